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


@implementer(IConsumer)
class Download:
    """
    One file's bytes on their way to disk, hashed as they arrive.

    It is the consumer a transfer writes into; a transfer that fails is
    :meth:`reset` before the next peer is tried, so failover reuses one
    temporary file.

    Given a reactor, writing and hashing happen on a thread of the
    download's own (both release the GIL), so the reactor thread only
    receives; when that thread falls ``HIGH_WATER`` bytes behind, the
    registered producer (the transport) is paused until it catches up.
    Await :meth:`flushed` before :meth:`verify` or :meth:`reset`.

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
        self.producer = None
        self._reactor = reactor
        self._queue: Optional[queue.SimpleQueue] = None
        self._thread: Optional[threading.Thread] = None
        self._backlog = 0
        self._paused = False
        self._error: Optional[OSError] = None
        if reactor is not None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="p2prelay-download", daemon=True)
            self._thread.start()
        self.reset()

    def reset(self) -> None:
        """Start a new attempt: no bytes, no expectations, no earlier error."""
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self._error = None
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
        if self._queue is None:
            self._store(data)
            return
        self._backlog += len(data)
        self._queue.put(data)
        if self._backlog > HIGH_WATER and self.producer is not None and not self._paused:
            self._paused = True
            self.producer.pauseProducing()

    def _store(self, data: bytes) -> None:
        if self._error is None:
            try:
                self._file.write(data)
            except OSError as e:  # a full disk fails the download, not the client
                self._error = e
        self._hash.update(data)

    def _run(self) -> None:
        """The writer thread: store queued chunks, fire flush markers."""
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, Deferred):
                self._reactor.callFromThread(item.callback, None)
                continue
            self._store(item)
            self._reactor.callFromThread(self._stored, len(item))

    def _stored(self, count: int) -> None:
        self._backlog -= count
        if self._paused and self._backlog < LOW_WATER:
            self._paused = False
            if self.producer is not None:
                self.producer.resumeProducing()

    def flushed(self) -> "Deferred[None]":
        """Fires once every byte written so far is stored and hashed."""
        if self._queue is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._queue.put(d)
        return d

    def _stop(self) -> None:
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = self._thread = None

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
