"""
The UDP transfer's datagram formats: every byte on the wire, and nothing else.

Each datagram kind (``REQUEST``, ``RETRY``, ``META``, ``DATA``, ``ACK``,
``ERROR``, ``CLOSE``) is encoded and decoded here, with the constants of
the format (sizes, limits, the magic), so that the sender, the server and
the receiver share one definition of the wire and ``docs/udp.rst`` can be
checked against one module.  No I/O, no clocks, no state.

Decoders of the server's answers return None for a datagram too short or
too long for its kind; what that means (a failed download) is the
receiver's decision.  The two hot paths (``DATA`` out, ``DATA`` in) use
:data:`DATA_HEADER` and :data:`BLOCK_NUMBER` directly rather than a
function call per block.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Sequence, Tuple

import attrs

from .. import wire

# Every datagram starts with the same 8-byte header.
MAGIC = b"PU"
VERSION = 1
REQUEST = 1  # client -> server: which file, which range, optional cookie
RETRY = 2  # server -> client: "prove your address": a cookie to echo
META = 3  # server -> client: size, range, block size and SHA-256 of the file
DATA = 4  # server -> client: one numbered block
ACK = 5  # client -> server: cumulative block number and SACK ranges
ERROR = 6  # server -> client: a wire status (404, 416, 503, ...) and text
CLOSE = 7  # client -> server: the client has given up; free the transfer

HEADER = struct.Struct("!2sBBI")  # magic, version, type, transfer id
DATA_HEADER = struct.Struct("!2sBBII")  # header, block number
REQUEST_BODY = struct.Struct("!QQIIB")  # offset, length, block size, window, cookie length
META_BODY = struct.Struct("!QQQII32s")  # size, offset, length, block size, window, sha256
ACK_BODY = struct.Struct("!IB")  # next expected block, number of SACK ranges
ERROR_BODY = struct.Struct("!H")  # status
BLOCK_NUMBER = struct.Struct("!I")  # at HEADER_SIZE in a DATA datagram
_U16 = struct.Struct("!H")

HEADER_SIZE = HEADER.size  # 8
DATA_HEADER_SIZE = DATA_HEADER.size  # 12
TO_END = 2**64 - 1  # REQUEST length meaning "to the end of the file"

# Sizes.  A 1400-byte block makes a 1412-byte datagram: inside a 1500-byte
# Ethernet MTU for IPv4 (1472) and IPv6 (1452), so nothing fragments.
DEFAULT_BLOCK = 1400
MIN_BLOCK = 64
MAX_BLOCK = 60 * 1024  # loopback and jumbo-frame links; fragments elsewhere
MAX_DATAGRAM = 64 * 1024  # the maxPacketSize both ends pass to listenUDP
MIN_REQUEST = 1200  # requests are padded to this, as QUIC pads its Initial
MAX_BLOCKS = 2**32 - 1  # block numbers are 32 bits
MAX_SACK = 32  # SACK ranges in one ACK (269 bytes at most)
MAX_COOKIE = 255  # a REQUEST's cookie length is one byte

# The receive window a REQUEST announces, in blocks: the server clamps
# what it is told to this, the client asks for no more.
MIN_WINDOW = 16
MAX_WINDOW = 16384


def header(kind: int, tid: int) -> bytes:
    """The 8-byte header every datagram starts with."""
    return HEADER.pack(MAGIC, VERSION, kind, tid)


def parseHeader(data: bytes) -> Optional[Tuple[int, int]]:
    """(type, transfer id), or None for a datagram that is not ours."""
    if len(data) < HEADER_SIZE:
        return None
    magic, version, kind, tid = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        return None
    return kind, tid


# REQUEST


@attrs.frozen
class Request:
    """What a client asks for; ``length`` None means to the end of the file."""

    offset: int
    length: Optional[int]
    blockSize: int
    window: int
    cookie: bytes
    name: str


def encodeRequest(tid: int, request: Request) -> bytes:
    """A REQUEST datagram, zero-padded to MIN_REQUEST bytes."""
    name = request.name.encode("utf-8")
    length = TO_END if request.length is None else request.length
    body = (
        header(REQUEST, tid)
        + REQUEST_BODY.pack(
            request.offset, length, request.blockSize, request.window, len(request.cookie)
        )
        + request.cookie
        + _U16.pack(len(name))
        + name
    )
    return body + bytes(max(0, MIN_REQUEST - len(body)))


def decodeRequest(data: bytes) -> Request:
    """Raises ProtocolError(400) for a request we cannot read."""
    try:
        at = HEADER_SIZE
        offset, length, blockSize, window, cookieLength = REQUEST_BODY.unpack_from(data, at)
        at += REQUEST_BODY.size
        cookie = data[at : at + cookieLength]
        at += cookieLength
        (nameLength,) = _U16.unpack_from(data, at)
        at += _U16.size
        raw = data[at : at + nameLength]
        if len(raw) != nameLength or len(cookie) != cookieLength:
            raise ValueError("truncated")
        name = raw.decode("utf-8")
    except (struct.error, ValueError):
        raise wire.ProtocolError(wire.BAD_REQUEST, "malformed UDP request") from None
    return Request(offset, None if length == TO_END else length, blockSize, window, cookie, name)


def cookieOf(data: bytes) -> bytes:
    """The cookie in a request, read before anything else is trusted."""
    at = HEADER_SIZE + REQUEST_BODY.size
    if len(data) < at:
        return b""
    return data[at : at + data[at - 1]]


# RETRY


def encodeRetry(tid: int, cookie: bytes) -> bytes:
    return header(RETRY, tid) + cookie


def decodeRetry(data: bytes) -> Optional[bytes]:
    """The cookie to echo, or None if there is none or it cannot be echoed."""
    cookie = data[HEADER_SIZE:]
    if not cookie or len(cookie) > MAX_COOKIE:
        return None
    return cookie


# META


@attrs.frozen
class Meta:
    """The server's announcement of what it is about to send."""

    size: int  # of the whole file
    offset: int
    length: int
    blockSize: int
    window: int
    sha256: bytes  # of the whole file, 32 bytes


