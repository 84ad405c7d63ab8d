"""
The UDP sender's retransmission timeout: the RFC 6298 estimator.

Kept apart from the sender so the arithmetic (SRTT, RTTVAR, backoff and
the clamps) can be checked against the RFC on its own.  The minimum is
lower than RFC 6298's 1 s because the client's delayed ACK is 10 ms, a
hundredth of TCP's.  Times are in seconds.
"""

from __future__ import annotations

from typing import Optional

RTO_INITIAL = 1.0  # before any sample; also the client's first handshake wait
RTO_MIN = 0.2
RTO_MAX = 5.0
CLOCK_GRANULARITY = 0.001


class RoundTrip:
    """
    The RFC 6298 retransmission timeout: SRTT, RTTVAR and backoff.
    """

    def __init__(self) -> None:
        self.srtt: Optional[float] = None
        self.rttvar = 0.0
        self.base = RTO_INITIAL
        self.backoff = 1

    def sample(self, rtt: float) -> None:
        """A round trip measured on a block sent once (Karn's rule)."""
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.base = self.srtt + max(CLOCK_GRANULARITY, 4 * self.rttvar)
        self.backoff = 1

    @property
    def timeout(self) -> float:
        """The current RTO, backoff included, within RTO_MIN..RTO_MAX."""
        return min(max(self.base * self.backoff, RTO_MIN), RTO_MAX)

    def expired(self) -> None:
        """The timer fired: double the timeout until it reaches RTO_MAX."""
        if self.base * self.backoff < RTO_MAX:
            self.backoff *= 2
