"""
A download in progress: bytes go to a temporary file beside their final
place and become visible only once their size and SHA-256 check out.

The rename is the commit point, so an existing file is never clobbered by a
partial or unverified one, and a crash leaves at most a ``.p2prelay-*``
temporary behind (which peer nodes never announce).
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from .. import wire

TEMP_PREFIX = ".p2prelay-"
# Bytes queued for the writer thread before the transfer is paused, and
# the level at which it resumes: the disk, not memory, sets the pace.
HIGH_WATER = 8 * 1024 * 1024
LOW_WATER = 2 * 1024 * 1024
# Bytes the reactor thread gathers before handing them to the writing and
# hashing threads: fewer, larger handoffs (below LOW_WATER, so what is
# still gathered never holds a paused transfer).
BATCH = 1024 * 1024


class VerificationError(Exception):
    """The bytes received are not the file that was announced."""


class DestinationError(Exception):
    """The file cannot be saved where it was asked to go."""


class NoSpace(DestinationError):
    """The folder a download writes into has less free space than the file needs."""


def freeSpace(directory: Path) -> int:
    """Bytes an unprivileged writer may still use in ``directory``'s file system."""
    return shutil.disk_usage(directory).free


def human(size: float) -> str:
    """A size for people: ``512 bytes``, ``1.5 KiB``, ``2.0 GiB``."""
    if size < 1024:
        return f"{int(size)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        size /= 1024
        if size < 1024 or unit == "PiB":
            break
    return f"{size:.1f} {unit}"


