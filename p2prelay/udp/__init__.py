"""
Reliable file transfer over UDP: the server half and the client half.

The TCP download gets ordering, retransmission and congestion control from
the kernel; over UDP this module provides them, and it must also refuse to
be a traffic amplifier, because a UDP source address can be forged.  The
datagram formats, the handshake and every timer are described in
``docs/udp.rst``; the short version:

* The client asks for a file with a padded ``REQUEST``.  A request without a
  valid cookie gets only a tiny ``RETRY`` carrying a stateless HMAC cookie,
  so a forged request costs the server no state and the forged victim
  receives fewer bytes than the forger sent.
* A request that echoes the cookie starts the transfer: ``META`` announces
  the whole file's size and SHA-256, then numbered ``DATA`` blocks flow
  under a congestion window (slow start, halving on loss) bounded by the
  receiver's window.
* The client answers with ``ACK`` datagrams carrying a cumulative block
  number and selective ranges; the server declares a block lost when three
  later-sent blocks were acknowledged (the RACK idea, counted in packets),
  or when the RFC 6298 retransmission timer expires.
* On Linux the server sends runs of ``DATA`` with one system call (UDP
  GSO) and the client reads them back in one buffer (UDP GRO); elsewhere,
  and on test transports, every datagram is sent and read on its own.

Everything here that waits takes its time from an injected ``IReactorTime``.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import hmac
import math
import os
import socket
import struct
import sys
from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from typing import IO, Any, Dict, List, Optional, Tuple

import attrs
from twisted.internet import error
from twisted.internet import udp as twistedUDP
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IPushProducer, IReactorFDSet, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import wire
from ..node.share import SharedDirectory
from ..wire import FileEntry

Address = Tuple[str, int]

# Datagram framing.  Every datagram starts with the same 8-byte header.
MAGIC = b"PU"
VERSION = 1
REQUEST = 1  # client -> server: which file, which range, optional cookie
RETRY = 2  # server -> client: "prove your address": a cookie to echo
META = 3  # server -> client: size, range, block size and SHA-256 of the file
DATA = 4  # server -> client: one numbered block
ACK = 5  # client -> server: cumulative block number and SACK ranges
ERROR = 6  # server -> client: a wire status (404, 416, 503, ...) and text
CLOSE = 7  # client -> server: the client has given up; free the transfer

_HEAD = struct.Struct("!2sBBI")  # magic, version, type, transfer id
_DATA_HEAD = struct.Struct("!2sBBII")  # header, block number
_REQUEST = struct.Struct("!QQIIB")  # offset, length, block size, window, cookie length
_META = struct.Struct("!QQQII32s")  # size, offset, length, block size, window, sha256
_ACK = struct.Struct("!IB")  # next expected block, number of SACK ranges
_ERROR = struct.Struct("!H")  # status
_U16 = struct.Struct("!H")
_BLOCK_NUMBER = struct.Struct("!I")
_BUCKET = struct.Struct("!I")

HEADER_SIZE = _HEAD.size  # 8
DATA_HEADER_SIZE = _DATA_HEAD.size  # 12
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
AMPLIFICATION = 3  # bytes sent per byte received to an unproven address

# Windows, in blocks unless named otherwise.
RECEIVE_WINDOW_BYTES = 4 * 1024 * 1024  # out-of-order data a client buffers
INITIAL_WINDOW_BYTES = 256 * 1024  # first burst: ~190 default blocks
INITIAL_WINDOW = 256  # ... and never more blocks than this
MIN_WINDOW = 16
MAX_WINDOW = 16384
MIN_CWND = 4
REORDER_THRESHOLD = 3  # later-sent blocks acknowledged before one is lost
ACK_EVERY = 16  # in-order blocks per acknowledgement
SOCKET_BUFFER = 4 * 1024 * 1024  # SO_RCVBUF/SO_SNDBUF we ask the kernel for
READ_CHUNK = 1024 * 1024  # file bytes read at once and sliced into blocks
WRITE_BATCH = 256 * 1024  # in-order bytes gathered into one sink.write

# Linux UDP segmentation offload (<linux/udp.h>; Python 3.11 lacks the
# names).  With UDP_SEGMENT the server hands the kernel one buffer of many
# equal-size DATA datagrams per system call; with UDP_GRO the client reads
# such runs back in one buffer, told the segment size in a control message.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
GSO_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS in every version
GSO_BYTES = 65000  # a UDP payload is at most 65507 bytes over IPv4
_GSO_SIZE = struct.Struct("=H")  # the UDP_SEGMENT control message: native u16
_GRO_CMSG = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
# A send with UDP_SEGMENT fails with these when the route or device cannot
# segment (no checksum offload, IPsec, a segment above the path MTU, an old
# kernel); the same datagrams are then sent one by one.
_NO_GSO = frozenset(
    {errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
)

# Timers, in seconds (RFC 6298 names; the minimum is lower than its 1 s
# because the delayed ACK below is 100 times shorter than TCP's).
RTO_INITIAL = 1.0
RTO_MIN = 0.2
RTO_MAX = 5.0
CLOCK_GRANULARITY = 0.001
ACK_DELAY = 0.01
PUMP_RETRY = 0.002  # after the kernel refused a send (EAGAIN/ENOBUFS)
COOKIE_PERIOD = 30.0  # a cookie is valid for one to two periods
FINAL_ACKS = 3  # copies of the last ACK, since nothing acknowledges it
REMEMBER_FINISHED = 1024  # finished transfers remembered against replays
KEEPALIVE = 5.0  # while the sink has us paused: an ACK this often keeps the server's transfer
PAUSE_LIMIT = 6  # timeouts one pause may last before the download fails

_TRANSIENT = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR})


class UDPTransferError(Exception):
    """
    A UDP transfer failed for a reason other than an error answer or a
    timeout: a malformed or inconsistent reply, or a local failure.
    """


@attrs.frozen
class UDPResult:
    """What a finished UDP download delivered."""

    size: int  # size of the whole file
    sha256: str  # announced SHA-256 of the whole file
    offset: int
    length: int  # bytes delivered to the sink


def _header(kind: int, tid: int) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, kind, tid)


def _parseHeader(data: bytes) -> Optional[Tuple[int, int]]:
    """(type, transfer id), or None for a datagram that is not ours."""
    if len(data) < HEADER_SIZE:
        return None
    magic, version, kind, tid = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        return None
    return kind, tid


def _send(transport: Any, datagram: bytes, addr: Address) -> bool:
    """
    Send one datagram; False when the kernel had no room for it.

    Twisted raises for EAGAIN/ENOBUFS on UDP; for us that is the same as a
    datagram lost in the network, but one we know about.
    """
    try:
        transport.write(datagram, addr)
    except OSError as e:
        if e.errno in _TRANSIENT:
            return False
        raise
    return True


def _gsoSocket(transport: Any) -> Optional[socket.socket]:
    """
    The transport's socket if it can send runs of datagrams with
    ``UDP_SEGMENT`` (Linux 4.18 and later), else None: a fake transport, or
    a kernel that does not know the option.  Checked once per socket.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        sock = transport.getHandle()
        sock.getsockopt(socket.SOL_UDP, UDP_SEGMENT)
    except (AttributeError, OSError):
        return None
    return sock if hasattr(sock, "sendmsg") else None


