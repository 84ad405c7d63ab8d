"""
Multi-source downloads: one file's pieces from several holders at once.

Given the manifest (:mod:`.manifest`), :class:`PieceFetch`
asks up to ``sources`` holders for pieces in parallel, one range GET
(``offset= length=``) per piece (under the holder's own name, for one
that holds the same bytes under another: :class:`~.manifest.OtherName`), each piece checked against its digest
as it lands (in a thread: hashing 4 MiB costs the reactor 2.5 ms);
which holder gets which piece is the :class:`~.schedule.Scheduler`'s
business (faster holders more pieces, a holder that sent a bad piece
dropped, a busy one benched, endgame duplicates cancelled).  Each
verified piece goes to an output (:mod:`.outputs`); :func:`savePieces`
and :func:`streamPieces` run the engine into the ``.part`` or to stdout.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import pieces, wire
from ..negotiation import _OneShotFactory
from .download import NoSpace, VerificationError, freeSpace, human
from .get import GetProtocol
from .journal import CHANGED, NEW, RECHECKED, RESUMED, Journal
from .manifest import Manifest
from .outcomes import Attempt, Fetched, NotFetched, describe, unreachable
from .outputs import STREAM_WINDOW, JournalOutput, ReaderGone, StreamOutput
from .paths import DIRECT, via

if TYPE_CHECKING:
    from .fetcher import _FetchAttempt

PIECES_PER_HOLDER = 2  # pieces asked of one holder at once (one connection each)
MiB = 1024 * 1024


class Interrupted(CancelledError):
    """The download was cancelled (Ctrl-C); ``kept`` of ``total`` bytes stay for a resume."""

    def __init__(self, name: str, kept: int, total: int) -> None:
        super().__init__(name)
        self.name = name
        self.kept = kept
        self.total = total


@implementer(IConsumer)
class PieceBuffer:
    """One piece's bytes in memory, as :class:`GetProtocol` writes them."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.chunks: List[bytes] = []
        self.received = 0
        self.expectedSize: Optional[int] = None
        self.producer = None

    def expect(self, size: int, sha256: Optional[str]) -> None:
        if size != self.length:
            raise VerificationError(f"the peer offers {size} bytes for a piece of {self.length}")
        self.expectedSize = size

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        self.received += len(data)

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks = []
        return data


def pieceMatches(data: bytes, digest: bytes) -> bool:
    """Whether a piece's bytes hash to its digest (run in a thread)."""
    return pieces.pieceDigest(data) == digest


