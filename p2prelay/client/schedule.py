"""
Which piece to ask which holder for next: the multi-source scheduler.

Pure logic, no Twisted and no I/O, so every decision can be tested on its
own: the fetcher tells the scheduler what happened (a piece verified, a
piece failed, a holder appeared) and asks it what to do next
(:meth:`Scheduler.assign`).  Time comes from an injected callable that
returns seconds (``time.monotonic``, or a ``task.Clock``'s ``seconds``).

All the holders of one root hold every piece, so there is no rarity to
weigh: pieces go out lowest index first, which is also the order a stream
to stdout needs.  What differs between holders is speed, and trust:

- each holder has at most K pieces in flight, K grown from its measured
  throughput (a new holder starts at one), so a fast holder keeps a short
  queue of requests and never waits a round trip between pieces, and,
  since holders pull work as they finish, faster holders get more pieces;
- a holder that sends a piece that fails its digest is dropped for good
  and the piece goes back to the queue; a plain failure (a timeout, a lost
  connection) counts against the holder and ``maxFailures`` in a row drop
  it; a piece that failed at one holder goes preferably to another;
- at most ``sources`` holders are in use at once; the others wait as
  spares and step in when one in use is dropped (or asked us to back off,
  ``retryAfter``);
- endgame: when no piece is left to hand out and a holder is idle, it gets
  a duplicate of the piece that has been in flight longest; the first copy
  to be verified wins and :meth:`Scheduler.completed` names the holders
  whose copy to cancel;
- with a ``window`` (streaming), no piece more than ``window`` beyond
  :attr:`Scheduler.nextInOrder` is handed out, so what waits in memory for
  the pieces before it stays bounded.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Set, Tuple

PIECE_SIZE = 4 * 1024 * 1024  # the default piece size (the manifest records the real one)
SOURCES = 4  # holders used at once, by default (--sources)
MAX_IN_FLIGHT = 8  # pieces one holder may have in flight, at most
INITIAL_IN_FLIGHT = 1  # ... and before its speed is known
PIPELINE_SECONDS = 1.0  # a measured holder gets about this many seconds of work queued
MAX_FAILURES = 3  # plain failures in a row that drop a holder
BUSY_PATIENCE = 60.0  # seconds a holder may answer only "busy" (503 retry=) before it is dropped
COPIES = 2  # requests for one piece in flight at once, at most (endgame)
SMOOTHING = 0.3  # weight of the newest measurement in a holder's rate
MIN_SECONDS = 1e-3  # a piece never counts as faster than this (a clock that did not move)

Holder = Hashable


class _HolderState:
    """What the scheduler knows about one holder."""

    __slots__ = (
        "id",
        "order",
        "inFlight",
        "rate",
        "failures",
        "dropped",
        "corrupt",
        "benchedUntil",
        "busySince",
        "lastEvent",
        "pieces",
    )

    def __init__(self, holder: Holder, order: int) -> None:
        self.id = holder
        self.order = order
        self.inFlight: Set[int] = set()
        self.rate: Optional[float] = None  # bytes/s, smoothed
        self.failures = 0  # plain failures in a row
        self.dropped = False
        self.corrupt = False
        self.benchedUntil: Optional[float] = None
        self.busySince: Optional[float] = None  # its first "busy" since it last delivered
        self.lastEvent: Optional[float] = None  # when one of its pieces last ended
        self.pieces = 0  # pieces it delivered


class Scheduler:
    """
    The pieces of one file (one root) and the holders to get them from.

    ``pieceCount`` pieces of ``pieceSize`` bytes (the last may be short);
    ``have`` the ones already verified (a resumed download); ``now`` a
    callable returning seconds.  ``sources`` caps the holders in use at
    once, ``window`` (None: no limit) how far beyond :attr:`nextInOrder`
    a piece may be handed out.
    """

    def __init__(
        self,
        pieceCount: int,
        now: Callable[[], float],
        sources: int = SOURCES,
        *,
        pieceSize: int = PIECE_SIZE,
        window: Optional[int] = None,
        have: Iterable[int] = (),
        maxInFlight: int = MAX_IN_FLIGHT,
        maxFailures: int = MAX_FAILURES,
        copies: int = COPIES,
        pipelineSeconds: float = PIPELINE_SECONDS,
        busyPatience: float = BUSY_PATIENCE,
    ) -> None:
        if pieceCount < 0:
            raise ValueError(f"pieceCount must be >= 0, not {pieceCount}")
        if sources < 1:
            raise ValueError(f"sources must be >= 1, not {sources}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, not {window}")
        self.pieceCount = pieceCount
        self.now = now
        self.sources = sources
        self.pieceSize = pieceSize
        self.window = window
        self.maxInFlight = max(1, maxInFlight)
        self.maxFailures = max(1, maxFailures)
        self.copies = max(1, copies)
        self.pipelineSeconds = pipelineSeconds
        self.busyPatience = busyPatience

        self._verified = bytearray(pieceCount)
        self._verifiedCount = 0
        for piece in have:
            self._checkPiece(piece)
            if not self._verified[piece]:
                self._verified[piece] = 1
                self._verifiedCount += 1
        # Pieces never handed out are [_fresh, pieceCount) minus the verified;
        # pieces that came back (failed, holder dropped) wait in _returned.
        self._fresh = 0
        self._returned: List[int] = []  # a heap
        self._queued: Set[int] = set()  # what _returned holds
        self._failedBy: Dict[int, Set[Holder]] = {}
        # piece -> {holder: when it was asked for}
        self._flight: Dict[int, Dict[Holder, float]] = {}
        self._firstAsked: Dict[int, float] = {}
        self._nextInOrder = 0
        self._advance()

        self._holders: Dict[Holder, _HolderState] = {}
        self._active: List[Holder] = []

    # What the fetcher asks.

    @property
    def done(self) -> bool:
        """Every piece is verified."""
        return self._verifiedCount == self.pieceCount

    @property
    def verifiedCount(self) -> int:
        return self._verifiedCount

    @property
    def missing(self) -> List[int]:
        """The pieces not yet verified, in order."""
        return [i for i in range(self._nextInOrder, self.pieceCount) if not self._verified[i]]

    def isVerified(self, piece: int) -> bool:
        return bool(self._verified[piece])

    @property
    def nextInOrder(self) -> int:
        """The lowest piece not yet verified (``pieceCount`` when done)."""
        return self._nextInOrder

    @property
    def holdersInUse(self) -> int:
        """Holders currently in use (never more than ``sources``)."""
        return len(self._active)

    @property
    def holders(self) -> List[Holder]:
        """The holders not dropped, in the order they were added."""
        return [h.id for h in self._holders.values() if not h.dropped]

    @property
    def exhausted(self) -> bool:
        """Pieces are missing and no holder is left to get them from."""
        return not self.done and not self.holders

    @property
    def endgame(self) -> bool:
        """Every missing piece is in flight: nothing new is left to hand out."""
        return not self.done and not self._queued and self._nextFresh() is None

    def isDropped(self, holder: Holder) -> bool:
        state = self._holders.get(holder)
        return state is not None and state.dropped

    def inFlight(self, holder: Holder) -> Set[int]:
        """The pieces ``holder`` has been asked for and not yet delivered."""
        state = self._holders.get(holder)
        return set(state.inFlight) if state is not None else set()

    def rate(self, holder: Holder) -> Optional[float]:
        """``holder``'s measured throughput in bytes/s, if known."""
        return self._holders[holder].rate

    def limit(self, holder: Holder) -> int:
        """K: how many pieces ``holder`` may have in flight at once."""
        rate = self._holders[holder].rate
        if rate is None:
            return min(INITIAL_IN_FLIGHT, self.maxInFlight)
        wanted = math.ceil(rate * self.pipelineSeconds / max(self.pieceSize, 1))
        return max(1, min(self.maxInFlight, wanted))

    def nextWake(self) -> Optional[float]:
        """When the first holder asked to back off may be asked again (None: none is)."""
        times = [
            h.benchedUntil
            for h in self._holders.values()
            if h.benchedUntil is not None and not h.dropped
        ]
        return min(times) if times else None

    def stalled(self, after: float) -> List[Tuple[int, Holder]]:
        """
        The requests in flight for longer than ``after`` seconds, oldest
        first, as (piece, holder): for the fetcher to give up on (with
        :meth:`failed`) if it wants; the endgame duplicates them anyway.
        """
        now = self.now()
        old = [
            (asked, piece, holder)
            for piece, copies in self._flight.items()
            for holder, asked in copies.items()
            if now - asked > after
        ]
        old.sort(key=lambda item: item[0])
        return [(piece, holder) for _, piece, holder in old]

    # What the fetcher tells.

    def addHolder(self, holder: Holder) -> None:
        """A holder of this root to get pieces from (again: no change)."""
        if holder not in self._holders:
            self._holders[holder] = _HolderState(holder, len(self._holders))

    def assign(self, holder: Holder) -> Optional[int]:
        """
        The next piece to ask ``holder`` for, or None: it has as many in
        flight as it may, or it is dropped, benched, or not in use and
        there is no room, or there is nothing (not even a duplicate) for
        it.  Call it again until None to fill the holder's queue.
        """
        state = self._holders.get(holder)
        if state is None or state.dropped or self.done:
            return None
        now = self.now()
        if state.benchedUntil is not None:
            if now < state.benchedUntil:
                return None
            state.benchedUntil = None
        if holder not in self._active:
            if len(self._active) >= self.sources:
                return None
            self._active.append(holder)
        if len(state.inFlight) >= self.limit(holder):
            return None
        piece = self._take(holder)
        if piece is None and not state.inFlight:
            piece = self._duplicate(holder)
        if piece is None:
            return None
        self._flight.setdefault(piece, {})[holder] = now
        self._firstAsked.setdefault(piece, now)
        state.inFlight.add(piece)
        return piece

    def completed(
        self, piece: int, holder: Holder, nbytes: int, seconds: Optional[float] = None
    ) -> List[Holder]:
        """
        ``holder`` delivered ``piece`` (``nbytes`` long) and it verified.

        Returns the other holders whose copy of the same piece is still in
        flight: cancel those requests (they need no :meth:`failed`).  A
        piece already verified changes nothing.  ``seconds``, when given,
        is how long the transfer took; otherwise it is measured from when
        the piece was asked for (or from this holder's previous piece, if
        that ended later: requests queue at a holder).
        """
        self._checkPiece(piece)
        now = self.now()
        state = self._holders.get(holder)
        if state is not None and piece in state.inFlight:
            asked = self._flight[piece][holder]
            if seconds is None:
                start = asked if state.lastEvent is None else max(asked, state.lastEvent)
                seconds = now - start
            self._measure(state, nbytes, seconds)
            state.failures = 0
            state.busySince = None
            state.pieces += 1
            state.lastEvent = now
        if self._verified[piece]:
            return []
        self._verified[piece] = 1
        self._verifiedCount += 1
        self._discardQueued(piece)
        self._failedBy.pop(piece, None)
        self._firstAsked.pop(piece, None)
        cancel = []
        for other in self._flight.pop(piece, {}):
            self._holders[other].inFlight.discard(piece)
            if other != holder:
                cancel.append(other)
        self._advance()
        return sorted(cancel, key=lambda h: self._holders[h].order)

    def failed(
        self,
        piece: int,
        holder: Holder,
        corrupt: bool = False,
        retryAfter: Optional[float] = None,
    ) -> List[int]:
        """
        ``holder`` did not deliver ``piece``.

        ``corrupt``: what it sent failed the piece's digest, and the holder
        is dropped for good.  Otherwise (timeout, connection lost) it is a
        failure in a row, and ``maxFailures`` of them drop the holder; with
        ``retryAfter`` (a busy holder's hint, in seconds) it is no failure,
        but the holder gives up its place to a spare and is not asked
        again before then -- unless it has answered nothing but "busy" for
        ``busyPatience`` seconds, which drops it.  The piece goes back to the queue unless
        another copy is in flight.

        Returns the holder's other pieces in flight if it was dropped or
        benched (cancel those requests; they are back in the queue), else
        an empty list.  A failure reported
        for a request already cancelled changes nothing (unless corrupt).
        """
        self._checkPiece(piece)
        state = self._holders.get(holder)
        if state is None:
            return []
        wasInFlight = piece in state.inFlight
        if wasInFlight:
            self._release(piece, holder)
            state.lastEvent = self.now()
            self._failedBy.setdefault(piece, set()).add(holder)
        if corrupt:
            return self._drop(state, corrupt=True)
        if not wasInFlight or state.dropped:
            return []
        if retryAfter is not None:
            now = self.now()
            if state.busySince is None:
                state.busySince = now
            elif now - state.busySince >= self.busyPatience:
                # Busy for ever is as good as gone: without this, one holder
                # that only ever answers 503 keeps a download waiting forever.
                return self._drop(state)
            return self._bench(state, retryAfter)
        state.failures += 1
        if state.failures >= self.maxFailures:
            return self._drop(state)
        return []

    def removeHolder(self, holder: Holder) -> List[int]:
        """
        ``holder`` is gone (it left the relay's list, say): it is dropped
        and its pieces go back to the queue.  Returns those pieces.
        """
        state = self._holders.get(holder)
        if state is None:
            return []
        return self._drop(state)

    # Inside.

    def _checkPiece(self, piece: int) -> None:
        if not 0 <= piece < self.pieceCount:
            raise IndexError(f"piece {piece} out of range 0..{self.pieceCount - 1}")

    def _advance(self) -> None:
        while self._nextInOrder < self.pieceCount and self._verified[self._nextInOrder]:
            self._nextInOrder += 1

    def _limitIndex(self) -> int:
        """The first piece index beyond the window."""
        if self.window is None:
            return self.pieceCount
        return min(self.pieceCount, self._nextInOrder + self.window)

    def _nextFresh(self) -> Optional[int]:
        while self._fresh < self.pieceCount and self._verified[self._fresh]:
            self._fresh += 1
        return self._fresh if self._fresh < self.pieceCount else None

    def _discardQueued(self, piece: int) -> None:
        if piece in self._queued:
            self._queued.discard(piece)
            self._returned.remove(piece)
            heapq.heapify(self._returned)

    def _take(self, holder: Holder) -> Optional[int]:
        """The lowest piece waiting within the window, preferably one this holder did not fail."""
        limit = self._limitIndex()
        if self._returned and self._returned[0] < limit:
            waiting = sorted(p for p in self._returned if p < limit)
            choice = next(
                (p for p in waiting if holder not in self._failedBy.get(p, ())), None
            )
            fresh = self._nextFresh()
            if choice is None and fresh is not None and fresh < limit:
                # Every returned piece failed here once: new work first.
                self._fresh += 1
                return fresh
            if choice is None:
                choice = waiting[0]
            self._discardQueued(choice)
            return choice
        fresh = self._nextFresh()
        if fresh is not None and fresh < limit:
            self._fresh += 1
            return fresh
        return None

    def _duplicate(self, holder: Holder) -> Optional[int]:
        """Endgame: the piece in flight longest elsewhere, if it may have another copy."""
        best: Optional[Tuple[float, int]] = None
        for piece, copies in self._flight.items():
            if holder in copies or len(copies) >= self.copies:
                continue
            key = (self._firstAsked.get(piece, 0.0), piece)
            if best is None or key < best:
                best = key
        return None if best is None else best[1]

    def _release(self, piece: int, holder: Holder) -> None:
        """One copy of ``piece`` is no longer in flight; requeue it if that was the last."""
        self._holders[holder].inFlight.discard(piece)
        copies = self._flight.get(piece)
        if copies is not None:
            copies.pop(holder, None)
            if not copies:
                del self._flight[piece]
                self._firstAsked.pop(piece, None)
        if piece not in self._flight and not self._verified[piece] and piece not in self._queued:
            self._queued.add(piece)
            heapq.heappush(self._returned, piece)

    def _drop(self, state: _HolderState, corrupt: bool = False) -> List[int]:
        state.corrupt = state.corrupt or corrupt
        if state.dropped:
            return []
        state.dropped = True
        state.benchedUntil = None
        abandoned = sorted(state.inFlight)
        for piece in abandoned:
            self._release(piece, state.id)
        if state.id in self._active:
            self._active.remove(state.id)
        return abandoned

    def _bench(self, state: _HolderState, seconds: float) -> List[int]:
        state.benchedUntil = self.now() + max(0.0, seconds)
        abandoned = sorted(state.inFlight)
        for piece in abandoned:
            self._release(piece, state.id)
        if state.id in self._active:
            self._active.remove(state.id)
        return abandoned

    def _measure(self, state: _HolderState, nbytes: int, seconds: float) -> None:
        rate = nbytes / max(seconds, MIN_SECONDS)
        if state.rate is None:
            state.rate = rate
        else:
            state.rate = (1 - SMOOTHING) * state.rate + SMOOTHING * rate
