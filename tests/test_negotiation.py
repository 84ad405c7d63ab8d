"""
The shared negotiation plumbing: OneShotClient's lifecycle (its Deferred
fires exactly once, however the negotiation ends), ``negotiate``, and the
servers' deadlines (the whole request, and the close after the answer).
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2prelay import wire
from p2prelay.client.relay import query
from p2prelay.negotiation import (
    CLOSE_DEADLINE,
    MIN_RATE,
    NEGOTIATION_DEADLINE,
    REQUEST_DEADLINE,
    IncompleteAnswer,
    NegotiationProtocol,
    OneShotClient,
    negotiate,
)
from p2prelay.node.server import FileServerFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.relay.protocol import RelayFactory
from p2prelay.relay.registry import Registry

TIMEOUT = 5.0
SERVER = IPv4Address("TCP", "10.9.8.7", 4321)


class LogTests(SynchronousTestCase):
    def idleLog(self, peer) -> list[str]:
        clock = Clock()
        proto = NegotiationProtocol(clock, TIMEOUT)
        proto.makeConnection(StringTransport(peerAddress=peer))
        with capturedLogs() as events:
            clock.advance(TIMEOUT)
        return [formatEvent(e) for e in events]

    def test_idlePeerAsHostPort(self):
        """Closing an idle connection logs the peer as host:port, not an address repr."""
        [line] = self.idleLog(SERVER)
        self.assertIn("from 10.9.8.7:4321", line)
        self.assertNotIn("IPv4Address", line)

    def test_idleIPv6PeerBracketed(self):
        """An IPv6 peer is logged as [host]:port."""
        [line] = self.idleLog(IPv6Address("TCP", "::1", 4321))
        self.assertIn("from [::1]:4321", line)


class Lost(IncompleteAnswer):
    """What the test client says when the server hangs up early."""


class StatusClient(OneShotClient[int]):
    """
    A minimal one-shot client: asks nothing, succeeds with the first 2xx
    status it hears, fails with any other status.
    """

    role = "test server"

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, TIMEOUT)
        self.lostWith: list[object] = []

    def messageReceived(self, message: wire.Message) -> None:
        code = message.status
        if code is None:
            raise wire.ProtocolError(wire.BAD_REQUEST, "expected a status line")
        if code == wire.OK:
            self.succeed(code)
        else:
            self.fail(wire.ProtocolError(code, message.text))

    def incomplete(self, reason: object) -> Lost:
        self.lostWith.append(reason)
        return Lost("hung up")


class OneShotClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = StatusClient(self.clock)
        self.transport = StringTransport(peerAddress=SERVER)
        self.client.makeConnection(self.transport)
        self.results: list[object] = []
        self.client.deferred.addBoth(self.results.append)

    def assertFiredOnce(self) -> object:
        """Exactly one result reached the Deferred; return it."""
        self.assertEqual(len(self.results), 1, self.results)
        return self.results[0]

    def test_succeed(self):
        """succeed() fires the Deferred with its value and closes the connection gracefully."""
        self.client.dataReceived(wire.status(wire.OK))
        self.assertEqual(self.assertFiredOnce(), 200)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected, "a graceful close, not an abort")

    def test_fail(self):
        """fail() fails the Deferred with its reason and closes the connection."""
        self.client.dataReceived(wire.status(wire.NOT_FOUND, "nope"))
        result = self.assertFiredOnce()
        self.assertIsInstance(result, Failure)
        self.assertEqual(result.value.status, wire.NOT_FOUND)
        self.assertTrue(self.transport.disconnecting)

    def test_firesOnce(self):
        """After the outcome, further succeed() or fail() calls change nothing."""
        self.client.succeed(1)
        self.client.succeed(2)
        self.client.fail(ValueError("late"))
        self.assertEqual(self.assertFiredOnce(), 1)

    def test_linesAfterOutcomeIgnored(self):
        """Lines that arrive after the outcome are not handled."""
        self.client.dataReceived(wire.status(wire.OK) + b"not the protocol\r\n")
        self.assertEqual(self.assertFiredOnce(), 200)

    def test_malformedLine(self):
        """A line that breaks the protocol fails with ProtocolError naming the server's role."""
        self.client.dataReceived(b"HTTP/1.1 200 OK\r\n")
        result = self.assertFiredOnce()
        self.assertEqual(result.value.status, wire.BAD_REQUEST)
        self.assertIn("bad answer from test server", result.value.message)

    def test_messageReceivedRaises(self):
        """A ProtocolError raised by messageReceived fails the negotiation."""
        self.client.dataReceived(wire.end(0))
        result = self.assertFiredOnce()
        self.assertIn("expected a status line", result.value.message)

    def test_overLongLine(self):
        """An over-long line fails with 414 before its end arrives."""
        self.client.dataReceived(b"P2P/1 200 pad=" + b"a" * wire.MAX_LINE)
        self.assertEqual(self.assertFiredOnce().value.status, wire.LINE_TOO_LONG)
        self.assertTrue(self.transport.disconnecting)

    def test_timeout(self):
        """A server silent for the timeout fails it with TimeoutError and aborts the connection."""
        self.clock.advance(TIMEOUT - 0.1)
        self.assertEqual(self.results, [])
        self.clock.advance(0.1)
        self.assertIsInstance(self.assertFiredOnce().value, TimeoutError)
        self.assertTrue(self.transport.disconnected, "aborted, not waiting on a silent peer")

    def test_trafficResetsTimeout(self):
        """Each chunk from the server restarts the timeout."""
        self.clock.advance(TIMEOUT - 1)
        self.client.dataReceived(b"P2P/1 ")
        self.clock.advance(TIMEOUT - 1)
        self.assertEqual(self.results, [])

    def test_noTimeoutAfterOutcome(self):
        """Once the outcome is known no timer is left running."""
        self.client.dataReceived(wire.status(wire.OK))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connectionLostEarly(self):
        """A close before the outcome fails with the subclass's incomplete() error."""
        reason = Failure(ConnectionDone())
        self.client.connectionLost(reason)
        self.assertIsInstance(self.assertFiredOnce().value, Lost)
        self.assertEqual(self.client.lostWith, [reason])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connectionLostAfterOutcome(self):
        """A close after the outcome is the expected end, not an error."""
        self.client.dataReceived(wire.status(wire.OK))
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.assertFiredOnce(), 200)
        self.assertEqual(self.client.lostWith, [])

    def test_defaultIncomplete(self):
        """Without an override, an early close is an IncompleteAnswer naming the role."""
        client = OneShotClient(self.clock, TIMEOUT)
        client.role = "relay"
        client.makeConnection(StringTransport())
        client.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(client.deferred, IncompleteAnswer)
        self.assertIn("relay closed", str(failure.value))

    def test_cancel(self):
        """Cancelling aborts the connection and fails the Deferred with CancelledError."""
        self.client.deferred.cancel()
        self.assertIsInstance(self.assertFiredOnce().value, CancelledError)
        self.assertTrue(self.transport.disconnected)

    def test_quietAfterCancel(self):
        """After a cancel, the timeout, late lines and the close touch nothing."""
        self.client.deferred.cancel()
        self.clock.advance(TIMEOUT * 2)
        self.client.dataReceived(wire.status(wire.OK))
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(self.assertFiredOnce().value, CancelledError)
        self.assertEqual(self.client.lostWith, [])

    def test_cancelBeforeConnected(self):
        """A client cancelled before it was ever connected fails quietly."""
        client = StatusClient(self.clock)
        client.deferred.cancel()
        self.failureResultOf(client.deferred, CancelledError)


