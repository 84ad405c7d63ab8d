"""
The piece scheduler: which holder gets which piece, what happens when one
is slow, corrupt, stalled or gone, the endgame, the streaming window and
the cap on holders in use.

The scheduler is pure logic on an injected clock, so these tests drive it
with a ``task.Clock`` and a small simulated swarm of holders (each serving
its requests one after another at its own speed) instead of a network.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2prelay.client.schedule import BUSY_PATIENCE, MAX_IN_FLIGHT, Scheduler

PIECE = 1024 * 1024
MB = 1000 * 1000
SCALE = max(1, int(os.environ.get("P2PRELAY_PROPERTY_SCALE", "1")))


class Swarm:
    """
    Simulated holders: each serves the pieces it was asked for in order at
    ``speed`` bytes/s (None: never answers, a stalled holder).  ``run``
    fills every holder's queue from the scheduler, delivers whichever
    piece finishes first, cancels what the scheduler says to cancel, and
    repeats until the scheduler is done or nothing is in flight.
    """

    def __init__(self, sched: Scheduler, clock: Clock, speeds: Dict[str, Optional[float]]) -> None:
        self.sched = sched
        self.clock = clock
        self.speeds = speeds
        # holder -> [(piece, start of its transfer)], served in order
        self.queues: Dict[str, List[Tuple[int, float]]] = {h: [] for h in speeds}
        self.delivered: Dict[str, List[int]] = {h: [] for h in speeds}
        self.cancelled: List[Tuple[str, int]] = []
        self.corrupt: set = set()
        for holder in speeds:
            sched.addHolder(holder)

    def fill(self) -> None:
        for holder in self.sched.holders:
            while (piece := self.sched.assign(holder)) is not None:
                self.queues[holder].append((piece, self.clock.seconds()))

    def finishTime(self, holder: str) -> Optional[float]:
        speed = self.speeds[holder]
        if speed is None or not self.queues[holder]:
            return None
        _, asked = self.queues[holder][0]
        start = max(asked, self.lastEnd.get(holder, 0.0))
        return start + PIECE / speed

    def step(self) -> bool:
        """Deliver the next piece to finish; False when none will."""
        self.fill()
        times = [(t, h) for h in self.queues if (t := self.finishTime(h)) is not None]
        if not times or self.sched.done:
            return False
        when, holder = min(times)
        self.clock.advance(when - self.clock.seconds())
        piece, _ = self.queues[holder].pop(0)
        self.lastEnd[holder] = when
        if holder in self.corrupt:
            for p in self.sched.failed(piece, holder, corrupt=True):
                self.cancel(holder, p)
            return True
        self.delivered[holder].append(piece)
        for other in self.sched.completed(piece, holder, PIECE):
            self.cancel(other, piece)
        return True

    def cancel(self, holder: str, piece: int) -> None:
        self.cancelled.append((holder, piece))
        self.queues[holder] = [(p, t) for p, t in self.queues[holder] if p != piece]

    def run(self, steps: int = 10_000) -> None:
        self.lastEnd: Dict[str, float] = {}
        for _ in range(steps):
            if not self.step():
                return


class SpeedTests(SynchronousTestCase):
    def test_fasterHolderGetsMorePieces(self) -> None:
        """Over a whole download a holder four times faster delivers several times as many pieces."""
        clock = Clock()
        sched = Scheduler(64, clock.seconds, pieceSize=PIECE)
        swarm = Swarm(sched, clock, {"fast": 40 * MB, "slow": 10 * MB})
        swarm.run()
        self.assertTrue(sched.done)
        fast, slow = len(swarm.delivered["fast"]), len(swarm.delivered["slow"])
        self.assertEqual(fast + slow, 64)
        self.assertGreater(fast, 2.5 * slow)

    def test_limitGrowsWithMeasuredRate(self) -> None:
        """A new holder may have one piece in flight; once measured, a fast one may have more than a slow one."""
        clock = Clock()
        sched = Scheduler(100, clock.seconds, pieceSize=PIECE)
        sched.addHolder("fast")
        sched.addHolder("slow")
        self.assertEqual(sched.limit("fast"), 1)
        a = sched.assign("fast")
        b = sched.assign("slow")
        self.assertIsNone(sched.assign("fast"))  # its one piece is in flight
        clock.advance(0.1)  # 1 MiB in 0.1 s: about 10 MB/s
        sched.completed(a, "fast", PIECE)
        clock.advance(0.9)  # 1 MiB in 1 s
        sched.completed(b, "slow", PIECE)
        self.assertGreater(sched.limit("fast"), sched.limit("slow"))
        self.assertEqual(sched.limit("slow"), 1)
        self.assertLessEqual(sched.limit("fast"), MAX_IN_FLIGHT)
        assigned = []
        while (p := sched.assign("fast")) is not None:
            assigned.append(p)
        self.assertEqual(len(assigned), sched.limit("fast"))

    def test_explicitSecondsMeasure(self) -> None:
        """completed(seconds=...) measures the holder's rate from the time given."""
        clock = Clock()
        sched = Scheduler(4, clock.seconds, pieceSize=PIECE)
        sched.addHolder("a")
        sched.completed(sched.assign("a"), "a", 1000, seconds=2.0)
        self.assertEqual(sched.rate("a"), 500.0)

    def test_piecesGoOutLowestFirst(self) -> None:
        """Pieces are handed out in index order."""
        sched = Scheduler(5, Clock().seconds)
        for h in "abc":
            sched.addHolder(h)
        self.assertEqual([sched.assign(h) for h in "abc"], [0, 1, 2])


class CorruptTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sched = Scheduler(8, self.clock.seconds)
        self.sched.addHolder("bad")
        self.sched.addHolder("good")

    def test_corruptHolderDroppedForGood(self) -> None:
        """A holder whose piece fails its digest is never asked again, even if added anew."""
        piece = self.sched.assign("bad")
        self.sched.failed(piece, "bad", corrupt=True)
        self.assertTrue(self.sched.isDropped("bad"))
        self.sched.addHolder("bad")
        self.assertIsNone(self.sched.assign("bad"))
        self.assertEqual(self.sched.holders, ["good"])

    def test_corruptPieceRefetchedElsewhere(self) -> None:
        """The piece a corrupt holder sent goes to another holder next."""
        piece = self.sched.assign("bad")
        self.sched.assign("good")
        self.sched.failed(piece, "bad", corrupt=True)
        self.sched.completed(1, "good", PIECE)
        self.assertEqual(self.sched.assign("good"), piece)
        self.assertIn(piece, self.sched.missing)

    def test_corruptHolderOtherPiecesAbandoned(self) -> None:
        """Dropping a corrupt holder returns its other pieces in flight, to be cancelled and requeued."""
        sched = Scheduler(8, self.clock.seconds, maxInFlight=4)
        sched.addHolder("bad")
        first = sched.assign("bad")
        self.clock.advance(0.01)
        sched.completed(first, "bad", 4 * 1024 * 1024)  # fast: a longer queue
        pieces = []
        while (p := sched.assign("bad")) is not None:
            pieces.append(p)
        self.assertGreater(len(pieces), 1)
        abandoned = sched.failed(pieces[0], "bad", corrupt=True)
        self.assertEqual(abandoned, pieces[1:])
        sched.addHolder("good")
        self.assertEqual(sched.assign("good"), pieces[0])

    def test_swarmWithCorruptHolderCompletes(self) -> None:
        """A simulated download with one holder sending garbage completes from the others."""
        sched = Scheduler(20, self.clock.seconds, pieceSize=PIECE)
        swarm = Swarm(sched, self.clock, {"liar": 50 * MB, "a": 10 * MB, "b": 10 * MB})
        swarm.corrupt.add("liar")
        swarm.run()
        self.assertTrue(sched.done)
        self.assertTrue(sched.isDropped("liar"))
        self.assertEqual(swarm.delivered["liar"], [])
        self.assertEqual(sorted(swarm.delivered["a"] + swarm.delivered["b"]), list(range(20)))


class FailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sched = Scheduler(10, self.clock.seconds, maxFailures=3)
        self.sched.addHolder("flaky")
        self.sched.addHolder("good")

    def test_disappearsMidPiece(self) -> None:
        """A holder whose connection is lost mid-piece stays in use; the piece goes to another holder."""
        piece = self.sched.assign("flaky")
        self.sched.assign("good")
        self.assertEqual(self.sched.failed(piece, "flaky"), [])
        self.assertFalse(self.sched.isDropped("flaky"))
        self.sched.completed(1, "good", PIECE)
        self.assertEqual(self.sched.assign("good"), piece)

    def test_failedPiecePreferablyElsewhere(self) -> None:
        """A holder that failed a piece gets new work rather than the same piece again."""
        piece = self.sched.assign("flaky")
        self.sched.failed(piece, "flaky")
        self.assertNotEqual(self.sched.assign("flaky"), piece)
        self.assertEqual(self.sched.assign("good"), piece)

    def test_failuresInARowDrop(self) -> None:
        """maxFailures plain failures in a row drop the holder."""
        for _ in range(3):
            self.assertFalse(self.sched.isDropped("flaky"))
            self.sched.failed(self.sched.assign("flaky"), "flaky")
        self.assertTrue(self.sched.isDropped("flaky"))
        self.assertIsNone(self.sched.assign("flaky"))

    def test_successResetsFailures(self) -> None:
        """A delivered piece resets the count of failures in a row."""
        for _ in range(2):
            self.sched.failed(self.sched.assign("flaky"), "flaky")
        self.sched.completed(self.sched.assign("flaky"), "flaky", PIECE)
        for _ in range(2):
            self.sched.failed(self.sched.assign("flaky"), "flaky")
        self.assertFalse(self.sched.isDropped("flaky"))

    def test_failureOfCancelledRequestIgnored(self) -> None:
        """A failure reported for a request no longer in flight (cancelled) does not count."""
        sched = Scheduler(1, self.clock.seconds, maxFailures=1)
        sched.addHolder("a")
        sched.addHolder("b")
        sched.assign("a")
        self.assertEqual(sched.assign("b"), 0)  # endgame duplicate
        self.assertEqual(sched.completed(0, "b", PIECE), ["a"])
        self.assertEqual(sched.failed(0, "a"), [])
        self.assertFalse(sched.isDropped("a"))

    def test_removeHolderRequeues(self) -> None:
        """A holder that is gone is dropped and its pieces return to the queue."""
        piece = self.sched.assign("flaky")
        self.assertEqual(self.sched.removeHolder("flaky"), [piece])
        self.assertTrue(self.sched.isDropped("flaky"))
        self.assertEqual(self.sched.assign("good"), piece)

    def test_exhaustedWhenEveryHolderDropped(self) -> None:
        """With pieces missing and every holder dropped, the scheduler says so."""
        self.sched.removeHolder("good")
        self.assertFalse(self.sched.exhausted)
        self.sched.failed(self.sched.assign("flaky"), "flaky", corrupt=True)
        self.assertTrue(self.sched.exhausted)

    def test_busyHolderBenched(self) -> None:
        """A busy answer with a retry hint is no failure: the holder is not asked again before then."""
        sched = Scheduler(10, self.clock.seconds, sources=1)
        sched.addHolder("busy")
        sched.addHolder("spare")
        piece = sched.assign("busy")
        self.assertIsNone(sched.assign("spare"))  # one source at a time
        sched.failed(piece, "busy", retryAfter=5)
        self.assertIsNone(sched.assign("busy"))
        self.assertEqual(sched.nextWake(), 5)
        self.assertEqual(sched.assign("spare"), piece)  # the spare takes its place
        self.clock.advance(5)
        sched.completed(piece, "spare", PIECE)
        sched.removeHolder("spare")
        self.assertIsNotNone(sched.assign("busy"))
        self.assertFalse(sched.isDropped("busy"))


    def test_busyForeverDropped(self) -> None:
        """A holder answering only "busy" for BUSY_PATIENCE seconds is dropped, so the download ends."""
        sched = Scheduler(2, self.clock.seconds, sources=1)
        sched.addHolder("busy")
        while True:
            piece = sched.assign("busy")
            if piece is None:
                self.clock.advance(1)
                continue
            sched.failed(piece, "busy", retryAfter=1)
            if sched.isDropped("busy"):
                break
            self.assertLess(self.clock.seconds(), BUSY_PATIENCE + 2)
        self.assertGreaterEqual(self.clock.seconds(), BUSY_PATIENCE)
        self.assertTrue(sched.exhausted)

    def test_busyPatienceRestartsOnDelivery(self) -> None:
        """A piece delivered resets the patience: a holder busy now and then is kept."""
        sched = Scheduler(100, self.clock.seconds, sources=1)
        sched.addHolder("popular")
        for _ in range(5):
            piece = sched.assign("popular")
            sched.failed(piece, "popular", retryAfter=BUSY_PATIENCE / 2)
            self.clock.advance(BUSY_PATIENCE / 2)
            piece = sched.assign("popular")
            sched.completed(piece, "popular", PIECE)
        self.assertFalse(sched.isDropped("popular"))

