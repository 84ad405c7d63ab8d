"""
What the UDP transfer asks of the kernel's sockets, and how it copes when
the answer is no: large buffers, sends that find the buffer full, and
Linux's segmentation offload in both directions.

Per-datagram work (a system call, a trip through the network stack, a
Python call) is what limits small blocks.  With ``UDP_SEGMENT`` (GSO) the
server hands the kernel one buffer of many equal-size DATA datagrams per
system call; with ``UDP_GRO`` the client reads such runs back in one
buffer, told the segment size in a control message.  Everything here
degrades to one datagram at a time on other systems, old kernels and test
transports, so the protocol modules never need to know which they got.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from typing import Any, List, Optional, Tuple

from twisted.internet import udp as twistedUDP
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from .packets import MAX_DATAGRAM

Address = Tuple[str, int]

SOCKET_BUFFER = 4 * 1024 * 1024  # SO_RCVBUF/SO_SNDBUF we ask the kernel for

# Linux UDP segmentation offload (<linux/udp.h>; Python 3.11 lacks the names).
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
GSO_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS in every version
GSO_BYTES = 65000  # a UDP payload is at most 65507 bytes over IPv4
_GSO_SIZE = struct.Struct("=H")  # the UDP_SEGMENT control message: native u16
_GRO_CMSG = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0

# A send with UDP_SEGMENT fails with these when the route or device cannot
# segment (no checksum offload, IPsec, a segment above the path MTU, an old
# kernel); the same datagrams are then sent one by one.
NO_GSO = frozenset(
    {errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
)
# A send or receive that found the kernel's buffer full or empty: for us
# the same as a datagram lost in the network, but one we know about, and
# worth trying again in a moment.
TRANSIENT = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR})
# A send that a local firewall rule or a full conntrack table refused: a
# datagram lost before it left.  Loss recovery sends it again as it would
# one lost on the wire; waiting would not help the next one.
REFUSED = frozenset({errno.EPERM})


def send(transport: Any, datagram: bytes, addr: Address) -> bool:
    """
    Send one datagram; False when the kernel had no room for it.

    Twisted raises for EAGAIN/ENOBUFS (and EPERM, from a firewall) on UDP;
    for us that is the same as a datagram lost in the network, but one we
    know about.
    """
    try:
        transport.write(datagram, addr)
    except OSError as e:
        if e.errno in TRANSIENT or e.errno in REFUSED:
            return False
        raise
    return True


def directSendto(transport: Any) -> Any:
    """
    The fastest way to send a DATA datagram on ``transport``.

    ``Port.write`` checks the address family on every call, a third of
    the sender's CPU per block; transfers only send to addresses that
    datagrams arrived from, so the socket's own ``sendto`` is enough.
    """
    try:
        return transport.getHandle().sendto
    except AttributeError:
        return transport.write


def bigBuffers(transport: Any) -> None:
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


# Sending runs (GSO)


def gsoSocket(transport: Any) -> Optional[socket.socket]:
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


def sendSegmented(sock: socket.socket, parts: List[Any], addr: Address) -> None:
    """
    Send the datagrams ``parts`` holds (alternating headers and payloads,
    all the first one's size but the last) as one run: one ``sendmsg`` the
    kernel cuts into datagrams.  Raises OSError as ``sendmsg`` does.
    """
    segment = _GSO_SIZE.pack(len(parts[0]) + len(parts[1]))
    sock.sendmsg(parts, [(socket.SOL_UDP, UDP_SEGMENT, segment)], 0, addr)


# Receiving runs (GRO)


def segments(data: Any, size: int) -> List[memoryview]:
    """
    Split a buffer of coalesced datagrams (GRO) back into datagrams: all
    ``size`` bytes long but the last, which may be shorter.
    """
    view = memoryview(data)
    return [view[at : at + size] for at in range(0, len(view), size)]


def groSize(ancillary: List[Tuple[int, int, bytes]]) -> int:
    """The segment size from a ``UDP_GRO`` control message, or 0."""
    for level, kind, value in ancillary:
        if level == socket.SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return int.from_bytes(value[:4], sys.byteorder)
    return 0


class SegmentingPort(twistedUDP.Port):
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
        """
        Read what the socket holds (up to ``maxThroughput`` bytes), telling
        a protocol that wants to know (``readStarted``/``readFinished``)
        where a wake-up's reads begin and end, so it can answer all of them
        at once.
        """
        started = getattr(self.protocol, "readStarted", None)
        if started is None:
            return self._read()
        started()
        try:
            return self._read()
        finally:
            try:
                self.protocol.readFinished()
            except BaseException:
                self.log.failure("UDP: unhandled error after reading datagrams")

    def _read(self) -> None:
        if not self.gro:
            return super().doRead()
        read = 0
        while read < self.maxThroughput:
            try:
                data, ancillary, _, addr = self.socket.recvmsg(self.maxPacketSize, _GRO_CMSG)
            except OSError as e:
                if e.errno in TRANSIENT or e.errno == errno.ECONNREFUSED:
                    return
                raise
            read += len(data)
            addr = addr[:2]  # no IPv6 flow information or scope, as Port does
            size = groSize(ancillary)
            try:
                if size and len(data) > size:
                    self.protocol.segmentsReceived(data, size, addr)
                else:
                    self.protocol.datagramReceived(data, addr)
            except BaseException:
                self.log.failure("UDP: unhandled error receiving a datagram")
        return None


def listenEphemeral(reactor: Any, protocol: DatagramProtocol, interface: str) -> Any:
    """
    A client's ephemeral port for MAX_DATAGRAM datagrams: a segmenting one
    when the reactor watches file descriptors (every POSIX reactor), else
    the reactor's own.
    """
    if IReactorFDSet.providedBy(reactor):
        port = SegmentingPort(0, protocol, interface, MAX_DATAGRAM, reactor)
        port.startListening()
        return port
    return reactor.listenUDP(0, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM)
