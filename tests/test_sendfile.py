"""
The node's sendfile() path: which transports get it, and the producer's
behaviour on a real loopback TCP connection driven in process (a Twisted
TCP connection over a connected socket pair, its reactor a task.Clock that
records readers and writers, so every step is explicit and nothing waits
on real time).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
from pathlib import Path

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import wire
from p2prelay.negotiation import IDLE_TIMEOUT
from p2prelay.node import producers
from p2prelay.node.producers import FileBodyProducer, SendfileProducer, sendfileSocket
from p2prelay.node.server import FileServerFactory
from p2prelay.node.share import SharedDirectory

CLIENT = IPv4Address("TCP", "10.1.2.3", 40000)
SMALL_BUFFER = 16 * 1024


def syncThread(f, *args):
    return maybeDeferred(f, *args)


class FDClock(Clock):
    """A task.Clock that is also the reactor a connection registers with."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: set = set()
        self.writers: set = set()

    def addReader(self, reader) -> None:
        self.readers.add(reader)

    def removeReader(self, reader) -> None:
        self.readers.discard(reader)

    def addWriter(self, writer) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer) -> None:
        self.writers.discard(writer)


class Connection(tcp.Connection):
    """Twisted's TCP connection over one end of a socket pair."""

    def __init__(self, skt: socket.socket, protocol, reactor: FDClock) -> None:
        super().__init__(skt, protocol, reactor)
        self.connected = 1

    def getPeer(self):
        return CLIENT

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 9000)


class Peer:
    """The client's end: reads what it is given, when the test says so."""

    def __init__(self, case: SynchronousTestCase, buffers: int | None = SMALL_BUFFER) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        case.addCleanup(listener.close)
        self.client = socket.socket()
        if buffers:
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        self.client.connect(listener.getsockname())
        self.server, _ = listener.accept()
        if buffers:
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
        self.client.setblocking(False)
        case.addCleanup(self.client.close)
        case.addCleanup(self.server.close)
        self.received = bytearray()

    def read(self, limit: int | None = None) -> int:
        """Read what has arrived (up to ``limit`` bytes); how many bytes that was."""
        got = 0
        while (limit is None or got < limit) and self.client.fileno() != -1:
            try:
                data = self.client.recv(65536 if limit is None else min(65536, limit - got))
            except BlockingIOError:
                break
            if not data:
                break
            self.received += data
            got += len(data)
        return got


class ChoiceTests(SynchronousTestCase):
    """Which transports get sendfile()."""

    def setUp(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"x")
        self.file = open(path, "rb")
        self.addCleanup(self.file.close)

    def tcpConnection(self) -> Connection:
        peer = Peer(self)
        return Connection(peer.server, None, FDClock())

    def test_plainTCP(self):
        """A plain Twisted TCP connection gets sendfile(), into its socket."""
        connection = self.tcpConnection()
        self.assertEqual(sendfileSocket(connection, self.file), connection.getHandle().fileno())

    def test_stringTransport(self):
        """A transport that is not Twisted's TCP connection (a test's StringTransport) reads instead."""
        self.assertIsNone(sendfileSocket(StringTransport(), self.file))

    def test_startTLS(self):
        """A TCP connection that has started TLS must see every byte: no sendfile()."""
        connection = self.tcpConnection()
        connection.TLS = True
        self.assertIsNone(sendfileSocket(connection, self.file))

    def test_noFileDescriptor(self):
        """A file without a descriptor (in memory) is read instead."""
        self.assertIsNone(sendfileSocket(self.tcpConnection(), io.BytesIO(b"x")))

    def test_noSendfileOnThisPlatform(self):
        """Without os.sendfile everything is read instead."""
        self.patch(producers, "HAVE_SENDFILE", False)
        self.assertIsNone(sendfileSocket(self.tcpConnection(), self.file))


class ProducerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = os.urandom(3 * 1024 * 1024 + 123)
        self.path = Path(self.mktemp())
        self.path.write_bytes(self.data)
        self.reactor = FDClock()
        self.calls = 0
        real = os.sendfile

        def counting(*args):
            self.calls += 1
            return real(*args)

        self.patch(os, "sendfile", counting)

    def connect(self, buffers: int | None = SMALL_BUFFER) -> None:
        self.peer = Peer(self, buffers)
        self.connection = Connection(self.peer.server, None, self.reactor)

    def produce(self, offset: int = 0, length: int | None = None, **kwargs) -> SendfileProducer:
        f = open(self.path, "rb")
        self.addCleanup(f.close)
        length = len(self.data) - offset if length is None else length
        self.producer = SendfileProducer(f, offset, length, **kwargs)
        self.outcome = []
        self.producer.start(self.connection).addBoth(self.outcome.append)
        return self.producer

    def pump(self, rounds: int = 10_000) -> None:
        """Read, and let the connection write, until nothing moves."""
        for _ in range(rounds):
            got = self.peer.read()
            if self.connection in self.reactor.writers:
                result = self.connection.doWrite()
                if result is not None:
                    self.connection.connectionLost(Failure(result))
                    return
            elif not got:
                return


class ProducerTests(ProducerTestCase):
    def test_wholeBody(self):
        """Every byte goes out through sendfile(), then the deferred fires and the producer unregisters."""
        self.connect()
        self.produce()
        self.pump()
        self.assertEqual(bytes(self.peer.received), self.data)
        self.assertEqual(self.outcome, [None])
        self.assertIsNone(self.connection.producer)
        self.assertGreater(self.calls, 0)

    def test_range(self):
        """A range sends exactly its bytes, from its offset."""
        self.connect()
        self.produce(offset=1000, length=2 * 1024 * 1024)
        self.pump()
        self.assertEqual(bytes(self.peer.received), self.data[1000 : 1000 + 2 * 1024 * 1024])

    def test_bufferedBytesFirst(self):
        """Bytes the connection still buffers (the status line) leave before any sendfile() byte."""
        self.connect()
        self.connection.write(b"STATUS LINE\n")
        self.produce()
        self.assertEqual(self.calls, 0, "no sendfile() while the status line waits")
        self.pump()
        self.assertEqual(bytes(self.peer.received), b"STATUS LINE\n" + self.data)

    def test_fullSocketWaitsForWritability(self):
        """A client that does not read leaves the producer waiting on writability, not spinning."""
        self.connect()
        self.produce()
        calls = self.calls
        self.assertIn(self.connection, self.reactor.writers)
        self.assertEqual(self.outcome, [])
        self.assertLess(calls, 50, "stopped at EAGAIN")
        self.peer.read(SMALL_BUFFER)
        self.connection.doWrite()
        self.assertGreater(self.calls, calls, "writable again: more is sent")

    def test_batchPerWritableEvent(self):
        """One writable event sends at most one batch, then waits for the next event."""
        self.connect(buffers=None)
        progress = []
        self.produce(batch=64 * 1024, progress=lambda: progress.append(1))
        self.assertEqual(self.peer.read(), 64 * 1024)
        self.assertIn(self.connection, self.reactor.writers)
        self.assertEqual(len(progress), 1)
        self.connection.doWrite()
        self.assertEqual(self.peer.read(), 64 * 1024)
        self.assertEqual(len(progress), 2)

    def test_fileShrank(self):
        """A file shorter than announced fails the transfer instead of sending less."""
        self.connect(buffers=None)
        self.produce(offset=0, length=len(self.data) + 10)
        self.pump()
        self.assertEqual(len(self.outcome), 1)
        self.assertIn("shrank", str(self.outcome[0].value))
        self.assertIsNone(self.connection.producer)

    def test_unsupportedFallsBackToReads(self):
        """When the kernel refuses sendfile() for this file the body is read and written instead."""
        def refuse(*args):
            self.calls += 1
            raise OSError(errno.EINVAL, "Invalid argument")

        self.patch(os, "sendfile", refuse)
        self.connect()
        self.produce()
        self.pump()
        self.assertEqual(bytes(self.peer.received), self.data)
        self.assertEqual(self.outcome, [None])
        self.assertEqual(self.calls, 1, "refused once, then never asked again")

    def test_peerGone(self):
        """A client that closes mid-body fails the transfer with the socket's error."""
        self.connect()
        self.produce()
        self.peer.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.peer.client.close()  # with unread data: a reset
        self.producer.resumeProducing()  # as the connection does once writable
        self.assertEqual(len(self.outcome), 1)
        self.outcome[0].trap(OSError)
        self.assertIn(self.outcome[0].value.errno, (errno.ECONNRESET, errno.EPIPE))
        self.assertIsNone(self.connection.producer)

    def test_stopProducing(self):
        """Once stopped nothing more is sent and the deferred fails; the file is closed."""
        self.connect()
        producer = self.produce()
        producer.stopProducing()
        calls = self.calls
        producer.resumeProducing()
        self.assertEqual(self.calls, calls)
        self.assertEqual(len(self.outcome), 1)
        self.outcome[0].trap(ConnectionError)
        self.assertTrue(producer._file.closed)


