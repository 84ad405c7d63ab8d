"""
The client's side of phases 2 and 3: ask the relay, then fetch from peers
one at a time, failing over until one delivers a verified copy.

The peers the relay names as holders come first; if none delivers, every
other active peer is tried too, since the relay's index may be stale.  A
peer that cannot be reached at all is reported to the relay so the next
client does not wait on it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Awaitable, Callable, List, Optional, Sequence

import attrs
from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

from .. import udp, wire
from ..negotiation import IncompleteAnswer, negotiate
from .download import Download, VerificationError
from .get import GetProtocol
from .relay import IncompleteReply, query

PEER_TIMEOUT = 10.0


class NoUDP(Exception):
    """The peer did not register a UDP port, or does not answer on it."""


class RelayUnreachable(Exception):
    """The relay could not be asked at all (refused, timed out, no route)."""


class NotFetched(Exception):
    """Every candidate peer was tried and none delivered the file."""

    def __init__(self, name: str, attempts: Sequence["Attempt"], why: str = "") -> None:
        super().__init__(name)
        self.name = name
        self.attempts = list(attempts)
        notFound = [a for a in attempts if a.error.startswith(f"{wire.NOT_FOUND} ")]
        if why:
            self.why = why
        elif not attempts:
            self.why = "no active peer holds it"
        elif len(notFound) == len(attempts):
            self.why = f"not found on any of the {len(attempts)} active peers"
        else:
            self.why = f"all {len(attempts)} peers that might have it failed"


@attrs.frozen
class PeerAddress:
    host: str
    port: int
    node: str = ""
    udp: Optional[int] = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def fromMessage(cls, message: wire.Message) -> "PeerAddress":
        udp = message.get("udp")
        return cls(
            host=message.require("host"),
            port=message.port(),
            node=message.get("node", "") or "",
            udp=message.port("udp") if udp else None,
        )


@attrs.frozen
class Attempt:
    peer: str
    error: str


@attrs.frozen
class Fetched:
    name: str
    size: int
    sha256: str
    peer: str
    attempts: List[Attempt]
    seconds: float


def describe(e: BaseException) -> str:
    """A short, user-facing reason for a failed attempt."""
    if isinstance(e, wire.ProtocolError):
        return f"{e.status} {e.message}"
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (error.TimeoutError, error.TCPTimedOutError)):
        return "timed out"
    if isinstance(e, error.DNSLookupError):
        return "unknown host"
    if isinstance(e, (IncompleteAnswer, VerificationError, NoUDP)):
        return str(e)
    if isinstance(e, error.ConnectError):
        return (e.osError and str(e.osError)) or e.__class__.__name__
    return str(e) or e.__class__.__name__


def unreachable(e: BaseException) -> bool:
    """Errors meaning nothing listens there (as opposed to a bad answer)."""
    return isinstance(
        e,
        (
            error.ConnectionRefusedError,
            error.TimeoutError,
            error.TCPTimedOutError,
            error.NoRouteError,
            error.DNSLookupError,
        ),
    )


Report = Callable[[str], None]
TransferFn = Callable[[PeerAddress, str, Download], Awaitable[None]]


class Fetcher:
    """
    Everything a client needs to get files: the relay, the reactor, limits.

    ``transfer`` performs one attempt against one peer; the TCP one is the
    default and a UDP one can be swapped in without touching the failover.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        relay,
        *,
        timeout: float = PEER_TIMEOUT,
        report: Report = lambda line: None,
        verbose: Report = lambda line: None,
        transfer: Optional[TransferFn] = None,
        peerEndpoint: Optional[Callable[[PeerAddress], object]] = None,
        exclude: Sequence[str] = (),
    ) -> None:
        self.reactor = reactor
        self.relay = relay
        self.timeout = timeout
        self.report = report
        self.verbose = verbose
        self.transfer = transfer or self.transferTCP
        # Node ids never to fetch from: a peer's own node, in p2p-peer.
        self.exclude = frozenset(exclude)
        self.peerEndpoint = peerEndpoint or (
            lambda peer: HostnameEndpoint(reactor, peer.host, peer.port, timeout=self.timeout)
        )

    async def ask(self, payload: bytes):
        try:
            return await query(self.relay, payload, self.reactor, self.timeout)
        except (error.ConnectError, error.TimeoutError, IncompleteReply) as e:
            raise RelayUnreachable(describe(e)) from None

    def _peerList(self, reply) -> List[PeerAddress]:
        peers = [PeerAddress.fromMessage(m) for m in reply.items if m.word == wire.PEER]
        return [p for p in peers if p.node not in self.exclude]

    async def peers(self) -> List[PeerAddress]:
        return self._peerList(await self.ask(wire.request(wire.PEERS)))

    async def holders(self, name: str) -> List[PeerAddress]:
        return self._peerList(await self.ask(wire.request(wire.WHOHAS, name=name)))

    async def search(self, pattern: str, limit: Optional[int] = None):
        reply = await self.ask(wire.request(wire.SEARCH, pattern=pattern, limit=limit))
        truncated = bool(reply.end and reply.end.get("truncated") == "1")
        return [m for m in reply.items if m.word == wire.FILE], truncated

    async def reportDead(self, peer: PeerAddress) -> None:
        try:
            await self.ask(wire.request(wire.DEAD, host=peer.host, port=peer.port))
        except Exception as e:
            self.log.debug("could not report {peer}: {error}", peer=str(peer), error=e)

    async def transferTCP(self, peer: PeerAddress, name: str, sink: Download) -> None:
        await negotiate(self.peerEndpoint(peer), GetProtocol(self.reactor, name, sink, self.timeout))

    async def transferUDP(
        self, peer: PeerAddress, name: str, sink: Download, blockSize: int = udp.DEFAULT_BLOCK
    ) -> None:
        """
        One attempt over UDP.  Silence is not reported to the relay as a
        dead peer: UDP may be filtered where TCP is not.
        """
        if peer.udp is None:
            raise NoUDP("peer serves no UDP")
        host = peer.host
        if not (isIPAddress(host) or isIPv6Address(host)):
            host = await self.reactor.resolve(host)
        try:
            result = await udp.fetchUDP(
                self.reactor, host, peer.udp, name, sink, timeout=self.timeout, blockSize=blockSize
            )
        except error.TimeoutError:
            raise NoUDP(f"no answer over UDP (port {peer.udp})") from None
        except udp.UDPTransferError as e:
            raise NoUDP(f"UDP transfer failed: {e}") from None
        sink.expect(result.size, result.sha256)

    async def save(
        self,
        name: str,
        final: Path,
        *,
        force: bool = False,
        onStart: Callable[[Download], None] = lambda sink: None,
    ) -> Fetched:
        """
        Fetch ``name`` to ``final``: into a temporary file beside it, renamed
        into place only once verified (never over an existing file unless
        ``force``).  Nothing is left behind when it fails.  ``onStart``
        sees the download, e.g. to show its progress.
        """
        sink = Download(final.parent, self.reactor)
        onStart(sink)
        try:
            result = await self.fetch(name, sink)
            sink.commit(final, force=force)
        except BaseException:
            sink.discard()
            raise
        return result

    async def fetch(self, name: str, sink: Download) -> Fetched:
        """
        Fetch ``name`` into ``sink``, verified, trying peer after peer.

        Raises :class:`RelayUnreachable` or :class:`NotFetched`.
        """
        wire.checkName(name)
        started = time.monotonic()
        attempts: List[Attempt] = []
        tried: set[tuple[str, int]] = set()
        holders = await self.holders(name)
        if holders:
            self.verbose(
                f"relay: {len(holders)} peer(s) hold {name}: "
                + ", ".join(str(p) for p in holders)
            )
        else:
            self.verbose(f"relay: no registered peer holds {name}; asking every active peer")

        async def tryAll(candidates: List[PeerAddress]) -> Optional[PeerAddress]:
            for peer in candidates:
                if (peer.host, peer.port) in tried:
                    continue
                tried.add((peer.host, peer.port))
                await sink.flushed()
                sink.reset()
                self.verbose(f"fetching {name} from {peer}")
                try:
                    await self.transfer(peer, name, sink)
                    await sink.flushed()
                    sink.verify()
                    return peer
                except Exception as e:
                    reason = describe(e)
                    attempts.append(Attempt(str(peer), reason))
                    self.report(f"peer {peer}: {reason}, trying next")
                    if unreachable(e):
                        await self.reportDead(peer)
            return None

        winner = await tryAll(holders)
        if winner is None:
            try:
                everyone = await self.peers()
            except RelayUnreachable as e:
                if not attempts:
                    raise
                raise NotFetched(
                    name, attempts, f"every holder failed and the relay went away ({e})"
                ) from None
            others = [p for p in everyone if (p.host, p.port) not in tried]
            if others and holders:
                self.verbose(f"trying the {len(others)} other active peer(s)")
            winner = await tryAll(others)
        if winner is None:
            raise NotFetched(name, attempts)
        assert sink.expectedHash is not None and sink.expectedSize is not None
        return Fetched(
            name=name,
            size=sink.expectedSize,
            sha256=sink.expectedHash,
            peer=str(winner),
            attempts=attempts,
            seconds=time.monotonic() - started,
        )
