"""
A set of block numbers kept as sorted, disjoint ranges: the one structure
behind both ends' selective acknowledgements.

The receiver holds the out-of-order blocks it has buffered as ranges (what
its ACKs report as SACK ranges); the sender holds the SACKed blocks above
the cumulative ACK as ranges (so each block is accounted for once however
often ACKs repeat it).  Both need the same operations, cheaply, on the
hot path: add a block or a range, drop everything below a point as the
cumulative number moves on, and look at the lowest range.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Iterator, List, Tuple


class RangeSet:
    """
    Non-negative integers as half-open ranges ``[start, end)``: sorted,
    disjoint and never touching (adjacent ranges are merged).

    ``starts`` and ``ends`` are the ranges' bounds, in order, for callers on
    a hot path to read directly (``starts[0]`` is the lowest member); they
    are only ever changed in place, by this class, so a reference to them
    stays valid.  Never write to them.
    """

    __slots__ = ("starts", "ends")

    def __init__(self) -> None:
        self.starts: List[int] = []
        self.ends: List[int] = []

    def __len__(self) -> int:
        """The number of ranges (not of members)."""
        return len(self.starts)

    def __bool__(self) -> bool:
        return bool(self.starts)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return zip(self.starts, self.ends)

    def __getitem__(self, i: int) -> Tuple[int, int]:
        """The ``i``-th range as ``(start, end)``; negative ``i`` counts from the top."""
        return self.starts[i], self.ends[i]

    def __contains__(self, n: int) -> bool:
        i = bisect_right(self.starts, n) - 1
        return i >= 0 and n < self.ends[i]

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def indexAtOrBelow(self, n: int) -> int:
        """The index of the last range starting at or below ``n``; -1 if none does."""
        return bisect_right(self.starts, n) - 1

    def add(self, n: int) -> None:
        """Add one member: the receiver's path, for every block it buffers."""
        starts, ends = self.starts, self.ends
        i = bisect_right(starts, n) - 1
        if i >= 0 and n < ends[i]:
            return  # already a member
        joinLeft = i >= 0 and ends[i] == n
        joinRight = i + 1 < len(starts) and starts[i + 1] == n + 1
        if joinLeft and joinRight:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joinLeft:
            ends[i] = n + 1
        elif joinRight:
            starts[i + 1] = n
        else:
            starts.insert(i + 1, n)
            ends.insert(i + 1, n + 1)

    def addRange(self, start: int, end: int) -> List[Tuple[int, int]]:
        """
        Add ``[start, end)``; return the parts of it that were not members
        before, in order, so a caller can account for each member once.
        """
        starts, ends = self.starts, self.ends
        if start >= end:
            return []
        i = bisect_right(starts, start) - 1
        if i >= 0 and ends[i] >= end:
            return []  # the common case: nothing new
        lo = bisect_left(ends, start)  # first range ending at or after start
        hi = bisect_right(starts, end)  # first range starting after end
        fresh = []
        cursor = start
        newStart, newEnd = start, end
        for j in range(lo, hi):
            if starts[j] > cursor:
                fresh.append((cursor, min(starts[j], end)))
            cursor = max(cursor, ends[j])
            newStart = min(newStart, starts[j])
            newEnd = max(newEnd, ends[j])
        if cursor < end:
            fresh.append((cursor, end))
        starts[lo:hi] = [newStart]
        ends[lo:hi] = [newEnd]
        return fresh

    def discardBelow(self, n: int) -> None:
        """Remove every member below ``n``."""
        starts, ends = self.starts, self.ends
        cut = bisect_right(ends, n)
        del starts[:cut], ends[:cut]
        if starts and starts[0] < n:
            starts[0] = n

    def clear(self) -> None:
        del self.starts[:], self.ends[:]
