"""
Stateless address validation for the UDP server: HMAC address cookies.

A UDP source address can be forged, so the server must not send a file,
or keep any state, for an address that has not shown it can receive.  A
first request is answered only with a cookie: an HMAC of the client's
address and port and a time bucket, under a secret that never leaves this
process.  A request that echoes a valid cookie proves its address; the
server remembers nothing in between.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Tuple

from twisted.internet.interfaces import IReactorTime

COOKIE_PERIOD = 30.0  # a cookie is valid for one to two periods

_BUCKET = struct.Struct("!I")


class Cookies:
    """
    Mints and checks cookies for one server: ``bucket || HMAC[:16]``, valid
    during the bucket it was minted in and the next.
    """

    SIZE = _BUCKET.size + 16

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._secret = os.urandom(32)

    def _mac(self, addr: Tuple[str, int], bucket: int) -> bytes:
        message = f"{addr[0]}|{addr[1]}|{bucket}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:16]

    def _bucket(self) -> int:
        return int(self._clock.seconds() // COOKIE_PERIOD) & 0xFFFFFFFF

    def mint(self, addr: Tuple[str, int]) -> bytes:
        """A cookie for ``addr``, to send it in a RETRY."""
        bucket = self._bucket()
        return _BUCKET.pack(bucket) + self._mac(addr, bucket)

    def check(self, addr: Tuple[str, int], cookie: bytes) -> bool:
        """Whether ``cookie`` was minted here for ``addr``, and recently."""
        if len(cookie) != self.SIZE:
            return False
        (bucket,) = _BUCKET.unpack_from(cookie)
        if (self._bucket() - bucket) & 0xFFFFFFFF > 1:
            return False
        return hmac.compare_digest(cookie[_BUCKET.size :], self._mac(addr, bucket))