class ManualEndpoint:
    """A client endpoint whose connection completes when the test says so."""

    def __init__(self) -> None:
        self.attempt: Deferred | None = None
        self.cancelled = False
        self.factory = None

    def connect(self, factory):
        self.factory = factory

        def cancel(d: Deferred) -> None:
            self.cancelled = True

        self.attempt = Deferred(cancel)
        return self.attempt

    def complete(self) -> tuple[OneShotClient, StringTransport]:
        proto = self.factory.buildProtocol(SERVER)
        transport = StringTransport(peerAddress=SERVER)
        proto.makeConnection(transport)
        self.attempt.callback(proto)
        return proto, transport


class NegotiateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = ManualEndpoint()
        self.client = StatusClient(self.clock)
        self.d = ensureDeferred(negotiate(self.endpoint, self.client))

    def test_outcome(self):
        """negotiate() connects the very protocol it was given and returns its outcome."""
        proto, transport = self.endpoint.complete()
        self.assertIs(proto, self.client)
        self.assertNoResult(self.d)
        proto.dataReceived(wire.status(wire.OK))
        self.assertEqual(self.successResultOf(self.d), 200)

    def test_failure(self):
        """A failed negotiation raises its reason."""
        proto, _ = self.endpoint.complete()
        proto.dataReceived(wire.status(wire.NOT_FOUND))
        self.failureResultOf(self.d, wire.ProtocolError)

    def test_connectFails(self):
        """A connection that cannot be made raises the endpoint's error."""
        d = ensureDeferred(negotiate(_Refusing(), StatusClient(self.clock)))
        self.failureResultOf(d, ConnectionRefusedError)

    def test_cancelWhileConnecting(self):
        """Cancelling before the connection is made cancels the attempt."""
        self.d.cancel()
        self.assertTrue(self.endpoint.cancelled)
        self.failureResultOf(self.d, CancelledError)

    def test_cancelWhileNegotiating(self):
        """Cancelling once connected aborts the connection."""
        _, transport = self.endpoint.complete()
        self.d.cancel()
        self.failureResultOf(self.d, CancelledError)
        self.assertTrue(transport.disconnected)

    def test_factoryIsQuiet(self):
        """The factory negotiate() hands the endpoint logs nothing when started and stopped."""
        with capturedLogs() as events:
            self.endpoint.factory.doStart()  # as a connector does around a connection
            self.endpoint.factory.doStop()
        self.assertEqual(list(events), [])


