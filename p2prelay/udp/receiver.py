"""
The receiving side of the UDP transfer: ``fetchUDP`` and its protocol.

A download is one ephemeral UDP port and one :class:`UDPClient` on it: it
asks for a range (echoing the server's cookie), writes blocks to the sink
in order, buffers at most a window of out-of-order blocks, acknowledges
with cumulative and selective ranges, and is the sink's push producer so
a slow disk pauses the download instead of filling memory.  Every path
ends in a result, an error answer, a timeout or a
:class:`UDPTransferError`, and closes the port.
"""

from __future__ import annotations

import enum
import os
from typing import Any, Dict, List, Optional, Tuple

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import wire
from . import offload, packets
from .packets import BLOCK_NUMBER, DATA_HEADER_SIZE, HEADER_SIZE  # the hot path
from .packets import DEFAULT_BLOCK, MAX_BLOCK, MIN_BLOCK
from .ranges import RangeSet
from .rtt import RTO_INITIAL, RTO_MAX

Address = Tuple[str, int]

RECEIVE_WINDOW_BYTES = 4 * 1024 * 1024  # out-of-order data a client buffers
ACK_EVERY = 2  # in-order blocks per acknowledgement (a small window must not wait for the timer)
ACK_DELAY = 0.01  # seconds an in-order block waits for company before its ACK
WRITE_BATCH = 256 * 1024  # in-order bytes gathered into one sink.write
FINAL_ACKS = 3  # copies of the last ACK, since nothing acknowledges it
KEEPALIVE = 5.0  # while the sink has us paused: an ACK this often keeps the server's transfer
PAUSE_LIMIT = 6  # timeouts one pause may last before the download fails
HANDSHAKE_MIN = 0.05  # seconds: the shortest wait before repeating the cookie'd request
HANDSHAKE_RTTS = 4  # ... otherwise this many round trips of REQUEST -> RETRY
EARLY_BYTES = 1024 * 1024  # DATA kept while META is missing, to place once it comes
LOOPBACK_BLOCK = MAX_BLOCK  # the default block towards this machine: no MTU in the way


def defaultBlock(host: str) -> int:
    """
    The block size to ask for when the caller names none: DEFAULT_BLOCK,
    which fits any Ethernet path, except towards a loopback address,
    where the path is this machine's own and per-datagram work is what
    limits (256 MiB took 2-3 times as long in 1400-byte blocks as in 60 KiB
    ones, measured with benchmarks/transfer.py).
    """
    import ipaddress

    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = False  # a name: we cannot know where it leads
    return LOOPBACK_BLOCK if loopback else DEFAULT_BLOCK


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


class ClientPhase(enum.Enum):
    HANDSHAKE = "handshake"  # REQUEST sent, waiting for RETRY or META
    RECEIVING = "receiving"
    DONE = "done"


