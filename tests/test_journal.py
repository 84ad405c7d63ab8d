"""
The resume journal: ``NAME.part`` and ``NAME.part.journal`` beside the
final name, read back after an interruption, trusted only while they agree,
and started over whenever they do not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2prelay.client import journal
from p2prelay.client.download import DestinationError
from p2prelay.client.journal import (
    CHANGED,
    NEW,
    RECHECKED,
    RESUMED,
    Journal,
    PartBusy,
    decodeBitmap,
    encodeBitmap,
    formatJournal,
    parseJournal,
)

PIECE = 1024
SIZE = 3 * PIECE + 100  # four pieces, the last short
CONTENT = bytes((i * 7 + i // 251) % 256 for i in range(SIZE))
PIECES = [CONTENT[i : i + PIECE] for i in range(0, SIZE, PIECE)]
DIGESTS = [hashlib.sha256(p).digest() for p in PIECES]
SHA = hashlib.sha256(CONTENT).hexdigest()
ROOT = "ab" * 32


class JournalTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.final = self.dir / "big.bin"
        self.clock = Clock()
        self.hashed: list = []

    def open(self, root: str = ROOT, **kw) -> Journal:
        kw.setdefault("digests", DIGESTS)
        j = Journal.open(self.final, SIZE, SHA, root, PIECE, now=self.clock.seconds, **kw)
        self.addCleanup(j.close)
        return j

    def countingHasher(self, fd_path: Path):
        """A hashPiece that reads the .part and records which pieces it hashed."""

        def hashPiece(i: int):
            self.hashed.append(i)
            data = fd_path.read_bytes()[i * PIECE : (i + 1) * PIECE]
            want = min(PIECE, SIZE - i * PIECE)
            return hashlib.sha256(data).digest() if len(data) == want else None

        return hashPiece

    def keep(self, j: Journal, *pieces: int) -> None:
        """Write and verify ``pieces``, then stop as an interrupted fetch does."""
        for i in pieces:
            j.write(i * PIECE, PIECES[i])
            j.markVerified(i)
        j.close()

    def stored(self) -> dict:
        doc = parseJournal(journal.journalPath(self.final).read_bytes())
        self.assertIsNotNone(doc)
        return doc


class FreshTests(JournalTestCase):
    def test_freshPartAndJournal(self) -> None:
        """A first fetch creates NAME.part of the file's size and NAME.part.journal beside the final name."""
        j = self.open()
        self.assertEqual(j.status, NEW)
        self.assertEqual(j.verified, set())
        self.assertEqual(j.part, self.dir / "big.bin.part")
        self.assertEqual(j.path, self.dir / "big.bin.part.journal")
        self.assertEqual(j.part.stat().st_size, SIZE)
        self.assertEqual(self.stored()["pieces"], set())
        self.assertFalse(self.final.exists())

    def test_emptyFile(self) -> None:
        """A file of no bytes has no pieces and nothing missing."""
        j = Journal.open(self.final, 0, SHA, ROOT, PIECE, now=self.clock.seconds)
        self.addCleanup(j.close)
        self.assertEqual(j.missing, [])
        self.assertEqual(j.keptBytes, 0)

    def test_writePinsMtime(self) -> None:
        """Writing through the journal leaves the .part's mtime at the recorded value."""
        j = self.open()
        before = j.part.stat().st_mtime_ns
        os.utime(j.part, ns=(before - 10**9, before - 10**9))
        j.pin()
        j.write(PIECE, PIECES[1])
        self.assertEqual(j.part.stat().st_mtime_ns, before)

    def test_writeOutsideFileRefused(self) -> None:
        """A write beyond the file's size is refused."""
        j = self.open()
        self.assertRaises(ValueError, j.write, SIZE - 10, b"x" * 11)

    def test_secondFetchRefused(self) -> None:
        """While one fetch holds the .part, another of the same name in the same folder is refused."""
        self.open()
        self.assertRaises(PartBusy, self.open)

    def test_partIsAFolder(self) -> None:
        """A folder where the .part would go is a destination error, not a traceback."""
        self.dir.mkdir()
        journal.partPath(self.final).mkdir()
        self.assertRaises(DestinationError, self.open)

    def test_partIsASymlink(self) -> None:
        """A symbolic link where the .part would go is never followed."""
        self.dir.mkdir()
        target = self.dir / "elsewhere"
        target.write_bytes(b"precious")
        journal.partPath(self.final).symlink_to(target)
        self.assertRaises(DestinationError, self.open)
        self.assertEqual(target.read_bytes(), b"precious")