class EndgameTests(SynchronousTestCase):
    def test_stalledPieceTakenOver(self) -> None:
        """A piece stalled at one holder is duplicated to an idle one at the end, and the stalled copy cancelled."""
        clock = Clock()
        sched = Scheduler(10, clock.seconds, pieceSize=PIECE)
        swarm = Swarm(sched, clock, {"stuck": None, "fast": 20 * MB})
        swarm.run()
        self.assertTrue(sched.done)
        self.assertIn(0, swarm.delivered["fast"])
        self.assertEqual(swarm.delivered["stuck"], [])
        self.assertIn(("stuck", 0), swarm.cancelled)
        self.assertEqual(sched.inFlight("stuck"), set())

    def test_duplicateOfLongestInFlight(self) -> None:
        """With nothing left to hand out, an idle holder gets the piece in flight longest."""
        clock = Clock()
        sched = Scheduler(3, clock.seconds)
        for h in "abc":
            sched.addHolder(h)
        sched.assign("a")
        clock.advance(1)
        sched.assign("b")
        clock.advance(1)
        sched.assign("c")
        sched.completed(2, "c", PIECE)
        self.assertTrue(sched.endgame)
        self.assertEqual(sched.assign("c"), 0)
        self.assertIsNone(sched.assign("c"))  # busy again: no second duplicate

    def test_firstCopyWins(self) -> None:
        """When a duplicated piece arrives, the other copies are cancelled and a late copy changes nothing."""
        clock = Clock()
        sched = Scheduler(1, clock.seconds)
        sched.addHolder("a")
        sched.addHolder("b")
        sched.assign("a")
        self.assertEqual(sched.assign("b"), 0)
        self.assertEqual(sched.completed(0, "b", PIECE), ["a"])
        self.assertTrue(sched.done)
        self.assertEqual(sched.completed(0, "a", PIECE), [])
        self.assertEqual(sched.verifiedCount, 1)

    def test_copiesBounded(self) -> None:
        """A piece never has more than ``copies`` requests in flight."""
        sched = Scheduler(1, Clock().seconds, copies=2)
        for h in "abcd":
            sched.addHolder(h)
        self.assertEqual([sched.assign(h) for h in "abcd"], [0, 0, None, None])

    def test_notBeforeEndgame(self) -> None:
        """While pieces remain to hand out, a holder never gets a duplicate."""
        sched = Scheduler(3, Clock().seconds)
        sched.addHolder("a")
        sched.addHolder("b")
        self.assertEqual(sched.assign("a"), 0)
        self.assertEqual(sched.assign("b"), 1)
        self.assertFalse(sched.endgame)

    def test_stalledRequestsListed(self) -> None:
        """stalled(after) lists the requests in flight longer than ``after``, oldest first."""
        clock = Clock()
        sched = Scheduler(4, clock.seconds)
        for h in "ab":
            sched.addHolder(h)
        sched.assign("a")
        clock.advance(10)
        sched.assign("b")
        clock.advance(5)
        self.assertEqual(sched.stalled(12), [(0, "a")])
        self.assertEqual(sched.stalled(1), [(0, "a"), (1, "b")])


