"""
Tests for p2prelay.udp.ranges: RangeSet, the block ranges behind both
ends' selective acknowledgements.

The property tests drive RangeSet with sequences of operations drawn by
Hypothesis and compare it, after every operation, with a plain Python set
of integers as the model.
"""

from __future__ import annotations

from typing import Callable, List, Set, Tuple

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from p2prelay.udp.ranges import RangeSet

SPAN = 80  # members are drawn from 0..SPAN-1: small, so ranges meet and merge


def rangeSet(*ranges: Tuple[int, int]) -> RangeSet:
    s = RangeSet()
    for start, end in ranges:
        s.addRange(start, end)
    return s


def members(s: RangeSet) -> Set[int]:
    return {n for start, end in s for n in range(start, end)}


class RangeSetTests(unittest.SynchronousTestCase):
    """RangeSet's operations, one case at a time."""

    def test_empty(self) -> None:
        """A new RangeSet has no ranges, is false, and contains nothing."""
        s = RangeSet()
        self.assertEqual((len(s), bool(s), list(s)), (0, False, []))
        self.assertNotIn(0, s)
        self.assertEqual(s.indexAtOrBelow(5), -1)

    def test_addOne(self) -> None:
        """Adding one member makes a range of one."""
        s = RangeSet()
        s.add(7)
        self.assertEqual(list(s), [(7, 8)])
        self.assertIn(7, s)
        self.assertNotIn(6, s)
        self.assertNotIn(8, s)

    def test_addJoinsLeft(self) -> None:
        """A member just above a range extends it."""
        s = rangeSet((3, 5))
        s.add(5)
        self.assertEqual(list(s), [(3, 6)])

    def test_addJoinsRight(self) -> None:
        """A member just below a range extends it downwards."""
        s = rangeSet((3, 5))
        s.add(2)
        self.assertEqual(list(s), [(2, 5)])

    def test_addFillsAGap(self) -> None:
        """A member filling the only gap between two ranges merges them."""
        s = rangeSet((3, 5), (6, 9))
        s.add(5)
        self.assertEqual(list(s), [(3, 9)])

    def test_addApart(self) -> None:
        """A member away from every range is a new range, in order."""
        s = rangeSet((3, 5), (20, 22))
        s.add(10)
        s.add(0)
        s.add(30)
        self.assertEqual(list(s), [(0, 1), (3, 5), (10, 11), (20, 22), (30, 31)])

    def test_addMemberAgain(self) -> None:
        """Adding a member already present changes nothing."""
        s = rangeSet((3, 9))
        for n in (3, 5, 8):
            s.add(n)
        self.assertEqual(list(s), [(3, 9)])

    def test_addRangeNew(self) -> None:
        """A range over nothing yet is wholly fresh."""
        s = rangeSet((0, 2))
        self.assertEqual(s.addRange(5, 9), [(5, 9)])
        self.assertEqual(list(s), [(0, 2), (5, 9)])

    def test_addRangeCovered(self) -> None:
        """A range already covered is not fresh at all, and changes nothing."""
        s = rangeSet((2, 10))
        self.assertEqual(s.addRange(3, 7), [])
        self.assertEqual(s.addRange(2, 10), [])
        self.assertEqual(list(s), [(2, 10)])

    def test_addRangeAcrossGaps(self) -> None:
        """A range over several ranges returns only the gaps it filled."""
        s = rangeSet((2, 4), (6, 8), (12, 13))
        self.assertEqual(s.addRange(0, 15), [(0, 2), (4, 6), (8, 12), (13, 15)])
        self.assertEqual(list(s), [(0, 15)])

    def test_addRangeOverlapping(self) -> None:
        """A range overlapping one end of a range returns the part beyond it."""
        s = rangeSet((5, 10))
        self.assertEqual(s.addRange(8, 14), [(10, 14)])
        self.assertEqual(s.addRange(1, 6), [(1, 5)])
        self.assertEqual(list(s), [(1, 14)])

    def test_addRangeTouching(self) -> None:
        """Ranges that touch are merged: none ever ends where the next starts."""
        s = rangeSet((0, 3), (6, 9))
        self.assertEqual(s.addRange(3, 6), [(3, 6)])
        self.assertEqual(list(s), [(0, 9)])

    def test_addRangeEmpty(self) -> None:
        """An empty or reversed range adds nothing."""
        s = rangeSet((0, 3))
        self.assertEqual(s.addRange(5, 5), [])
        self.assertEqual(s.addRange(9, 7), [])
        self.assertEqual(list(s), [(0, 3)])

    def test_discardBelowInsideARange(self) -> None:
        """Discarding below a point inside a range cuts that range there."""
        s = rangeSet((2, 5), (7, 12), (20, 21))
        s.discardBelow(9)
        self.assertEqual(list(s), [(9, 12), (20, 21)])

    def test_discardBelowAtAnEnd(self) -> None:
        """Discarding below a range's end removes the whole range."""
        s = rangeSet((2, 5), (7, 12))
        s.discardBelow(5)
        self.assertEqual(list(s), [(7, 12)])

    def test_discardBelowInAGap(self) -> None:
        """Discarding below a point between ranges keeps the ranges above."""
        s = rangeSet((2, 5), (7, 12))
        s.discardBelow(6)
        self.assertEqual(list(s), [(7, 12)])

    def test_discardBelowEverything(self) -> None:
        """Discarding below a point above every range empties the set."""
        s = rangeSet((2, 5), (7, 12))
        s.discardBelow(100)
        self.assertEqual(list(s), [])

    def test_discardBelowNothing(self) -> None:
        """Discarding below the lowest member changes nothing."""
        s = rangeSet((2, 5))
        s.discardBelow(2)
        s.discardBelow(0)
        self.assertEqual(list(s), [(2, 5)])

    def test_indexing(self) -> None:
        """Ranges are indexed in order; negative indices count from the top."""
        s = rangeSet((0, 1), (3, 4), (6, 9))
        self.assertEqual((s[0], s[2], s[-1]), ((0, 1), (6, 9), (6, 9)))

    def test_indexAtOrBelow(self) -> None:
        """indexAtOrBelow finds the last range starting at or below a point."""
        s = rangeSet((2, 4), (6, 8))
        self.assertEqual(
            [s.indexAtOrBelow(n) for n in (1, 2, 3, 4, 5, 6, 9)], [-1, 0, 0, 0, 0, 1, 1]
        )

    def test_clear(self) -> None:
        """clear empties the set."""
        s = rangeSet((2, 4), (6, 8))
        s.clear()
        self.assertEqual(list(s), [])

    def test_boundsViewsStayValid(self) -> None:
        """``starts`` and ``ends`` are changed in place, so references to them stay current."""
        s = RangeSet()
        starts, ends = s.starts, s.ends
        s.add(4)
        s.addRange(10, 12)
        s.discardBelow(5)
        s.add(9)
        self.assertEqual((starts, ends), ([9], [12]))
        s.clear()
        self.assertEqual((starts, ends), ([], []))


