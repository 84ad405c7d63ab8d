"""
The client's side of phases 2 and 3: ask the relay, then fetch from peers,
failing over until one delivers a verified copy.

Peers are strangers and the relay's lists are the attacker's to fill, so
every step is bounded.  The holders the relay names come first, at most
``maxHolders`` of them per file; connections to them are raced as RFC 8305
races addresses -- a new attempt every ``STAGGER`` seconds, a few at once,
each given ``connectTimeout`` -- and the first that connects gets the GET
(the others are cancelled and wait their turn).  Its answer must describe
the size and SHA-256 the relay's index lists for that holder, arrive
promptly, and keep up ``speedLimit`` bytes/s over ``speedTime`` seconds.

If no holder delivers, the other active peers are tried too (within the
same budget), since the index may be stale; a copy from a peer the index
does not list is checked against the index's entries for the name when
there are any, and otherwise only against the sender's own hash, which the
user is told.  A peer that could not be reached at all is reported to the
relay, and only peers actually tried are.

A holder the relay lists as firewalled comes after the direct ones and is
reached through the relay (:mod:`.paths`: a reverse connection, else a
relayed one), with a longer setup budget; it is never reported dead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Awaitable, Callable, List, Optional, Sequence, Tuple

import attrs
from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from .. import wire
from ..addresses import AllRelaysFailed, NoSuchHost, TCPClient
from .download import Download, VerificationError
from .get import SPEED_LIMIT, SPEED_TIME, Accepted, GetProtocol
from .outcomes import (
    Attempt,
    Fetched,
    NotFetched,
    NoRelayReachable,
    NoUDP,
    PeerAddress,
    RelayNotFound,
    RelayUnreachable,
    describe,
    directFirst,
    notIndexed,
    unreachable,
)
from .paths import DIRECT, PathEndpoint, via
from .race import ATTEMPTS_AT_ONCE, STAGGER, Race
from .relay import IncompleteReply, ProofNeeded, Prover, queryReached

PEER_TIMEOUT = 10.0  # idle timeout of every connection
CONNECT_TIMEOUT = 3.0  # seconds to connect to a peer, and again for its status line
MAX_HOLDERS = 16  # peers contacted per file, at most
SOURCES = 4  # holders a multi-piece file is fetched from at once (--sources)
WALK = 8  # other active peers asked, at most, for a name the index lists no holder of (--walk)


Report = Callable[[str], None]
TransferFn = Callable[[PeerAddress, str, Download], Awaitable[None]]


class Fetcher:
    """
    Everything a client needs to get files: the relay, the reactor, limits.

    The TCP transfer (the default) races connections and checks each
    answer as it arrives; ``transfer`` swaps in another way to make one
    attempt against one peer (UDP), tried one peer after another, its
    result checked against the index afterwards.  ``prover`` answers a
    private relay's challenge (see :func:`~p2prelay.client.relay.secretProver`).
    ``listen`` False (``--no-listen``): never accept a connection, so a
    firewalled peer is reached via the relay, not by a reverse connection.
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
        connectTimeout: float = CONNECT_TIMEOUT,
        speedLimit: float = SPEED_LIMIT,
        speedTime: float = SPEED_TIME,
        maxHolders: int = MAX_HOLDERS,
        attemptsAtOnce: int = ATTEMPTS_AT_ONCE,
        stagger: float = STAGGER,
        prover: Optional[Prover] = None,
        sources: int = SOURCES,
        runInThread: Optional[Callable[..., Deferred]] = None,
        walk: int = WALK,
        listen: bool = True,
    ) -> None:
        self.reactor = reactor
        self.relay = relay
        self.timeout = timeout
        self.report = report
        self.verbose = verbose
        self.transfer = transfer
        self.connectTimeout = connectTimeout
        self.speedLimit = speedLimit
        self.speedTime = speedTime
        self.maxHolders = maxHolders
        self.attemptsAtOnce = attemptsAtOnce
        self.stagger = stagger
        self.prover = prover
        # Node ids never to fetch from: a peer's own node, in p2p-peer.
        self.exclude = frozenset(exclude)
        self.peerEndpoint = peerEndpoint or self._endpoint
        self.sources = sources
        self.walk = walk
        self.listen = listen
        # A reverse connection never came: we cannot be reached, so every
        # later firewalled peer of this session goes straight to the relay.
        self.reverseTimedOut = False
        self.runInThread = runInThread or _threadRunner(reactor)
        # Told each download as it starts (its name, bytes received, total
        # and peers: a _FetchAttempt), e.g. to show its progress.
        self.onTransfer: Callable[[object], None] = lambda transfer: None

    def _endpoint(self, peer: PeerAddress):
        """
        Where to connect for ``peer``.  An address is dialled at once; only
        a host name goes through a resolver (a thread), whose delay would
        otherwise let a later attempt overtake it in the race.  Plain TCP
        never imports twisted.internet.endpoints (and with it the TLS stack).
        A firewalled peer is reached through the relay (:class:`~.paths.PathEndpoint`).
        """
        if peer.firewalled:
            return PathEndpoint(self, peer)
        return TCPClient(self.reactor, peer.host, peer.port, timeout=self.connectTimeout)

    async def ask(self, payload: bytes, at=None):
        """
        The relay's reply to ``payload``: asked of ``at`` (one relay's
        endpoint) when given, else of the relay (or the relays, in turn).
        """
        return (await self._askReached(payload, at))[0]

    async def _askReached(self, payload: bytes, at=None):
        """:meth:`ask`, and the endpoint of the relay that answered."""
        try:
            return await queryReached(
                self.relay if at is None else at, payload, self.reactor, self.timeout, self.prover
            )
        except AllRelaysFailed as e:
            raise NoRelayReachable(str(e)) from None
        except NoSuchHost as e:
            raise RelayNotFound(str(e)) from None
        except (error.ConnectError, error.TimeoutError, IncompleteReply) as e:
            raise RelayUnreachable(describe(e)) from None
        except ProofNeeded as e:
            # A private relay, and no --secret-file: the relay's refusal.
            raise wire.ProtocolError(wire.UNAUTHORIZED, str(e)) from None

    def _peerList(self, reply, at=None) -> List[PeerAddress]:
        """The PEER items of ``reply`` (from the relay ``at``), but for excluded nodes."""
        peers = [PeerAddress.fromMessage(m) for m in reply.items if m.word == wire.PEER]
        if at is not None and at is not self.relay:
            peers = [attrs.evolve(p, relay=at) for p in peers]
        return [p for p in peers if p.node not in self.exclude]

    async def peers(self) -> List[PeerAddress]:
        return self._peerList(*await self._askReached(wire.request(wire.PEERS)))

    async def holders(self, name: str) -> List[PeerAddress]:
        """
        The relay's holders of ``name``: the direct ones first, then the
        firewalled ones; each remembers the relay that listed it.
        """
        return directFirst(self._peerList(*await self._askReached(wire.request(wire.WHOHAS, name=name))))

    async def holdersOfRoot(self, root: str) -> List[Tuple[str, PeerAddress]]:
        """
        The relay's holders of the bytes whose manifest root is ``root``,
        under any name (``WHOHAS root=``): (the name each holds them under,
        the peer), the direct ones first.  An older relay refuses the
        question (a :class:`wire.ProtocolError`, 400).
        """
        reply, at = await self._askReached(wire.request(wire.WHOHAS, root=root))
        named: List[Tuple[str, PeerAddress]] = []
        for message in reply.items:
            if message.word != wire.PEER:
                continue
            try:
                name = message.name()
            except wire.ProtocolError:
                continue  # no name= (or an unusable one): nothing to ask it for
            [peer] = self._peerList(attrs.evolve(reply, items=[message]), at) or [None]
            if peer is not None:
                named.append((name, peer))
        return [x for x in named if not x[1].firewalled] + [x for x in named if x[1].firewalled]

    async def search(self, pattern: str, limit: Optional[int] = None):
        reply = await self.ask(wire.request(wire.SEARCH, pattern=pattern, limit=limit))
        truncated = bool(reply.end and reply.end.get("truncated") == "1")
        return [m for m in reply.items if m.word == wire.FILE], truncated

    async def reportDead(self, peer: PeerAddress) -> None:
        try:
            await self.ask(wire.request(wire.DEAD, host=peer.host, port=peer.port), at=peer.relay)
        except Exception as e:
            self.log.debug("could not report {peer}: {error}", peer=str(peer), error=e)

    async def transferUDP(
        self, peer: PeerAddress, name: str, sink: Download, blockSize: Optional[int] = None
    ) -> None:
        """
        One attempt over UDP (``blockSize`` bytes a block, by default
        ``udp.fetchUDP``'s: 1400, or 60 KiB towards a loopback address).
        Silence is not reported to the relay as a dead peer: UDP may be
        filtered where TCP is not.  A firewalled peer is not tried: no path
        through the relay carries UDP.
        """
        from .. import udp  # only a UDP fetch needs the UDP code

        if peer.udp is None:
            raise NoUDP("peer serves no UDP")
        if peer.firewalled:
            raise NoUDP("peer is firewalled: UDP needs a direct path")
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
        resume: Optional[bool] = None,
    ) -> Fetched:
        """
        Fetch ``name`` to ``final``, never over an existing file unless
        ``force``.

        With ``resume`` True or False (p2p-fetch -o), a file of two pieces
        or more whose holders list a root goes piece by piece (from up to
        :attr:`sources` holders at once) into ``NAME.part`` beside
        ``final``, with a journal of the verified pieces: a failed or
        interrupted download keeps both, and the next save of the same name
        and root with ``resume`` fetches only the missing pieces;
        ``resume=False`` (``--no-resume``) starts over.  With ``resume``
        None (p2p-peer, saving into a folder its node shares, whose scan
        would announce a ``NAME.part``), and for anything else, it goes as before: into a temporary file, renamed into
        place only once verified, nothing left behind when it fails, not
        even the folders made for it; ``onStart`` sees that download, e.g.
        to show its progress.  Cancelling raises :class:`~.swarm.Interrupted`.
        """
        wire.checkName(name)
        holders = await self.holders(name)
        if self.transfer is None and resume is not None:
            from .manifest import planPieces
            from .swarm import savePieces

            attempt = _FetchAttempt(self, name, None)
            plan = await planPieces(attempt, holders)
            if plan is not None:
                return await savePieces(attempt, *plan, final, force=force, resume=resume)
        sink = Download(final.parent, _threads(self.reactor), name=name)
        onStart(sink)
        try:
            result = await self.fetch(name, sink, holders=holders)
            sink.commit(final, force=force)
        except CancelledError:
            sink.discard()
            raise _interrupted(name, sink) from None
        except BaseException:
            sink.discard()
            raise
        return result

    async def stream(
        self, name: str, writer, makeSink: Callable[[], Download]
    ) -> Tuple[Fetched, Optional[Download]]:
        """
        Fetch ``name`` for stdout.  A file of two pieces or more whose
        holders list a root, with :attr:`sources` above 1, is written to
        ``writer`` (the console's stdout stream) piece by piece in order as
        each verifies, and ``(result, None)`` returned; anything else goes
        into ``makeSink()`` as before, returned verified for the caller to
        print.  Cancelling raises :class:`~.swarm.Interrupted`.
        """
        wire.checkName(name)
        holders = await self.holders(name)
        if self.transfer is None and self.sources > 1:
            from .manifest import planPieces
            from .swarm import streamPieces

            attempt = _FetchAttempt(self, name, None)
            plan = await planPieces(attempt, holders)
            if plan is not None:
                return await streamPieces(attempt, *plan, writer), None
        sink = makeSink()
        try:
            return await self.fetch(name, sink, holders=holders), sink
        except CancelledError:
            sink.discard()
            raise _interrupted(name, sink) from None
        except BaseException:
            sink.discard()
            raise

    async def fetch(
        self, name: str, sink: Download, holders: Optional[List[PeerAddress]] = None
    ) -> Fetched:
        """
        Fetch ``name`` into ``sink``, verified, trying peer after peer
        (the ``holders`` the relay lists, asked for unless given).

        Raises :class:`RelayUnreachable`, :class:`NotFetched`, or
        :class:`~p2prelay.client.download.NoSpace` when no listed copy fits.
        """
        wire.checkName(name)
        sink.name = sink.name or name
        attempt = _FetchAttempt(self, name, sink)
        return await attempt.run(holders)