class _Refusing:
    def connect(self, factory):
        return fail(ConnectionRefusedError())


class QuietServer(Protocol):
    """Answers one relay query, then waits for the client to hang up."""

    def __init__(self, lost: Deferred) -> None:
        self.lost = lost

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(wire.status(wire.OK, count=0) + wire.end(0))

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class RealConnectionLogTests(TestCase):
    """Over real loopback TCP, where Twisted's connectors start and stop factories."""

    async def test_queryLogsNoFactoryLines(self):
        """A query (as every heartbeat makes) logs no "Starting factory" or "Stopping factory"."""
        lost: Deferred[None] = Deferred()
        server = Factory.forProtocol(lambda: QuietServer(lost))
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=5)
        with capturedLogs() as events:
            reply = await query(endpoint, wire.request(wire.PEERS), reactor, timeout=5)
            # The client closes first; the server sees that only on a later
            # reactor turn, after the client's connector stopped its factory.
            await lost
        self.assertEqual(reply.status.status, wire.OK)
        texts = [formatEvent(e) for e in events]
        self.assertFalse(any("factory" in t.lower() for t in texts), texts)


# Server deadlines.

DEADLINE = 5.0
RATE = 1000  # bytes/s, for the generic server below


class CollectingServer(NegotiationProtocol):
    """
    A server negotiation: lines until END, then one answer.  Its deadline
    and minimum rate are the test's.
    """

    deadline = DEADLINE
    minRate = RATE

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        if self.finished:
            return
        self.lines.append(line)
        if line.startswith(b"P2P/1 END"):
            self.finish(wire.status(wire.OK, count=len(self.lines)))


def trickle(clock: Clock, proto, data: bytes, every: float, until: float) -> float:
    """Feed ``data`` one byte per ``every`` seconds until the server closes or ``until``."""
    transport = proto.transport
    for byte in data:
        if transport.disconnecting or clock.seconds() >= until:
            break
        proto.dataReceived(bytes([byte]))
        clock.advance(every)
    return clock.seconds()


class DeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = CollectingServer(self.clock)
        self.transport = StringTransport(peerAddress=SERVER)
        self.proto.makeConnection(self.transport)

    def replies(self) -> list[wire.Message]:
        return [wire.parseLine(l) for l in self.transport.value().split(b"\n") if l]

    def test_silentCutAtDeadline(self):
        """A connection that sends nothing is answered 408 at the deadline, not at the idle timeout."""
        self.clock.advance(DEADLINE - 0.01)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.01)
        [reply] = self.replies()
        self.assertEqual(reply.status, wire.TIMEOUT)
        self.assertTrue(self.transport.disconnecting)

    def test_trickleCut(self):
        """A request trickling in at 1 byte per 4 s is cut at the deadline, its traffic notwithstanding."""
        trickle(self.clock, self.proto, wire.request(wire.PEERS) * 10, 4.0, 60)
        self.assertTrue(self.transport.disconnecting)
        [reply] = self.replies()
        self.assertEqual(reply.status, wire.TIMEOUT)
        self.assertLess(self.clock.seconds(), DEADLINE + 4.0 + 0.1)

    def test_fastBigRequest(self):
        """A request far longer than the deadline allows at once, arriving faster than minRate, completes."""
        line = wire.item(wire.FILE, name="x" * 80, size=1, sha256="a" * 64)
        body = line * 200 + wire.end(200)  # about 30 s of bytes at RATE
        chunk = RATE  # one second's worth at the minimum rate ...
        for i in range(0, len(body), chunk):
            self.assertFalse(self.transport.disconnecting, f"cut after {i} bytes")
            self.proto.dataReceived(body[i : i + chunk])
            self.clock.advance(0.9)  # ... arriving in 0.9 s
        [reply] = self.replies()
        self.assertEqual(reply.status, wire.OK)
        self.assertEqual(reply.get("count"), "201")
        self.assertGreater(self.clock.seconds(), DEADLINE * 4)

    def test_slowBigRequestCut(self):
        """A long request arriving slower than minRate is cut once its bytes no longer pay for the time."""
        line = wire.item(wire.FILE, name="x" * 80, size=1, sha256="a" * 64)
        body = line * 200 + wire.end(200)
        chunk = RATE // 2  # half the minimum rate
        for i in range(0, len(body), chunk):
            if self.transport.disconnecting:
                break
            self.proto.dataReceived(body[i : i + chunk])
            self.clock.advance(1.0)
        self.assertEqual(self.replies()[0].status, wire.TIMEOUT)
        # 5 s, plus half a second bought per second: about 10 s.
        self.assertLess(self.clock.seconds(), 2 * DEADLINE + 1.5)

    def test_requestCompleteStopsDeadline(self):
        """After requestComplete() the deadline no longer applies."""
        self.proto.requestComplete()
        self.clock.advance(DEADLINE * 2)
        self.assertFalse(self.transport.disconnecting)

    def test_heldDeadline(self):
        """Time the server spends on its own work (holdDeadline) does not count against the peer."""
        self.clock.advance(DEADLINE - 1)
        self.proto.holdDeadline()
        self.clock.advance(DEADLINE * 3)
        self.assertFalse(self.transport.disconnecting)
        self.proto.resumeDeadline()
        self.clock.advance(0.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertEqual(self.replies()[0].status, wire.TIMEOUT)

    def test_resumeAfterAnswer(self):
        """Resuming the deadline after the server has answered starts nothing."""
        self.proto.holdDeadline()
        self.proto.dataReceived(wire.end(0))
        self.proto.resumeDeadline()
        answered = self.transport.value()
        self.clock.advance(DEADLINE * 2)
        self.assertEqual(self.transport.value(), answered)

    def test_answerUnreadAborted(self):
        """A peer that does not take the answer is aborted after the close deadline plus its size at minRate."""
        self.proto.dataReceived(wire.end(0))
        answer = len(self.transport.value())
        self.assertTrue(self.transport.disconnecting)
        grace = CollectingServer.closeDeadline + answer / RATE
        self.clock.advance(grace - 0.01)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(0.01)
        self.assertTrue(self.transport.disconnected, "aborted")

    def test_refusalUnreadAborted(self):
        """After an error status too, a peer that does not take it is aborted."""
        self.proto.dataReceived(b"x" * (wire.MAX_LINE + 10))
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(CollectingServer.closeDeadline + 1)
        self.assertTrue(self.transport.disconnected)

    def test_closedLeavesNoTimer(self):
        """A connection lost (at any point) leaves no timer behind."""
        self.proto.dataReceived(wire.end(0))
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lostMidRequestLeavesNoTimer(self):
        """A connection lost mid-request leaves no timer behind."""
        self.proto.dataReceived(b"P2P/1 ")
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_clientsHaveNoDeadline(self):
        """A OneShotClient keeps only its idle timeout: steady traffic is never cut."""
        client = StatusClient(self.clock)
        transport = StringTransport(peerAddress=SERVER)
        client.makeConnection(transport)
        for _ in range(20):
            client.dataReceived(b" ")
            self.clock.advance(TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)


class RelayDeadlineTests(SynchronousTestCase):
    """The relay's deadlines, on its real protocol."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock.seconds, 90.0)
        for i in range(200):
            self.registry.register(f"n{i}", "10.0.0.1", 5000 + i, [])
        self.factory = RelayFactory(self.registry, self.clock)
        self.proto = self.factory.buildProtocol(SERVER)
        self.transport = StringTransport(peerAddress=SERVER)
        self.proto.makeConnection(self.transport)

    def test_trickleCut(self):
        """A request trickling at 1 byte per 4 s is cut 408 at NEGOTIATION_DEADLINE (it used to stay forever)."""
        trickle(self.clock, self.proto, wire.request(wire.PEERS), 4.0, 120)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(wire.parseLine(self.transport.value().split(b"\r\n")[0]).status, wire.TIMEOUT)
        self.assertLessEqual(self.clock.seconds(), NEGOTIATION_DEADLINE + 4.0)

    def test_unreadAnswerAborted(self):
        """A client that never reads a long PEERS answer is aborted after the close deadline."""
        self.proto.dataReceived(wire.request(wire.PEERS))
        size = len(self.transport.value())
        self.assertGreater(size, 10_000)
        self.clock.advance(CLOSE_DEADLINE + size / MIN_RATE + 0.01)
        self.assertTrue(self.transport.disconnected, "aborted")


class NodeDeadlineTests(SynchronousTestCase):
    """The node's request deadline, on its real file server."""

    def setUp(self) -> None:
        self.clock = Clock()
        root = FilePath(self.mktemp())
        root.makedirs()
        root.child("a.txt").setContent(b"hello")
        self.hashing: list[Deferred] = []
        self.share = SharedDirectory(root.path, runInThread=self.slowThread)
        self.cooperator = Cooperator(scheduler=lambda f: self.clock.callLater(0, f))
        self.addCleanup(self.cooperator.stop)
        self.factory = FileServerFactory(self.share, self.clock, self.cooperator)
        self.proto = self.factory.buildProtocol(SERVER)
        self.transport = StringTransport(peerAddress=SERVER)
        self.proto.makeConnection(self.transport)

    def slowThread(self, f, *args) -> Deferred:
        d: Deferred = Deferred()
        d.addCallback(lambda _: f(*args))
        self.hashing.append(d)
        return d

    def status(self) -> wire.Message:
        return wire.parseLine(self.transport.value().split(b"\r\n")[0])

    def test_trickleCut(self):
        """A request line trickling at 1 byte per 4 s is cut 408 at REQUEST_DEADLINE (it used to stay forever)."""
        trickle(self.clock, self.proto, wire.request(wire.GET, name="a.txt"), 4.0, 120)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.status().status, wire.TIMEOUT)
        self.assertLessEqual(self.clock.seconds(), REQUEST_DEADLINE + 4.0)

    def test_deadlineEndsWithLine(self):
        """Once the request line is in, the deadline is over: a slow hash is the server's wait."""
        self.clock.advance(REQUEST_DEADLINE - 1)
        self.proto.dataReceived(wire.request(wire.GET, name="a.txt"))
        self.clock.advance(REQUEST_DEADLINE * 2)
        self.assertEqual(self.transport.value(), b"")
        for d in self.hashing:
            d.callback(None)
        self.clock.advance(0)
        self.assertEqual(self.status().status, wire.OK)

    def test_unreadEndAborted(self):
        """A client that stops reading once the body is written is aborted after the close deadline."""
        self.proto.dataReceived(wire.request(wire.GET, name="a.txt"))
        for d in self.hashing:
            d.callback(None)
        for _ in range(5):
            self.clock.advance(0)
        self.assertTrue(self.transport.value().endswith(b"hello"))
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(CLOSE_DEADLINE + 1)
        self.assertTrue(self.transport.disconnected, "aborted")
