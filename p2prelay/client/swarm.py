"""
Multi-source downloads: one file's pieces from several holders at once.

The relay lists, for each holder of a name, the size, SHA-256 and *root*
of what it holds (see :mod:`p2prelay.pieces`).  Holders with the same root
hold the same bytes, so the fetcher

1. groups the holders by (root, size, SHA-256) and takes the group most of
   them are in (a tie goes to the group listed first): another root is
   another version of the file;
2. asks one holder of the group for the manifest (``MANIFEST name=``) and
   uses it only if its root is the one the relay lists -- a holder whose
   manifest does not match is a failed holder, and the next one is asked;
3. asks up to ``sources`` holders for pieces in parallel, one range GET
   (``offset= length=``) per piece, each piece checked against its digest
   as it lands (in a thread: hashing 4 MiB costs the reactor 2.5 ms);
   which holder gets which piece is the :class:`~.schedule.Scheduler`'s
   business (faster holders more pieces, a holder that sent a bad piece
   dropped, a busy one benched, endgame duplicates cancelled);
4. hands each verified piece to an *output*: :class:`JournalOutput` (``-o``:
   the ``.part`` and its journal, resumable, renamed into place only after
   the whole-file SHA-256 checks) or :class:`StreamOutput` (stdout: pieces
   in order as soon as they are complete, within a window of pieces).
"""

from __future__ import annotations

import collections
import hashlib
import os
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import pieces, wire
from ..negotiation import IncompleteAnswer, OneShotClient, negotiate
from .download import DestinationError, VerificationError
from .get import GetProtocol
from .journal import Journal

PIECES_PER_HOLDER = 2  # pieces asked of one holder at once (one connection each)
STREAM_WINDOW = 8  # pieces beyond the next one to print that may be fetched
WRITES_PENDING = 4  # verified pieces waiting for the disk before no more are asked for
HASH_READ = 4 * 1024 * 1024  # bytes per read when hashing the whole .part
MiB = 1024 * 1024

RunInThread = Callable[..., Deferred]


class Interrupted(CancelledError):
    """The download was cancelled (Ctrl-C); ``kept`` of ``total`` bytes stay for a resume."""

    def __init__(self, name: str, kept: int, total: int) -> None:
        super().__init__(name)
        self.name = name
        self.kept = kept
        self.total = total


class ReaderGone(Exception):
    """stdout was closed by its reader (``| head``): nothing more is wanted."""


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
        code = message.status
        if code is None:
            raise wire.ProtocolError(wire.BAD_REQUEST, "peer sent no status line")
        if code != wire.OK:
            self.fail(
                wire.ProtocolError(code, message.text or wire.REASONS.get(code, ""), retry=message.retry())
            )
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


class Serial:
    """Jobs run one after another through ``runInThread``, in the order submitted."""

    def __init__(self, runInThread: RunInThread) -> None:
        self.runInThread = runInThread
        self._queue: Deque[tuple] = collections.deque()
        self._busy = False
        self._idle: List[Deferred] = []

    @property
    def pending(self) -> int:
        return len(self._queue) + (1 if self._busy else 0)

    def submit(self, f: Callable, *args) -> Deferred:
        result: Deferred = Deferred()
        self._queue.append((f, args, result))
        if not self._busy:
            self._next()
        return result

    def _next(self) -> None:
        if not self._queue:
            self._busy = False
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
            return
        self._busy = True
        f, args, result = self._queue.popleft()
        d = self.runInThread(f, *args)

        def done(outcome: object) -> object:
            self._next()
            return outcome

        d.addBoth(done)
        d.chainDeferred(result)

    def idle(self) -> Deferred:
        """Fires once every job submitted so far has run."""
        if not self._busy:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        return d


# Outputs: where verified pieces go.


