"""
Resume state for ``p2p-fetch -o DIR/NAME``: ``NAME.part`` and its journal.

An interrupted download keeps, beside the name it is going to, the partial
file under a stable name, ``NAME.part``, and ``NAME.part.journal``: a small
JSON document naming the file (name, size, whole-file SHA-256, root, piece
size), the ``.part``'s size and mtime when the journal was written, and a
bitmap of the pieces verified so far.  The next fetch of the same name and
root opens both and fetches only the missing pieces.

Trust, but check cheaply:

- a journal that cannot be read, does not parse, fails its own checksum,
  has another version, or describes another file (a different root, size,
  hash or piece size) is treated as absent: both files start over;
- the ``.part`` is written only through :meth:`Journal.write`, which pins
  the file's mtime to the value the journal records, so an unchanged size
  and mtime mean nobody else touched it and the verified pieces are trusted
  without re-reading them; a ``.part`` whose size or mtime differs
  (truncated, edited) gets only the pieces the journal claims re-hashed,
  and those that fail are dropped;
- the ``.part`` is never renamed here: the fetcher moves it to the final
  name only after the whole-file SHA-256 checks, so nothing unverified ever
  reaches that name.

The journal is rewritten atomically (a temporary file, then
``os.replace``), at most every ``FLUSH_INTERVAL`` seconds as pieces are
verified, and by :meth:`Journal.flush` (at exit, on interruption).  A
fetch holds an exclusive lock on the ``.part`` while it runs, so a second
fetch of the same name into the same folder is refused instead of mixing
its pieces in.

:meth:`Journal.open` does blocking I/O (it may re-hash pieces): for a large
file, call it from a thread.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Set

from .download import DestinationError

VERSION = 1
PART_SUFFIX = ".part"
JOURNAL_SUFFIX = ".part.journal"
FLUSH_INTERVAL = 0.5  # seconds between two journal writes, at least
MAX_JOURNAL = 4 * 1024 * 1024  # bytes; 1,048,576 pieces make a bitmap of 170 KiB in base64
READ_SIZE = 1024 * 1024  # bytes per read when re-hashing a piece

# What Journal.open found.
NEW = "new"  # no usable journal: a fresh .part
RESUMED = "resumed"  # the journal matched the .part: its pieces are trusted
RECHECKED = "rechecked"  # the .part changed: the claimed pieces were re-hashed
CHANGED = "changed"  # a journal for another version of the file: started over


class PartBusy(DestinationError):
    """Another fetch is writing the same ``.part`` right now."""


def pieceCount(size: int, pieceSize: int) -> int:
    """How many pieces a file of ``size`` bytes has (0 for an empty file)."""
    return -(-size // pieceSize) if size > 0 else 0


def pieceLength(index: int, size: int, pieceSize: int) -> int:
    """The length of piece ``index`` (the last may be short)."""
    return max(0, min(pieceSize, size - index * pieceSize))


def encodeBitmap(pieces: Iterable[int], count: int) -> str:
    """The set ``pieces`` as a base64 bitmap, piece 0 in the high bit of byte 0."""
    bits = bytearray(-(-count // 8))
    for i in pieces:
        bits[i >> 3] |= 0x80 >> (i & 7)
    return base64.b64encode(bytes(bits)).decode("ascii")


def decodeBitmap(text: str, count: int) -> Set[int]:
    """The pieces a base64 bitmap holds; ValueError unless it has exactly ``count`` bits' room and none beyond."""
    bits = base64.b64decode(text.encode("ascii"), validate=True)
    if len(bits) != -(-count // 8):
        raise ValueError("bitmap length does not match the piece count")
    pieces = {
        (byte << 3) + bit
        for byte, value in enumerate(bits)
        if value
        for bit in range(8)
        if value & (0x80 >> bit)
    }
    if pieces and max(pieces) >= count:
        raise ValueError("bitmap names a piece beyond the end")
    return pieces


def _checksum(fields: dict) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_FIELDS = {
    "version": int,
    "name": str,
    "size": int,
    "sha256": str,
    "root": str,
    "pieceSize": int,
    "partSize": int,
    "partMtimeNs": int,
    "pieces": str,
}


def parseJournal(data: bytes) -> Optional[dict]:
    """The journal's fields, or None if it is not a journal of ours in good order."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or set(doc) != set(_FIELDS) | {"check"}:
        return None
    for key, kind in _FIELDS.items():
        value = doc[key]
        if type(value) is not kind:  # bool is not an int here
            return None
    check = doc.pop("check")
    if check != _checksum(doc) or doc["version"] != VERSION:
        return None
    if doc["size"] < 0 or doc["pieceSize"] < 1 or doc["partSize"] < 0:
        return None
    try:
        doc["pieces"] = decodeBitmap(doc["pieces"], pieceCount(doc["size"], doc["pieceSize"]))
    except ValueError:
        return None
    return doc


def formatJournal(fields: dict, pieces: Iterable[int]) -> bytes:
    """The journal document for ``fields`` (every field but the bitmap) and ``pieces``."""
    doc = dict(fields, version=VERSION)
    doc["pieces"] = encodeBitmap(pieces, pieceCount(doc["size"], doc["pieceSize"]))
    doc["check"] = _checksum(doc)
    return json.dumps(doc, sort_keys=True).encode("utf-8") + b"\n"


def _readJournal(path: Path) -> Optional[dict]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, MAX_JOURNAL + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_JOURNAL:
        return None
    return parseJournal(data)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise DestinationError(f"{path} is a folder; remove it to download here") from None
    except PermissionError:
        if path.is_dir():  # unlink() of a folder is EPERM on some systems
            raise DestinationError(f"{path} is a folder; remove it to download here") from None
        raise


def _lock(fd: int, part: Path) -> None:
    try:
        import fcntl
    except ImportError:  # no advisory locks here: go without
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PartBusy(f"another download is writing {part}") from None


def _openExisting(part: Path) -> Optional[int]:
    """The existing ``.part`` opened for writing (locked), or None if there is none."""
    try:
        fd = os.open(part, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR):
            raise DestinationError(f"{part} is not a regular file; remove it to download here") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DestinationError(f"{part} is not a regular file; remove it to download here")
    _lock(fd, part)
    return fd


def _createFresh(part: Path, size: int) -> int:
    """A new, empty ``.part`` of ``size`` bytes (sparse), opened and locked."""
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    _lock(fd, part)
    if size:
        os.ftruncate(fd, size)  # extend, never shrink a file just made (see STYLE.md)
    return fd


def _diskHasher(fd: int, size: int, pieceSize: int) -> Callable[[int], Optional[bytes]]:
    def hashPiece(index: int) -> Optional[bytes]:
        length = pieceLength(index, size, pieceSize)
        offset = index * pieceSize
        digest = hashlib.sha256()
        done = 0
        while done < length:
            chunk = os.pread(fd, min(READ_SIZE, length - done), offset + done)
            if not chunk:
                return None  # the .part ends before the piece does
            digest.update(chunk)
            done += len(chunk)
        return digest.digest()

    return hashPiece


class Journal:
    """
    One ``-o`` download's ``.part`` and journal; make one with :meth:`open`.

    ``verified`` is the set of pieces known good on disk; ``status`` says
    what :meth:`open` found (``NEW``, ``RESUMED``, ``RECHECKED``,
    ``CHANGED``) and ``dropped`` which claimed pieces failed a re-hash.
    Write the file's bytes with :meth:`write` only, and call
    :meth:`markVerified` once a piece's bytes are written and checked.
    """

    def __init__(
        self,
        final: Path,
        fd: int,
        fields: dict,
        verified: Set[int],
        mtimeNs: int,
        now: Callable[[], float],
        status: str,
        dropped: Sequence[int] = (),
    ) -> None:
        self.final = final
        self.part = partPath(final)
        self.path = journalPath(final)
        self.fd: Optional[int] = fd
        self.name: str = fields["name"]
        self.size: int = fields["size"]
        self.sha256: str = fields["sha256"]
        self.root: str = fields["root"]
        self.pieceSize: int = fields["pieceSize"]
        self.count = pieceCount(self.size, self.pieceSize)
        self.verified: Set[int] = set(verified)
        self.status = status
        self.dropped: List[int] = sorted(dropped)
        self.now = now
        self._mtimeNs = mtimeNs
        self._dirty = False
        self._written: Optional[float] = None  # when the journal was last written
        self.lastError: Optional[OSError] = None

    @classmethod
    def open(
        cls,
        final: Path,
        size: int,
        sha256: str,
        root: str,
        pieceSize: int,
        *,
        name: Optional[str] = None,
        digests: Optional[Sequence[bytes]] = None,
        hashPiece: Optional[Callable[[int], Optional[bytes]]] = None,
        now: Callable[[], float] = time.monotonic,
        resume: bool = True,
    ) -> "Journal":
        """
        Find or create ``NAME.part`` and ``NAME.part.journal`` beside ``final``.

        A journal for the same name, size, SHA-256, root and piece size is
        resumed; any other journal, or ``resume=False`` (``--no-resume``),
        starts over.  Should the ``.part`` have changed since the journal
        was written, the pieces it claims are re-hashed (``hashPiece(i)``,
        by default a SHA-256 of the piece as on disk) and compared with
        ``digests`` (the manifest's); without ``digests`` they are all
        dropped.  Raises :class:`PartBusy` while another fetch writes the
        same ``.part``, and ``DestinationError`` if it is a folder or link.
        """
        if pieceSize < 1 or size < 0:
            raise ValueError(f"bad size {size} or piece size {pieceSize}")
        count = pieceCount(size, pieceSize)
        if digests is not None and len(digests) != count:
            raise ValueError(f"{len(digests)} digests for {count} pieces")
        part, path = partPath(final), journalPath(final)
        fields = {
            "name": final.name if name is None else name,
            "size": size,
            "sha256": sha256,
            "root": root,
            "pieceSize": pieceSize,
        }
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = _openExisting(part)
        record = _readJournal(path) if resume else None
        status = NEW
        if record is not None and any(record[k] != v for k, v in fields.items()):
            record, status = None, CHANGED
        if record is None or fd is None:
            if fd is not None:
                os.close(fd)  # releases our lock; the name is unlinked next
            _unlink(path)
            _unlink(part)
            fd = _createFresh(part, size)
            journal = cls(final, fd, fields, set(), os.fstat(fd).st_mtime_ns, now, status)
            journal.flush()  # a .part never stands without its journal
            return journal
        try:
            st = os.fstat(fd)
            verified = record["pieces"]
            dropped: List[int] = []
            if st.st_size != record["partSize"] or st.st_mtime_ns != record["partMtimeNs"]:
                status = RECHECKED
                check = hashPiece or _diskHasher(fd, size, pieceSize)
                good = {
                    i for i in verified if digests is not None and check(i) == digests[i]
                }
                dropped = sorted(verified - good)
                verified = good
                if st.st_size != size:
                    os.ftruncate(fd, size)
            else:
                status = RESUMED
            journal = cls(
                final, fd, fields, verified, os.fstat(fd).st_mtime_ns, now, status, dropped
            )
            if status == RECHECKED:
                journal.pin()
                journal.flush()
        except BaseException:
            os.close(fd)
            raise
        return journal

    # What the fetcher asks.

    @property
    def keptBytes(self) -> int:
        """Bytes of verified pieces on disk."""
        return sum(pieceLength(i, self.size, self.pieceSize) for i in self.verified)

    @property
    def missing(self) -> List[int]:
        """The pieces still to fetch, in order."""
        return [i for i in range(self.count) if i not in self.verified]

    @property
    def dirty(self) -> bool:
        """Pieces were verified since the journal was last written."""
        return self._dirty

    def flushDue(self) -> Optional[float]:
        """Seconds until the pending batch should be written (None: nothing pending)."""
        if not self._dirty:
            return None
        if self._written is None:
            return 0.0
        return max(0.0, self._written + FLUSH_INTERVAL - self.now())

    # What the fetcher tells.

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` in the ``.part`` (the mtime stays pinned)."""
        if self.fd is None:
            raise ValueError("the journal is closed")
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"{len(data)} bytes at {offset} do not fit in {self.size}")
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written
        self.pin()

    def pin(self) -> None:
        """Set the ``.part``'s mtime back to the value the journal records."""
        if self.fd is not None:
            os.utime(self.fd, ns=(self._mtimeNs, self._mtimeNs))

    def markVerified(self, piece: int) -> None:
        """
        ``piece`` is on disk and verified.  The journal is rewritten when
        the last write is ``FLUSH_INTERVAL`` old; a failure to write it is
        kept in ``lastError`` (the download goes on; resume loses a little).
        """
        if not 0 <= piece < self.count:
            raise IndexError(f"piece {piece} out of range 0..{self.count - 1}")
        if piece in self.verified:
            return
        self.verified.add(piece)
        self._dirty = True
        if self.flushDue() == 0.0:
            try:
                self.flush()
            except OSError as e:
                self.lastError = e

    def forget(self, pieces: Iterable[int]) -> None:
        """``pieces`` are not good after all (a failed whole-file check): fetch them again."""
        before = len(self.verified)
        self.verified.difference_update(pieces)
        if len(self.verified) != before:
            self._dirty = True

    def flush(self) -> None:
        """Write the journal now (atomically) if anything changed, or if it was never written."""
        if not self._dirty and self._written is not None:
            return
        fields = {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "root": self.root,
            "pieceSize": self.pieceSize,
            "partSize": self.size,
            "partMtimeNs": self._mtimeNs,
        }
        data = formatJournal(fields, self.verified)
        temporary = self.path.with_name(self.path.name + ".new")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        self._dirty = False
        self._written = self.now()
        self.lastError = None

    def close(self) -> None:
        """Write what is pending and let go of the ``.part`` (both files stay, for a resume)."""
        if self.fd is None:
            return
        try:
            self.flush()
        finally:
            os.close(self.fd)
            self.fd = None

    def remove(self) -> None:
        """Delete the ``.part`` (if still there) and the journal: after success, or --no-resume."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for path in (self.part, self.path, self.path.with_name(self.path.name + ".new")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def partPath(final: Path) -> Path:
    """Where the bytes of ``final`` wait until they verify: ``NAME.part``."""
    return final.with_name(final.name + PART_SUFFIX)


def journalPath(final: Path) -> Path:
    """The journal beside ``NAME.part``: ``NAME.part.journal``."""
    return final.with_name(final.name + JOURNAL_SUFFIX)
