"""
A peer node's shared folder: what it holds, and the only door into it.

Every file name that arrives from the network passes through
:meth:`SharedDirectory.resolve`, which refuses anything that is not a
regular file inside the folder (``../x``, absolute paths, symlinks that
point outside), so no other module joins untrusted names to paths.

Hashing is slow and blocking, so it runs off the reactor thread through an
injected ``runInThread`` (tests pass a synchronous one).  One read of a
file gives both its whole-file SHA-256 and its piece manifest
(:func:`manifest.hashFile`); a :class:`manifest.ManifestCache`, kept
beside the node's key, spares a restarted node from reading an unchanged
file again.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional

from twisted.internet import threads
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from .. import wire
from ..human import humanSize, plural
from ..pieces import PIECE_SIZE
from ..wire import FileEntry
from .manifest import FileHashes, ManifestCache, hashFile

SKIPPED_SHOWN = 5  # names quoted in the one warning about unshareable names
BIG_FILE = 64 * 1024 * 1024  # a file this large gets its own "hashing ..." line

RunInThread = Callable[..., "Deferred[Any]"]
_open = open  # the one place shared files are opened (tests replace it)


def _hashIfStable(path: Path, size: int, mtime_ns: int, pieceSize: int) -> FileHashes | None:
    """
    Hash a file (whole and by pieces), or None when it changed while we
    read it.

    A file still being written must not be announced with a hash of half
    its bytes; the next scan tries again.
    """
    hashes = hashFile(path, pieceSize)
    try:
        after = path.stat()
    except OSError:
        return None
    if after.st_size != size or after.st_mtime_ns != mtime_ns or hashes.size != size:
        return None
    return hashes


def _cached(
    cache: ManifestCache, pieceSize: int, wanted: List[tuple[str, os.stat_result]]
) -> Dict[str, FileHashes]:
    """The hashes ``cache`` holds for each (name, stat) in ``wanted`` (a worker thread's job)."""
    found = {}
    for name, st in wanted:
        hashes = cache.get(name, st.st_size, st.st_mtime_ns, pieceSize)
        if hashes is not None:
            found[name] = hashes
    return found


def _hashAndRecord(
    cache: Optional[ManifestCache], name: str, path: Path, size: int, mtime_ns: int, pieceSize: int
) -> FileHashes | None:
    """:func:`_hashIfStable`, and the result put in ``cache`` (a worker thread's job)."""
    hashes = _hashIfStable(path, size, mtime_ns, pieceSize)
    if hashes is not None and cache is not None:
        cache.put(name, size, mtime_ns, hashes)
    return hashes


def _entry(name: str, st: os.stat_result, hashes: FileHashes) -> FileEntry:
    return FileEntry(
        name, st.st_size, hashes.sha256, st.st_mtime_ns, root=hashes.root, pieceSize=hashes.pieceSize
    )


def _announced(entries: Dict[str, "FileEntry"]) -> Dict[str, tuple]:
    return {name: (e.size, e.sha256, e.root, e.pieceSize) for name, e in entries.items()}




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
    The files under one folder, with their sizes, SHA-256 digests and piece
    manifests (in pieces of ``pieceSize`` bytes).

    ``cache``, a :class:`ManifestCache` (default: none), keeps the hashes
    across restarts; it must live outside the folder.
    """

    log = Logger()

    def __init__(
        self,
        root: str | Path,
        runInThread: RunInThread = threads.deferToThread,
        cache: Optional[ManifestCache] = None,
        pieceSize: int = PIECE_SIZE,
    ):
        self.root = Path(root)
        self._realRoot = os.path.realpath(self.root)
        self._runInThread = runInThread
        self.cache = cache
        self.pieceSize = pieceSize
        self.entries: Dict[str, FileEntry] = {}
        # The piece digests behind each entry's root, by name.
        self.hashes: Dict[str, FileHashes] = {}
        self._pruned = False
        self.backlog = 0  # files the scan under way found and has not hashed yet

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

    def _current(self, name: str, st: os.stat_result) -> Optional[FileEntry]:
        """The entry for ``name`` if it describes the file as ``st`` finds it, with its pieces."""
        entry = self.entries.get(name)
        if (
            entry is None
            or (entry.size, entry.mtime_ns) != (st.st_size, st.st_mtime_ns)
            or entry.root is None
            or name not in self.hashes
        ):
            return None
        return entry

    def scan(self) -> "Deferred[bool]":
        """
        Re-read the folder; fires with True when the set of files changed.

        Only new or changed files (by size and modification time) are hashed
        again, each in a worker thread; a file the cache knows at its size
        and modification time is not read at all.
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
        hashes: Dict[str, FileHashes] = {}
        unknown = []
        for name, path, st in listing:
            old = self._current(name, st)
            if old is not None:
                fresh[name], hashes[name] = old, self.hashes[name]
            else:
                unknown.append((name, path, st))
        cached: Dict[str, FileHashes] = {}
        if unknown and self.cache is not None:
            cached = await self._runInThread(
                _cached, self.cache, self.pieceSize, [(name, st) for name, _, st in unknown]
            )
        hashed = hashedBytes = 0
        self.backlog = sum(1 for name, _, _ in unknown if name not in cached)
        for name, path, st in unknown:
            found = cached.get(name)
            if found is None:
                self.backlog = max(self.backlog - 1, 0)
                if st.st_size >= BIG_FILE:
                    self.log.info(
                        "hashing {name} ({size})", name=_shown(name), size=humanSize(st.st_size)
                    )
                try:
                    found = await self._runInThread(
                        _hashAndRecord, self.cache, name, path, st.st_size, st.st_mtime_ns, self.pieceSize
                    )
                except OSError as e:
                    self.log.warn("cannot read {name}: {error}", name=name, error=e)
                    continue
                if found is None:
                    self.log.info("{name} changed while hashing; retrying later", name=name)
                    continue
                hashed += 1
                hashedBytes += st.st_size
            fresh[name] = _entry(name, st, found)
            hashes[name] = found
        self.backlog = 0
        if hashed:
            self.log.info(
                "hashed {files} ({size}); {known} known from earlier",
                files=plural(hashed, "file"),
                count=hashed,
                size=humanSize(hashedBytes),
                known=len(fresh) - hashed,
            )
        if self.cache is not None and (not self._pruned or set(fresh) != set(self.entries)):
            # Files that are gone leave the cache too.
            await self._runInThread(self.cache.prune, list(fresh))
            self._pruned = True
        # Only what the relay is told counts: a touched but unchanged file
        # is no reason to register again.
        changed = _announced(fresh) != _announced(self.entries)
        self.entries = fresh
        self.hashes = hashes
        return changed

    def add(self, entry: FileEntry, hashes: Optional[FileHashes] = None) -> None:
        """
        Record a file we just wrote and verified.  Without its ``hashes``
        (piece digests) the next scan reads it once to make its manifest.
        """
        self.entries[entry.name] = entry
        if hashes is not None and entry.root == hashes.root:
            self.hashes[entry.name] = hashes
        else:
            self.hashes.pop(entry.name, None)

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
            entry = self._current(name, st)
            if entry is None:
                hashes = await self._runInThread(
                    _hashAndRecord, self.cache, name, path, st.st_size, st.st_mtime_ns, self.pieceSize
                )
                if hashes is None:
                    raise wire.ProtocolError(wire.BUSY, "file is changing; try again later")
                entry = _entry(name, st, hashes)
                self.entries[name] = entry
                self.hashes[name] = hashes
            return f, entry
        except BaseException:
            f.close()
            raise

    async def manifest(self, name: str) -> tuple[FileEntry, FileHashes]:
        """
        A shared file's entry and piece digests, as :meth:`open` finds it
        (hashed again if it changed since the last scan).
        """
        f, entry = await self.open(name)
        f.close()
        hashes = self.hashes.get(name)
        if hashes is None or hashes.root != entry.root:
            # Replaced meanwhile by another request's hashing: ask again.
            raise wire.ProtocolError(wire.BUSY, "file is changing; try again later")
        return entry, hashes
