"""
A file's manifest, and the plan of a fetch piece by piece.

The relay lists, for each holder of a name, the size, SHA-256 and *root*
of what it holds (see :mod:`p2prelay.pieces`).  Holders with the same root
hold the same bytes, so :func:`planPieces`

1. groups the holders by (root, size, SHA-256) and takes the group most of
   them are in (a tie goes to the group listed first): another root is
   another version of the file;
2. asks one holder of the group for the manifest (``MANIFEST name=``, with
   :class:`ManifestProtocol`) and uses it only if its root is the one the
   relay lists -- a holder whose manifest does not match is a failed
   holder, and the next one is asked;
3. asks the relay for the holders of that root under *other* names
   (``WHOHAS root=``): the same bytes, so more sources, each asked for
   pieces under its own name (:class:`OtherName`) and every piece checked
   against the same manifest.  A relay too old to know ``root=`` answers
   400, which only means no more sources.

The pieces themselves are :mod:`.swarm`'s business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

import attrs
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime

from .. import pieces, wire
from ..negotiation import IncompleteAnswer, OneShotClient, negotiate
from .download import VerificationError, human
from .outcomes import PeerAddress, describe, unreachable

if TYPE_CHECKING:
    from .fetcher import _FetchAttempt

MIN_PIECES = 2  # files of fewer pieces are fetched in one request, from one peer


@attrs.frozen
class Manifest:
    """A file's layout, as a holder sent it and as the relay's root vouches for."""

    size: int
    sha256: str
    root: str
    pieceSize: int
    digests: Sequence[bytes] = attrs.field(repr=False)

    @property
    def count(self) -> int:
        return len(self.digests)

    def range(self, index: int) -> Tuple[int, int]:
        return pieces.pieceRange(index, self.size, self.pieceSize)


def groupByRoot(holders: Iterable) -> List[Tuple[Tuple[str, int, str], list]]:
    """
    Holders listed with a root, grouped by (root, size, sha256): the group
    most holders are in first, a tie in the order first listed.  Holders
    listed without a root are left out.
    """
    groups: Dict[Tuple[str, int, str], list] = {}
    for peer in holders:
        if peer.root is None or peer.size is None or peer.sha256 is None:
            continue
        groups.setdefault((peer.root, peer.size, peer.sha256), []).append(peer)
    order = list(groups)
    return sorted(groups.items(), key=lambda item: (-len(item[1]), order.index(item[0])))


@attrs.frozen
class OtherName(PeerAddress):
    """A holder of the same bytes (the same root) under another name: its pieces are asked for as ``name``."""

    name: str = attrs.field(default="", eq=False)


class ManifestProtocol(OneShotClient[Manifest]):
    """
    ``P2P/1 MANIFEST name=NAME``, answered ``200 size= sha256= root= piece=
    count=`` and then exactly count * 32 raw bytes.  The answer must be the
    file the relay lists (size, SHA-256, root), its layout one we accept
    (:func:`pieces.checkLayout`), and the digests must hash to the root.
    """

    role = "peer"

    def __init__(
        self,
        clock: IReactorTime,
        name: str,
        size: int,
        sha256: str,
        root: str,
        timeout: float,
        answerTimeout: Optional[float] = None,
    ) -> None:
        super().__init__(clock, timeout)
        self.name = name
        self.listed = (size, sha256, root)
        self.answerTimeout = answerTimeout
        self._answerCall = None
        self._layout: Optional[Tuple[int, int]] = None  # (pieceSize, count)
        self._body = bytearray()
        self._need = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.answerTimeout is not None:
            self._answerCall = self.clock.callLater(self.answerTimeout, self._noAnswer)
        self.transport.write(wire.request(wire.MANIFEST, name=self.name))

    def _noAnswer(self) -> None:
        self._answerCall = None
        from twisted.internet.error import TimeoutError

        self.fail(TimeoutError(f"no manifest from the peer within {self.answerTimeout:g} seconds"))
        self.transport.abortConnection()

    def _cancelAnswer(self) -> None:
        if self._answerCall is not None and self._answerCall.active():
            self._answerCall.cancel()
        self._answerCall = None

    def messageReceived(self, message: wire.Message) -> None:
        if self._layout is not None:
            return  # raw mode from here on
        self._cancelAnswer()
        refusal = message.refusal()
        if refusal is not None:
            self.fail(refusal)
            return
        size = message.integer("size")
        digest = message.sha256()
        root = message.sha256("root")
        pieceSize = message.integer("piece")
        count = message.integer("count", high=pieces.MAX_PIECES)
        if (size, digest, root) != self.listed:
            self.fail(VerificationError("the peer's manifest is for another file than the relay lists"))
            return
        try:
            expected = pieces.checkLayout(size, pieceSize)
        except ValueError as e:
            self.fail(VerificationError(f"unusable manifest: {e}"))
            return
        if count != expected:
            raise wire.ProtocolError(wire.BAD_REQUEST, f"{count} pieces for {size} bytes in pieces of {pieceSize}")
        self._layout = (pieceSize, count)
        self._need = count * pieces.DIGEST_BYTES
        if self._need == 0:
            self._done()
        else:
            self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self._body += data[: self._need - len(self._body)]
        if len(self._body) == self._need:
            self._done()

    def _done(self) -> None:
        assert self._layout is not None
        pieceSize, count = self._layout
        size, sha256, root = self.listed
        digests = pieces.decodeDigests(bytes(self._body), count)
        if pieces.rootOf(size, pieceSize, digests) != root:
            self.fail(VerificationError("the peer's manifest does not match the root the relay lists"))
            return
        self.succeed(Manifest(size, sha256, root, pieceSize, digests))

    def conclude(self) -> None:
        super().conclude()
        self._cancelAnswer()

    def incomplete(self, reason: object) -> IncompleteAnswer:
        if self._layout is not None:
            return IncompleteAnswer(f"connection lost after {len(self._body)} of {self._need} manifest bytes")
        return IncompleteAnswer("peer closed the connection without answering")


async def planPieces(attempt: "_FetchAttempt", holders: List[PeerAddress]):
    """
    ``(manifest, holders)`` when ``name`` goes piece by piece: the
    holders of the root most of them list, if the file has two pieces
    or more and one of them sent a manifest that matches the root; else
    None (the file goes in one request from one peer, as before).
    """
    f = attempt.fetcher
    groups = groupByRoot(holders)
    if not groups:
        return None
    (root, size, sha256), group = groups[0]
    if size < MIN_PIECES * group[0].piece:
        return None
    group = group[: f.maxHolders]
    if len(groups) > 1:
        f.verbose(
            f"relay: {len(groups[0][1])} holder(s) of {attempt.name} hold the version most do "
            f"(root {root[:12]}...); the others hold another version and are not used"
        )
    plan = await fetchManifest(attempt, group, size, sha256, root)
    if plan is None:
        return None
    manifest, good = plan
    room = max(0, f.maxHolders - len(good))
    more = await otherNames(attempt, manifest, group, room) if room else []
    return manifest, good + more


async def otherNames(
    attempt: "_FetchAttempt", manifest: Manifest, known: List[PeerAddress], room: int
) -> List[OtherName]:
    """
    At most ``room`` of the relay's holders of ``manifest``'s root under
    names other than the one fetched, not among ``known``, as
    :class:`OtherName`; none when the
    relay does not know ``WHOHAS root=`` (400) or cannot be asked.
    """
    f = attempt.fetcher
    try:
        found = await f.holdersOfRoot(manifest.root)
    except CancelledError:
        raise
    except wire.ProtocolError as e:
        if e.status != wire.BAD_REQUEST:  # 400: an older relay, which asks for name=
            f.verbose(f"relay: no holders of the same content under other names ({describe(e)})")
        return []
    except Exception as e:
        f.verbose(f"relay: no holders of the same content under other names ({describe(e)})")
        return []
    nodes = {p.node for p in known if p.node}
    addresses = {(p.host, p.port) for p in known}
    layout = (manifest.root, manifest.size, manifest.sha256, manifest.pieceSize)
    more: List[OtherName] = []
    for name, peer in found:
        if name == attempt.name or (peer.root, peer.size, peer.sha256, peer.piece) != layout:
            continue
        if peer.node in nodes or (peer.host, peer.port) in addresses:
            continue
        nodes.add(peer.node)
        addresses.add((peer.host, peer.port))
        more.append(OtherName(**{a.name: getattr(peer, a.name) for a in attrs.fields(PeerAddress)}, name=name))
        if len(more) >= room:
            break
    if more:
        f.verbose(f"relay: {len(more)} more holder(s) of the same content under other names")
    return more

async def fetchManifest(attempt: "_FetchAttempt", group: List[PeerAddress], size: int, sha256: str, root: str):
    """The manifest from the first holder in ``group`` that sends one matching ``root``."""
    f = attempt.fetcher
    good = list(group)
    for peer in group:
        proto = ManifestProtocol(
            attempt.clock, attempt.name, size, sha256, root, f.timeout, answerTimeout=f.connectTimeout
        )
        try:
            manifest = await negotiate(f.peerEndpoint(peer), proto)
        except CancelledError:
            raise
        except VerificationError as e:
            attempt.failed(peer, e)  # a bad manifest: a failed holder
            good.remove(peer)
            continue
        except Exception as e:
            if unreachable(e):
                attempt.failed(peer, e)
                good.remove(peer)
            else:  # no manifest here (an older node, a busy one): it may still serve pieces
                f.verbose(f"peer {peer}: no manifest ({describe(e)})")
            continue
        f.verbose(
            f"manifest of {attempt.name} from {peer}: {manifest.count} pieces of {human(manifest.pieceSize)}"
        )
        return manifest, good
    await attempt.settle()
    return None
