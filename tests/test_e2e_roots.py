"""
End-to-end, identical content under different names: a real ``twistd
relay``, two real ``twistd peernode`` processes sharing the same bytes
(one as ``big.iso``, the other as ``mirror/debian.iso``), both rate-capped
so the pieces spread, and the real ``p2p-fetch -o -v``: the holder under
the other name, found by ``WHOHAS root=``, serves pieces under its own name.
"""

from __future__ import annotations

import hashlib
import os

from p2prelay.pieces import MIN_PIECE_SIZE

from .support import NetworkTestCase
from .test_e2e_pieces import ranges

PIECE = MIN_PIECE_SIZE  # 16 KiB
DATA = os.urandom(64 * PIECE)  # 1 MiB


class SameContentTests(NetworkTestCase):
    """Two nodes capped at 512 KiB/s hold DATA in 16 KiB pieces, under two names."""

    @classmethod
    def startNodes(cls, net) -> None:
        cls.named, cls.mirror = net.nodesInParallel(
            (net.folder("named", {"big.iso": DATA}), "--piece-size", "16K", "--max-rate", "512K"),
            (net.folder("mirror", {"mirror/debian.iso": DATA}), "--piece-size", "16K", "--max-rate", "512K"),
        )

    def test_fetchedFromBothNames(self):
        """p2p-fetch -o -v of big.iso takes pieces from the holder of the same bytes as mirror/debian.iso too; the file verifies."""
        marks = len(self.named.log), len(self.mirror.log)
        out = self.net.root / "out-roots"
        result = self.net.fetch("-o", str(out), "-v", "big.iso")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256((out / "big.iso").read_bytes()).digest(), hashlib.sha256(DATA).digest())
        stderr = result.stderr.decode("utf-8", "replace")
        self.assertIn("1 more holder(s) of the same content under other names", stderr)
        named = ranges(self.named.log, "big.iso", marks[0])
        mirrored = ranges(self.mirror.log, "mirror/debian.iso", marks[1])
        self.assertTrue(named and mirrored, (named, mirrored, stderr))
        self.assertTrue(all(offset % PIECE == 0 for offset in named + mirrored))
        self.assertEqual({o // PIECE for o in named + mirrored}, set(range(64)))