Op = Tuple[str, int, int]
Check = Callable[[RangeSet, Set[int], Op, object], None]


def operation(kind: str) -> st.SearchStrategy[Op]:
    start = st.integers(0, SPAN - 1)
    return st.tuples(st.just(kind), start, st.integers(-2, 12)).map(
        lambda t: (t[0], t[1], t[1] + t[2])  # addRange's end; an empty or reversed range too
    )


OPERATIONS = st.lists(
    st.one_of(operation("add"), operation("addRange"), operation("discardBelow")), max_size=60
)


class RangeSetPropertyTests(unittest.SynchronousTestCase):
    """
    Properties that hold after any sequence of operations, checked against
    a set of integers as the model.
    """

    def replay(self, ops: List[Op], check: Check) -> None:
        """Apply ``ops`` to a RangeSet and to the model, checking after each."""
        s: RangeSet = RangeSet()
        model: Set[int] = set()
        for op in ops:
            kind, a, b = op
            result: object = None
            if kind == "add":
                s.add(a)
                model.add(a)
            elif kind == "addRange":
                before = set(model)
                result = (s.addRange(a, b), before)
                model.update(range(a, b))
            else:
                s.discardBelow(a)
                model = {n for n in model if n >= a}
            check(s, model, op, result)

    @given(OPERATIONS)
    def test_sameMembersAsTheModel(self, ops: List[Op]) -> None:
        """After every operation the set has exactly the model's members."""

        def check(s, model, op, result):
            self.assertEqual(members(s), model, op)
            inside = [n for n in range(-1, SPAN + 14) if n in s]
            self.assertEqual(inside, sorted(model), op)

        self.replay(ops, check)

    @given(OPERATIONS)
    def test_rangesSortedDisjointAndApart(self, ops: List[Op]) -> None:
        """Ranges are non-empty, in order, and never overlap or touch."""

        def check(s, model, op, result):
            ranges = list(s)
            self.assertEqual(len(ranges), len(s))
            for start, end in ranges:
                self.assertLess(start, end, op)
            for (_, end), (start, _) in zip(ranges, ranges[1:]):
                self.assertLess(end, start, op)

        self.replay(ops, check)

    @given(OPERATIONS)
    def test_rangesAreTheModelsRuns(self, ops: List[Op]) -> None:
        """The ranges are the model's maximal runs of consecutive members, so the fewest."""

        def check(s, model, op, result):
            runs = []
            for n in sorted(model):
                if runs and runs[-1][1] == n:
                    runs[-1][1] = n + 1
                else:
                    runs.append([n, n + 1])
            self.assertEqual(list(s), [tuple(r) for r in runs], op)

        self.replay(ops, check)

    @given(OPERATIONS)
    def test_freshIsExactlyWhatWasNew(self, ops: List[Op]) -> None:
        """addRange returns, in order and without overlap, exactly the members it added."""

        def check(s, model, op, result):
            if op[0] != "addRange":
                return
            fresh, before = result
            self.assertEqual(
                [n for first, end in fresh for n in range(first, end)],
                sorted(model - before),
                op,
            )
            for first, end in fresh:
                self.assertLess(first, end, op)

        self.replay(ops, check)
