"""
The UDP sender's congestion window: slow start, additive increase, and a
multiplicative decrease of BETA on loss.

TCP gets this from the kernel; over UDP the sender must not flood a path
it shares with others.  The policy is Reno's, counted in blocks, with
CUBIC's and QUIC stacks' gentler decrease: start at about 256 KiB worth,
grow by one per acknowledged block up to ``ssthresh`` and by about one
per window after, shrink to BETA of the window once per window of losses
(a burst of random drops is one event, not one per block), and collapse
to ``MIN_CWND`` only when the retransmission timer expires.  It is one plain object so the sender only reports events to it
(acknowledged, lost, timed out) and asks how much may be in flight, and
so the policy can be tested without a network.
"""

from __future__ import annotations

INITIAL_WINDOW_BYTES = 256 * 1024  # first burst: ~190 default blocks
INITIAL_WINDOW = 256  # ... and never more blocks than this
MIN_CWND = 4
BETA = 0.7  # the window kept on a loss (CUBIC, RFC 9438; Reno's 0.5 halves it)


class Congestion:
    """
    The congestion window of one transfer, in blocks (a float: congestion
    avoidance grows it by fractions).  It never exceeds ``limit``, the
    receiver's window.

    Losses are grouped by send sequence (every datagram sent, first copy
    or retransmission, gets the next number): a loss of a block sent
    before the last reduction belongs to the event that caused it, so one
    window of losses reduces the window once.
    """

    def __init__(self, limit: int, blockSize: int) -> None:
        self.limit = float(limit)
        self.cwnd = float(
            min(limit, INITIAL_WINDOW, max(MIN_CWND, INITIAL_WINDOW_BYTES // blockSize))
        )
        self.ssthresh = float(limit)
        self.recoverySeq = 0  # losses of blocks sent at or before this: same event

    def acked(self, count: int) -> None:
        """``count`` (more than zero) blocks were newly acknowledged."""
        if self.cwnd < self.ssthresh:
            self.cwnd += count  # slow start
        else:
            self.cwnd += count / self.cwnd  # about one block per window
        self.cwnd = min(self.cwnd, self.limit)

    def lost(self, seq: int, latestSeq: int) -> bool:
        """
        The block sent as ``seq`` was declared lost; ``latestSeq`` is the
        last sequence sent so far.  Reduces the window to BETA of itself
        (at least MIN_CWND) unless this loss belongs to an event already
        answered; True when it did.
        """
        if seq <= self.recoverySeq:
            return False
        self.cwnd = max(self.cwnd * BETA, float(MIN_CWND))
        self.ssthresh = self.cwnd
        self.recoverySeq = latestSeq
        return True

    def timedOut(self, inflight: int, latestSeq: int) -> None:
        """
        The retransmission timer expired with ``inflight`` blocks
        outstanding: start again from MIN_CWND, with ``ssthresh`` at half
        of what was in flight (RFC 5681, 3.1).
        """
        self.ssthresh = max(inflight / 2, float(MIN_CWND))
        self.cwnd = float(MIN_CWND)
        self.recoverySeq = latestSeq