class PieceFetch:
    """
    The pieces of one file from a group of holders of the same root, into
    ``output``; :meth:`run` fires when every piece is verified and stored,
    or fails with :class:`~.fetcher.NotFetched` when no holder is left.
    Cancelling it cancels every request in flight.
    """

    log = Logger()

    def __init__(
        self,
        attempt,  # the fetcher's _FetchAttempt: reports and failed attempts
        manifest: Manifest,
        holders: Sequence,
        output,
        *,
        sources: int,
        window: Optional[int] = None,
    ) -> None:
        from .schedule import Scheduler

        self.attempt = attempt
        self.fetcher = attempt.fetcher
        self.clock = self.fetcher.reactor
        self.name = attempt.name
        self.manifest = manifest
        self.output = output
        self.scheduler = Scheduler(
            manifest.count,
            self.clock.seconds,
            sources,
            pieceSize=manifest.pieceSize,
            window=window,
            have=output.have,
            maxInFlight=PIECES_PER_HOLDER,
        )
        self.peers = {}
        for peer in holders:
            key = (peer.host, peer.port)
            if key not in self.peers:
                self.peers[key] = peer
                self.scheduler.addHolder(key)
        self.requests: Dict[Tuple[int, tuple], Deferred] = {}
        self.buffers: Dict[Tuple[int, tuple], PieceBuffer] = {}  # the requests' bytes so far
        # Bytes of verified pieces (those kept from an earlier run too): for progress.
        self.verifiedBytes = sum(manifest.range(i)[1] for i in output.have)
        self.checking = 0
        self.delivered: Dict[tuple, int] = {}  # holder -> pieces it delivered
        self.paths: Dict[tuple, str] = {}  # holder -> the path its last connection took
        self.wake = None
        self.result: Deferred = Deferred(self._cancel)
        output.onDrain = self.pump

    @property
    def over(self) -> bool:
        return self.result.called

    def bytesDone(self) -> int:
        """Bytes verified, and received for pieces in flight (for a progress display)."""
        inFlight = sum(b.received for key, b in self.buffers.items() if key in self.requests)
        return min(self.manifest.size, self.verifiedBytes + inFlight)

    def activePeers(self) -> List[str]:
        """The holders with a request in flight, as host:port."""
        holders = dict.fromkeys(holder for _, holder in self.requests)
        return [str(self.peers[h]) for h in holders]

    def run(self) -> Deferred:
        self.pump()
        return self.result

    def pump(self) -> None:
        """Hand out what can be handed out; finish or fail when that is all."""
        if self.over:
            return
        s = self.scheduler
        if self.output.error is not None:
            self._fail(self.output.error)
            return
        if getattr(self.output, "closed", False):
            self._fail(ReaderGone())
            return
        if s.done:
            self._succeed()
            return
        if s.exhausted:
            self._exhausted()
            return
        if not self.output.full():
            for holder in s.holders:
                while not self.over:
                    piece = s.assign(holder)
                    if piece is None:
                        break
                    self._request(piece, holder)  # may fail at once, and pump again
        if self.over:
            return
        if self.requests or self.checking or self.output.full():
            return
        wake = s.nextWake()
        if wake is not None:
            if self.wake is None or not self.wake.active():
                self.wake = self.clock.callLater(max(0.0, wake - self.clock.seconds()), self._woken)
            return
        self._exhausted()

    def _woken(self) -> None:
        self.wake = None
        self.pump()

    def _request(self, piece: int, holder: tuple) -> None:
        f = self.fetcher
        peer = self.peers[holder]
        offset, length = self.manifest.range(piece)
        buffer = PieceBuffer(length)
        proto = GetProtocol(
            self.clock,
            getattr(peer, "name", None) or self.name,  # a holder of the same bytes under another name
            buffer,
            f.timeout,
            offset,
            length,
            answerTimeout=f.connectTimeout,
            speedLimit=f.speedLimit,
            speedTime=f.speedTime,
        )
        self.attempt.contacted.add(holder)
        try:
            endpoint = f.peerEndpoint(peer)
        except Exception as e:
            self._lost(Failure(e), piece, holder, None)
            return
        if hasattr(endpoint, "length"):  # a path through the relay: a piece, not the file
            endpoint.length = length
        d = Deferred.fromCoroutine(self._negotiate(endpoint, proto, holder))
        self.requests[(piece, holder)] = d
        self.buffers[(piece, holder)] = buffer
        d.addCallbacks(
            self._arrived, self._lost, callbackArgs=(piece, holder, buffer, d), errbackArgs=(piece, holder, d)
        )

    async def _negotiate(self, endpoint, proto: GetProtocol, holder: tuple) -> None:
        """One piece's request; the first connection to each holder says its path (-v)."""
        await endpoint.connect(_OneShotFactory(proto))
        path = getattr(endpoint, "path", None) or DIRECT
        if holder not in self.paths:
            peer = self.peers[holder]
            other = getattr(peer, "name", None)
            alias = f" (as {other})" if other and other != self.name else ""
            self.fetcher.verbose(f"fetching {self.name} from {peer}{alias}{via(path)}")
        self.paths[holder] = path
        return await proto.deferred

    def mainPath(self) -> str:
        """The path of the holder that delivered the most pieces."""
        if not self.delivered:
            return DIRECT
        main = max(self.delivered, key=lambda holder: self.delivered[holder])
        return self.paths.get(main, DIRECT)

    def _arrived(self, _: object, piece: int, holder: tuple, buffer: PieceBuffer, d: Deferred) -> None:
        if self.requests.get((piece, holder)) is not d:
            return
        del self.requests[(piece, holder)]
        self.buffers.pop((piece, holder), None)
        if self.over:
            return
        data = buffer.take()
        self.checking += 1
        check = self.fetcher.runInThread(pieceMatches, data, self.manifest.digests[piece])
        check.addCallback(self._checked, piece, holder, data)
        check.addErrback(self._bug)

    def _checked(self, good: bool, piece: int, holder: tuple, data: bytes) -> None:
        self.checking -= 1
        if self.over:
            return
        s = self.scheduler
        peer = self.peers[holder]
        if not good:
            self.attempt.attempts.append(_attempt(peer, f"piece {piece} failed its SHA-256"))
            self.fetcher.report(f"peer {peer}: sent a bad copy of piece {piece}; not using it again")
            self._cancelAll(holder, s.failed(piece, holder, corrupt=True))
            self.pump()
            return
        if s.isVerified(piece):
            self.pump()
            return
        for other in s.completed(piece, holder, len(data)):
            self._cancel1(piece, other)
        self.verifiedBytes += len(data)
        self.delivered[holder] = self.delivered.get(holder, 0) + 1
        self.output.store(piece, data)
        self.pump()

    def _lost(self, failure: Failure, piece: int, holder: tuple, d: Optional[Deferred]) -> None:
        if d is not None:
            if self.requests.get((piece, holder)) is not d:
                return  # cancelled by us: another copy won, or the holder was dropped
            del self.requests[(piece, holder)]
            self.buffers.pop((piece, holder), None)
        if self.over:
            return

        e = failure.value
        s = self.scheduler
        peer = self.peers[holder]
        reason = describe(e)
        self.attempt.attempts.append(_attempt(peer, reason))
        busy = isinstance(e, wire.ProtocolError) and e.status == wire.BUSY
        if unreachable(e):
            abandoned = s.removeHolder(holder)
            self.attempt.reportUnreachable(peer)
            self.fetcher.report(f"peer {peer}: {reason}; not using it again")
        elif busy:
            abandoned = s.failed(piece, holder, retryAfter=e.retry if e.retry is not None else 1.0)
            self.fetcher.verbose(f"peer {peer}: busy; trying other holders first")
        else:
            abandoned = s.failed(piece, holder)
            if s.isDropped(holder):
                self.fetcher.report(f"peer {peer}: {reason}; not using it again")
            else:
                self.fetcher.verbose(f"peer {peer}: {reason} (piece {piece}); asking another holder")
        self._cancelAll(holder, abandoned)
        self.pump()

    def _cancel1(self, piece: int, holder: tuple) -> None:
        d = self.requests.pop((piece, holder), None)
        self.buffers.pop((piece, holder), None)
        if d is not None:
            d.cancel()

    def _cancelAll(self, holder: tuple, abandoned: Iterable[int]) -> None:
        for piece in abandoned:
            self._cancel1(piece, holder)

    def _stopAll(self) -> None:
        requests, self.requests = self.requests, {}
        self.buffers.clear()
        for d in requests.values():
            d.cancel()
        if self.wake is not None and self.wake.active():
            self.wake.cancel()
        self.wake = None

    def _bug(self, failure: Failure) -> None:
        self.log.failure("bug while checking a piece", failure)
        self._fail(failure.value)

    def _exhausted(self) -> None:

        s = self.scheduler
        self._fail(
            NotFetched(
                self.name,
                self.attempt.attempts,
                f"every holder of this version failed with {s.pieceCount - s.verifiedCount} "
                f"of {s.pieceCount} pieces missing",
            )
        )

    def _succeed(self) -> None:
        if not self.over:
            self._stopAll()
            self.result.callback(self)

    def _fail(self, e: BaseException) -> None:
        if not self.over:
            self._stopAll()
            self.result.errback(Failure(e))

    def _cancel(self, d: Deferred) -> None:
        # Deferred's canceller: stop; Deferred itself fails with CancelledError.
        self._stopAll()


