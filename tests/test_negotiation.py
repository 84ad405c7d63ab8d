"""
The shared negotiation plumbing: OneShotClient's lifecycle (its Deferred
fires exactly once, however the negotiation ends) and ``negotiate``.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2prelay import wire
from p2prelay.client.relay import query
from p2prelay.negotiation import (
    IncompleteAnswer,
    NegotiationProtocol,
    OneShotClient,
    negotiate,
)

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