def encodeMeta(tid: int, meta: Meta) -> bytes:
    return header(META, tid) + META_BODY.pack(
        meta.size, meta.offset, meta.length, meta.blockSize, meta.window, meta.sha256
    )


def decodeMeta(data: bytes) -> Optional[Meta]:
    if len(data) != HEADER_SIZE + META_BODY.size:
        return None
    return Meta(*META_BODY.unpack_from(data, HEADER_SIZE))


# DATA


def encodeData(tid: int, block: int, payload: bytes) -> bytes:
    """One DATA datagram (the sender builds its runs from DATA_HEADER itself)."""
    return DATA_HEADER.pack(MAGIC, VERSION, DATA, tid, block) + payload


def dataPrefix(tid: int) -> bytes:
    """The first HEADER_SIZE bytes of every DATA datagram of one transfer."""
    return header(DATA, tid)


# ACK


def encodeAck(tid: int, cumulative: int, ranges: Sequence[Tuple[int, int]]) -> bytes:
    """An ACK: every block below ``cumulative`` and the ``[first, end)`` ranges."""
    values: List[int] = []
    for first, end in ranges:
        values += (first, end)
    return (
        header(ACK, tid)
        + ACK_BODY.pack(cumulative, len(ranges))
        + struct.pack(f"!{len(values)}I", *values)
    )


def decodeAck(data: bytes) -> Optional[Tuple[int, List[int]]]:
    """(cumulative, [first, end, first, end, ...]), or None if malformed."""
    if len(data) < HEADER_SIZE + ACK_BODY.size:
        return None
    cumulative, count = ACK_BODY.unpack_from(data, HEADER_SIZE)
    if len(data) != HEADER_SIZE + ACK_BODY.size + 8 * count:
        return None
    ranges = list(struct.unpack_from(f"!{2 * count}I", data, HEADER_SIZE + ACK_BODY.size))
    return cumulative, ranges


# ERROR and CLOSE


def encodeError(tid: int, status: int, text: str) -> bytes:
    return header(ERROR, tid) + ERROR_BODY.pack(status) + text.encode("utf-8")[: wire.MAX_TEXT]


def decodeError(data: bytes) -> Optional[Tuple[int, str]]:
    """(status, text), or None if too short to hold a status."""
    if len(data) < HEADER_SIZE + ERROR_BODY.size:
        return None
    (status,) = ERROR_BODY.unpack_from(data, HEADER_SIZE)
    return status, data[HEADER_SIZE + ERROR_BODY.size :].decode("utf-8", "replace")


def encodeClose(tid: int) -> bytes:
    return header(CLOSE, tid)