def _missingParents(directory: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create for ``directory``, deepest first."""
    missing = []
    current = directory
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    return missing


def destination(directory: Path, name: str) -> Path:
    """
    Where ``name`` is saved under ``directory``, refusing any escape.
    """
    wire.checkName(name)
    root = os.path.realpath(directory)
    final = os.path.realpath(os.path.join(root, *name.split("/")))
    if not final.startswith(root.rstrip(os.sep) + os.sep):
        raise DestinationError(f"{name} would be saved outside {directory}")
    return Path(final)


class _Flush:
    """A marker both worker threads pass; the last to arrive fires ``deferred``."""

    def __init__(self, reactor, deferred: Deferred, parties: int) -> None:
        self._reactor = reactor
        self._deferred = deferred
        self._parties = parties
        self._lock = threading.Lock()

    def arrive(self) -> None:
        with self._lock:
            self._parties -= 1
            last = self._parties == 0
        if last:
            self._reactor.callFromThread(self._deferred.callback, None)


@implementer(IConsumer)
class Download:
    """
    One file's bytes on their way to disk, hashed as they arrive.

    It is the consumer a transfer writes into; a transfer that fails is
    :meth:`reset` before the next peer is tried, so failover reuses one
    temporary file.

    Given a reactor, writing and hashing happen on two threads of the
    download's own, side by side (both release the GIL), so the reactor
    thread only receives: it gathers what arrives into batches of about
    ``BATCH`` bytes and hands each to both threads at once.  When the
    slower of them falls ``HIGH_WATER`` bytes behind, the registered
    producer (the transport) is paused until it is back under
    ``LOW_WATER``.  Await :meth:`flushed` before :meth:`verify` or
    :meth:`reset`.

    The folders it had to create for ``directory`` are removed again by
    :meth:`discard` (if still empty), so a failed nested fetch leaves no
    empty folders behind.  :meth:`expect` refuses a size the folder's
    file system has no room for (:class:`NoSpace`); ``name`` is the file's
    name in that message.
    """

    def __init__(self, directory: Path, reactor=None, name: str = "") -> None:
        self.directory = directory
        self.name = name
        self._created = _missingParents(Path(os.path.abspath(directory)))
        directory.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=directory)
        self.path = Path(path)
        self._file = os.fdopen(fd, "w+b")
        self._dirty = False  # an attempt has written into the file
        self.producer = None
        self._reactor = reactor
        self._lock = threading.Lock()  # the counters and the pause, shared with the threads
        self._paused = False
        self._resuming = False
        self._queues: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []
        if reactor is not None:
            for work in ("_writeBatch", "_hashBatch"):
                q: queue.SimpleQueue = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._run, args=(q, work), name=f"p2prelay-download{work}", daemon=True
                )
                self._queues.append(q)
                self._threads.append(thread)
                thread.start()
        # Not reset(): truncating a file just made costs a synchronous flush
        # of the whole file at close() on ext4.
        self._newAttempt()

    def reset(self) -> None:
        """Start a new attempt: no bytes, no expectations, no earlier error."""
        if self._dirty:
            self._file.seek(0)
            self._file.truncate()
            self._dirty = False
        self._newAttempt()

    def _newAttempt(self) -> None:
        self._hash = hashlib.sha256()
        self._error: Optional[OSError] = None
        self._pending: list[bytes] = []  # received, not yet handed to the threads
        self._pendingBytes = 0
        self._written = 0  # bytes of this attempt each thread is done with
        self._hashed = 0
        self.received = 0
        self.expectedSize: Optional[int] = None
        self.expectedHash: Optional[str] = None

    def checkSpace(self, size: int) -> None:
        """Raise :class:`NoSpace` unless ``size`` bytes fit where this download writes."""
        free = freeSpace(self.directory) + self.received
        if size > free:
            raise NoSpace(
                f"not enough space in {self.directory}: {self.name or 'the file'} "
                f"needs {human(size)}, {human(free)} free"
            )

    def expect(self, size: int, sha256: Optional[str]) -> None:
        """The bytes to come: ``size`` of them (checked against free space), hashing to ``sha256``."""
        self.checkSpace(size)
        self.expectedSize = size
        self.expectedHash = sha256

    # IConsumer

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer
        if self._paused:
            # Still behind from an earlier attempt: the next source waits too.
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if not self._queues:
            self._writeBatch([data])
            self._hashBatch([data])
            return
        self._pending.append(data)
        self._pendingBytes += len(data)
        if self._pendingBytes >= BATCH:
            self._handOff()
            with self._lock:
                behind = not self._paused and self._backlog() > HIGH_WATER
                if behind:
                    self._paused = True
            if behind and self.producer is not None:
                self.producer.pauseProducing()

    def _handOff(self) -> None:
        """Give the gathered bytes to both threads."""
        if self._pending:
            batch, self._pending, self._pendingBytes = self._pending, [], 0
            for q in self._queues:
                q.put(batch)

    def _backlog(self) -> int:
        """Bytes received that one thread or the other has still to handle (under the lock)."""
        return self.received - min(self._written, self._hashed)

    # The threads' work: each runs on one thread only (or, without a
    # reactor, on the caller's).

    def _writeBatch(self, batch: list[bytes]) -> int:
        count = 0
        for data in batch:
            count += len(data)
            if self._error is None:
                self._dirty = True
                try:
                    self._file.write(data)
                except OSError as e:  # a full disk fails the download, not the client
                    self._error = e
        with self._lock:
            self._written += count
        return count

    def _hashBatch(self, batch: list[bytes]) -> int:
        digest = self._hash
        count = 0
        for data in batch:
            digest.update(data)  # releases the GIL: the writer and the reactor go on
            count += len(data)
        with self._lock:
            self._hashed += count
        return count

    def _run(self, q: queue.SimpleQueue, work: str) -> None:
        """One worker thread: batches for method ``work``, flush markers, and None to stop."""
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, _Flush):
                item.arrive()
                continue
            getattr(self, work)(item)
            with self._lock:
                resume = self._paused and not self._resuming and self._backlog() < LOW_WATER
                if resume:
                    self._resuming = True
            if resume:
                self._reactor.callFromThread(self._resume)

    def _resume(self) -> None:
        with self._lock:
            self._resuming = False
            self._paused = False
        if self.producer is not None:
            self.producer.resumeProducing()

    def flushed(self) -> "Deferred[None]":
        """Fires once every byte written so far is stored and hashed."""
        if not self._queues:
            return succeed(None)
        self._handOff()
        d: Deferred[None] = Deferred()
        marker = _Flush(self._reactor, d, len(self._queues))
        for q in self._queues:
            q.put(marker)
        return d

    def _stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join()
        self._queues, self._threads = [], []

    # Verification and commit.

    def verify(self) -> str:
        """The SHA-256 of what arrived, if it is what was announced."""
        if self._error is not None:
            raise self._error
        self._file.flush()
        digest = self._hash.hexdigest()
        if self.received != self.expectedSize:
            raise VerificationError(
                f"got {self.received} bytes, expected {self.expectedSize}"
            )
        if self.expectedHash is not None and digest != self.expectedHash:
            raise VerificationError("SHA-256 mismatch: the bytes are not the announced file")
        return digest

    def open(self):
        """A fresh reader over the verified bytes (for printing them)."""
        return open(self.path, "rb")

    def commit(self, final: Path, force: bool = False) -> None:
        """
        Move the verified file into place; never replace one unless forced.
        The folders made for it stay.
        """
        self._commit(final, force)
        self._created = []

    def _commit(self, final: Path, force: bool) -> None:
        self._stop()
        self._file.close()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o644)
        if force:
            os.replace(self.path, final)
            return
        try:
            # link() fails if the name exists: a no-clobber rename.
            os.link(self.path, final)
        except FileExistsError:
            raise DestinationError(f"{final} exists (use --force to replace it)") from None
        except OSError:
            # No hard links here (some network or FAT file systems): claim
            # the name exclusively, then move the verified bytes over it.
            try:
                os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                raise DestinationError(f"{final} exists (use --force to replace it)") from None
            os.replace(self.path, final)
            return
        os.unlink(self.path)

    def discard(self) -> None:
        """Remove the temporary file, and the folders made for it if they are empty."""
        self._stop()
        self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        created, self._created = self._created, []
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty (another download, or the user's): keep it
                break
