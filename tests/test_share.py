"""
A node's shared folder: names the protocol cannot carry (skipped, with one
warning per scan, never a traceback or a node that cannot start), and the
piece manifests made at scan time and kept in the manifest cache.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

from twisted.internet.defer import ensureDeferred
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from p2prelay.node import share as share_module
from p2prelay.node.manifest import ManifestCache, hashFile
from p2prelay.node.share import SharedDirectory
from p2prelay.pieces import MIN_PIECE_SIZE, rootOf
from p2prelay.wire import FileEntry
from tests.support import syncThread


class OddNameTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()
        (self.root / "good.txt").write_bytes(b"fine")
        self.share = SharedDirectory(self.root, runInThread=syncThread)

    def create(self, name: bytes) -> None:
        """A real file with a bytes name, as another program could leave one."""
        os.close(os.open(os.path.join(os.fsencode(self.root), name), os.O_CREAT | os.O_WRONLY, 0o644))

    def scan(self) -> list[dict]:
        with capturedLogs() as events:
            self.successResultOf(self.share.scan())
        return [e for e in events if e["log_level"] >= LogLevel.warn]

    def test_notUTF8(self):
        """A file whose name is not valid UTF-8 is skipped; the rest are shared."""
        self.create(b"bad\xff.txt")
        self.scan()
        self.assertEqual(sorted(self.share.entries), ["good.txt"])

    def test_newline(self):
        """A file whose name holds a newline or another control character is skipped."""
        self.create(b"two\nlines.txt")
        self.create(b"bell\x07.txt")
        self.scan()
        self.assertEqual(sorted(self.share.entries), ["good.txt"])

    def test_notUTF8Directory(self):
        """Files inside a folder whose name is not UTF-8 are skipped too."""
        (self.root / os.fsdecode(b"dir\xfe")).mkdir()
        self.create(b"dir\xfe/inner.txt")
        self.scan()
        self.assertEqual(sorted(self.share.entries), ["good.txt"])

    def test_oneWarningPerScan(self):
        """However many odd names, each scan logs one warning, naming them escaped."""
        for i in range(20):
            self.create(b"bad%d\xff" % i)
        self.create(b"two\nlines")
        [warning] = self.scan()
        text = formatEvent(warning)
        self.assertIn("21 files", text)
        self.assertIn("\\xff", text)
        self.assertNotIn("\n", text)
        [again] = self.scan()
        self.assertIn("21 files", formatEvent(again))

    def test_newlineEscaped(self):
        """A newline in a skipped name is shown escaped, so the warning stays one line."""
        self.create(b"two\nlines")
        [warning] = self.scan()
        self.assertIn("two\\nlines", formatEvent(warning))

    def test_cleanFolderNoWarning(self):
        """A folder of ordinary names logs no warning."""
        self.assertEqual(self.scan(), [])


class PieceTests(SynchronousTestCase):
    """
    A scan's piece manifests, and the cache that spares a restarted node
    from reading an unchanged share again.
    """

    PIECE = MIN_PIECE_SIZE

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()
        self.cachePath = Path(self.mktemp()).absolute() / "manifests.sqlite"
        self.reads: list[str] = []
        real = share_module.hashFile

        def counting(path, pieceSize):
            self.reads.append(Path(path).name)
            return real(path, pieceSize)

        self.patch(share_module, "hashFile", counting)
        self.data = os.urandom(3 * self.PIECE + 100)
        (self.root / "big.bin").write_bytes(self.data)
        (self.root / "small.txt").write_bytes(b"tiny")

    def share(self) -> SharedDirectory:
        """A node's share as a fresh start makes it: a new object over the same folder and cache."""
        cache = ManifestCache(self.cachePath)
        self.addCleanup(cache.close)
        return SharedDirectory(self.root, runInThread=syncThread, cache=cache, pieceSize=self.PIECE)

    def scan(self, share: SharedDirectory) -> bool:
        return self.successResultOf(share.scan())

    def test_entryCarriesRoot(self):
        """A scanned file's entry carries the root of its piece digests and the piece size."""
        share = self.share()
        self.scan(share)
        entry = share.entries["big.bin"]
        digests = [
            hashlib.sha256(self.data[i : i + self.PIECE]).digest()
            for i in range(0, len(self.data), self.PIECE)
        ]
        self.assertEqual(len(digests), 4)
        self.assertEqual(entry.pieceSize, self.PIECE)
        self.assertEqual(entry.root, rootOf(len(self.data), self.PIECE, digests))
        self.assertEqual(entry.sha256, hashlib.sha256(self.data).hexdigest())
        self.assertEqual(list(share.hashes["big.bin"].digests), digests)

    def test_oneReadPerFile(self):
        """Whole-file digest and piece digests come from one read of each file."""
        self.scan(self.share())
        self.assertEqual(sorted(self.reads), ["big.bin", "small.txt"])

    def test_restartReadsNothing(self):
        """A restarted node over an unchanged folder reads no file again: the cache knows them all."""
        first = self.share()
        self.scan(first)
        self.reads.clear()
        second = self.share()
        self.assertTrue(self.scan(second), "a fresh start still registers its files")
        self.assertEqual(self.reads, [])
        self.assertEqual(second.entries, first.entries)
        self.assertEqual(second.hashes, first.hashes)

    def test_restartReadsChangedFile(self):
        """After a restart only a file changed meanwhile is read again."""
        self.scan(self.share())
        (self.root / "small.txt").write_bytes(b"changed")
        self.reads.clear()
        second = self.share()
        self.scan(second)
        self.assertEqual(self.reads, ["small.txt"])
        self.assertEqual(second.entries["small.txt"].sha256, hashlib.sha256(b"changed").hexdigest())

    def test_otherPieceSizeReadsAgain(self):
        """A restart with another piece size makes new manifests (the cache is per piece size)."""
        self.scan(self.share())
        self.reads.clear()
        cache = ManifestCache(self.cachePath)
        self.addCleanup(cache.close)
        share = SharedDirectory(self.root, runInThread=syncThread, cache=cache, pieceSize=2 * self.PIECE)
        self.scan(share)
        self.assertEqual(sorted(self.reads), ["big.bin", "small.txt"])
        self.assertEqual(share.entries["big.bin"].pieceSize, 2 * self.PIECE)

    def test_vanishedFilePruned(self):
        """A file that left the folder leaves the cache at the end of the scan."""
        share = self.share()
        self.scan(share)
        (self.root / "small.txt").unlink()
        self.scan(share)
        st = (self.root / "big.bin").stat()
        self.assertIsNotNone(share.cache.get("big.bin", st.st_size, st.st_mtime_ns, self.PIECE))
        count = sqlite3.connect(self.cachePath).execute("SELECT count(*) FROM manifests").fetchone()
        self.assertEqual(count, (1,))

    def test_changingFileNotCached(self):
        """A file that changed while it was hashed is neither announced nor cached."""
        real = share_module.hashFile

        def growing(path, pieceSize):
            hashes = real(path, pieceSize)
            with open(path, "ab") as f:
                f.write(b"more")
            return hashes

        self.patch(share_module, "hashFile", growing)
        share = self.share()
        self.scan(share)
        self.assertEqual(share.entries, {})
        count = sqlite3.connect(self.cachePath).execute("SELECT count(*) FROM manifests").fetchone()
        self.assertEqual(count, (0,))

    def test_hashingLogged(self):
        """Hashing a big file is logged at info with its size, so a slow start is explained."""
        self.patch(share_module, "BIG_FILE", 2048)
        (self.root / "big.bin").write_bytes(b"x" * 2048)
        with capturedLogs() as events:
            self.scan(self.share())
        texts = [formatEvent(e) for e in events if e["log_level"] == LogLevel.info]
        self.assertIn("hashing big.bin (2.0 KiB)", texts)
        self.assertFalse(any("small.txt" in t for t in texts), "small files get no line each")
        self.assertIn("hashed 2 files (2.0 KiB); 0 known from earlier", texts)

    def test_oneFileGrammar(self):
        """One file hashed is "1 file", with p2prelay.human's size."""
        for path in self.root.iterdir():
            path.unlink()
        (self.root / "one.bin").write_bytes(b"x" * 17)
        with capturedLogs() as events:
            self.scan(self.share())
        texts = [formatEvent(e) for e in events]
        self.assertIn("hashed 1 file (17 B); 0 known from earlier", texts)

    def test_backlog(self):
        """While a scan hashes, backlog counts the files it has yet to start; none once it is done."""
        seen = []
        real = share_module.hashFile
        share = self.share()

        def watching(path, pieceSize):
            seen.append(share.backlog)
            return real(path, pieceSize)

        self.patch(share_module, "hashFile", watching)
        for name in ("a.bin", "b.bin"):
            (self.root / name).write_bytes(name.encode())
        files = len(list(self.root.iterdir()))
        self.scan(share)
        self.assertEqual(seen, list(range(files - 1, -1, -1)))
        self.assertEqual(share.backlog, 0)

    def test_addedWithoutHashesGetsManifest(self):
        """A file added without its piece digests is read once by the next scan, and announced again with its root."""
        share = self.share()
        self.scan(share)
        path = self.root / "new.bin"
        path.write_bytes(b"downloaded")
        st = path.stat()
        share.add(FileEntry("new.bin", st.st_size, hashlib.sha256(b"downloaded").hexdigest(), st.st_mtime_ns))
        self.reads.clear()
        self.assertTrue(self.scan(share))
        self.assertEqual(self.reads, ["new.bin"])
        self.assertIsNotNone(share.entries["new.bin"].root)

    def test_addedWithHashes(self):
        """A file added with its hashes needs no read at all."""
        share = self.share()
        self.scan(share)
        path = self.root / "new.bin"
        path.write_bytes(b"downloaded")
        st = path.stat()
        hashes = hashFile(path, self.PIECE)
        entry = FileEntry("new.bin", st.st_size, hashes.sha256, st.st_mtime_ns, hashes.root, self.PIECE)
        share.add(entry, hashes)
        self.reads.clear()
        self.assertFalse(self.scan(share))
        self.assertEqual(self.reads, [])

    def test_manifest(self):
        """manifest() gives a file's entry and digests, from the scan when unchanged."""
        share = self.share()
        self.scan(share)
        self.reads.clear()
        entry, hashes = self.successResultOf(ensureDeferred(share.manifest("big.bin")))
        self.assertEqual(self.reads, [])
        self.assertEqual(hashes.root, entry.root)
        self.assertEqual(len(hashes.digests), 4)

    def test_manifestOfChangedFile(self):
        """manifest() of a file changed since the scan hashes it again first."""
        share = self.share()
        self.scan(share)
        (self.root / "big.bin").write_bytes(b"y" * (self.PIECE + 1))
        entry, hashes = self.successResultOf(ensureDeferred(share.manifest("big.bin")))
        self.assertEqual(entry.size, self.PIECE + 1)
        self.assertEqual(len(hashes.digests), 2)
        self.assertEqual(hashes.root, entry.root)
