"""
Reliable file transfer over UDP: the server half and the client half.

The TCP download gets ordering, retransmission and congestion control from
the kernel; over UDP this package provides them, and it must also refuse to
be a traffic amplifier, because a UDP source address can be forged.  The
datagram formats, the handshake and every timer are described in
``docs/udp.rst``; the short version:

* The client asks for a file with a padded ``REQUEST``.  A request without a
  valid cookie gets only a tiny ``RETRY`` carrying a stateless HMAC cookie,
  so a forged request costs the server no state and the forged victim
  receives fewer bytes than the forger sent.
* A request that echoes the cookie starts the transfer: ``META`` announces
  the whole file's size and SHA-256, then numbered ``DATA`` blocks flow
  under a congestion window (slow start, a 0.7 decrease on loss) bounded by the
  receiver's window.
* The client answers with ``ACK`` datagrams carrying a cumulative block
  number and selective ranges; the server declares a block lost when three
  later-sent blocks were acknowledged (the RACK idea, counted in packets),
  or when the RFC 6298 retransmission timer expires.
* On Linux the server sends runs of ``DATA`` with one system call (UDP
  GSO) and the client reads them back in one buffer (UDP GRO); elsewhere,
  and on test transports, every datagram is sent and read on its own.

Everything here that waits takes its time from an injected ``IReactorTime``.

The modules, one job each:

``packets``     the datagram formats and their constants
``cookies``     stateless HMAC address cookies (anti-amplification)
``rtt``         the RFC 6298 retransmission-timeout estimator
``congestion``  the congestion window: slow start, a 0.7 decrease on loss
``ranges``      ``RangeSet``, the block ranges behind SACK on both ends
``sender``      one transfer's sending side
``server``      ``UDPFileServer``: dispatch, cookies, busy limits
``receiver``    the client: ``fetchUDP`` and its protocol
``offload``     socket buffers, GSO/GRO helpers and the segmenting port

This package exports what the rest of ``p2prelay`` uses.
"""

from .packets import DEFAULT_BLOCK, MAX_BLOCK, MAX_DATAGRAM, MIN_BLOCK
from .receiver import UDPResult, UDPTransferError, fetchUDP
from .server import UDPFileServer

__all__ = [
    "DEFAULT_BLOCK",
    "MAX_BLOCK",
    "MAX_DATAGRAM",
    "MIN_BLOCK",
    "UDPFileServer",
    "UDPResult",
    "UDPTransferError",
    "fetchUDP",
]