@implementer(IPushProducer)
class UDPClient(DatagramProtocol):
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
        window = RECEIVE_WINDOW_BYTES // blockSize
        self.window = max(packets.MIN_WINDOW, min(packets.MAX_WINDOW, window))
        self.request = packets.Request(offset, length, blockSize, self.window, b"", name)
        self.phase = ClientPhase.HANDSHAKE
        self.deferred: Deferred[UDPResult] = Deferred(self._cancel)
        self._handshakeDelay = RTO_INITIAL
        self._handshakeCall: Any = None
        self._requestsSent = 0
        self._requestSentAt = 0.0
        self._early: List[bytes] = []  # DATA that arrived before META (META was lost)
        self._earlyBytes = 0
        self._nudged = False  # the request was repeated at once because META is missing
        self._ackCall: Any = None
        self._progressCall: Any = None
        self._lastProgress = clock.seconds()
        self._dataPrefix = packets.dataPrefix(self.tid)
        self.expected = 0  # next block to hand to the sink
        self.buffer: Dict[int, bytes] = {}  # out-of-order blocks
        self.ranges = RangeSet()  # the blocks in `buffer`, for SACK
        self._starts, self._ends = self.ranges.starts, self.ranges.ends  # read-only views
        self._latest = 0  # the most recently buffered block
        self._unacked = 0  # in-order blocks since the last ACK
        self._ackNow = False  # a gap, a filled gap or a duplicate arrived
        self._pending: List[Any] = []  # in-order payloads not yet written
        self.pendingBytes = 0
        self._paused = False  # by the sink: write nothing, hold what arrives
        self._room = self.window  # blocks accepted beyond `expected`; fewer while paused
        self._pausedAt = 0.0
        self._pauseCall: Any = None
        self._writing = False  # inside sink.write
        self._reading = False  # between readStarted and readFinished
        self._ackDue = False  # data arrived during that read: _acknowledge after it

    # Life cycle

    def startProtocol(self) -> None:
        offload.bigBuffers(self.transport)
        self._sendRequest()
        self._progressCall = self.clock.callLater(self.timeout, self._progressCheck)

    def _stopTimers(self) -> None:
        for call in (self._handshakeCall, self._ackCall, self._progressCall, self._pauseCall):
            if call is not None and call.active():
                call.cancel()

    def _finish(self, result: Any) -> None:
        """Stop every timer and fire the Deferred once."""
        if self.phase is ClientPhase.DONE:
            return
        self.phase = ClientPhase.DONE
        self._stopTimers()
        self.buffer.clear()
        self.ranges.clear()
        self._pending.clear()
        self._early.clear()
        self.deferred.callback(result)

    def _fail(self, reason: Exception) -> None:
        if self.phase is not ClientPhase.DONE:
            self._write(packets.encodeClose(self.tid))
            self._finish(Failure(reason))

    def _cancel(self, d: Deferred[UDPResult]) -> None:
        if self.phase is not ClientPhase.DONE:
            self._write(packets.encodeClose(self.tid))
            self.phase = ClientPhase.DONE
            self._stopTimers()

    def _write(self, datagram: bytes) -> None:
        try:
            offload.send(self.transport, datagram, self.peer)
        except Exception as e:
            if self.phase is not ClientPhase.DONE and datagram[3] != packets.CLOSE:
                self._finish(Failure(UDPTransferError(f"cannot send to {self.peer}: {e}")))

    # Timers

    def _sendRequest(self) -> None:
        self._requestsSent += 1
        self._requestSentAt = self.clock.seconds()
        self._write(packets.encodeRequest(self.tid, self.request))
        if self.phase is ClientPhase.HANDSHAKE:
            self._handshakeCall = self.clock.callLater(self._handshakeDelay, self._handshakeTimeout)

    def _handshakeTimeout(self) -> None:
        self._handshakeCall = None
        if self.phase is ClientPhase.HANDSHAKE:
            self._handshakeDelay = min(self._handshakeDelay * 2, RTO_MAX)
            self._sendRequest()

    def _progressCheck(self) -> None:
        self._progressCall = None
        if self.phase is ClientPhase.DONE:
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
        if self._paused or self.phase is ClientPhase.DONE:
            return
        self._paused = True
        self._pausedAt = self.clock.seconds()
        if self.pendingBytes:  # gathered before the pause: counts against the window
            self._room = self.window - -(-self.pendingBytes // self.blockSize)
        self._pauseCall = self.clock.callLater(
            min(KEEPALIVE, PAUSE_LIMIT * self.timeout), self._pauseCheck
        )

    def resumeProducing(self) -> None:
        """Write what was held, then move the cumulative ACK on."""
        if not self._paused or self.phase is ClientPhase.DONE:
            return
        self._paused = False
        self._room = self.window
        if self._pauseCall is not None and self._pauseCall.active():
            self._pauseCall.cancel()
        self._pauseCall = None
        self._lastProgress = self.clock.seconds()
        if self.phase is not ClientPhase.RECEIVING or self._writing:
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
        if not self._paused or self.phase is ClientPhase.DONE:
            return
        paused = self.clock.seconds() - self._pausedAt
        limit = PAUSE_LIMIT * self.timeout
        if paused >= limit:
            self._fail(UDPTransferError(f"the sink paused the download for {paused:g} seconds"))
            return
        if self.phase is ClientPhase.RECEIVING:
            self._sendAck()  # the server drops a transfer that goes unacknowledged
        self._pauseCall = self.clock.callLater(min(KEEPALIVE, limit - paused), self._pauseCheck)

    # Datagrams

    def datagramReceived(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        if addr != self.peer or self.phase is ClientPhase.DONE:
            return
        if data[:HEADER_SIZE] == self._dataPrefix:
            if self.phase is ClientPhase.RECEIVING:
                self._dataReceived(data)
                if self._reading:
                    self._ackDue = True  # sent by readFinished, once for the whole read
                else:
                    self._acknowledge()
            if self.phase is ClientPhase.HANDSHAKE:
                self._earlyData(data)
            return
        header = packets.parseHeader(data)
        if header is None or header[1] != self.tid:
            return
        kind = header[0]
        try:
            if kind == packets.RETRY:
                self._retryReceived(data)
            elif kind == packets.META:
                self._metaReceived(data)
            elif kind == packets.ERROR:
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
        if addr != self.peer or self.phase is ClientPhase.DONE:
            return
        prefix = self._dataPrefix
        sawData = False
        for datagram in offload.segments(data, size):
            if datagram[:HEADER_SIZE] == prefix:
                if self.phase is not ClientPhase.RECEIVING:
                    if self.phase is ClientPhase.HANDSHAKE:
                        self._earlyData(datagram)
                    continue
                self._dataReceived(datagram)
                sawData = True
            else:
                self.datagramReceived(bytes(datagram), addr)
            if self.phase is ClientPhase.DONE:
                return
        if sawData:
            if self._reading:
                self._ackDue = True
            else:
                self._acknowledge()

    def readStarted(self) -> None:
        """
        The port is about to hand over everything the socket holds (up to
        its read limit): acknowledge once, after all of it, rather than
        after every run.  At a high rate that is one ACK per wake-up
        instead of one per 64 KiB (an ACK over loopback costs its sender
        the receiver's whole kernel path); at a low rate a read holds one
        datagram, and the ACK goes out as if unbatched.
        """
        self._reading = True

    def readFinished(self) -> None:
        """The read that :meth:`readStarted` announced is over."""
        self._reading = False
        if self._ackDue:
            self._ackDue = False
            self._acknowledge()

    def _retryReceived(self, data: bytes) -> None:
        if self.phase is not ClientPhase.HANDSHAKE:
            return
        cookie = packets.decodeRetry(data)
        if cookie is None:
            raise UDPTransferError("malformed RETRY from the server")
        if cookie == self.request.cookie:
            return  # a duplicate
        now = self.clock.seconds()
        self._lastProgress = now
        self.request = attrs.evolve(self.request, cookie=cookie)
        if self._handshakeCall is not None and self._handshakeCall.active():
            self._handshakeCall.cancel()
        if self._requestsSent == 1:
            # A round trip measured on a request sent once (Karn): the
            # cookie'd request is repeated after a few of them, not 1 s.
            rtt = now - self._requestSentAt
            self._handshakeDelay = min(RTO_INITIAL, max(HANDSHAKE_MIN, HANDSHAKE_RTTS * rtt))
        else:
            self._handshakeDelay = RTO_INITIAL
        self._sendRequest()

    def _earlyData(self, datagram: Any) -> None:
        """
        DATA before META: the server accepted our cookie'd request but its
        META was lost.  Ask again at once (a repeated request makes the
        server resend META) and keep what arrives, up to EARLY_BYTES, to
        place when META comes, instead of waiting for both ends' timers.
        """
        if not self.request.cookie:
            return  # not from a transfer we asked for
        if self._earlyBytes + len(datagram) <= EARLY_BYTES:
            self._early.append(bytes(datagram))
            self._earlyBytes += len(datagram)
        if not self._nudged:
            self._nudged = True
            self._write(packets.encodeRequest(self.tid, self.request))

    def _errorReceived(self, data: bytes) -> None:
        answer = packets.decodeError(data)
        if answer is None:
            raise UDPTransferError("malformed ERROR from the server")
        status, text = answer
        if not 400 <= status <= 599:
            raise UDPTransferError(f"server answered with status {status}")
        self._finish(Failure(wire.ProtocolError(status, text or wire.REASONS.get(status, ""))))

    def _metaReceived(self, data: bytes) -> None:
        if self.phase is not ClientPhase.HANDSHAKE:
            if self.phase is ClientPhase.RECEIVING:
                self._sendAck()  # our first ACK was lost
            return
        meta = packets.decodeMeta(data)
        if meta is None:
            raise UDPTransferError("malformed META from the server")
        want = self.request
        if (
            meta.offset != want.offset
            or (want.length is not None and meta.length != want.length)
            or meta.offset + meta.length > meta.size
            or not 0 < meta.blockSize <= want.blockSize
            or meta.window > want.window
        ):
            raise UDPTransferError("the server's META does not match the request")
        self.size, self.offset, self.length = meta.size, meta.offset, meta.length
        blockSize, length = meta.blockSize, meta.length
        self.sha256 = meta.sha256.hex()
        self.blockSize = blockSize
        self.nblocks = -(-length // blockSize)
        self.window = self.request.window
        self.lastBlockSize = length - (self.nblocks - 1) * blockSize if self.nblocks else 0
        self.phase = ClientPhase.RECEIVING
        self._lastProgress = self.clock.seconds()
        if self._handshakeCall is not None and self._handshakeCall.active():
            self._handshakeCall.cancel()
        self._sendAck()
        early, self._early, self._earlyBytes = self._early, [], 0
        for datagram in early:
            self._dataReceived(datagram)
            if self.phase is not ClientPhase.RECEIVING:
                return
        if early:
            self._ackNow = True
            self._acknowledge()
        else:
            self._checkDone()

    def _dataReceived(self, data: Any) -> None:
        """
        The hot path: keep it to a few operations per block.  What to
        acknowledge is left to :meth:`_acknowledge`, after one datagram or
        after a run of them.
        """
        (block,) = BLOCK_NUMBER.unpack_from(data, HEADER_SIZE)
        expected = self.expected
        if block < expected or block >= expected + self._room or block in self.buffer:
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
                self.buffer[block] = bytes(payload)  # not a view pinning a whole GRO buffer
                self.ranges.add(block)
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
        if self.phase is not ClientPhase.RECEIVING:
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
        self.pendingBytes += len(payload)
        if self.pendingBytes >= WRITE_BATCH:
            self._writePending()

    def _writePending(self) -> None:
        if self._pending and not self._paused:
            data = b"".join(self._pending)
            self._pending.clear()
            self.pendingBytes = 0
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
        block, end = self.ranges[0]
        buffer = self.buffer
        deliver = self._deliver
        while block < end and not self._paused and self.phase is ClientPhase.RECEIVING:
            deliver(buffer.pop(block))
            block += 1
        if self.phase is not ClientPhase.RECEIVING:
            return  # the sink stopped us
        self.expected = block
        self.ranges.discardBelow(block)

    def _delayedAck(self) -> None:
        """The data paused: acknowledge it and write out what is gathered."""
        self._ackCall = None
        if self.phase is ClientPhase.RECEIVING and self._flush():
            self._sendAck()

    def _sendAck(self) -> None:
        self._unacked = 0
        self._ackNow = False
        if self._ackCall is not None:
            if self._ackCall.active():
                self._ackCall.cancel()
            self._ackCall = None
        ranges = self.ranges
        if len(ranges) <= packets.MAX_SACK:
            picked = list(ranges)
        else:
            # The range holding the newest block drives the sender's loss
            # detection; the lowest ranges are the holes to fill first.
            latest = ranges.indexAtOrBelow(self._latest)
            others = [i for i in range(packets.MAX_SACK) if i != latest][: packets.MAX_SACK - 1]
            picked = [ranges[latest]] + [ranges[i] for i in others]
        self._write(packets.encodeAck(self.tid, self.expected, picked))

    def _checkDone(self) -> None:
        if (
            self.phase is ClientPhase.RECEIVING
            and self.expected == self.nblocks
            and not self._pending
        ):
            final = packets.encodeAck(self.tid, self.expected, ())
            for _ in range(FINAL_ACKS - 1):
                self._write(final)
            self._finish(UDPResult(self.size, self.sha256, self.offset, self.length))


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
    blockSize: Optional[int] = None,
) -> UDPResult:
    """
    Download ``name`` (or the range ``offset``, ``length``) from the UDP
    server at ``host``:``port`` into ``sink.write``, in order, asking for
    blocks of ``blockSize`` bytes (by default :func:`defaultBlock`: 1400,
    or 60 KiB towards a loopback address); the server may send smaller.

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
    if blockSize is None:
        blockSize = defaultBlock(host)
    if offset < 0 or (length is not None and length < 0):
        raise ValueError("offset and length must not be negative")
    if not MIN_BLOCK <= blockSize <= MAX_BLOCK:
        raise ValueError(f"blockSize must be {MIN_BLOCK}..{MAX_BLOCK}")
    client = UDPClient(reactor, (host, port), name, sink, offset, length, timeout, blockSize)
    interface = "::" if ":" in host else ""
    consumer = hasattr(sink, "registerProducer")
    if consumer:
        sink.registerProducer(client, True)
    try:
        listening = offload.listenEphemeral(reactor, client, interface)
    except BaseException:
        if consumer:
            sink.unregisterProducer()
        raise
    try:
        return await client.deferred
    finally:
        if client.phase is not ClientPhase.DONE:
            client._cancel(client.deferred)
        if consumer:
            sink.unregisterProducer()
        stopped = listening.stopListening()
        if stopped is not None:
            await stopped
