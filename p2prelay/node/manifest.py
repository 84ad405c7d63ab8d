"""
A shared file's hashes (whole-file SHA-256 and piece manifest), and the
cache that spares a restarted node from hashing an unchanged share again.

:func:`hashFile` reads a file once, in 1 MiB reads, feeding every chunk to
both the whole-file digest and the current piece's; it blocks, so the scan
calls it in a worker thread (``hashlib`` releases the GIL on large
buffers, so the reactor keeps running meanwhile).

:class:`ManifestCache` keeps the result per shared name in SQLite, valid
only while the file's size and modification time (ns) are the ones it was
hashed at.  It lives beside the node's key (:func:`defaultCachePath`),
never inside the shared folder.  A cache file that cannot be read is moved
aside with a warning and rebuilt: the node never refuses to start over its
own cache, it only hashes again.

Threads: the connection is opened with ``check_same_thread=False`` and
every use holds the cache's lock, so the cache may be used from any thread
(the reactor's worker pool runs calls on whichever thread is free), one
call at a time.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Optional, Tuple

import attrs
from twisted.logger import Logger

from .. import identity
from ..pieces import DIGEST_BYTES, PIECE_SIZE, pieceCount, rootOf

HASH_CHUNK = 1024 * 1024  # bytes per read
CACHE_NAME = "manifests.sqlite"
SCHEMA_VERSION = 1  # PRAGMA user_version of the files this code writes
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")


@attrs.frozen
class FileHashes:
    """
    What one read of a file yields: its SHA-256 (hex), the piece size, the
    piece digests (32 raw bytes each, in order) and the number of bytes
    read, which the root also covers.
    """

    sha256: str
    pieceSize: int
    digests: Tuple[bytes, ...] = attrs.field(converter=tuple)
    size: int

    @property
    def root(self) -> str:
        return rootOf(self.size, self.pieceSize, self.digests)


def hashFile(path: str | Path, pieceSize: int = PIECE_SIZE) -> FileHashes:
    """
    The whole-file SHA-256 and piece digests of ``path``, in one pass.

    Reads never cross a piece boundary, so each byte is read once and fed
    to both digests.  Raises OSError when the file cannot be read.
    """
    if pieceSize < 1:
        raise ValueError(f"a piece size must be at least one byte ({pieceSize})")
    whole = hashlib.sha256()
    piece = hashlib.sha256()
    inPiece = 0
    size = 0
    digests = []
    buffer = memoryview(bytearray(min(HASH_CHUNK, pieceSize)))
    with open(path, "rb", buffering=0) as f:
        while True:
            read = f.readinto(buffer[: min(len(buffer), pieceSize - inPiece)])
            if not read:
                break
            chunk = buffer[:read]
            whole.update(chunk)
            piece.update(chunk)
            inPiece += read
            size += read
            if inPiece == pieceSize:
                digests.append(piece.digest())
                piece = hashlib.sha256()
                inPiece = 0
    if inPiece:
        digests.append(piece.digest())
    return FileHashes(whole.hexdigest(), pieceSize, digests, size)


def defaultCachePath(sharedFolder: str | Path) -> Path:
    """Where the node sharing ``sharedFolder`` keeps its manifest cache."""
    return identity.nodeStateDir(sharedFolder) / CACHE_NAME


class ManifestCache:
    """
    Hashes of shared files by (relative name, size, mtime_ns), on disk.

    One row per name: a file that changed replaces its old row.  Errors
    never reach the caller: a broken file is moved aside and rebuilt, a
    busy or unwritable one makes :meth:`get` a miss and :meth:`put` a
    no-op, and the node simply hashes.
    """

    log = Logger()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = None

    # Connection, schema and recovery.

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._open()
        return self._db

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5, check_same_thread=False, isolation_level=None)
        try:
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, not {SCHEMA_VERSION}")
            # A cache: losing the last few writes on power loss costs a re-hash.
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS manifests ("
                " name TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
                " sha256 TEXT NOT NULL, piece INTEGER NOT NULL, digests BLOB NOT NULL)"
            )
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def _moveAside(self, error: str) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        aside: Path | None = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        try:
            os.replace(self.path, aside)
        except OSError:
            aside = None
        for suffix in ("-wal", "-shm", "-journal"):  # they belong to the broken file
            try:
                os.unlink(f"{self.path}{suffix}")
            except OSError:
                pass
        self.log.warn(
            "manifest cache {path} is unusable ({error}); moved to {aside}, rebuilding",
            path=str(self.path),
            error=error,
            aside=str(aside),
        )

    def _run(self, what: str, action, default):
        """
        ``action(db)`` under the lock; a corrupt file is moved aside and the
        action tried once more on a fresh one, any other error gives
        ``default``.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    return action(self._connection())
                except sqlite3.OperationalError as e:  # busy, read-only, disk full...
                    self.log.warn(
                        "manifest cache {path}: cannot {what} ({error})",
                        path=str(self.path),
                        what=what,
                        error=str(e),
                    )
                    return default
                except sqlite3.DatabaseError as e:  # corrupt
                    self._moveAside(str(e))
                except OSError as e:  # the state folder cannot be made
                    self.log.warn(
                        "manifest cache {path}: cannot {what} ({error})",
                        path=str(self.path),
                        what=what,
                        error=str(e),
                    )
                    return default
            return default

    # The cache.

    def get(
        self, name: str, size: int, mtime_ns: int, pieceSize: int = PIECE_SIZE
    ) -> Optional[FileHashes]:
        """
        The hashes recorded for ``name`` at this size and mtime with this
        piece size, or None (never seen, changed since, or a row that does
        not hold together).
        """

        def action(db: sqlite3.Connection):
            return db.execute(
                "SELECT sha256, piece, digests FROM manifests"
                " WHERE name = ? AND size = ? AND mtime_ns = ? AND piece = ?",
                (name, size, mtime_ns, pieceSize),
            ).fetchone()

        row = self._run("read", action, None)
        if row is None:
            return None
        sha256, piece, blob = row
        if (
            not isinstance(sha256, str)
            or not _HEX64.match(sha256)
            or not isinstance(blob, bytes)
            or len(blob) != pieceCount(size, piece) * DIGEST_BYTES
        ):
            return None
        digests = [blob[i : i + DIGEST_BYTES] for i in range(0, len(blob), DIGEST_BYTES)]
        return FileHashes(sha256, piece, digests, size)

    def put(self, name: str, size: int, mtime_ns: int, hashes: FileHashes) -> None:
        """Record ``hashes`` for ``name`` as it is at this size and mtime."""
        if hashes.size != size:
            raise ValueError(f"hashes of {hashes.size} bytes for a file of {size}")
        row = (name, size, mtime_ns, hashes.sha256, hashes.pieceSize, b"".join(hashes.digests))

        def action(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?)", row)

        self._run("write", action, None)

    def prune(self, keep: Iterable[str]) -> int:
        """Forget every name not in ``keep``; how many were forgotten."""
        names = [(name,) for name in set(keep)]

        def action(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("CREATE TEMP TABLE IF NOT EXISTS keep (name TEXT PRIMARY KEY)")
                db.execute("DELETE FROM keep")
                db.executemany("INSERT INTO keep VALUES (?)", names)
                count = db.execute(
                    "DELETE FROM manifests WHERE name NOT IN (SELECT name FROM keep)"
                ).rowcount
                db.execute("DELETE FROM keep")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return count

        return self._run("prune", action, 0)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