def _segments(data: Any, size: int) -> List[memoryview]:
    """
    Split a buffer of coalesced datagrams (GRO) back into datagrams: all
    ``size`` bytes long but the last, which may be shorter.
    """
    view = memoryview(data)
    return [view[at : at + size] for at in range(0, len(view), size)]


def _bigBuffers(transport: Any) -> None:
    """
    Ask for large socket buffers: a burst of a full window must not
    overflow the default ~200 KiB receive queue.
    """
    try:
        sock = transport.getHandle()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    except (AttributeError, OSError):
        pass  # a fake transport, or a kernel that refuses: still correct


class _RoundTrip:
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
        return min(max(self.base * self.backoff, RTO_MIN), RTO_MAX)

    def expired(self) -> None:
        if self.base * self.backoff < RTO_MAX:
            self.backoff *= 2


class _Cookies:
    """
    Stateless address validation: an HMAC of the client's address and a
    time bucket under a secret that never leaves this process.
    """

    SIZE = _BUCKET.size + 16

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._secret = os.urandom(32)

    def _mac(self, addr: Address, bucket: int) -> bytes:
        message = f"{addr[0]}|{addr[1]}|{bucket}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:16]

    def _bucket(self) -> int:
        return int(self._clock.seconds() // COOKIE_PERIOD) & 0xFFFFFFFF

    def mint(self, addr: Address) -> bytes:
        bucket = self._bucket()
        return _BUCKET.pack(bucket) + self._mac(addr, bucket)

    def check(self, addr: Address, cookie: bytes) -> bool:
        if len(cookie) != self.SIZE:
            return False
        (bucket,) = _BUCKET.unpack_from(cookie)
        if (self._bucket() - bucket) & 0xFFFFFFFF > 1:
            return False
        return hmac.compare_digest(cookie[_BUCKET.size :], self._mac(addr, bucket))


@attrs.frozen
class _Request:
    offset: int
    length: Optional[int]
    blockSize: int
    window: int
    cookie: bytes
    name: str


def _encodeRequest(tid: int, request: _Request) -> bytes:
    name = request.name.encode("utf-8")
    length = TO_END if request.length is None else request.length
    body = (
        _header(REQUEST, tid)
        + _REQUEST.pack(
            request.offset, length, request.blockSize, request.window, len(request.cookie)
        )
        + request.cookie
        + _U16.pack(len(name))
        + name
    )
    return body + bytes(max(0, MIN_REQUEST - len(body)))


def _decodeRequest(data: bytes) -> _Request:
    """Raises ProtocolError(400) for a request we cannot read."""
    try:
        at = HEADER_SIZE
        offset, length, blockSize, window, cookieLength = _REQUEST.unpack_from(data, at)
        at += _REQUEST.size
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
    return _Request(
        offset, None if length == TO_END else length, blockSize, window, cookie, name
    )


def _cookieOf(data: bytes) -> bytes:
    """The cookie in a request, read before anything else is trusted."""
    at = HEADER_SIZE + _REQUEST.size
    if len(data) < at:
        return b""
    return data[at : at + data[at - 1]]


def _encodeError(tid: int, status: int, text: str) -> bytes:
    return _header(ERROR, tid) + _ERROR.pack(status) + text.encode("utf-8")[: wire.MAX_TEXT]


class _Phase(enum.Enum):
    OPENING = "opening"  # waiting for the share to open (and maybe hash) the file
    SENDING = "sending"
    DONE = "done"


class _Transfer:
    """
    One file range being sent to one client: the sending half of the
    protocol, with its window, loss detection and timers.

    Blocks are numbered from 0 at the range's offset.  ``_inflight`` maps
    each block sent and not yet acknowledged or declared lost to
    ``(send sequence, send time, retransmitted)``, in sending order, so
    loss detection only ever looks at its head.
    """

    log = Logger()

    def __init__(
        self, server: UDPFileServer, key: Tuple[str, int, int], addr: Address, tid: int
    ) -> None:
        self.server = server
        self.key = key
        self.addr = addr
        self.tid = tid
        self.clock = server.clock
        self.phase = _Phase.OPENING
        self.name = ""
        self._file: Optional[IO[bytes]] = None
        self._timer: Any = None
        self._pumpCall: Any = None
        self.retransmits = 0
        self.began = False  # META was sent: a repeated request must not restart it

    def begin(
        self, f: IO[bytes], entry: FileEntry, request: _Request, blockSize: int
    ) -> None:
        """The file is open: announce it and start sending."""
        self._file = f
        self.name = entry.name
        self.entry = entry
        self.offset = request.offset
        self.length = request.length if request.length is not None else entry.size - request.offset
        self.blockSize = blockSize
        self.nblocks = -(-self.length // blockSize)
        self.window = max(MIN_WINDOW, min(request.window, MAX_WINDOW))
        self.cwnd = float(
            min(self.window, INITIAL_WINDOW, max(MIN_CWND, INITIAL_WINDOW_BYTES // blockSize))
        )
        self.ssthresh = float(self.window)
        self.rtt = _RoundTrip()
        self.started = self.lastHeard = self.clock.seconds()
        self.metaAcked = False
        self.cumAck = 0  # every block below this is acknowledged
        self.nextNew = 0  # the first block never sent
        self._seq = 0  # send sequence, counting retransmissions
        self._highestAckedSeq = 0
        self._recoverySeq = 0  # losses of blocks sent before this: same event
        self._inflight: "OrderedDict[int, Tuple[int, float, bool]]" = OrderedDict()
        self._lost: "deque[int]" = deque()
        self._lostSet: set[int] = set()
        self._sackStarts: List[int] = []  # SACKed ranges above cumAck
        self._sackEnds: List[int] = []
        self._chunk = memoryview(b"")
        self._chunkFirst = self._chunkEnd = 0
        self._chunkBlocks = max(1, READ_CHUNK // blockSize)
        self._sendto = self.server._sendto()
        self._gso = self.server._gso
        self._perSend = 1
        if self._gso is not None:
            self._perSend = max(1, min(GSO_SEGMENTS, GSO_BYTES // (DATA_HEADER_SIZE + blockSize)))
        self._meta = _header(META, self.tid) + _META.pack(
            entry.size,
            self.offset,
            self.length,
            blockSize,
            self.window,
            bytes.fromhex(entry.sha256),
        )
        self.phase = _Phase.SENDING
        self.began = True
        self.log.info(
            "UDP: sending {name} [{offset}+{length}] to {peer} in {blocks} blocks of {size}",
            name=self.name,
            offset=self.offset,
            length=self.length,
            peer=self.addr,
            blocks=self.nblocks,
            size=blockSize,
        )
        self._sendMeta()
        self._pump()
        self._arm(self.rtt.timeout)

    def _sendMeta(self) -> None:
        try:
            _send(self.server.transport, self._meta, self.addr)
        except Exception as e:
            self.stop(f"cannot send: {e}")

    def requestRepeated(self) -> None:
        """The client asked again: our META (or its RETRY answer) was lost."""
        if self.phase is _Phase.SENDING and not self.metaAcked:
            self._sendMeta()

    # Sending

    def _block(self, block: int) -> memoryview:
        """
        A block's bytes, sliced from a large read so the file is read in
        big sequential pieces rather than one small read per datagram.
        """
        if not self._chunkFirst <= block < self._chunkEnd:
            assert self._file is not None
            position = self.offset + block * self.blockSize
            want = min(self._chunkBlocks * self.blockSize, self.offset + self.length - position)
            self._file.seek(position)
            data = self._file.read(want)
            if len(data) != want:
                raise _FileChanged()
            self._chunk = memoryview(data)
            self._chunkFirst = block
            self._chunkEnd = block + -(-want // self.blockSize)
        start = (block - self._chunkFirst) * self.blockSize
        return self._chunk[start : start + self.blockSize]

    def _pump(self) -> None:
        """
        Send lost blocks first, then new ones, while the window allows: in
        runs of up to ``_perSend`` datagrams, each run one system call when
        the socket can segment (GSO).
        """
        self._pumpCall = None
        if self.phase is not _Phase.SENDING:
            return
        inflight = self._inflight
        if len(inflight) >= self.cwnd:
            return
        tid = self.tid
        pack = _DATA_HEAD.pack
        blockSize = self.blockSize
        limit = min(self.nblocks, self.cumAck + self.window)
        now = self.clock.seconds()
        lost = self._lost
        lostSet = self._lostSet
        try:
            while len(inflight) < self.cwnd:
                # One run: retransmissions first, then consecutive new
                # blocks; only the run's last datagram may be short.
                run: List[int] = []
                retransmits = 0
                parts: List[Any] = []
                nextNew = self.nextNew
                room = min(self._perSend, math.ceil(self.cwnd) - len(inflight))
                while len(run) < room:
                    if lost:
                        block = lost.popleft()
                        if block not in lostSet:
                            continue  # acknowledged after it was declared lost
                        lostSet.discard(block)
                        retransmits += 1
                    elif nextNew < limit:
                        block = nextNew
                        nextNew += 1
                    else:
                        break
                    payload = self._block(block)
                    run.append(block)
                    parts += (pack(MAGIC, VERSION, DATA, tid, block), payload)
                    if len(payload) != blockSize:
                        break
                if not run:
                    break
                sent = self._sendRun(parts)
                seq = self._seq
                for i in range(sent):
                    seq += 1
                    inflight[run[i]] = (seq, now, i < retransmits)
                self._seq = seq
                self.retransmits += min(sent, retransmits)
                if sent == len(run):
                    self.nextNew = nextNew
                    continue
                # The kernel's buffer is full: keep the rest for a moment.
                unsent = run[sent:]
                if sent < retransmits:
                    again = unsent[: retransmits - sent]
                    lost.extendleft(reversed(again))
                    lostSet.update(again)
                    unsent = unsent[retransmits - sent :]
                self.nextNew = unsent[0] if unsent else nextNew
                if self._pumpCall is None:
                    self._pumpCall = self.clock.callLater(PUMP_RETRY, self._pump)
                break
        except _FileChanged:
            self._fail(wire.SERVER_ERROR, "file changed while sending; try again")
        except Exception as e:
            self.log.warn("UDP: cannot send to {peer}: {error}", peer=self.addr, error=e)
            self.stop(f"cannot send: {e}")

    def _sendRun(self, parts: List[Any]) -> int:
        """
        Send DATA datagrams given as alternating headers and payloads;
        return how many the kernel took before its buffer was full.

        With GSO the whole run is one ``sendmsg`` and the kernel cuts it
        into datagrams of the first one's size.  A route that cannot do
        that turns GSO off for this transfer, and the run goes out again
        datagram by datagram.
        """
        count = len(parts) // 2
        if count > 1 and self._gso is not None:
            segment = _GSO_SIZE.pack(len(parts[0]) + len(parts[1]))
            try:
                self._gso.sendmsg(parts, [(socket.SOL_UDP, UDP_SEGMENT, segment)], 0, self.addr)
                return count
            except OSError as e:
                if e.errno in _TRANSIENT:
                    return 0
                if e.errno not in _NO_GSO:
                    raise
                self.log.info(
                    "UDP: no segmentation offload towards {peer} ({error}); "
                    "sending datagram by datagram",
                    peer=self.addr,
                    error=e,
                )
                self._gso = None
                self._perSend = 1
        sendto = self._sendto
        addr = self.addr
        for i in range(count):
            try:
                sendto(parts[2 * i] + parts[2 * i + 1], addr)
            except OSError as e:
                if e.errno not in _TRANSIENT:
                    raise
                return i
        return count

    # Acknowledgements

    def ackReceived(self, cumulative: int, ranges: List[int]) -> None:
        """
        Account for an ACK: free acknowledged blocks, measure the round
        trip, detect losses, adjust the window, and send more.
        """
        if self.phase is not _Phase.SENDING or cumulative > self.nextNew:
            return  # acknowledges data we never sent: not from our client
        now = self.clock.seconds()
        self.lastHeard = now
        self.metaAcked = True
        newest: Optional[Tuple[int, float, bool]] = None
        acked = 0
        inflight = self._inflight
        lostSet = self._lostSet

        def take(first: int, last: int) -> None:
            """Mark blocks first..last-1 delivered (called once per range)."""
            nonlocal acked, newest
            for block in range(first, last):
                record = inflight.pop(block, None)
                if record is not None:
                    acked += 1
                    if newest is None or record[0] > newest[0]:
                        newest = record
                elif block in lostSet:
                    lostSet.discard(block)
                    acked += 1

        if cumulative > self.cumAck:
            take(self.cumAck, cumulative)
            self.cumAck = cumulative
            cut = bisect_right(self._sackEnds, cumulative)
            del self._sackStarts[:cut], self._sackEnds[:cut]
            if self._sackStarts and self._sackStarts[0] < cumulative:
                self._sackStarts[0] = cumulative
        for i in range(0, len(ranges), 2):
            start = max(ranges[i], self.cumAck)
            end = min(ranges[i + 1], self.nextNew)
            if start >= end:
                continue
            for first, last in self._addSack(start, end):
                take(first, last)
        if newest is not None:
            if newest[0] > self._highestAckedSeq:
                self._highestAckedSeq = newest[0]
            if not newest[2]:
                self.rtt.sample(now - newest[1])
        if acked:
            if self.cwnd < self.ssthresh:
                self.cwnd += acked
            else:
                self.cwnd += acked / self.cwnd
            self.cwnd = min(self.cwnd, float(self.window))
            self._arm(self.rtt.timeout)
        self._detectLosses()
        if self.cumAck == self.nblocks:
            self._finished()
        else:
            self._pump()

    def _addSack(self, start: int, end: int) -> List[Tuple[int, int]]:
        """
        Merge [start, end) into the SACKed ranges; return the parts that
        were not covered before, so each block is accounted for once no
        matter how many ACKs repeat its range.
        """
        starts, ends = self._sackStarts, self._sackEnds
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

    def _detectLosses(self) -> None:
        """
        A block is lost when REORDER_THRESHOLD blocks sent after it have
        been acknowledged; only the oldest in-flight blocks need checking.
        """
        inflight = self._inflight
        horizon = self._highestAckedSeq - REORDER_THRESHOLD
        reduced = False
        while inflight:
            block = next(iter(inflight))
            seq = inflight[block][0]
            if seq > horizon:
                break
            del inflight[block]
            self._lost.append(block)
            self._lostSet.add(block)
            if seq > self._recoverySeq and not reduced:
                # One multiplicative decrease per window of losses.
                self.cwnd = max(self.cwnd / 2, float(MIN_CWND))
                self.ssthresh = self.cwnd
                self._recoverySeq = self._seq
                reduced = True

    # Timers

    def _arm(self, delay: float) -> None:
        """
        Push the retransmission deadline out.  The timer is moved lazily:
        one DelayedCall that, when it fires early, re-arms for the deadline.
        """
        now = self.clock.seconds()
        self._deadline = now + delay
        fire = min(self._deadline, self.lastHeard + self.server.idleTimeout)
        if self._timer is None or not self._timer.active():
            self._timer = self.clock.callLater(max(0.0, fire - now), self._timerFired)
        elif self._timer.getTime() > fire + RTO_MIN:
            self._timer.reset(max(0.0, fire - now))

    def _timerFired(self) -> None:
        self._timer = None
        if self.phase is not _Phase.SENDING:
            return
        now = self.clock.seconds()
        if now - self.lastHeard >= self.server.idleTimeout:
            self.log.info(
                "UDP: {peer} stopped acknowledging {name}; dropping the transfer",
                peer=self.addr,
                name=self.name,
            )
            self.stop("idle")
            return
        if now < self._deadline:
            fire = min(self._deadline, self.lastHeard + self.server.idleTimeout)
            self._timer = self.clock.callLater(max(0.0, fire - now), self._timerFired)
            return
        # RFC 6298 5.4-5.6: back off, and resend from the oldest block.
        self.rtt.expired()
        if not self.metaAcked:
            self._sendMeta()
        if self._inflight:
            self.ssthresh = max(len(self._inflight) / 2, float(MIN_CWND))
            self.cwnd = float(MIN_CWND)
            self._recoverySeq = self._seq
            lost = sorted(self._inflight)
            self._inflight.clear()
            self._lost.extendleft(reversed(lost))
            self._lostSet.update(lost)
        self._arm(self.rtt.timeout)
        self._pump()

    # Endings

    def _finished(self) -> None:
        elapsed = self.clock.seconds() - self.started
        self.log.info(
            "UDP: sent {name} [{offset}+{length}] to {peer} in {elapsed:.3f}s "
            "({retransmits} retransmitted blocks)",
            name=self.name,
            offset=self.offset,
            length=self.length,
            peer=self.addr,
            elapsed=elapsed,
            retransmits=self.retransmits,
        )
        self.stop(None)

    def _fail(self, status: int, text: str) -> None:
        try:
            _send(self.server.transport, _encodeError(self.tid, status, text), self.addr)
        except Exception:
            pass
        self.stop(text)

    def stop(self, reason: Optional[str]) -> None:
        """Free everything this transfer holds; safe to call twice."""
        if self.phase is _Phase.DONE:
            return
        if reason is not None and self.phase is _Phase.SENDING:
            self.log.info(
                "UDP: transfer of {name} to {peer} ended: {reason}",
                name=self.name,
                peer=self.addr,
                reason=reason,
            )
        self.phase = _Phase.DONE
        for call in (self._timer, self._pumpCall):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._pumpCall = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._chunk = memoryview(b"")
        self.server._forget(self)


class _FileChanged(Exception):
    """The file got shorter than announced while we were sending it."""


class UDPFileServer(DatagramProtocol):
    """
    Serves a node's shared folder over UDP.

    Pass ``maxPacketSize=MAX_DATAGRAM`` to ``listenUDP``: larger client
    requests and ACKs would otherwise be truncated.  ``blockSize`` is the
    largest block this server sends; a client asking for less gets that.
    ``segmentation=False`` turns off Linux UDP segmentation offload (GSO),
    which is otherwise used whenever the socket supports it.
    """

    log = Logger()

    def __init__(
        self,
        share: SharedDirectory,
        clock: Optional[IReactorTime] = None,
        *,
        blockSize: int = DEFAULT_BLOCK,
        maxTransfers: int = 64,
        maxPerAddress: int = 8,
        idleTimeout: float = 30.0,
        segmentation: bool = True,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        if not MIN_BLOCK <= blockSize <= MAX_BLOCK:
            raise ValueError(f"blockSize must be {MIN_BLOCK}..{MAX_BLOCK}")
        self.share = share
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.blockSize = blockSize
        self.maxTransfers = maxTransfers
        self.maxPerAddress = maxPerAddress
        self.idleTimeout = idleTimeout
        self.segmentation = segmentation
        self._gso: Optional[socket.socket] = None
        self.transfers: Dict[Tuple[str, int, int], _Transfer] = {}
        self.perAddress: Dict[str, int] = {}
        self._cookies = _Cookies(self.clock)
        self._finished: "OrderedDict[Tuple[str, int, int], float]" = OrderedDict()

    def startProtocol(self) -> None:
        _bigBuffers(self.transport)
        self._gso = _gsoSocket(self.transport) if self.segmentation else None

    def _sendto(self) -> Any:
        """
        The fastest way to send a DATA datagram.

        ``Port.write`` checks the address family on every call, a third of
        the sender's CPU per block; transfers only send to addresses that
        datagrams arrived from, so the socket's own ``sendto`` is enough.
        """
        try:
            return self.transport.getHandle().sendto
        except AttributeError:
            return self.transport.write

    def stopProtocol(self) -> None:
        for transfer in list(self.transfers.values()):
            transfer.stop("server stopped")

    def datagramReceived(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        header = _parseHeader(data)
        if header is None:
            return  # never answer what is not ours: no reflection
        kind, tid = header
        key = (addr[0], addr[1], tid)
        if kind == ACK:
            transfer = self.transfers.get(key)
            if transfer is not None:
                if len(data) < HEADER_SIZE + _ACK.size:
                    return
                cumulative, count = _ACK.unpack_from(data, HEADER_SIZE)
                if len(data) != HEADER_SIZE + _ACK.size + 8 * count:
                    return
                ranges = list(struct.unpack_from(f"!{2 * count}I", data, HEADER_SIZE + _ACK.size))
                transfer.ackReceived(cumulative, ranges)
        elif kind == REQUEST:
            self._requestReceived(data, addr, tid, key)
        elif kind == CLOSE:
            transfer = self.transfers.get(key)
            if transfer is not None:
                transfer.stop("client closed")

    def _answer(self, datagram: bytes, addr: Address) -> None:
        try:
            _send(self.transport, datagram, addr)
        except Exception as e:
            self.log.warn("UDP: cannot answer {peer}: {error}", peer=addr, error=e)

    def _requestReceived(
        self, data: bytes, addr: Address, tid: int, key: Tuple[str, int, int]
    ) -> None:
        if len(data) < MIN_REQUEST:
            return  # unpadded: answering could amplify
        existing = self.transfers.get(key)
        if existing is not None:
            existing.requestRepeated()
            return
        if not self._cookies.check(addr, _cookieOf(data)):
            # Stateless: a 32-byte answer to a request of at least 1200.
            self._answer(_header(RETRY, tid) + self._cookies.mint(addr), addr)
            return
        self._forgetOldFinished()
        if key in self._finished:
            return  # a late duplicate of a request we already served
        try:
            request = _decodeRequest(data)
            wire.checkName(request.name)
            if not MIN_BLOCK <= request.blockSize <= MAX_BLOCK:
                raise wire.ProtocolError(
                    wire.BAD_REQUEST, f"block size must be {MIN_BLOCK}..{MAX_BLOCK}"
                )
            if len(self.transfers) >= self.maxTransfers:
                raise wire.ProtocolError(
                    wire.BUSY, f"busy: {self.maxTransfers} UDP transfers running; try later"
                )
            if self.perAddress.get(addr[0], 0) >= self.maxPerAddress:
                raise wire.ProtocolError(
                    wire.BUSY,
                    f"busy: at most {self.maxPerAddress} UDP transfers per address; try later",
                )
        except wire.ProtocolError as e:
            self._answer(_encodeError(tid, e.status, e.message), addr)
            return
        transfer = _Transfer(self, key, addr, tid)
        self.transfers[key] = transfer
        self.perAddress[addr[0]] = self.perAddress.get(addr[0], 0) + 1
        ensureDeferred(self._open(transfer, request)).addErrback(
            lambda f: self.log.failure("UDP: cannot start sending", f)
        )

    async def _open(self, transfer: _Transfer, request: _Request) -> None:
        try:
            f, entry = await self.share.open(request.name)
        except wire.ProtocolError as e:
            transfer._fail(e.status, e.message)
            return
        except Exception:
            self.log.failure("UDP: cannot open {name}", name=request.name)
            transfer._fail(wire.SERVER_ERROR, "cannot read the file")
            return
        if transfer.phase is not _Phase.OPENING:
            f.close()  # the client gave up while we were opening
            return
        length = request.length if request.length is not None else entry.size - request.offset
        if request.offset > entry.size or length < 0 or request.offset + length > entry.size:
            f.close()
            transfer._fail(
                wire.BAD_RANGE, f"range {request.offset}+{length} is outside {entry.size} bytes"
            )
            return
        blockSize = min(request.blockSize, self.blockSize)
        if -(-length // blockSize) > MAX_BLOCKS:
            f.close()
            transfer._fail(wire.TOO_LARGE, "range has too many blocks for UDP; use TCP")
            return
        transfer.begin(f, entry, request, blockSize)

    def _forget(self, transfer: _Transfer) -> None:
        if self.transfers.get(transfer.key) is not transfer:
            return
        del self.transfers[transfer.key]
        host = transfer.addr[0]
        left = self.perAddress.get(host, 1) - 1
        if left:
            self.perAddress[host] = left
        else:
            self.perAddress.pop(host, None)
        if not transfer.began:
            return  # refused: a repeated request is answered again
        self._finished[transfer.key] = self.clock.seconds() + 2 * COOKIE_PERIOD
        while len(self._finished) > REMEMBER_FINISHED:
            self._finished.popitem(last=False)

    def _forgetOldFinished(self) -> None:
        """Drop remembered transfers whose requests' cookies have expired."""
        now = self.clock.seconds()
        while self._finished:
            key = next(iter(self._finished))
            if self._finished[key] > now:
                break
            del self._finished[key]


# The client


class _ClientPhase(enum.Enum):
    HANDSHAKE = "handshake"  # REQUEST sent, waiting for RETRY or META
    RECEIVING = "receiving"
    DONE = "done"


@implementer(IPushProducer)
class _UDPClient(DatagramProtocol):
    """
    The receiving half: asks for a range, writes blocks to the sink in
    order, buffers at most a window of out-of-order blocks, acknowledges.

    It is also the sink's push producer.  While paused it writes nothing:
    blocks that arrive are held like out-of-order ones (acknowledged
    selectively, at most a window of them), and the cumulative ACK, whose
    value plus the window is as far as the server may send, stays put.
    Resuming writes what is held and moves the cumulative ACK on, which
    opens the server's window again at once.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        peer: Address,
        name: str,
        sink: Any,
        offset: int,
        length: Optional[int],
        timeout: float,
        blockSize: int,
    ) -> None:
        self.clock = clock
        self.peer = peer
        self.sink = sink
        self.timeout = timeout
        self.tid = int.from_bytes(os.urandom(4), "big")
        self.window = max(MIN_WINDOW, min(MAX_WINDOW, RECEIVE_WINDOW_BYTES // blockSize))
        self.request = _Request(offset, length, blockSize, self.window, b"", name)
        self.phase = _ClientPhase.HANDSHAKE
        self.deferred: Deferred[UDPResult] = Deferred(self._cancel)
        self._handshakeDelay = RTO_INITIAL
        self._handshakeCall: Any = None
        self._ackCall: Any = None
        self._progressCall: Any = None
        self._lastProgress = clock.seconds()
        self._dataPrefix = _header(DATA, self.tid)
        self.expected = 0  # next block to hand to the sink
        self._buffer: Dict[int, bytes] = {}  # out-of-order blocks
        self._starts: List[int] = []  # ranges held in _buffer, for SACK
        self._ends: List[int] = []
        self._latest = 0  # the most recently buffered block
        self._unacked = 0  # in-order blocks since the last ACK
        self._ackNow = False  # a gap, a filled gap or a duplicate arrived
        self._pending: List[Any] = []  # in-order payloads not yet written
        self._pendingBytes = 0
        self._paused = False  # by the sink: write nothing, hold what arrives
        self._room = self.window  # blocks accepted beyond `expected`; fewer while paused
        self._pausedAt = 0.0
        self._pauseCall: Any = None
        self._writing = False  # inside sink.write

    # Life cycle

    def startProtocol(self) -> None:
        _bigBuffers(self.transport)
        self._sendRequest()
        self._progressCall = self.clock.callLater(self.timeout, self._progressCheck)

    def _stopTimers(self) -> None:
        for call in (self._handshakeCall, self._ackCall, self._progressCall, self._pauseCall):
            if call is not None and call.active():
                call.cancel()

    def _finish(self, result: Any) -> None:
        """Stop every timer and fire the Deferred once."""
        if self.phase is _ClientPhase.DONE:
            return
        self.phase = _ClientPhase.DONE
        self._stopTimers()
        self._buffer.clear()
        del self._starts[:], self._ends[:]
        self._pending.clear()
        self.deferred.callback(result)

    def _fail(self, reason: Exception) -> None:
        if self.phase is not _ClientPhase.DONE:
            self._write(_header(CLOSE, self.tid))
            self._finish(Failure(reason))

    def _cancel(self, d: Deferred[UDPResult]) -> None:
        if self.phase is not _ClientPhase.DONE:
            self._write(_header(CLOSE, self.tid))
            self.phase = _ClientPhase.DONE
            self._stopTimers()

    def _write(self, datagram: bytes) -> None:
        try:
            _send(self.transport, datagram, self.peer)
        except Exception as e:
            if self.phase is not _ClientPhase.DONE and datagram[3] != CLOSE:
                self._finish(Failure(UDPTransferError(f"cannot send to {self.peer}: {e}")))

    # Timers

    def _sendRequest(self) -> None:
        self._write(_encodeRequest(self.tid, self.request))
        if self.phase is _ClientPhase.HANDSHAKE:
            self._handshakeCall = self.clock.callLater(self._handshakeDelay, self._handshakeTimeout)

    def _handshakeTimeout(self) -> None:
        self._handshakeCall = None
        if self.phase is _ClientPhase.HANDSHAKE:
            self._handshakeDelay = min(self._handshakeDelay * 2, RTO_MAX)
            self._sendRequest()

    def _progressCheck(self) -> None:
        self._progressCall = None
        if self.phase is _ClientPhase.DONE:
            return
        if self._paused:
            # Not the peer's fault: the clock restarts on resuming, and
            # _pauseCheck bounds the pause itself.
            self._progressCall = self.clock.callLater(self.timeout, self._progressCheck)
            return
        waited = self.clock.seconds() - self._lastProgress
        if waited < self.timeout:
            self._progressCall = self.clock.callLater(self.timeout - waited, self._progressCheck)
            return
        self._fail(
            error.TimeoutError(
                f"no progress from {self.peer[0]}:{self.peer[1]} in {self.timeout:g} seconds"
            )
        )

    # IPushProducer, for the sink

    def pauseProducing(self) -> None:
        """
        The sink is full: write nothing more, hold what arrives (at most a
        window in all), keep the server's transfer alive with an ACK every
        KEEPALIVE seconds, and give up after PAUSE_LIMIT timeouts.
        """
        if self._paused or self.phase is _ClientPhase.DONE:
            return
        self._paused = True
        self._pausedAt = self.clock.seconds()
        if self._pendingBytes:  # gathered before the pause: counts against the window
            self._room = self.window - -(-self._pendingBytes // self.blockSize)
        self._pauseCall = self.clock.callLater(
            min(KEEPALIVE, PAUSE_LIMIT * self.timeout), self._pauseCheck
        )

    def resumeProducing(self) -> None:
        """Write what was held, then move the cumulative ACK on."""
        if not self._paused or self.phase is _ClientPhase.DONE:
            return
        self._paused = False
        self._room = self.window
        if self._pauseCall is not None and self._pauseCall.active():
            self._pauseCall.cancel()
        self._pauseCall = None
        self._lastProgress = self.clock.seconds()
        if self.phase is not _ClientPhase.RECEIVING or self._writing:
            return  # (resumed from inside sink.write: the writer carries on)
        if self._starts and self._starts[0] == self.expected:
            try:
                self._drain()  # stops early if the sink pauses us again
            except Exception as e:
                self._fail(UDPTransferError(f"cannot write the data: {e}"))
                return
        self._ackNow = True
        self._acknowledge()

    def stopProducing(self) -> None:
        """The sink wants no more: end the download as cancelling does."""
        self._fail(UDPTransferError("the download was stopped by its sink"))

    def _pauseCheck(self) -> None:
        self._pauseCall = None
        if not self._paused or self.phase is _ClientPhase.DONE:
            return
        paused = self.clock.seconds() - self._pausedAt
        limit = PAUSE_LIMIT * self.timeout
        if paused >= limit:
            self._fail(UDPTransferError(f"the sink paused the download for {paused:g} seconds"))
            return
        if self.phase is _ClientPhase.RECEIVING:
            self._sendAck()  # the server drops a transfer that goes unacknowledged
        self._pauseCall = self.clock.callLater(min(KEEPALIVE, limit - paused), self._pauseCheck)

    # Datagrams

    def datagramReceived(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        if addr != self.peer or self.phase is _ClientPhase.DONE:
            return
        if data[:HEADER_SIZE] == self._dataPrefix:
            if self.phase is _ClientPhase.RECEIVING:
                self._dataReceived(data)
                self._acknowledge()
            return  # before META we cannot place blocks; the server resends META
        header = _parseHeader(data)
        if header is None or header[1] != self.tid:
            return
        kind = header[0]
        try:
            if kind == RETRY:
                self._retryReceived(data)
            elif kind == META:
                self._metaReceived(data)
            elif kind == ERROR:
                self._errorReceived(data)
        except UDPTransferError as e:
            self._fail(e)

    def segmentsReceived(self, data: bytes, size: int, addr: Address) -> None:
        """
        A run of datagrams that the kernel delivered in one buffer (UDP
        GRO), each ``size`` bytes but the last: handled as that many
        datagrams, except that the acknowledgement they call for is sent
        once, after the run, since they all arrived at the same moment.
        """
        if addr != self.peer or self.phase is _ClientPhase.DONE:
            return
        prefix = self._dataPrefix
        sawData = False
        for datagram in _segments(data, size):
            if datagram[:HEADER_SIZE] == prefix:
                if self.phase is not _ClientPhase.RECEIVING:
                    continue
                self._dataReceived(datagram)
                sawData = True
            else:
                self.datagramReceived(bytes(datagram), addr)
            if self.phase is _ClientPhase.DONE:
                return
        if sawData:
            self._acknowledge()

    def _retryReceived(self, data: bytes) -> None:
        if self.phase is not _ClientPhase.HANDSHAKE:
            return
        cookie = data[HEADER_SIZE:]
        if not cookie or len(cookie) > 255:
            raise UDPTransferError("malformed RETRY from the server")
        if cookie == self.request.cookie:
            return  # a duplicate
        self._lastProgress = self.clock.seconds()
        self.request = attrs.evolve(self.request, cookie=cookie)
        if self._handshakeCall is not None and self._handshakeCall.active():
            self._handshakeCall.cancel()
        self._handshakeDelay = RTO_INITIAL
        self._sendRequest()

    def _errorReceived(self, data: bytes) -> None:
        if len(data) < HEADER_SIZE + _ERROR.size:
            raise UDPTransferError("malformed ERROR from the server")
        (status,) = _ERROR.unpack_from(data, HEADER_SIZE)
        text = data[HEADER_SIZE + _ERROR.size :].decode("utf-8", "replace")
        if not 400 <= status <= 599:
            raise UDPTransferError(f"server answered with status {status}")
        self._finish(Failure(wire.ProtocolError(status, text or wire.REASONS.get(status, ""))))

    def _metaReceived(self, data: bytes) -> None:
        if self.phase is not _ClientPhase.HANDSHAKE:
            if self.phase is _ClientPhase.RECEIVING:
                self._sendAck()  # our first ACK was lost
            return
        if len(data) != HEADER_SIZE + _META.size:
            raise UDPTransferError("malformed META from the server")
        size, offset, length, blockSize, window, digest = _META.unpack_from(data, HEADER_SIZE)
        want = self.request
        if (
            offset != want.offset
            or (want.length is not None and length != want.length)
            or offset + length > size
            or not 0 < blockSize <= want.blockSize
            or window > want.window
        ):
            raise UDPTransferError("the server's META does not match the request")
        self.size, self.offset, self.length = size, offset, length
        self.sha256 = digest.hex()
        self.blockSize = blockSize
        self.nblocks = -(-length // blockSize)
        self.window = self.request.window
        self.lastBlockSize = length - (self.nblocks - 1) * blockSize if self.nblocks else 0
        self.phase = _ClientPhase.RECEIVING
        self._lastProgress = self.clock.seconds()
        if self._handshakeCall is not None and self._handshakeCall.active():
            self._handshakeCall.cancel()
        self._sendAck()
        self._checkDone()

    def _dataReceived(self, data: Any) -> None:
        """
        The hot path: keep it to a few operations per block.  What to
        acknowledge is left to :meth:`_acknowledge`, after one datagram or
        after a run of them.
        """
        (block,) = _BLOCK_NUMBER.unpack_from(data, HEADER_SIZE)
        expected = self.expected
        if block < expected or block >= expected + self._room or block in self._buffer:
            self._ackNow = True  # a duplicate: our ACK may have been lost
            return
        if block >= self.nblocks:
            self._fail(UDPTransferError(f"server sent block {block} of {self.nblocks}"))
            return
        payload = data[DATA_HEADER_SIZE:]
        size = self.blockSize if block != self.nblocks - 1 else self.lastBlockSize
        if len(payload) != size:
            self._fail(UDPTransferError(f"block {block} has {len(payload)} bytes, not {size}"))
            return
        self._lastProgress = self.clock.seconds()
        try:
            if block == expected and not self._paused:
                self._deliver(payload)
                self.expected = expected = expected + 1
                if self._starts and self._starts[0] == expected:
                    self._drain()
                    self._ackNow = True
                else:
                    self._unacked += 1
            else:
                self._buffer[block] = bytes(payload)  # not a view pinning a whole GRO buffer
                self._insert(block)
                self._latest = block
                if self._paused and self._starts[0] == expected and self._ends[0] == block + 1:
                    self._unacked += 1  # held in order: acknowledged as in-order data is
                else:
                    self._ackNow = True  # a gap: tell the sender now
        except Exception as e:
            self._fail(UDPTransferError(f"cannot write the data: {e}"))

    def _acknowledge(self) -> None:
        """
        After data arrived: acknowledge at once (a gap, a filled gap, a
        duplicate, ACK_EVERY in-order blocks, the last block) or within
        ACK_DELAY; and finish once every block is in the sink.
        """
        if self.phase is not _ClientPhase.RECEIVING:
            return
        if self.expected == self.nblocks:
            if self._flush():
                self._sendAck()
                self._checkDone()
        elif self._ackNow or self._unacked >= ACK_EVERY:
            self._sendAck()
        elif self._unacked and self._ackCall is None:
            self._ackCall = self.clock.callLater(ACK_DELAY, self._delayedAck)

    def _deliver(self, payload: Any) -> None:
        """
        Hand an in-order block towards the sink.  Blocks are gathered into
        writes of WRITE_BATCH bytes: a sink's cost is mostly per call (a
        ``Download`` hands every write to its thread and back).
        """
        self._pending.append(payload)
        self._pendingBytes += len(payload)
        if self._pendingBytes >= WRITE_BATCH:
            self._writePending()

    def _writePending(self) -> None:
        if self._pending and not self._paused:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pendingBytes = 0
            self._writing = True
            try:
                self.sink.write(data)  # which may pause, resume or stop us
            finally:
                self._writing = False

    def _flush(self) -> bool:
        """Write what is gathered; False (and the download failed) if the sink raised."""
        try:
            self._writePending()
        except Exception as e:
            self._fail(UDPTransferError(f"cannot write the data: {e}"))
            return False
        return True

    def _drain(self) -> None:
        """
        A gap was filled, or the sink resumed us: hand the buffered run at
        ``expected`` to the sink, until the sink pauses us (again).
        """
        starts, ends = self._starts, self._ends
        block, end = starts[0], ends[0]
        buffer = self._buffer
        deliver = self._deliver
        while block < end and not self._paused and self.phase is _ClientPhase.RECEIVING:
            deliver(buffer.pop(block))
            block += 1
        if self.phase is not _ClientPhase.RECEIVING:
            return  # the sink stopped us
        self.expected = block
        if block == end:
            del starts[0], ends[0]
        else:
            starts[0] = block

    def _insert(self, block: int) -> None:
        starts, ends = self._starts, self._ends
        i = bisect_right(starts, block) - 1
        joinLeft = i >= 0 and ends[i] == block
        joinRight = i + 1 < len(starts) and starts[i + 1] == block + 1
        if joinLeft and joinRight:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joinLeft:
            ends[i] = block + 1
        elif joinRight:
            starts[i + 1] = block
        else:
            starts.insert(i + 1, block)
            ends.insert(i + 1, block + 1)

    def _delayedAck(self) -> None:
        """The data paused: acknowledge it and write out what is gathered."""
        self._ackCall = None
        if self.phase is _ClientPhase.RECEIVING and self._flush():
            self._sendAck()

    def _sendAck(self) -> None:
        self._unacked = 0
        self._ackNow = False
        if self._ackCall is not None:
            if self._ackCall.active():
                self._ackCall.cancel()
            self._ackCall = None
        starts, ends = self._starts, self._ends
        if len(starts) <= MAX_SACK:
            picked = list(range(len(starts)))
        else:
            # The range holding the newest block drives the sender's loss
            # detection; the lowest ranges are the holes to fill first.
            latest = bisect_right(starts, self._latest) - 1
            picked = [latest] + [i for i in range(MAX_SACK) if i != latest][: MAX_SACK - 1]
        values: List[int] = []
        for i in picked:
            values += (starts[i], ends[i])
        self._write(
            _header(ACK, self.tid)
            + _ACK.pack(self.expected, len(picked))
            + struct.pack(f"!{len(values)}I", *values)
        )

    def _checkDone(self) -> None:
        if (
            self.phase is _ClientPhase.RECEIVING
            and self.expected == self.nblocks
            and not self._pending
        ):
            final = _header(ACK, self.tid) + _ACK.pack(self.expected, 0)
            for _ in range(FINAL_ACKS - 1):
                self._write(final)
            self._finish(UDPResult(self.size, self.sha256, self.offset, self.length))


class _SegmentingPort(twistedUDP.Port):
    """
    A Twisted UDP port that asks Linux to deliver runs of datagrams from
    one sender in one buffer (``UDP_GRO``), and reads them with ``recvmsg``
    to learn where to cut: a run goes to the protocol's
    ``segmentsReceived(data, size, addr)``, a lone datagram to
    ``datagramReceived`` as usual.  Where the option is refused, this is
    a plain ``Port``.

    On loopback, a run the server sent with GSO arrives as it was sent, so
    both ends pay per run rather than per datagram.
    """

    log = Logger()
    maxThroughput = 1024 * 1024  # bytes read per wake-up; Port's is 256 KiB
    gro = False

    def startListening(self) -> None:
        super().startListening()
        if sys.platform.startswith("linux") and _GRO_CMSG:
            try:
                self.socket.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass

    def doRead(self) -> None:
        if not self.gro:
            return super().doRead()
        read = 0
        while read < self.maxThroughput:
            try:
                data, ancillary, _, addr = self.socket.recvmsg(self.maxPacketSize, _GRO_CMSG)
            except OSError as e:
                if e.errno in _TRANSIENT or e.errno == errno.ECONNREFUSED:
                    return
                raise
            read += len(data)
            addr = addr[:2]  # no IPv6 flow information or scope, as Port does
            size = _groSize(ancillary)
            try:
                if size and len(data) > size:
                    self.protocol.segmentsReceived(data, size, addr)
                else:
                    self.protocol.datagramReceived(data, addr)
            except BaseException:
                self.log.failure("UDP: unhandled error receiving a datagram")
        return None


def _groSize(ancillary: List[Tuple[int, int, bytes]]) -> int:
    """The segment size from a ``UDP_GRO`` control message, or 0."""
    for level, kind, value in ancillary:
        if level == socket.SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return int.from_bytes(value[:4], sys.byteorder)
    return 0


def _listen(reactor: Any, protocol: DatagramProtocol, interface: str) -> Any:
    """
    The client's ephemeral port: a segmenting one when the reactor
    watches file descriptors (every POSIX reactor), else the reactor's own.
    """
    if IReactorFDSet.providedBy(reactor):
        port = _SegmentingPort(0, protocol, interface, MAX_DATAGRAM, reactor)
        port.startListening()
        return port
    return reactor.listenUDP(0, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM)


async def fetchUDP(
    reactor: Any,
    host: str,
    port: int,
    name: str,
    sink: Any,
    *,
    offset: int = 0,
    length: Optional[int] = None,
    timeout: float = 10.0,
    blockSize: int = DEFAULT_BLOCK,
) -> UDPResult:
    """
    Download ``name`` (or the range ``offset``, ``length``) from the UDP
    server at ``host``:``port`` into ``sink.write``, in order.

    Checking the whole-file ``sha256`` in the result is the caller's job,
    since only the caller holds the whole file when this was a range.
    A sink with ``registerProducer`` (an ``IConsumer`` such as
    ``Download``) gets the download as its streaming producer until it
    ends, so it can pause the download while it catches up.
    Raises :class:`wire.ProtocolError` for the server's error answers,
    ``TimeoutError`` after ``timeout`` seconds without progress, and
    :class:`UDPTransferError` for anything else.
    """
    wire.checkName(name)
    if offset < 0 or (length is not None and length < 0):
        raise ValueError("offset and length must not be negative")
    if not MIN_BLOCK <= blockSize <= MAX_BLOCK:
        raise ValueError(f"blockSize must be {MIN_BLOCK}..{MAX_BLOCK}")
    client = _UDPClient(reactor, (host, port), name, sink, offset, length, timeout, blockSize)
    interface = "::" if ":" in host else ""
    consumer = hasattr(sink, "registerProducer")
    if consumer:
        sink.registerProducer(client, True)
    try:
        listening = _listen(reactor, client, interface)
    except BaseException:
        if consumer:
            sink.unregisterProducer()
        raise
    try:
        return await client.deferred
    finally:
        if client.phase is not _ClientPhase.DONE:
            client._cancel(client.deferred)
        if consumer:
            sink.unregisterProducer()
        stopped = listening.stopListening()
        if stopped is not None:
            await stopped