class ResumeTests(JournalTestCase):
    def test_writtenAndReadBack(self) -> None:
        """Verified pieces survive a restart and are trusted without re-hashing an unchanged .part."""
        self.keep(self.open(), 0, 2, 3)
        j = self.open(hashPiece=self.countingHasher(journal.partPath(self.final)))
        self.assertEqual(j.status, RESUMED)
        self.assertEqual(j.verified, {0, 2, 3})
        self.assertEqual(j.missing, [1])
        self.assertEqual(j.keptBytes, 2 * PIECE + 100)
        self.assertEqual(self.hashed, [])
        self.assertEqual(j.part.read_bytes()[2 * PIECE :], CONTENT[2 * PIECE :])

    def test_journalRecordsFile(self) -> None:
        """The journal names the file, its hashes, piece size and the .part's size and mtime."""
        j = self.open(name="folder/big.bin")
        self.keep(j, 1)
        doc = self.stored()
        self.assertEqual(doc["name"], "folder/big.bin")
        self.assertEqual((doc["size"], doc["sha256"], doc["root"]), (SIZE, SHA, ROOT))
        self.assertEqual(doc["pieceSize"], PIECE)
        self.assertEqual(doc["partSize"], SIZE)
        self.assertEqual(doc["partMtimeNs"], j.part.stat().st_mtime_ns)
        self.assertEqual(doc["pieces"], {1})

    def test_batchedWrites(self) -> None:
        """Pieces verified within FLUSH_INTERVAL of the last write wait for the next one, or flush()."""
        j = self.open()  # writes the journal at 0
        self.clock.advance(0.2)
        j.write(0, PIECES[0])
        j.markVerified(0)
        self.assertEqual(self.stored()["pieces"], set())
        self.assertAlmostEqual(j.flushDue(), 0.3)
        self.clock.advance(0.3)
        j.markVerified(0)  # already verified: nothing new to write
        self.assertEqual(self.stored()["pieces"], set())
        j.markVerified(3)
        self.assertEqual(self.stored()["pieces"], {0, 3})
        self.clock.advance(0.1)
        j.write(PIECE, PIECES[1])
        j.markVerified(1)
        self.assertEqual(self.stored()["pieces"], {0, 3})
        self.assertAlmostEqual(j.flushDue(), 0.4)
        self.assertTrue(j.dirty)
        j.flush()
        self.assertEqual(self.stored()["pieces"], {0, 1, 3})
        self.assertIsNone(j.flushDue())

    def test_atomicReplace(self) -> None:
        """The journal is replaced whole: no temporary file stays behind."""
        self.keep(self.open(), 0)
        self.assertEqual(
            sorted(p.name for p in self.dir.iterdir()), ["big.bin.part", "big.bin.part.journal"]
        )

    def test_truncatedPartDetected(self) -> None:
        """A .part cut short loses the claimed pieces it no longer holds, keeps the others, and regains its size."""
        self.keep(self.open(), 0, 1, 2, 3)
        os.truncate(journal.partPath(self.final), PIECE + PIECE // 2)
        j = self.open()
        self.assertEqual(j.status, RECHECKED)
        self.assertEqual(j.verified, {0})
        self.assertEqual(j.dropped, [1, 2, 3])
        self.assertEqual(j.part.stat().st_size, SIZE)
        self.assertEqual(self.stored()["pieces"], {0})

    def test_editedPartDetected(self) -> None:
        """A .part edited in place (same size, new mtime) gets only its claimed pieces re-hashed; the bad one is dropped."""
        self.keep(self.open(), 0, 2, 3)
        part = journal.partPath(self.final)
        with open(part, "r+b") as f:
            f.seek(2 * PIECE + 5)
            f.write(b"\0edited\0")
        j = self.open(hashPiece=self.countingHasher(part))
        self.assertEqual(j.status, RECHECKED)
        self.assertEqual(sorted(self.hashed), [0, 2, 3])
        self.assertEqual(j.verified, {0, 3})
        self.assertEqual(j.dropped, [2])

    def test_touchedPartKeepsGoodPieces(self) -> None:
        """A .part whose mtime changed but whose bytes did not keeps every claimed piece, after a re-hash."""
        self.keep(self.open(), 1, 3)
        os.utime(journal.partPath(self.final), ns=(1, 10**18))
        j = self.open()
        self.assertEqual(j.status, RECHECKED)
        self.assertEqual(j.verified, {1, 3})
        j.close()
        again = self.open(hashPiece=self.countingHasher(j.part))
        self.assertEqual(again.status, RESUMED)  # the new mtime is recorded
        self.assertEqual(self.hashed, [])

    def test_recheckWithoutDigestsDropsAll(self) -> None:
        """Without the manifest's digests a changed .part keeps nothing it cannot check."""
        self.keep(self.open(), 0, 1)
        os.utime(journal.partPath(self.final), ns=(1, 10**18))
        j = self.open(digests=None)
        self.assertEqual(j.verified, set())

    def test_changedRootStartsOver(self) -> None:
        """A journal for another version of the file (a different root) is discarded with its .part."""
        self.keep(self.open(), 0, 1)
        j = self.open(root="cd" * 32)
        self.assertEqual(j.status, CHANGED)
        self.assertEqual(j.verified, set())
        self.assertEqual(j.part.read_bytes(), bytes(SIZE))
        self.assertEqual(self.stored()["root"], "cd" * 32)

    def test_changedSizeStartsOver(self) -> None:
        """A journal for a file of another size or hash starts over too."""
        self.keep(self.open(), 0)
        j = Journal.open(self.final, SIZE + 1, SHA, ROOT, PIECE, now=self.clock.seconds)
        self.addCleanup(j.close)
        self.assertEqual(j.status, CHANGED)
        self.assertEqual(j.verified, set())

    def test_noResume(self) -> None:
        """resume=False (--no-resume) ignores the journal and starts over."""
        self.keep(self.open(), 0, 1)
        j = self.open(resume=False)
        self.assertEqual(j.status, NEW)
        self.assertEqual(j.verified, set())

    def test_journalWithoutPart(self) -> None:
        """A journal whose .part is gone starts over."""
        self.keep(self.open(), 0, 1)
        os.unlink(journal.partPath(self.final))
        j = self.open()
        self.assertEqual(j.status, NEW)
        self.assertEqual(j.verified, set())

    def test_partWithoutJournal(self) -> None:
        """A .part without a journal is not trusted: it starts over."""
        self.keep(self.open(), 0, 1)
        os.unlink(journal.journalPath(self.final))
        j = self.open()
        self.assertEqual(j.verified, set())
        self.assertEqual(j.part.read_bytes(), bytes(SIZE))

    def test_forget(self) -> None:
        """Pieces forgotten (a failed whole-file check) are missing again, in the journal too."""
        j = self.open()
        for i in range(4):
            j.write(i * PIECE, PIECES[i])
            j.markVerified(i)
        j.forget([2])
        j.flush()
        self.assertEqual(j.missing, [2])
        self.assertEqual(self.stored()["pieces"], {0, 1, 3})


class CorruptJournalTests(JournalTestCase):
    def assertStartsOver(self, data: bytes) -> None:
        self.keep(self.open(), 0, 1)
        journal.journalPath(self.final).write_bytes(data)
        j = self.open()
        self.assertEqual(j.status, NEW)
        self.assertEqual(j.verified, set())
        self.assertIsNotNone(self.stored())  # rewritten in good order

    def validDoc(self) -> dict:
        fields = dict(
            name="big.bin", size=SIZE, sha256=SHA, root=ROOT, pieceSize=PIECE,
            partSize=SIZE, partMtimeNs=1,
        )
        return json.loads(formatJournal(fields, {0, 1}))

    def test_garbage(self) -> None:
        """A journal of random bytes is treated as absent."""
        self.assertStartsOver(os.urandom(300))

    def test_truncatedJSON(self) -> None:
        """A journal cut short is treated as absent."""
        data = journal.journalPath(self.final)
        self.keep(self.open(), 0, 1)
        whole = data.read_bytes()
        self.assertStartsOver(whole[: len(whole) // 2])

    def test_empty(self) -> None:
        """An empty journal is treated as absent."""
        self.assertStartsOver(b"")

    def test_wrongVersion(self) -> None:
        """A journal of another version, even with a good checksum, is treated as absent."""
        doc = self.validDoc()
        del doc["check"]
        doc["version"] = 2
        doc["check"] = journal._checksum(doc)
        self.assertStartsOver(json.dumps(doc).encode())

    def test_checksumMismatch(self) -> None:
        """A journal edited by hand (its checksum no longer matching) is treated as absent."""
        doc = self.validDoc()
        doc["pieces"] = encodeBitmap(range(4), 4)
        self.assertStartsOver(json.dumps(doc).encode())

    def test_wrongTypes(self) -> None:
        """A journal with a field of the wrong type is treated as absent."""
        doc = self.validDoc()
        del doc["check"]
        doc["size"] = str(SIZE)
        doc["check"] = journal._checksum(doc)
        self.assertStartsOver(json.dumps(doc).encode())

    def test_notAnObject(self) -> None:
        """A journal that is JSON but not an object is treated as absent."""
        self.assertStartsOver(b"[1, 2, 3]")

    def test_validDocParses(self) -> None:
        """The documents these tests corrupt are valid to begin with."""
        doc = self.validDoc()
        self.assertEqual(parseJournal(json.dumps(doc).encode())["pieces"], {0, 1})


class RemoveTests(JournalTestCase):
    def test_removeBoth(self) -> None:
        """remove() deletes the .part and the journal."""
        j = self.open()
        self.keep(j, 0)
        j.remove()
        self.assertEqual(list(self.dir.iterdir()), [])

    def test_removeAfterRename(self) -> None:
        """remove() after the fetcher moved the verified .part to the final name deletes just the journal."""
        j = self.open()
        for i in range(4):
            j.write(i * PIECE, PIECES[i])
            j.markVerified(i)
        os.rename(j.part, self.final)
        j.remove()
        self.assertEqual([p.name for p in self.dir.iterdir()], ["big.bin"])
        self.assertEqual(self.final.read_bytes(), CONTENT)

    def test_closeKeepsBoth(self) -> None:
        """close() (an interruption) keeps both files, the journal up to date."""
        j = self.open()
        j.write(0, PIECES[0])
        j.markVerified(0)
        self.clock.advance(0.1)
        j.write(PIECE, PIECES[1])
        j.markVerified(1)
        j.close()
        self.assertEqual(self.stored()["pieces"], {0, 1})
        self.assertTrue(j.part.exists())


class BitmapTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None, database=None)
    @given(count=st.integers(0, 100), data=st.data())
    def test_roundTrip(self, count, data) -> None:
        """Any set of pieces survives the bitmap encoding."""
        pieces = data.draw(st.sets(st.integers(0, max(count - 1, 0)))) if count else set()
        self.assertEqual(decodeBitmap(encodeBitmap(pieces, count), count), pieces)

    def test_bitsBeyondEndRefused(self) -> None:
        """A bitmap naming a piece past the last is refused."""
        self.assertRaises(ValueError, decodeBitmap, encodeBitmap({7}, 8), 5)

    def test_lengthMismatchRefused(self) -> None:
        """A bitmap of the wrong length is refused."""
        self.assertRaises(ValueError, decodeBitmap, encodeBitmap({1}, 16), 8)