def _attempt(peer, error: str):

    return Attempt(str(peer), error)


def keptMessage(kept: int, total: int) -> str:
    return f"{kept / MiB:.1f} of {total / MiB:.1f} MiB kept for resume"


def fetched(attempt: "_FetchAttempt", manifest, engine, started: float, resumed: int = 0) -> Fetched:
    peers = [str(engine.peers[h]) for h in engine.peers if engine.delivered.get(h)]
    return Fetched(
        name=attempt.name,
        size=manifest.size,
        sha256=manifest.sha256,
        peer=", ".join(peers) if peers else "(earlier run)",
        attempts=attempt.attempts,
        seconds=time.monotonic() - started,
        peers=peers,
        resumed=resumed,
        path=engine.mainPath(),
    )


async def savePieces(attempt: "_FetchAttempt", manifest, holders, final: Path, *, force: bool, resume: bool) -> Fetched:
    """The pieces into ``NAME.part`` and its journal, then renamed to ``final``."""

    f = attempt.fetcher
    m = manifest
    journal = await f.runInThread(
        functools.partial(
            Journal.open,
            final,
            m.size,
            m.sha256,
            m.root,
            m.pieceSize,
            name=attempt.name,
            digests=m.digests,
            resume=resume,
        )
    )
    kept = journal.keptBytes
    if journal.status == RESUMED:
        f.report(f"resuming {attempt.name}: {human(kept)} of {human(m.size)} already verified in {journal.part}")
    elif journal.status == RECHECKED:
        f.report(
            f"resuming {attempt.name}: {journal.part} changed since the last run; "
            f"{len(journal.dropped)} piece(s) failed a re-check and are fetched again"
        )
    elif journal.status == CHANGED:
        f.report(f"{journal.part} holds another version of {attempt.name}; starting over")
    free = freeSpace(final.parent)
    if m.size - kept > free:
        if journal.status in (NEW, CHANGED) and not journal.verified:
            journal.remove()
        else:
            journal.close()
        raise NoSpace(
            f"not enough space in {final.parent}: {attempt.name} needs {human(m.size - kept)} more, "
            f"{human(free)} free"
        )
    output = JournalOutput(journal, attempt.clock, f.runInThread, force=force)
    engine = PieceFetch(attempt, m, holders, output, sources=f.sources)
    attempt.engine = engine
    f.onTransfer(attempt)
    started = time.monotonic()
    try:
        try:
            await engine.run()
            await output.finish(m)
        except CancelledError:
            await output.abandon()
            raise Interrupted(attempt.name, output.keptBytes, m.size) from None
        except NotFetched as e:
            await output.abandon()
            e.why += f" ({keptMessage(output.keptBytes, m.size)})"
            raise
        except BaseException:
            await output.abandon()
            raise
    finally:
        await attempt.settle()
    return fetched(attempt, m, engine, started, resumed=kept)

async def streamPieces(attempt: "_FetchAttempt", manifest, holders, writer) -> Fetched:
    """The pieces to ``writer`` (stdout) in order, each as soon as it and those before it verify."""

    f = attempt.fetcher
    m = manifest
    output = StreamOutput(writer, f.runInThread, window=STREAM_WINDOW)
    engine = PieceFetch(attempt, m, holders, output, sources=f.sources, window=STREAM_WINDOW)
    attempt.engine = engine
    f.onTransfer(attempt)
    started = time.monotonic()
    try:
        try:
            await engine.run()
            await output.finish(m)
        except ReaderGone:
            pass  # '| head': the reader has what it wanted
        except CancelledError:
            await output.abandon()
            raise Interrupted(attempt.name, 0, m.size) from None
        except NotFetched as e:
            await output.abandon()
            if output.written:
                e.why += f"; the output stops after {output.written} of {m.size} bytes"
            raise
    finally:
        await attempt.settle()
    return fetched(attempt, m, engine, started)


__all__ = [
    "Interrupted",
    "PieceFetch",
    "keptMessage",
    "savePieces",
    "streamPieces",
]
