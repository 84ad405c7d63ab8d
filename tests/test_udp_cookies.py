"""
Tests for p2prelay.udp.cookies: the stateless address cookies that keep
the UDP server from sending anything to an address it has not heard from.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from p2prelay.udp.cookies import COOKIE_PERIOD, Cookies

CLIENT = ("10.0.0.2", 1000)


class CookieTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.cookies = Cookies(self.clock)

    def test_valid(self) -> None:
        """A cookie minted for an address validates that address."""
        cookie = self.cookies.mint(CLIENT)
        self.assertEqual(len(cookie), Cookies.SIZE)
        self.assertTrue(self.cookies.check(CLIENT, cookie))

    def test_expiredCookie(self) -> None:
        """A cookie older than two periods is refused."""
        cookie = self.cookies.mint(CLIENT)
        self.assertTrue(self.cookies.check(CLIENT, cookie))
        self.clock.advance(COOKIE_PERIOD)
        self.assertTrue(self.cookies.check(CLIENT, cookie))
        self.clock.advance(COOKIE_PERIOD)
        self.assertFalse(self.cookies.check(CLIENT, cookie))

    def test_validIntoTheNextPeriod(self) -> None:
        """A cookie minted at the end of a period is still good in the next one."""
        self.clock.advance(COOKIE_PERIOD - 0.001)
        cookie = self.cookies.mint(CLIENT)
        self.clock.advance(COOKIE_PERIOD)
        self.assertTrue(self.cookies.check(CLIENT, cookie))

    def test_cookieBoundToPort(self) -> None:
        """A cookie minted for one port does not validate another."""
        cookie = self.cookies.mint(CLIENT)
        self.assertFalse(self.cookies.check((CLIENT[0], CLIENT[1] + 1), cookie))

    def test_cookieBoundToHost(self) -> None:
        """A cookie minted for one host does not validate another."""
        cookie = self.cookies.mint(CLIENT)
        self.assertFalse(self.cookies.check(("10.0.0.3", CLIENT[1]), cookie))

    def test_secretPerServer(self) -> None:
        """Another server's cookie for the same address is refused: each has its own secret."""
        other = Cookies(self.clock).mint(CLIENT)
        self.assertFalse(self.cookies.check(CLIENT, other))

    def test_wrongLength(self) -> None:
        """A cookie of the wrong length, or none, is refused."""
        cookie = self.cookies.mint(CLIENT)
        for bad in [b"", cookie[:-1], cookie + b"\0"]:
            self.assertFalse(self.cookies.check(CLIENT, bad))

    def test_tampered(self) -> None:
        """Changing any byte of a cookie, its time included, invalidates it."""
        cookie = self.cookies.mint(CLIENT)
        for i in range(len(cookie)):
            bad = cookie[:i] + bytes([cookie[i] ^ 1]) + cookie[i + 1 :]
            self.assertFalse(self.cookies.check(CLIENT, bad), i)
