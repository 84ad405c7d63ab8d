"""
The sending side of one UDP transfer: one file range to one client.

Everything the kernel's TCP would do for a download happens here for UDP:
blocks read in large pieces and sent under the congestion window and the
receiver's window, acknowledgements accounted for once each, losses found
by reordering (RACK's idea, counted in packets) or by the RFC 6298 timer,
and retransmissions sent ahead of new data.  The window policy lives in
:mod:`.congestion`, the timer's arithmetic in :mod:`.rtt`, SACK bookkeeping
in :mod:`.ranges` and the system calls in :mod:`.offload`; this module
decides what to send next.  The server creates one :class:`Transfer` per
accepted request and drops it when it stops.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict, deque
from typing import IO, TYPE_CHECKING, Any, Iterable, List, Optional, Tuple

from twisted.logger import Logger

from .. import wire
from ..wire import FileEntry
from . import offload, packets
from .congestion import Congestion
from .packets import DATA, DATA_HEADER, DATA_HEADER_SIZE, MAGIC, VERSION  # the hot path
from .ranges import RangeSet
from .rtt import RTO_MIN, RoundTrip

if TYPE_CHECKING:
    from .server import UDPFileServer

Address = Tuple[str, int]

REORDER_THRESHOLD = 3  # later-sent blocks acknowledged before one is lost
READ_CHUNK = 1024 * 1024  # file bytes read at once and sliced into blocks
PUMP_RETRY = 0.002  # seconds, after the kernel had no room for a send (EAGAIN/ENOBUFS)


class Phase(enum.Enum):
    OPENING = "opening"  # waiting for the share to open (and maybe hash) the file
    SENDING = "sending"
    DONE = "done"


class FileChanged(Exception):
    """The file got shorter than announced while we were sending it."""


class Transfer:
    """
    One file range being sent to one client: the sending half of the
    protocol, with its window, loss detection and timers.

    Blocks are numbered from 0 at the range's offset.  ``inflight`` maps
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
        self.phase = Phase.OPENING
        self.name = ""
        self._file: Optional[IO[bytes]] = None
        self._timer: Any = None
        self._pumpCall: Any = None
        self.retransmits = 0
        self.refused = 0  # datagrams a local firewall refused (EPERM)
        self.timeouts = 0  # retransmission timer expiries
        self.began = False  # META was sent: a repeated request must not restart it

    def begin(
        self, f: IO[bytes], entry: FileEntry, request: packets.Request, blockSize: int
    ) -> None:
        """The file is open: announce it and start sending."""
        self._file = f
        self.name = entry.name
        self.entry = entry
        self.offset = request.offset
        self.length = request.length if request.length is not None else entry.size - request.offset
        self.blockSize = blockSize
        self.nblocks = -(-self.length // blockSize)
        self.window = max(packets.MIN_WINDOW, min(request.window, packets.MAX_WINDOW))
        self.congestion = Congestion(self.window, blockSize)
        self.rtt = RoundTrip()
        self.started = self.lastHeard = self.clock.seconds()
        self.metaAcked = False
        self.cumAck = 0  # every block below this is acknowledged
        self.nextNew = 0  # the first block never sent
        self._seq = 0  # send sequence, counting retransmissions
        self._highestAckedSeq = 0
        self.inflight: "OrderedDict[int, Tuple[int, float, bool]]" = OrderedDict()
        self._lost: "deque[int]" = deque()  # to resend first, oldest first
        self._lostSet: set[int] = set()  # ... the same; acknowledged ones leave only this
        self._sacked = RangeSet()  # SACKed blocks above cumAck
        self._chunk = memoryview(b"")
        self._chunkFirst = self._chunkEnd = 0
        self._chunkBlocks = max(1, READ_CHUNK // blockSize)
        self._sendto = offload.directSendto(self.server.transport)
        self._gso = self.server.gso
        self._perSend = 1
        if self._gso is not None:
            self._perSend = max(
                1, min(offload.GSO_SEGMENTS, offload.GSO_BYTES // (DATA_HEADER_SIZE + blockSize))
            )
        self._meta = packets.encodeMeta(
            self.tid,
            packets.Meta(
                entry.size,
                self.offset,
                self.length,
                blockSize,
                self.window,
                bytes.fromhex(entry.sha256),
            ),
        )
        self.phase = Phase.SENDING
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
        self.pump()
        self._arm(self.rtt.timeout)

    def _sendMeta(self) -> None:
        try:
            offload.send(self.server.transport, self._meta, self.addr)
        except Exception as e:
            self.stop(f"cannot send: {e}")

    def requestRepeated(self) -> None:
        """The client asked again: our META (or its RETRY answer) was lost."""
        if self.phase is Phase.SENDING and not self.metaAcked:
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
                raise FileChanged()
            self._chunk = memoryview(data)
            self._chunkFirst = block
            self._chunkEnd = block + -(-want // self.blockSize)
        start = (block - self._chunkFirst) * self.blockSize
        return self._chunk[start : start + self.blockSize]

    def resend(self, blocks: Iterable[int]) -> None:
        """Queue ``blocks`` for sending again, in this order, ahead of anything queued."""
        blocks = list(blocks)
        self._lost.extendleft(reversed(blocks))
        self._lostSet.update(blocks)

    def pump(self) -> None:
        """
        Send lost blocks first, then new ones, while the window allows: in
        runs of up to ``_perSend`` datagrams, each run one system call when
        the socket can segment (GSO).
        """
        self._pumpCall = None
        if self.phase is not Phase.SENDING:
            return
        inflight = self.inflight
        cwnd = self.congestion.cwnd  # nothing in here changes it
        if len(inflight) >= cwnd:
            return
        tid = self.tid
        pack = DATA_HEADER.pack
        blockSize = self.blockSize
        limit = min(self.nblocks, self.cumAck + self.window)
        now = self.clock.seconds()
        lost = self._lost
        lostSet = self._lostSet
        try:
            while len(inflight) < cwnd:
                # One run: retransmissions first, then consecutive new
                # blocks; only the run's last datagram may be short.
                run: List[int] = []
                retransmits = 0
                parts: List[Any] = []
                nextNew = self.nextNew
                room = min(self._perSend, math.ceil(cwnd) - len(inflight))
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
                    self.resend(unsent[: retransmits - sent])
                    unsent = unsent[retransmits - sent :]
                self.nextNew = unsent[0] if unsent else nextNew
                if self._pumpCall is None:
                    self._pumpCall = self.clock.callLater(PUMP_RETRY, self.pump)
                break
        except FileChanged:
            self.fail(wire.SERVER_ERROR, "file changed while sending; try again")
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
            try:
                offload.sendSegmented(self._gso, parts, self.addr)
                return count
            except OSError as e:
                if e.errno in offload.REFUSED:
                    self.refused += count
                    return count  # lost before it left: loss recovery resends it
                if e.errno in offload.TRANSIENT:
                    return 0
                if e.errno not in offload.NO_GSO:
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
                if e.errno in offload.REFUSED:
                    self.refused += 1
                    continue  # lost before it left: loss recovery resends it
                if e.errno not in offload.TRANSIENT:
                    raise
                return i
        return count

    # Acknowledgements

    def ackReceived(self, cumulative: int, ranges: List[int]) -> None:
        """
        Account for an ACK: free acknowledged blocks, measure the round
        trip, detect losses, adjust the window, and send more.
        """
        if self.phase is not Phase.SENDING or cumulative > self.nextNew:
            return  # acknowledges data we never sent: not from our client
        now = self.clock.seconds()
        self.lastHeard = now
        self.metaAcked = True
        newest: Optional[Tuple[int, float, bool]] = None
        acked = 0
        inflight = self.inflight
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
            self._sacked.discardBelow(cumulative)
        for i in range(0, len(ranges), 2):
            start = max(ranges[i], self.cumAck)
            end = min(ranges[i + 1], self.nextNew)
            if start >= end:
                continue
            # Only what was not SACKed before: each block is counted once
            # however many ACKs repeat its range.
            for first, last in self._sacked.addRange(start, end):
                take(first, last)
        if newest is not None:
            if newest[0] > self._highestAckedSeq:
                self._highestAckedSeq = newest[0]
            if not newest[2]:
                self.rtt.sample(now - newest[1])
        if acked:
            self.congestion.acked(acked)
            self._arm(self.rtt.timeout)
        self._detectLosses()
        if self.cumAck == self.nblocks:
            self._finished()
        else:
            self.pump()

    def _detectLosses(self) -> None:
        """
        A block is lost when REORDER_THRESHOLD blocks sent after it have
        been acknowledged; only the oldest in-flight blocks need checking.
        """
        inflight = self.inflight
        horizon = self._highestAckedSeq - REORDER_THRESHOLD
        while inflight:
            block = next(iter(inflight))
            seq = inflight[block][0]
            if seq > horizon:
                break
            del inflight[block]
            self._lost.append(block)
            self._lostSet.add(block)
            self.congestion.lost(seq, self._seq)

    # Timers

    def _idleLimit(self) -> float:
        """
        Seconds this transfer may go unacknowledged: short until the client
        has acknowledged anything, so requests never followed up (a flood,
        or a client that vanished) do not hold slots for long.
        """
        return self.server.idleTimeout if self.metaAcked else self.server.unackedTimeout

    def _arm(self, delay: float) -> None:
        """
        Push the retransmission deadline out.  The timer is moved lazily:
        one DelayedCall that, when it fires early, re-arms for the deadline.
        """
        now = self.clock.seconds()
        self._deadline = now + delay
        fire = min(self._deadline, self.lastHeard + self._idleLimit())
        if self._timer is None or not self._timer.active():
            self._timer = self.clock.callLater(max(0.0, fire - now), self._timerFired)
        elif self._timer.getTime() > fire + RTO_MIN:
            self._timer.reset(max(0.0, fire - now))

    def _timerFired(self) -> None:
        self._timer = None
        if self.phase is not Phase.SENDING:
            return
        now = self.clock.seconds()
        if now - self.lastHeard >= self._idleLimit():
            self.log.info(
                "UDP: {peer} stopped (or never started) acknowledging {name}; "
                "dropping the transfer",
                peer=self.addr,
                name=self.name,
            )
            self.stop("idle")
            return
        if now < self._deadline:
            fire = min(self._deadline, self.lastHeard + self._idleLimit())
            self._timer = self.clock.callLater(max(0.0, fire - now), self._timerFired)
            return
        # RFC 6298 5.4-5.6: back off, and resend from the oldest block.
        self.timeouts += 1
        self.rtt.expired()
        if not self.metaAcked:
            self._sendMeta()
        if self.inflight:
            self.congestion.timedOut(len(self.inflight), self._seq)
            lost = sorted(self.inflight)
            self.inflight.clear()
            self.resend(lost)
        self._arm(self.rtt.timeout)
        self.pump()

    # Endings

    def _finished(self) -> None:
        elapsed = self.clock.seconds() - self.started
        self.log.info(
            "UDP: sent {name} [{offset}+{length}] to {peer} in {elapsed:.3f}s "
            "({retransmits} retransmitted blocks, {timeouts} timeouts, {refused} refused "
            "by a local firewall)",
            name=self.name,
            offset=self.offset,
            length=self.length,
            peer=self.addr,
            elapsed=elapsed,
            retransmits=self.retransmits,
            timeouts=self.timeouts,
            refused=self.refused,
        )
        self.stop(None)

    def fail(self, status: int, text: str) -> None:
        """Tell the client why the transfer cannot go on (an ERROR), and stop."""
        try:
            answer = packets.encodeError(self.tid, status, text)
            offload.send(self.server.transport, answer, self.addr)
        except Exception:
            pass
        self.stop(text)

    def stop(self, reason: Optional[str]) -> None:
        """Free everything this transfer holds; safe to call twice."""
        if self.phase is Phase.DONE:
            return
        if reason is not None and self.phase is Phase.SENDING:
            self.log.info(
                "UDP: transfer of {name} to {peer} ended: {reason}",
                name=self.name,
                peer=self.addr,
                reason=reason,
            )
        self.phase = Phase.DONE
        for call in (self._timer, self._pumpCall):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._pumpCall = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._chunk = memoryview(b"")
        self.server.forget(self)