def _threadRunner(reactor) -> Callable[..., Deferred]:
    """Run blocking work on the reactor's thread pool, or at once without threads (tests)."""
    from twisted.internet.interfaces import IReactorThreads

    if IReactorThreads.providedBy(reactor):
        from twisted.internet.threads import deferToThreadPool

        return lambda f, *args, **kw: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kw)
    from twisted.internet.defer import maybeDeferred

    return maybeDeferred


def _threads(reactor):
    """The reactor, if a Download may write on threads of its own and call back into it."""
    from twisted.internet.interfaces import IReactorThreads

    return reactor if IReactorThreads.providedBy(reactor) else None


def _interrupted(name: str, sink: Download):
    from .swarm import Interrupted

    return Interrupted(name, 0, sink.expectedSize or 0)


class _FetchAttempt:
    """One file's fetch: the candidates, the budget, the failed attempts."""

    def __init__(self, fetcher: Fetcher, name: str, sink: Optional[Download]) -> None:
        self.fetcher = fetcher
        self.clock = fetcher.reactor
        self.name = name
        self.sink = sink
        self.started = time.monotonic()
        self.attempts: List[Attempt] = []
        self.contacted: set[Tuple[str, int]] = set()
        self.reports: List[Deferred] = []
        self.reported: set[Tuple[str, int]] = set()
        # Every (size, sha256) the index lists for the name.
        self.indexed: frozenset = frozenset()
        # For a progress display: the peer sending now, the pieces engine.
        self.current: Optional[PeerAddress] = None
        self.engine = None
        self.listedSize: Optional[int] = None
        # Other peers asked for a name the index lists no holder of (None: no walk).
        self.walked: Optional[int] = None
        # (host, port) -> the path its last connection took (see .paths).
        self.paths: dict[Tuple[str, int], str] = {}

    @property
    def received(self) -> int:
        """Bytes of the file received so far (verified pieces and pieces in flight)."""
        if self.engine is not None:
            return self.engine.bytesDone()
        return self.sink.received if self.sink is not None else 0

    @property
    def total(self) -> Optional[int]:
        """The file's size, once known."""
        if self.engine is not None:
            return self.engine.manifest.size
        if self.sink is not None and self.sink.expectedSize is not None:
            return self.sink.expectedSize
        return self.listedSize

    @property
    def peers(self) -> List[str]:
        """The peers sending now."""
        if self.engine is not None:
            return self.engine.activePeers()
        return [str(self.current)] if self.current is not None else []

    def budget(self, candidates: Sequence[PeerAddress]) -> List[PeerAddress]:
        """Candidates not yet contacted, within what is left of maxHolders."""
        fresh: List[PeerAddress] = []
        seen = set(self.contacted)
        for peer in candidates:
            key = (peer.host, peer.port)
            if key not in seen:
                seen.add(key)
                fresh.append(peer)
        room = max(self.fetcher.maxHolders - len(self.contacted), 0)
        return fresh[:room]

    def accepted(self, peer: PeerAddress) -> Optional[Accepted]:
        """What a whole-file answer from ``peer`` may announce (None: anything)."""
        if peer.listed is not None:
            return frozenset([peer.listed])
        return self.indexed or None

    async def run(self, holders: Optional[List[PeerAddress]] = None) -> Fetched:
        f = self.fetcher
        name = self.name
        if holders is None:
            holders = await f.holders(name)
        self.indexed = frozenset(p.listed for p in holders if p.listed is not None)
        self.listedSize = next(iter(self.indexed))[0] if len(self.indexed) == 1 else None
        f.onTransfer(self)
        candidates = self.budget(holders)
        if holders:
            dropped = len(holders) - len(candidates)
            f.verbose(
                f"relay: {len(holders)} peer(s) hold {name}: "
                + ", ".join(str(p) for p in candidates)
                + (f" (and {dropped} more, beyond --max-holders)" if dropped else "")
            )
            sizes = [p.size for p in candidates if p.size is not None]
            if sizes:
                self.sink.checkSpace(min(sizes))
        else:
            f.verbose(f"relay: no registered peer holds {name}; asking every active peer")
        try:
            winner = await self.tryAll(candidates)
            if winner is None:
                winner = await self.tryOthers(holders)
        finally:
            for d in self.reports:
                await d
        if winner is None:
            if not holders and (self.walked or not f.walk):
                asked = f"asked {self.walked} other peer{'' if self.walked == 1 else 's'}"
                why = f"not in the index; {asked}" if f.walk else "not in the index (--walk 0: no other peer asked)"
                raise NotFetched(name, self.attempts, why, notIndexed=True)
            raise NotFetched(name, self.attempts)
        if winner.listed is None and not self.indexed:
            f.report(notIndexed(name))
        size, sha256 = self.sink.expectedSize, self.sink.expectedHash
        if size is None or sha256 is None:  # tryAll verified both; never a traceback though
            raise NotFetched(name, self.attempts, "the copy could not be verified")
        return Fetched(
            name=name,
            size=size,
            sha256=sha256,
            peer=str(winner),
            attempts=self.attempts,
            seconds=time.monotonic() - self.started,
            path=self.paths.get((winner.host, winner.port), DIRECT),
        )

    async def tryOthers(self, holders: List[PeerAddress]) -> Optional[PeerAddress]:
        f = self.fetcher
        if len(self.contacted) >= f.maxHolders or (not holders and f.walk <= 0):
            return None
        try:
            everyone = await f.peers()
        except RelayUnreachable as e:
            if not self.attempts:
                raise
            raise NotFetched(
                self.name, self.attempts, f"every holder failed and the relay went away ({e})"
            ) from None
        listed = {(p.host, p.port) for p in holders}
        # Strangers to the index: what they hold is not what the relay lists.
        others = self.budget(
            directFirst(
                [attrs.evolve(p, size=None, sha256=None) for p in everyone if (p.host, p.port) not in listed]
            )
        )
        if not holders:
            # A name nobody is listed for: a walk of a few peers, not a flood of
            # every one; their 404s are one summary, not a line each.
            others = others[: max(f.walk, 0)]
            self.walked = len(others)
        if others and holders:
            f.verbose(f"trying the {len(others)} other active peer(s)")
        return await self.tryAll(others)

    def failed(self, peer: PeerAddress, e: BaseException) -> None:
        """Record and tell one failed attempt; report an unreachable peer."""
        reason = describe(e)
        self.attempts.append(Attempt(str(peer), reason))
        if self.walked is not None and isinstance(e, wire.ProtocolError) and e.status == wire.NOT_FOUND:
            self.fetcher.verbose(f"peer {peer}: {reason}, trying next")  # summed up at the end
        else:
            self.fetcher.report(f"peer {peer}: {reason}, trying next")
        if unreachable(e):
            self.reportUnreachable(peer)

    def reportUnreachable(self, peer: PeerAddress) -> None:
        """
        Tell the relay (once) that nothing answers at ``peer``; never for a
        firewalled one, which is not meant to answer there.
        """
        if peer.firewalled:
            return
        key = (peer.host, peer.port)
        if key not in self.reported:
            self.reported.add(key)
            self.reports.append(Deferred.fromCoroutine(self.fetcher.reportDead(peer)))

    async def settle(self) -> None:
        """Wait for the reports to the relay to be sent."""
        reports, self.reports = self.reports, []
        for d in reports:
            await d

    def checkIndexed(self, peer: PeerAddress) -> None:
        """The verified copy is what the index lists for ``peer`` (or for the name)."""
        accept = self.accepted(peer)
        got = (self.sink.expectedSize, self.sink.expectedHash)
        if accept is not None and got not in accept:
            raise VerificationError("the copy is not the file the relay lists")

    async def tryAll(self, candidates: List[PeerAddress]) -> Optional[PeerAddress]:
        if self.fetcher.transfer is not None:
            return await self.tryInTurn(candidates)
        queue = list(candidates)
        while queue:
            connected = await self.race(queue)
            if connected is None:
                return None
            peer, proto = connected

            async def get(proto: GetProtocol = proto) -> None:
                proto.begin()
                await proto.deferred

            if await self.attempt(peer, get):
                return peer
        return None

    async def tryInTurn(self, candidates: List[PeerAddress]) -> Optional[PeerAddress]:
        """One peer after another through ``transfer`` (UDP)."""
        transfer = self.fetcher.transfer
        assert transfer is not None
        for peer in candidates:
            self.contacted.add((peer.host, peer.port))
            if await self.attempt(peer, lambda peer=peer: transfer(peer, self.name, self.sink)):
                return peer
        return None

    async def attempt(self, peer: PeerAddress, transfer: Callable[[], Awaitable[None]]) -> bool:
        """
        One attempt at ``peer`` into a clean sink, however the bytes travel:
        True once the copy is verified against the index, else the failure
        is recorded (and reported) and False.
        """
        await self.sink.flushed()
        self.sink.reset()
        self.current = peer
        path = self.paths.get((peer.host, peer.port))
        self.fetcher.verbose(f"fetching {self.name} from {peer}{via(path)}")
        try:
            await transfer()
            await self.sink.flushed()
            self.sink.verify()
            self.checkIndexed(peer)
            return True
        except Exception as e:
            self.failed(peer, e)
            return False

    def race(self, queue: List[PeerAddress]) -> "Deferred[Optional[Tuple[PeerAddress, GetProtocol]]]":
        """
        Connect to the peers at the head of ``queue``, staggered, and fire
        with the first that connects (its GET not yet sent), or None when
        every one failed.  Peers whose attempts were cancelled because
        another won go back to the head of the queue, in order.
        """
        return Race(self, queue).result