class WindowTests(SynchronousTestCase):
    def test_noPieceBeyondWindow(self) -> None:
        """With a window of W, no piece W or more beyond nextInOrder is handed out."""
        sched = Scheduler(10, Clock().seconds, window=2, maxInFlight=8)
        for h in "abcd":
            sched.addHolder(h)
        self.assertEqual([sched.assign(h) for h in "abcd"], [0, 1, 0, 1])  # then duplicates
        sched.completed(1, "b", PIECE)
        self.assertEqual(sched.nextInOrder, 0)
        self.assertIsNone(sched.assign("b"))  # piece 2 is beyond the window; 0 has its copies
        sched.completed(0, "a", PIECE)
        self.assertEqual(sched.nextInOrder, 2)
        self.assertEqual([sched.assign(h) for h in "ab"], [2, 3])

    def test_streamingStaysInWindow(self) -> None:
        """A whole simulated download with a window never has a piece in flight beyond it."""
        clock = Clock()
        sched = Scheduler(40, clock.seconds, pieceSize=PIECE, window=3)
        swarm = Swarm(sched, clock, {"a": 30 * MB, "b": 5 * MB, "c": 12 * MB})
        worst = 0
        step = swarm.step
        swarm.lastEnd = {}

        def watched() -> bool:
            nonlocal worst
            result = step()
            for q in swarm.queues.values():
                for p, _ in q:
                    worst = max(worst, p - sched.nextInOrder)
            return result

        while watched():
            pass
        self.assertTrue(sched.done)
        self.assertLess(worst, 3)

    def test_nextInOrderSkipsResumedPieces(self) -> None:
        """Pieces already verified (a resume) are never handed out, and nextInOrder starts past them."""
        sched = Scheduler(5, Clock().seconds, have=[0, 1, 3])
        sched.addHolder("a")
        sched.addHolder("b")
        self.assertEqual(sched.nextInOrder, 2)
        self.assertEqual(sched.missing, [2, 4])
        self.assertEqual([sched.assign("a"), sched.assign("b")], [2, 4])

    def test_nothingToFetch(self) -> None:
        """A file of no pieces, or every piece already verified, is done at once."""
        self.assertTrue(Scheduler(0, Clock().seconds).done)
        sched = Scheduler(2, Clock().seconds, have=[0, 1])
        sched.addHolder("a")
        self.assertTrue(sched.done)
        self.assertIsNone(sched.assign("a"))


class SourcesTests(SynchronousTestCase):
    def test_sourcesCap(self) -> None:
        """No more than ``sources`` holders are in use at once; the others get nothing."""
        sched = Scheduler(20, Clock().seconds, sources=2)
        for h in "abcdef":
            sched.addHolder(h)
        got = {h: sched.assign(h) for h in "abcdef"}
        self.assertEqual(sum(p is not None for p in got.values()), 2)
        self.assertEqual(sched.holdersInUse, 2)

    def test_spareStepsInForDropped(self) -> None:
        """When a holder in use is dropped, a spare takes its place."""
        sched = Scheduler(20, Clock().seconds, sources=2)
        for h in "abc":
            sched.addHolder(h)
        piece = sched.assign("a")
        sched.assign("b")
        self.assertIsNone(sched.assign("c"))
        sched.failed(piece, "a", corrupt=True)
        self.assertEqual(sched.assign("c"), piece)
        self.assertEqual(sched.holdersInUse, 2)

    def test_singleSource(self) -> None:
        """With sources=1 one holder gets every piece, in order."""
        clock = Clock()
        sched = Scheduler(6, clock.seconds, sources=1, pieceSize=PIECE)
        swarm = Swarm(sched, clock, {"a": 10 * MB, "b": 50 * MB})
        swarm.run()
        self.assertTrue(sched.done)
        self.assertEqual(swarm.delivered["a"], list(range(6)))
        self.assertEqual(swarm.delivered["b"], [])


