"""
The UDP file server: one port, many transfers.

``UDPFileServer`` is the peer node's UDP half.  It reads each datagram's
header, answers unproven addresses with a cookie only (so it never
amplifies a forged request), enforces the busy limits in all and per
address, opens the file through the node's ``SharedDirectory``, and hands
everything after that to a :class:`.sender.Transfer`.  Acknowledgements and
``CLOSE`` are routed to their transfer by (address, port, transfer id).
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from typing import Dict, Optional, Tuple

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from .. import wire
from ..node.share import SharedDirectory
from . import offload, packets
from .cookies import COOKIE_PERIOD, Cookies
from .packets import DEFAULT_BLOCK, MAX_BLOCK, MIN_BLOCK
from .sender import Phase, Transfer

Address = Tuple[str, int]
Key = Tuple[str, int, int]  # client host, client port, transfer id

REMEMBER_FINISHED = 1024  # finished transfers remembered against replays
IDLE_TIMEOUT = 30.0  # seconds a transfer survives without an acknowledgement
UNACKED_TIMEOUT = 3.0  # ... or, before its first acknowledgement, these many
MAX_TRANSFERS = 64  # transfers at once, all addresses together
MAX_TRANSFERS_PER_ADDRESS = 8  # transfers at once for one client host


class UDPFileServer(DatagramProtocol):
    """
    Serves a node's shared folder over UDP.

    Pass ``maxPacketSize=MAX_DATAGRAM`` to ``listenUDP``: larger client
    requests and ACKs would otherwise be truncated.  ``blockSize`` is the
    largest block this server sends; a client asking for less gets that.
    ``segmentation=False`` turns off Linux UDP segmentation offload (GSO),
    which is otherwise used whenever the socket supports it.

    A transfer whose client never acknowledges anything (not even META)
    frees its slot after ``unackedTimeout`` seconds; once acknowledged, it
    is dropped after ``idleTimeout`` seconds without an acknowledgement.
    """

    log = Logger()

    def __init__(
        self,
        share: SharedDirectory,
        clock: Optional[IReactorTime] = None,
        *,
        blockSize: int = DEFAULT_BLOCK,
        maxTransfers: int = MAX_TRANSFERS,
        maxPerAddress: int = MAX_TRANSFERS_PER_ADDRESS,
        idleTimeout: float = IDLE_TIMEOUT,
        unackedTimeout: float = UNACKED_TIMEOUT,
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
        self.unackedTimeout = unackedTimeout
        self.segmentation = segmentation
        self.gso: Optional[socket.socket] = None  # the socket, when it can send runs
        self.transfers: Dict[Key, Transfer] = {}
        self.perAddress: Dict[str, int] = {}
        self.cookies = Cookies(self.clock)
        self._finished: "OrderedDict[Key, float]" = OrderedDict()

    def startProtocol(self) -> None:
        offload.bigBuffers(self.transport)
        self.gso = offload.gsoSocket(self.transport) if self.segmentation else None

    def stopProtocol(self) -> None:
        for transfer in list(self.transfers.values()):
            transfer.stop("server stopped")

    def datagramReceived(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        header = packets.parseHeader(data)
        if header is None:
            return  # never answer what is not ours: no reflection
        kind, tid = header
        key = (addr[0], addr[1], tid)
        if kind == packets.ACK:
            transfer = self.transfers.get(key)
            if transfer is not None:
                ack = packets.decodeAck(data)
                if ack is not None:
                    transfer.ackReceived(*ack)
        elif kind == packets.REQUEST:
            self._requestReceived(data, addr, tid, key)
        elif kind == packets.CLOSE:
            transfer = self.transfers.get(key)
            if transfer is not None:
                transfer.stop("client closed")

    def _answer(self, datagram: bytes, addr: Address) -> None:
        try:
            offload.send(self.transport, datagram, addr)
        except Exception as e:
            self.log.warn("UDP: cannot answer {peer}: {error}", peer=addr, error=e)

    def _requestReceived(self, data: bytes, addr: Address, tid: int, key: Key) -> None:
        if len(data) < packets.MIN_REQUEST:
            return  # unpadded: answering could amplify
        existing = self.transfers.get(key)
        if existing is not None:
            existing.requestRepeated()
            return
        if not self.cookies.check(addr, packets.cookieOf(data)):
            # Stateless: a 32-byte answer to a request of at least 1200.
            self._answer(packets.encodeRetry(tid, self.cookies.mint(addr)), addr)
            return
        self._forgetOldFinished()
        if key in self._finished:
            return  # a late duplicate of a request we already served
        try:
            request = packets.decodeRequest(data)
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
            self._answer(packets.encodeError(tid, e.status, e.message), addr)
            return
        transfer = Transfer(self, key, addr, tid)
        self.transfers[key] = transfer
        self.perAddress[addr[0]] = self.perAddress.get(addr[0], 0) + 1
        ensureDeferred(self._open(transfer, request)).addErrback(
            lambda f: self.log.failure("UDP: cannot start sending", f)
        )

    async def _open(self, transfer: Transfer, request: packets.Request) -> None:
        try:
            f, entry = await self.share.open(request.name)
        except wire.ProtocolError as e:
            transfer.fail(e.status, e.message)
            return
        except Exception:
            self.log.failure("UDP: cannot open {name}", name=request.name)
            transfer.fail(wire.SERVER_ERROR, "cannot read the file")
            return
        if transfer.phase is not Phase.OPENING:
            f.close()  # the client gave up while we were opening
            return
        length = request.length if request.length is not None else entry.size - request.offset
        if request.offset > entry.size or length < 0 or request.offset + length > entry.size:
            f.close()
            transfer.fail(
                wire.BAD_RANGE, f"range {request.offset}+{length} is outside {entry.size} bytes"
            )
            return
        blockSize = min(request.blockSize, self.blockSize)
        if -(-length // blockSize) > packets.MAX_BLOCKS:
            f.close()
            transfer.fail(wire.TOO_LARGE, "range has too many blocks for UDP; use TCP")
            return
        transfer.begin(f, entry, request, blockSize)

    def forget(self, transfer: Transfer) -> None:
        """``transfer`` stopped: free its slots, and remember it against replays."""
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
