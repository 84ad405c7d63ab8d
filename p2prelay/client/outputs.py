"""
Where verified pieces go: :class:`JournalOutput` (``-o``: the ``.part`` and
its journal, resumable, renamed into place only after the whole-file
SHA-256 checks, by :func:`commitPart`) or :class:`StreamOutput` (stdout:
pieces in order as soon as they are complete, within a window of pieces),
each writing through a :class:`Serial` queue of thread calls.
"""

from __future__ import annotations

import collections
import hashlib
import os
from typing import Callable, Deque, Dict, List, Optional, Set

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from .download import DestinationError, VerificationError
from .journal import Journal
from .manifest import Manifest

STREAM_WINDOW = 8  # pieces beyond the next one to print that may be fetched
WRITES_PENDING = 4  # verified pieces waiting for the disk before no more are asked for
HASH_READ = 4 * 1024 * 1024  # bytes per read when hashing the whole .part

RunInThread = Callable[..., Deferred]


class ReaderGone(Exception):
    """stdout was closed by its reader (``| head``): nothing more is wanted."""


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