class JournalOutput:
    """
    ``-o``: pieces into ``NAME.part`` through its :class:`Journal`, the
    journal rewritten as they verify (batched, see the journal), the
    ``.part`` moved to the final name only after the whole file's SHA-256
    checks.  On failure or interruption both files stay for a resume.
    """

    def __init__(
        self, journal: Journal, clock: IReactorTime, runInThread: RunInThread, *, force: bool = False
    ) -> None:
        self.journal = journal
        self.clock = clock
        self.runInThread = runInThread
        self.force = force
        self.serial = Serial(runInThread)
        self.error: Optional[BaseException] = None
        self.closed = False
        self.onDrain: Callable[[], None] = lambda: None
        self._flushCall = None

    @property
    def have(self) -> Set[int]:
        return set(self.journal.verified)

    @property
    def keptBytes(self) -> int:
        return self.journal.keptBytes

    def full(self) -> bool:
        return self.serial.pending >= WRITES_PENDING

    def store(self, index: int, data: bytes) -> None:
        offset = index * self.journal.pieceSize
        d = self.serial.submit(self.journal.write, offset, data)
        d.addCallbacks(self._written, self._failed, callbackArgs=(index,))

    def _written(self, _: object, index: int) -> None:
        if self.journal.fd is None:
            return  # abandoned meanwhile
        self.journal.markVerified(index)
        self._scheduleFlush()
        self.onDrain()

    def _failed(self, failure: Failure) -> None:
        if self.error is None:
            self.error = failure.value
        self.onDrain()

    def _scheduleFlush(self) -> None:
        """Write the journal when its batch is due, even if no piece follows."""
        due = self.journal.flushDue()
        if due is None or (self._flushCall is not None and self._flushCall.active()):
            return
        self._flushCall = self.clock.callLater(due, self._flush)

    def _flush(self) -> None:
        self._flushCall = None
        if self.journal.fd is None:
            return
        try:
            self.journal.flush()
        except OSError as e:
            self.journal.lastError = e

    def _stopFlushing(self) -> None:
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None

    async def finish(self, manifest: Manifest) -> None:
        """Every piece is verified: check the whole file and move it into place."""
        await self.serial.idle()
        if self.error is not None:
            raise self.error
        self._stopFlushing()
        journal = self.journal
        # Through the serial queue, so abandon() waits for it before closing the file.
        digest = await self.serial.submit(_hashFile, journal.fd, manifest.size)
        if digest != manifest.sha256:
            journal.remove()
            raise VerificationError(
                "every piece verified, but the whole file does not match the SHA-256 the relay lists"
            )
        commitPart(journal, self.force)

    async def abandon(self) -> None:
        """Failed or interrupted: keep the ``.part`` and write the journal (for a resume)."""
        self._stopFlushing()
        await self.serial.idle()  # no thread still writes into (or reads) the file
        if self.journal.fd is None:
            return
        try:
            self.journal.close()
        except OSError as e:
            self.journal.lastError = e
            if self.journal.fd is not None:
                os.close(self.journal.fd)
                self.journal.fd = None


def _hashFile(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    done = 0
    while done < size:
        chunk = os.pread(fd, min(HASH_READ, size - done), done)
        if not chunk:
            break
        digest.update(chunk)
        done += len(chunk)
    return digest.hexdigest()


def commitPart(journal: Journal, force: bool) -> None:
    """
    Move a verified ``.part`` to its final name (never over an existing
    file unless ``force``) and remove its journal.
    """
    final, part = journal.final, journal.part
    if journal.fd is not None:
        os.close(journal.fd)
        journal.fd = None
    os.chmod(part, 0o644)
    if force:
        os.replace(part, final)
    else:
        try:
            os.link(part, final)  # fails if the name exists: a no-clobber rename
        except FileExistsError:
            raise DestinationError(f"{final} exists (use --force to replace it)") from None
        except OSError:
            try:
                os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                raise DestinationError(f"{final} exists (use --force to replace it)") from None
            os.replace(part, final)
    journal.remove()


class StreamOutput:
    """
    stdout: verified pieces written in order as soon as the ones before
    them are; the whole file's SHA-256 computed on the way (in a thread)
    and checked at the end.  ``writer`` is the console's stdout stream.
    """

    def __init__(self, writer, runInThread: RunInThread, window: int = STREAM_WINDOW) -> None:
        self.writer = writer
        self.window = window
        self.serial = Serial(runInThread)
        self.hash = hashlib.sha256()
        self.waiting: Dict[int, bytes] = {}
        self.next = 0
        self.written = 0
        self.error: Optional[BaseException] = None
        self.onDrain: Callable[[], None] = lambda: None
        writer.onResume = lambda: self.onDrain()

    have: Set[int] = frozenset()  # type: ignore[assignment]
    keptBytes = 0

    @property
    def closed(self) -> bool:
        return self.writer.closed

    def full(self) -> bool:
        return self.writer.paused or len(self.waiting) >= self.window

    def store(self, index: int, data: bytes) -> None:
        self.waiting[index] = data
        while self.next in self.waiting:
            chunk = self.waiting.pop(self.next)
            self.next += 1
            self.serial.submit(self.hash.update, chunk)
            self.written += len(chunk)
            self.writer.write(chunk)

    async def finish(self, manifest: Manifest) -> None:
        await self.serial.idle()
        if self.hash.hexdigest() != manifest.sha256:
            raise VerificationError(
                "every piece verified, but the whole file does not match the SHA-256 the relay lists "
                "(the output is not that file)"
            )

    async def abandon(self) -> None:
        self.waiting.clear()


# The download itself.


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
            self.name,
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
        d = Deferred.fromCoroutine(negotiate(endpoint, proto))
        self.requests[(piece, holder)] = d
        self.buffers[(piece, holder)] = buffer
        d.addCallbacks(
            self._arrived, self._lost, callbackArgs=(piece, holder, buffer, d), errbackArgs=(piece, holder, d)
        )

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
        from .fetcher import describe, unreachable

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
        from .fetcher import NotFetched

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
    from .fetcher import Attempt

    return Attempt(str(peer), error)


def keptMessage(kept: int, total: int) -> str:
    return f"{kept / MiB:.1f} of {total / MiB:.1f} MiB kept for resume"


__all__ = [
    "Interrupted",
    "JournalOutput",
    "Manifest",
    "ManifestProtocol",
    "PieceFetch",
    "StreamOutput",
    "commitPart",
    "groupByRoot",
    "keptMessage",
]
