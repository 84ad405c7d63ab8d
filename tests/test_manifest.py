"""
A shared file's hashes in one read (hashFile) and the manifest cache that
spares a restarted node from hashing an unchanged share again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import identity
from p2prelay.node import manifest
from p2prelay.node.manifest import FileHashes, ManifestCache, defaultCachePath, hashFile
from p2prelay.pieces import PIECE_SIZE, pieceDigest, rootOf


def expected(data: bytes, pieceSize: int) -> FileHashes:
    digests = [pieceDigest(data[i : i + pieceSize]) for i in range(0, len(data), pieceSize)]
    return FileHashes(hashlib.sha256(data).hexdigest(), pieceSize, digests, len(data))


class HashFileTests(SynchronousTestCase):
    def write(self, data: bytes) -> Path:
        path = Path(self.mktemp())
        path.write_bytes(data)
        return path

    def test_empty(self):
        """An empty file: the SHA-256 of nothing, no pieces, a root all the same."""
        hashes = hashFile(self.write(b""))
        self.assertEqual(hashes, FileHashes(hashlib.sha256().hexdigest(), PIECE_SIZE, [], 0))
        self.assertEqual(hashes.root, rootOf(0, PIECE_SIZE, []))

    def test_edgeSizes(self):
        """One byte, one piece, one piece and a byte: the digests match the slices."""
        for size in (1, 64, 65, 64 * 3):
            data = os.urandom(size)
            self.assertEqual(hashFile(self.write(data), 64), expected(data, 64), size)

    def test_defaultPieceSize(self):
        """At the default 4 MiB, a file one byte over a piece has two pieces."""
        data = os.urandom(PIECE_SIZE + 1)
        hashes = hashFile(self.write(data))
        self.assertEqual(hashes, expected(data, PIECE_SIZE))
        self.assertEqual(len(hashes.digests), 2)

    def test_pieceSizeNotAMultipleOfTheRead(self):
        """
        A piece size that is not a multiple of the 1 MiB read still cuts
        exactly at piece boundaries.
        """
        pieceSize = manifest.HASH_CHUNK + 12345
        data = os.urandom(3 * pieceSize + 7)
        self.assertEqual(hashFile(self.write(data), pieceSize), expected(data, pieceSize))

    def test_onePass(self):
        """Every byte is read once, in reads of at most 1 MiB."""
        data = os.urandom(PIECE_SIZE * 2 + 100)
        path = self.write(data)
        reads = []
        realOpen = open

        def counting(*args, **kwargs):
            f = realOpen(*args, **kwargs)
            original = f.readinto

            class Wrapped:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

                def readinto(self, buffer):
                    n = original(buffer)
                    reads.append((len(buffer), n))
                    return n

            return Wrapped()

        with mock.patch("builtins.open", counting):
            hashFile(path)
        self.assertEqual(sum(n for _, n in reads), len(data))
        self.assertLessEqual(max(asked for asked, _ in reads), manifest.HASH_CHUNK)

    def test_unreadable(self):
        """A file that cannot be read is an OSError for the caller."""
        self.assertRaises(OSError, hashFile, Path(self.mktemp()))

    @settings(max_examples=40, deadline=None, database=None)
    @given(st.binary(max_size=400), st.integers(1, 70))
    def test_anyFile(self, data, pieceSize):
        """For any content and piece size, the hashes are those of the slices."""
        path = Path(self.mktemp())
        path.write_bytes(data)
        self.assertEqual(hashFile(path, pieceSize), expected(data, pieceSize))


class CacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "state" / "manifests.sqlite"
        self.cache = self.open()
        self.hashes = expected(b"hello world, in pieces", 8)

    def open(self) -> ManifestCache:
        cache = ManifestCache(self.path)
        self.addCleanup(cache.close)
        return cache

    def test_miss(self):
        """A name never recorded is a miss."""
        self.assertIsNone(self.cache.get("a.txt", 22, 1, 8))

    def test_hit(self):
        """What was put for a name, size and mtime comes back for the same three."""
        self.cache.put("a.txt", 22, 1000, self.hashes)
        self.assertEqual(self.cache.get("a.txt", 22, 1000, 8), self.hashes)

    def test_survivesRestart(self):
        """A new cache on the same file (a restarted node) finds the entry."""
        self.cache.put("a.txt", 22, 1000, self.hashes)
        self.cache.close()
        self.assertEqual(self.open().get("a.txt", 22, 1000, 8), self.hashes)

    def test_changedFile(self):
        """A different size or modification time is a miss."""
        self.cache.put("a.txt", 22, 1000, self.hashes)
        self.assertIsNone(self.cache.get("a.txt", 23, 1000, 8))
        self.assertIsNone(self.cache.get("a.txt", 22, 1001, 8))

    def test_otherPieceSize(self):
        """An entry hashed at another piece size is a miss."""
        self.cache.put("a.txt", 22, 1000, self.hashes)
        self.assertIsNone(self.cache.get("a.txt", 22, 1000, 16))

    def test_replace(self):
        """Putting a name again replaces its entry: the old version is gone."""
        other = expected(b"hello world, in pieces, longer", 8)
        self.cache.put("a.txt", 22, 1000, self.hashes)
        self.cache.put("a.txt", 30, 2000, other)
        self.assertIsNone(self.cache.get("a.txt", 22, 1000, 8))
        self.assertEqual(self.cache.get("a.txt", 30, 2000, 8), other)

    def test_sizeMustMatch(self):
        """Hashes of another size than the one given are a bug of the caller."""
        self.assertRaises(ValueError, self.cache.put, "a.txt", 21, 1000, self.hashes)

    def test_prune(self):
        """Pruning forgets every name not kept, and says how many."""
        for name in ("a", "b", "c/d"):
            self.cache.put(name, 22, 1, self.hashes)
        self.assertEqual(self.cache.prune(["a", "c/d", "never-seen"]), 1)
        self.assertIsNone(self.cache.get("b", 22, 1, 8))
        self.assertEqual(self.cache.get("c/d", 22, 1, 8), self.hashes)
        self.assertEqual(self.cache.prune([]), 2)

    def test_emptyFile(self):
        """An empty file's entry (no digests) is a hit, not a miss."""
        empty = expected(b"", 8)
        self.cache.put("empty", 0, 5, empty)
        self.assertEqual(self.cache.get("empty", 0, 5, 8), empty)

    def test_inconsistentRow(self):
        """A row whose digests do not fit its size is a miss, not a wrong manifest."""
        self.cache.put("a.txt", 22, 1000, self.hashes)
        self.cache._run(
            "test", lambda db: db.execute("UPDATE manifests SET digests = substr(digests, 2)"), None
        )
        self.assertIsNone(self.cache.get("a.txt", 22, 1000, 8))

    def test_garbageFileMovedAside(self):
        """A file that is not SQLite is moved aside with a warning, and a new cache works."""
        self.path.parent.mkdir(parents=True)
        self.path.write_bytes(b"not a database" * 500)
        with capturedLogs() as events:
            self.assertIsNone(self.cache.get("a.txt", 22, 1000, 8))
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        aside = [p for p in self.path.parent.iterdir() if ".corrupt-" in p.name]
        self.assertEqual(len(aside), 1)
        self.assertEqual(aside[0].read_bytes(), b"not a database" * 500)
        self.cache.put("a.txt", 22, 1000, self.hashes)
        self.assertEqual(self.cache.get("a.txt", 22, 1000, 8), self.hashes)

    def test_truncatedFileMovedAside(self):
        """A cache file cut short (a full disk, say) is detected and rebuilt."""
        for i in range(300):
            self.cache.put(f"file{i}", 22, i, self.hashes)
        self.cache.close()
        data = self.path.read_bytes()
        self.path.write_bytes(data[: len(data) // 2])
        for suffix in ("-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        cache = self.open()
        with capturedLogs():
            self.assertIsNone(cache.get("file1", 22, 1, 8))
        self.assertTrue(any(".corrupt-" in p.name for p in self.path.parent.iterdir()))
        cache.put("file1", 22, 1, self.hashes)
        self.assertEqual(cache.get("file1", 22, 1, 8), self.hashes)

    def test_newerSchemaMovedAside(self):
        """A file another schema wrote is moved aside, never rewritten in place."""
        self.cache.put("a.txt", 22, 1000, self.hashes)
        self.cache._run("test", lambda db: db.execute("PRAGMA user_version = 99"), None)
        self.cache.close()
        cache = self.open()
        with capturedLogs():
            self.assertIsNone(cache.get("a.txt", 22, 1000, 8))
        self.assertTrue(any(".corrupt-" in p.name for p in self.path.parent.iterdir()))

    def test_uncreatable(self):
        """
        A cache whose folder cannot be made costs a warning per use and a
        re-hash, never an exception.
        """
        blocker = Path(self.mktemp())
        blocker.write_bytes(b"a file, not a folder")
        cache = ManifestCache(blocker / "manifests.sqlite")
        self.addCleanup(cache.close)
        with capturedLogs() as events:
            cache.put("a.txt", 22, 1000, self.hashes)
            self.assertIsNone(cache.get("a.txt", 22, 1000, 8))
            self.assertEqual(cache.prune([]), 0)
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.warn]), 3)

    def test_otherThread(self):
        """The cache can be used from a worker thread other than the one that made it."""
        self.cache.put("a.txt", 22, 1000, self.hashes)
        results = []

        def work():
            self.cache.put("b.txt", 22, 1000, self.hashes)
            results.append(self.cache.get("a.txt", 22, 1000, 8))

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        self.assertEqual(results, [self.hashes])
        self.assertEqual(self.cache.get("b.txt", 22, 1000, 8), self.hashes)


class LocationTests(SynchronousTestCase):
    def test_besideTheKey(self):
        """The cache lives in the node's state folder, beside its key, outside the share."""
        share = Path(self.mktemp()).absolute()
        share.mkdir()
        path = defaultCachePath(share)
        self.assertEqual(path.parent, identity.defaultKeyPath(share).parent)
        self.assertEqual(path.name, "manifests.sqlite")
        self.assertFalse(str(path).startswith(str(share) + os.sep))

    def test_keyPathUnchanged(self):
        """The key keeps the path it had: stateHome()/nodes/<16 hex of the real path>/node.key."""
        share = Path(self.mktemp()).absolute()
        share.mkdir()
        tag = hashlib.sha256(os.path.realpath(share).encode()).hexdigest()[:16]
        self.assertEqual(identity.defaultKeyPath(share), identity.stateHome() / "nodes" / tag / "node.key")
