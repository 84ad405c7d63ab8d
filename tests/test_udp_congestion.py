"""
Tests for p2prelay.udp.congestion: the sender's congestion window on its
own, event by event, with no network.
"""

from __future__ import annotations

from twisted.trial import unittest

from p2prelay.udp.congestion import (
    BETA,
    INITIAL_WINDOW,
    INITIAL_WINDOW_BYTES,
    MIN_CWND,
    Congestion,
)

LIMIT = 4096  # a receiver window larger than anything these tests reach


class InitialWindowTests(unittest.SynchronousTestCase):
    """The first burst: about INITIAL_WINDOW_BYTES, bounded in blocks."""

    def test_defaultBlocks(self) -> None:
        """With 1400-byte blocks the window starts at 256 KiB worth of them."""
        self.assertEqual(Congestion(LIMIT, 1400).cwnd, INITIAL_WINDOW_BYTES // 1400)

    def test_smallBlocks(self) -> None:
        """Small blocks start at INITIAL_WINDOW blocks, not 256 KiB worth."""
        self.assertEqual(Congestion(LIMIT, 64).cwnd, INITIAL_WINDOW)

    def test_largeBlocks(self) -> None:
        """Blocks so large that 256 KiB is few of them start at MIN_CWND."""
        self.assertEqual(Congestion(LIMIT, 128 * 1024).cwnd, MIN_CWND)

    def test_receiverWindow(self) -> None:
        """The window never starts above the receiver's window."""
        self.assertEqual(Congestion(16, 1400).cwnd, 16)

    def test_slowStartUntilTheLimit(self) -> None:
        """ssthresh starts at the receiver's window: slow start runs until then."""
        self.assertEqual(Congestion(LIMIT, 1400).ssthresh, LIMIT)


class GrowthTests(unittest.SynchronousTestCase):
    """How acknowledgements open the window."""

    def test_slowStart(self) -> None:
        """Below ssthresh, every acknowledged block adds one block."""
        c = Congestion(LIMIT, 1400)
        start = c.cwnd
        c.acked(10)
        self.assertEqual(c.cwnd, start + 10)
        c.acked(1)
        self.assertEqual(c.cwnd, start + 11)

    def test_slowStartDoublesPerWindow(self) -> None:
        """A whole window acknowledged in slow start doubles the window."""
        c = Congestion(LIMIT, 1400)
        start = c.cwnd
        c.acked(int(start))
        self.assertEqual(c.cwnd, 2 * start)

    def test_congestionAvoidance(self) -> None:
        """At or above ssthresh, a window of acknowledgements adds about one block."""
        c = Congestion(LIMIT, 1400)
        c.lost(seq=1, latestSeq=100)  # ssthresh = cwnd now
        start = c.cwnd
        for _ in range(int(start)):
            c.acked(1)
        self.assertGreater(c.cwnd, start + 0.98)
        self.assertLessEqual(c.cwnd, start + 1)

    def test_neverAboveTheReceiverWindow(self) -> None:
        """However much is acknowledged, the window stays within the receiver's."""
        c = Congestion(300, 1400)
        c.acked(10_000)
        self.assertEqual(c.cwnd, 300)
        c.lost(seq=1, latestSeq=2)
        for _ in range(10_000):
            c.acked(50)
        self.assertEqual(c.cwnd, 300)


class LossTests(unittest.SynchronousTestCase):
    """How losses and timeouts close the window."""

    def test_lossReduces(self) -> None:
        """A loss keeps BETA (0.7, not Reno's half) of the window and sets ssthresh to that."""
        c = Congestion(LIMIT, 1400)
        c.acked(13)  # 200 blocks
        self.assertTrue(c.lost(seq=5, latestSeq=300))
        self.assertEqual(BETA, 0.7)
        self.assertAlmostEqual(c.cwnd, 140)
        self.assertEqual(c.ssthresh, c.cwnd)

    def test_oneReductionPerEvent(self) -> None:
        """Losses of blocks sent before the reduction belong to the same event."""
        c = Congestion(LIMIT, 1400)
        c.acked(13)
        c.lost(seq=5, latestSeq=300)
        for seq in (6, 150, 300):
            self.assertFalse(c.lost(seq=seq, latestSeq=320))
        self.assertAlmostEqual(c.cwnd, 140)

    def test_laterLossReducesAgain(self) -> None:
        """A loss of a block sent after the reduction is a new event."""
        c = Congestion(LIMIT, 1400)
        c.acked(13)
        c.lost(seq=5, latestSeq=300)
        self.assertTrue(c.lost(seq=301, latestSeq=400))
        self.assertAlmostEqual(c.cwnd, 98)

    def test_lossFloor(self) -> None:
        """Reductions never take the window below MIN_CWND."""
        c = Congestion(LIMIT, 1400)
        latest = 0
        for _ in range(20):
            c.lost(seq=latest + 1, latestSeq=latest + 10)
            latest += 10
        self.assertEqual((c.cwnd, c.ssthresh), (MIN_CWND, MIN_CWND))

    def test_timeoutCollapses(self) -> None:
        """A timer expiry drops the window to MIN_CWND and ssthresh to half what was in flight."""
        c = Congestion(LIMIT, 1400)
        c.timedOut(inflight=150, latestSeq=400)
        self.assertEqual((c.cwnd, c.ssthresh), (MIN_CWND, 75))

    def test_timeoutThresholdFloor(self) -> None:
        """After a timeout with little in flight, ssthresh is still at least MIN_CWND."""
        c = Congestion(LIMIT, 1400)
        c.timedOut(inflight=3, latestSeq=10)
        self.assertEqual(c.ssthresh, MIN_CWND)

    def test_timeoutEndsTheEvent(self) -> None:
        """Losses of blocks sent before a timeout do not halve the collapsed window again."""
        c = Congestion(LIMIT, 1400)
        c.acked(100)
        c.timedOut(inflight=150, latestSeq=400)
        self.assertFalse(c.lost(seq=399, latestSeq=410))
        self.assertEqual(c.cwnd, MIN_CWND)

    def test_slowStartAfterTimeout(self) -> None:
        """After a timeout the window grows in slow start up to the new ssthresh, then slowly."""
        c = Congestion(LIMIT, 1400)
        c.timedOut(inflight=40, latestSeq=100)
        c.acked(16)
        self.assertEqual(c.cwnd, 20)
        c.acked(20)
        self.assertAlmostEqual(c.cwnd, 21)