GOOD_OUTCOMES = ["complete", "complete", "complete", "fail", "busy"]
BAD_OUTCOMES = ["complete", "fail", "corrupt", "vanish"]


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200 * SCALE, deadline=None, database=None)
    @given(
        pieces=st.integers(0, 24),
        sources=st.integers(1, 4),
        window=st.none() | st.integers(1, 5),
        maxFailures=st.integers(1, 3),
        kinds=st.lists(st.booleans(), min_size=0, max_size=4),
        data=st.data(),
    )
    def test_noPieceLostNoneTwice(self, pieces, sources, window, maxFailures, kinds, data):
        """
        Whatever holders do, with one good holder left every piece is
        completed exactly once, and no piece is ever handed out beyond the
        window, twice to one holder, or once verified.
        """
        clock = Clock()
        sched = Scheduler(
            pieces, clock.seconds, sources=sources, window=window, maxFailures=maxFailures
        )
        holders = ["good"] + [f"bad{i}" for i, bad in enumerate(kinds) if bad]
        holders += [f"good{i}" for i, bad in enumerate(kinds) if not bad]
        holders = data.draw(st.permutations(holders))
        for h in holders:
            sched.addHolder(h)
        outstanding: List[Tuple[str, int]] = []
        completions: Dict[int, int] = {}
        failuresInARow = {h: 0 for h in holders}
        busyLeft = 10
        for _ in range(3000):
            for h in sched.holders:
                while (p := sched.assign(h)) is not None:
                    self.assertFalse(sched.isVerified(p))
                    self.assertNotIn((h, p), outstanding)
                    if window is not None:
                        self.assertLess(p, sched.nextInOrder + window)
                    outstanding.append((h, p))
            self.assertLessEqual(sched.holdersInUse, sources)
            if sched.done:
                break
            if not outstanding:
                wake = sched.nextWake()
                self.assertIsNotNone(wake, f"pieces {sched.missing} lost")
                clock.advance(max(wake - clock.seconds(), 0))
                continue
            h, p = outstanding.pop(data.draw(st.integers(0, len(outstanding) - 1)))
            clock.advance(data.draw(st.floats(0, 5)))
            good = h.startswith("good")
            choices = GOOD_OUTCOMES if good else BAD_OUTCOMES
            outcome = data.draw(st.sampled_from(choices))
            if outcome == "fail" and good and failuresInARow[h] + 1 >= maxFailures:
                outcome = "complete"
            if outcome == "busy":
                if busyLeft == 0:
                    outcome = "complete"
                busyLeft -= 1
            if outcome == "complete":
                self.assertFalse(sched.isVerified(p), f"piece {p} delivered twice")
                completions[p] = completions.get(p, 0) + 1
                failuresInARow[h] = 0
                for other in sched.completed(p, h, 1000):
                    outstanding.remove((other, p))
                self.assertNotIn(p, [q for _, q in outstanding])
            elif outcome == "vanish":
                for q in sched.removeHolder(h):
                    if q != p:
                        outstanding.remove((h, q))
                self.assertEqual(sched.failed(p, h), [])
            else:
                if outcome == "fail":
                    failuresInARow[h] += 1
                abandoned = sched.failed(
                    p, h, corrupt=outcome == "corrupt", retryAfter=1.0 if outcome == "busy" else None
                )
                for q in abandoned:
                    outstanding.remove((h, q))
            for holder, q in outstanding:
                self.assertIn(q, sched.inFlight(holder))
        self.assertTrue(sched.done)
        self.assertEqual(completions, {p: 1 for p in range(pieces)})
        self.assertEqual(sched.missing, [])
        self.assertEqual(sched.nextInOrder, pieces)
