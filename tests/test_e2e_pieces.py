"""
End-to-end, client side of pieces: real ``twistd relay`` and ``twistd
peernode`` processes on loopback and the real ``p2p-fetch``, with small
files in 16 KiB pieces (the advanced ``--piece-size``) and rate-capped
nodes, so transfers last long enough to interrupt.  What each node sent
is read from its log ("sending NAME (LENGTH bytes from OFFSET)").
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time

from p2prelay.cli.demo import script
from p2prelay.client.journal import parseJournal
from p2prelay.pieces import MIN_PIECE_SIZE

from .support import NetworkTestCase

PIECE = MIN_PIECE_SIZE  # 16 KiB
MULTI = os.urandom(64 * PIECE)  # 1 MiB
RESUME = os.urandom(128 * PIECE)  # 2 MiB
RATED = os.urandom(6 * 1024 * 1024)
RATE = 2 * 1024 * 1024  # the lone node's --max-rate 2M
# "sending NAME (16384 bytes from 49152) to PEER", or "sending NAME (16.0 KiB from byte 49152) to PEER"
# (a whole file: no "from"): the offset is exact either way, the length is the piece's.
SENDING = re.compile(r"sending (?P<name>\S+) \((?:\d+ bytes from (?P<offset>\d+)|[^)]*? from byte (?P<at>\d+)|[^)]*)\)")


def rangeStart(match: "re.Match[str]") -> int | None:
    """The offset a "sending" line names; None for a whole file."""
    found = match.group("offset") or match.group("at")
    return None if found is None else int(found)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def waitWhile(process: subprocess.Popen, predicate, timeout: float = 15) -> None:
    """Poll until ``predicate`` holds; fail (with the fetch's stderr) if the fetch ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"p2p-fetch ({process.returncode}) before the condition: {process.stderr.read()!r}")
        time.sleep(0.01)


def ranges(log: list, name: str, since: int = 0) -> list[int]:
    """The offsets of the ranges of ``name`` a node logged sending, from line ``since`` (-1: the whole file)."""
    found = []
    for line in log[since:]:
        m = SENDING.search(line)
        if m and m.group("name") == name:
            start = rangeStart(m)
            found.append(-1 if start is None else start)
    return found


class PiecesTests(NetworkTestCase):
    """
    Three nodes capped at 512 KiB/s hold multi.bin and resume.bin in 16 KiB
    pieces; a fourth, capped at 2 MiB/s, alone holds rated.bin.
    """

    @classmethod
    def startNodes(cls, net) -> None:
        files = {"multi.bin": MULTI, "resume.bin": RESUME}
        cls.holders = net.nodesInParallel(
            *[(net.folder(label, files), "--piece-size", "16K", "--max-rate", "512K") for label in "abc"],
        )
        (cls.rated,) = net.nodesInParallel(
            (net.folder("rated", {"rated.bin": RATED}), "--piece-size", "16K", "--max-rate", "2M"),
        )

    def popen(self, *args: str) -> subprocess.Popen:
        process = subprocess.Popen(
            script("p2p-fetch") + list(args),
            env=self.net.env(),
            cwd=str(self.net.root),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: (process.poll() is None and process.kill(), process.wait(), process.stderr.close()))
        return process

    def test_multiSourceVerified(self):
        """A 64-piece file held by three nodes arrives whole and verified, pieces served by more than one of them."""
        marks = [len(node.log) for node in self.holders]
        out = self.net.root / "out-multi"
        result = self.net.fetch("-o", str(out), "multi.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sha((out / "multi.bin").read_bytes()), sha(MULTI))
        served = [ranges(node.log, "multi.bin", mark) for node, mark in zip(self.holders, marks)]
        self.assertGreater(sum(1 for r in served if r), 1, served)
        self.assertTrue(all(offset % PIECE == 0 for r in served for offset in r), served)

    def test_sigkillThenResume(self):
        """
        A download SIGKILLed part way keeps its journal; the next run asks
        the nodes only for pieces the journal did not record, and the
        result verifies.
        """
        out = self.net.root / "out-resume"
        out.mkdir()
        journal = out / "resume.bin.part.journal"

        def kept() -> set:
            try:
                fields = parseJournal(journal.read_bytes())
            except OSError:
                return set()
            return fields["pieces"] if fields else set()

        first = self.popen("-o", str(out), "resume.bin")
        waitWhile(first, lambda: len(kept()) >= 16)
        first.send_signal(signal.SIGKILL)
        first.wait()
        have = kept()
        self.assertTrue(16 <= len(have) < 128, len(have))
        self.assertTrue((out / "resume.bin.part").exists())
        time.sleep(0.2)  # the nodes log the end of the cut transfers
        marks = [len(node.log) for node in self.holders]
        result = self.net.fetch("-o", str(out), "resume.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sha((out / "resume.bin").read_bytes()), sha(RESUME))
        asked = {offset // PIECE for node, mark in zip(self.holders, marks) for offset in ranges(node.log, "resume.bin", mark)}
        self.assertEqual(asked & have, set())
        self.assertEqual(asked | have, set(range(128)))
        self.assertFalse((out / "resume.bin.part").exists())
        self.assertFalse(journal.exists())

    def test_rateCapHolds(self):
        """
        A multi-piece fetch from one node capped at 2 MiB/s never beats the
        cap by more than 10 % (process start aside).  How close it comes is
        load-dependent on a shared machine, so only a loose floor is checked
        here; the bucket's accuracy is specified on a fake clock in
        test_ratelimit.py.
        """
        started = time.monotonic()
        self.assertEqual(self.net.fetch("--peers").returncode, 0)
        baseline = time.monotonic() - started
        out = self.net.root / "out-rated"
        started = time.monotonic()
        result = self.net.fetch("-o", str(out), "rated.bin")
        elapsed = time.monotonic() - started - baseline
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sha((out / "rated.bin").read_bytes()), sha(RATED))
        rate = len(RATED) / elapsed
        self.assertLessEqual(rate, RATE * 1.1, f"{rate / 2**20:.2f} MiB/s: over the cap")
        self.assertGreater(rate, RATE * 0.25, f"{rate / 2**20:.2f} MiB/s: strangled")


class FailoverTests(NetworkTestCase):
    """Two nodes capped at 256 KiB/s hold the same 1 MiB file in 16 KiB pieces."""

    @classmethod
    def startNodes(cls, net) -> None:
        cls.doomed, cls.survivor = net.nodesInParallel(
            *[(net.folder(label, {"multi.bin": MULTI}), "--piece-size", "16K", "--max-rate", "256K") for label in "ab"],
        )

    def test_holderKilledMidFile(self):
        """
        One of two holders SIGKILLed mid-transfer: the file completes from
        the other, verified, which sends only part of it (the download
        continued from the pieces it had, not from byte 0).
        """
        out = self.net.root / "out"
        process = subprocess.Popen(
            script("p2p-fetch") + ["-o", str(out), "multi.bin"],
            env=self.net.env(),
            cwd=str(self.net.root),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: (process.poll() is None and process.kill(), process.wait(), process.stderr.close()))
        waitWhile(process, lambda: len(ranges(self.doomed.log, "multi.bin")) >= 8)
        self.doomed.stop(signal.SIGKILL)
        self.assertEqual(process.wait(timeout=30), 0, process.stderr.read())
        self.assertEqual(sha((out / "multi.bin").read_bytes()), sha(MULTI))
        served = ranges(self.survivor.log, "multi.bin")
        self.assertNotIn(-1, served)  # never the whole file again
        self.assertLess(len(set(served)), len(MULTI) // PIECE)