class ServerTests(ProducerTestCase):
    """The file server on a real TCP connection: the sendfile path end to end."""

    def setUp(self) -> None:
        super().setUp()
        root = self.path.parent / "share"
        root.mkdir()
        (root / "big.bin").write_bytes(self.data)
        self.factory = FileServerFactory(SharedDirectory(root, runInThread=syncThread), self.reactor)

    def get(self, request: bytes) -> None:
        self.connect()
        self.proto = self.factory.buildProtocol(CLIENT)
        self.connection.protocol = self.proto
        self.proto.makeConnection(self.connection)
        self.proto.dataReceived(request)
        self.reactor.advance(0)

    def test_getUsesSendfile(self):
        """A GET on plain TCP: the status line, then the body by sendfile(), then a close."""
        self.get(wire.request(wire.GET, name="big.bin"))
        self.assertIsInstance(self.proto._producer, SendfileProducer)
        self.pump()
        head, _, body = bytes(self.peer.received).partition(b"\n")
        message = wire.parseLine(head)
        self.assertEqual((message.status, message.sha256()), (wire.OK, hashlib.sha256(self.data).hexdigest()))
        self.assertEqual(body, self.data)
        self.assertGreater(self.calls, 0)
        self.assertFalse(self.connection.connected)

    def test_stalledClientTimesOut(self):
        """A client that stops reading mid-body is dropped after the idle timeout."""
        self.get(wire.request(wire.GET, name="big.bin"))
        self.connection.doWrite()  # the status line, then the body until the socket is full
        self.assertTrue(self.connection.connected)
        self.reactor.advance(IDLE_TIMEOUT)
        self.reactor.advance(0)  # abortConnection's connectionLost
        self.assertFalse(self.connection.connected)

    def test_progressIsActivity(self):
        """A body that keeps moving, however slowly, is never cut by the idle timeout."""
        self.get(wire.request(wire.GET, name="big.bin"))
        self.connection.doWrite()
        for _ in range(3):
            self.reactor.advance(IDLE_TIMEOUT - 1)
            self.peer.read(SMALL_BUFFER)
            self.connection.doWrite()
        self.assertTrue(self.connection.connected)
        self.pump()
        self.assertEqual(bytes(self.peer.received).partition(b"\n")[2], self.data)

    def test_fallbackOnStringTransport(self):
        """On a transport without a socket the server reads and pushes chunks as before."""
        proto = self.factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        proto.dataReceived(wire.request(wire.GET, name="big.bin"))
        self.reactor.advance(0)
        self.assertIsInstance(proto._producer, FileBodyProducer)
        self.assertEqual(self.calls, 0)
