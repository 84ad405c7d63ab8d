"""
Tests for p2prelay.udp.rtt: the RFC 6298 retransmission-timeout estimator.
"""

from twisted.trial import unittest

from p2prelay.udp.rtt import RTO_INITIAL, RTO_MAX, RTO_MIN, RoundTrip


class RoundTripTests(unittest.SynchronousTestCase):
    """The RFC 6298 estimator on its own."""

    def test_firstSample(self) -> None:
        """The first sample sets SRTT=R, RTTVAR=R/2, RTO=SRTT+4*RTTVAR."""
        rtt = RoundTrip()
        self.assertEqual(rtt.timeout, RTO_INITIAL)
        rtt.sample(0.5)
        self.assertEqual((rtt.srtt, rtt.rttvar), (0.5, 0.25))
        self.assertAlmostEqual(rtt.timeout, 1.5)

    def test_bounds(self) -> None:
        """The timeout stays within RTO_MIN and RTO_MAX."""
        rtt = RoundTrip()
        rtt.sample(0.0001)
        self.assertEqual(rtt.timeout, RTO_MIN)
        for _ in range(20):
            rtt.expired()
        self.assertEqual(rtt.timeout, RTO_MAX)

    def test_backoffClearedBySample(self) -> None:
        """Expiry doubles the timeout; a new sample undoes the backoff."""
        rtt = RoundTrip()
        rtt.sample(0.5)
        rtt.expired()
        self.assertAlmostEqual(rtt.timeout, 3.0)
        rtt.sample(0.5)
        self.assertAlmostEqual(rtt.timeout, 0.5 + 4 * 0.1875)
