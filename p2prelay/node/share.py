"""
A peer node's shared folder: what it holds, and the only door into it.

Every file name that arrives from the network passes through
:meth:`SharedDirectory.resolve`, which refuses anything that is not a
regular file inside the folder (``../x``, absolute paths, symlinks that
point outside), so no other module joins untrusted names to paths.

Hashing is slow and blocking, so it runs off the reactor thread through an
injected ``runInThread`` (tests pass a synchronous one).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List

from twisted.internet import threads
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from .. import wire
from ..wire import FileEntry

HASH_CHUNK = 1024 * 1024
SKIPPED_SHOWN = 5  # names quoted in the one warning about unshareable names

RunInThread = Callable[..., "Deferred[Any]"]
_open = open  # the one place shared files are opened (tests replace it)


def sha256File(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hashIfStable(path: Path, size: int, mtime_ns: int) -> str | None:
    """
    Hash a file, or None when it changed while we read it.

    A file still being written must not be announced with a hash of half
    its bytes; the next scan tries again.
    """
    digest = sha256File(path)
    try:
        after = path.stat()
    except OSError:
        return None
    if after.st_size != size or after.st_mtime_ns != mtime_ns:
        return None
    return digest


def _announced(entries: Dict[str, "FileEntry"]) -> Dict[str, tuple[int, str]]:
    return {name: (e.size, e.sha256) for name, e in entries.items()}


def checkShareableName(name: str) -> str:
    """
    :func:`wire.checkName`, for a name read from the disk: one that is not
    valid UTF-8 (Python hands it over with surrogate escapes) is refused
    with the same ProtocolError as any other unshareable name.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise wire.ProtocolError(wire.BAD_REQUEST, "file name is not UTF-8") from None
    return wire.checkName(name)


def _shown(name: str) -> str:
    """A file name from the disk for a log line: odd bytes and controls escaped."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _within(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class SharedDirectory:
    """
    The files under one folder, with their sizes and SHA-256 digests.
    """

    log = Logger()

    def __init__(self, root: str | Path, runInThread: RunInThread = threads.deferToThread):
        self.root = Path(root)
        self._realRoot = os.path.realpath(self.root)
        self._runInThread = runInThread
        self.entries: Dict[str, FileEntry] = {}

    def resolve(self, name: str) -> Path:
        """
        The on-disk path of a shared file, or ProtocolError (400 or 404).
        """
        wire.checkName(name)
        real = os.path.realpath(os.path.join(self._realRoot, *name.split("/")))
        if not _within(self._realRoot, real):
            raise wire.ProtocolError(wire.NOT_FOUND, "no such file in this share")
        try:
            st = os.stat(real)
        except OSError:
            raise wire.ProtocolError(wire.NOT_FOUND, "no such file in this share") from None
        if not stat.S_ISREG(st.st_mode):
            raise wire.ProtocolError(wire.NOT_FOUND, "no such file in this share")
        return Path(real)

    def _walk(self, skipped: List[str]) -> Iterator[tuple[str, Path, os.stat_result]]:
        """
        Regular files under the root, named as relative POSIX paths.

        A name the protocol cannot carry (not UTF-8, a newline or another
        control character, too long, ...) is appended to ``skipped``, shown
        with its odd bytes escaped, instead of being shared.
        """
        for dirpath, dirnames, filenames in os.walk(self._realRoot):
            # os.walk does not follow symlinked directories; keep it so.
            dirnames.sort()
            for filename in sorted(filenames):
                full = os.path.join(dirpath, filename)
                rel = os.path.relpath(full, self._realRoot).replace(os.sep, "/")
                if filename.startswith(".p2prelay-"):
                    continue  # our own partial downloads
                try:
                    checkShareableName(rel)
                except wire.ProtocolError:
                    skipped.append(_shown(rel))
                    continue
                try:
                    path = self.resolve(rel)
                    yield rel, path, path.stat()
                except (wire.ProtocolError, OSError):
                    continue

    def _list(self) -> tuple[list, List[str]]:
        skipped: List[str] = []
        return list(self._walk(skipped)), skipped

    def scan(self) -> "Deferred[bool]":
        """
        Re-read the folder; fires with True when the set of files changed.

        Only new or changed files (by size and modification time) are hashed
        again, each in a worker thread.
        """
        return ensureDeferred(self._scan())

    async def _scan(self) -> bool:
        listing, skipped = await self._runInThread(self._list)
        if skipped:
            # One line per scan, however many files: a folder full of odd
            # names must not flood the log.
            self.log.warn(
                "not sharing {count} files whose names the protocol cannot carry "
                "(not UTF-8, control characters or too long): {names}",
                count=len(skipped),
                names=", ".join(skipped[:SKIPPED_SHOWN])
                + (", ..." if len(skipped) > SKIPPED_SHOWN else ""),
            )
        fresh: Dict[str, FileEntry] = {}
        for name, path, st in listing:
            old = self.entries.get(name)
            if old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
                fresh[name] = old
                continue
            try:
                digest = await self._runInThread(
                    _hashIfStable, path, st.st_size, st.st_mtime_ns
                )
            except OSError as e:
                self.log.warn("cannot read {name}: {error}", name=name, error=e)
                continue
            if digest is None:
                self.log.info("{name} changed while hashing; retrying later", name=name)
                continue
            fresh[name] = FileEntry(name, st.st_size, digest, st.st_mtime_ns)
        # Only what the relay is told counts: a touched but unchanged file
        # is no reason to register again.
        changed = _announced(fresh) != _announced(self.entries)
        self.entries = fresh
        return changed

    def add(self, entry: FileEntry) -> None:
        """Record a file we just wrote and verified (no need to hash again)."""
        self.entries[entry.name] = entry

    async def open(self, name: str) -> tuple[IO[bytes], FileEntry]:
        """
        Open a shared file for serving, with its size and digest.

        The digest comes from the last scan when the file is unchanged since;
        otherwise it is computed now (off the reactor thread).
        """
        path = self.resolve(name)
        try:
            f = _open(path, "rb")
        except OSError as e:
            self.log.warn("cannot read {name}: {error}", name=name, error=e)
            raise wire.ProtocolError(
                wire.SERVER_ERROR, f"cannot read {name}: {e.strerror or e}"
            ) from None
        try:
            st = os.fstat(f.fileno())
            entry = self.entries.get(name)
            if entry is None or (entry.size, entry.mtime_ns) != (st.st_size, st.st_mtime_ns):
                digest = await self._runInThread(_hashIfStable, path, st.st_size, st.st_mtime_ns)
                if digest is None:
                    raise wire.ProtocolError(wire.BUSY, "file is changing; try again later")
                entry = FileEntry(name, st.st_size, digest, st.st_mtime_ns)
                self.entries[name] = entry
            return f, entry
        except BaseException:
            f.close()
            raise
