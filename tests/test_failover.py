"""
Several relays (``--relay a,b``): the comma list parsed, the failover
endpoint that tries them in order and sticks to the one that answered,
and every role going through it -- the registrar, the control connection
(whose circuits go to its own relay), and the client (whose DEAD, REVERSE
and RELAY go to the relay that listed the peer).
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr
from pathlib import Path

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import identity, wire
from p2prelay.addresses import (
    MAX_RELAYS,
    AddressError,
    AllRelaysFailed,
    FailoverEndpoint,
    Relay,
    TCPClient,
    checkClientAddress,
    clientEndpoint,
    endpointReached,
    relayReached,
    splitRelays,
)
from p2prelay.cli.options import EXIT_RELAY, EXIT_USAGE, buildFetcher, parseArgs
from p2prelay.client.fetcher import Fetcher
from p2prelay.client.outcomes import NoRelayReachable, PeerAddress, RelayUnreachable
from p2prelay.client.relay import QUERY_TIMEOUT, queryReached
from p2prelay.node.upkeep import Registrar
from p2prelay.relay.protocol import RelayFactory
from p2prelay.relay.registry import Registry
from p2prelay.tap import NodeOptions
from p2prelay.wire import FileEntry

from . import test_node_control as control_support
from . import test_upkeep as upkeep_support
from .support import MemoryEndpoint, MemoryNetwork
from .test_cli_fetch import CommandTestCase
from .test_fetch import FakeRelay as ClientRelay

REFUSED = ConnectionRefusedError("Connection refused")


class _Says(Protocol):
    """A server that answers any request with one fixed line, and closes."""

    def __init__(self, line: bytes) -> None:
        self.line = line

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.line)
        self.transport.loseConnection()


class Pending:
    """An endpoint whose attempts never complete; cancelling fails them as HostnameEndpoint does."""

    def __init__(self, network: MemoryNetwork, label: str) -> None:
        self.network = network
        self.label = label
        self.cancelled = 0

    def connect(self, factory) -> Deferred:
        self.network.connections.append(self.label)

        def cancel(d: Deferred) -> None:
            self.cancelled += 1
            d.errback(ConnectingCancelledError(self.label))

        return Deferred(cancel)


class FailoverTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
        self.server = Factory.forProtocol(Protocol)

    def relay(self, label: str, error: Exception | None = None) -> Relay:
        return Relay(label, self.network.endpoint(label, self.server, error))

    def failover(self, *relays: Relay) -> FailoverEndpoint:
        return FailoverEndpoint(list(relays))

    def connect(self, endpoint: FailoverEndpoint) -> Deferred:
        return endpoint.connect(Factory.forProtocol(Protocol))


class SplitRelaysTests(SynchronousTestCase):
    """The --relay comma list: every form a single --relay takes, each once, at most eight."""

    def test_oneRelayAsTyped(self) -> None:
        """Without a comma, the value is one relay, exactly as typed."""
        self.assertEqual(splitRelays(" relay.example:8000"), [" relay.example:8000"])

    def test_listSplitAndStripped(self) -> None:
        """A comma list is its relays in order, spaces around the commas dropped."""
        self.assertEqual(splitRelays("a.example:8000, b.example:8001"), ["a.example:8000", "b.example:8001"])

    def test_everyForm(self) -> None:
        """A port alone, a host, HOST:PORT, [V6]:PORT and an endpoint description mix in one list."""
        value = "8001,relay.example,relay.example:9000,[::1]:8000,tcp:other.example:8000"
        self.assertEqual(len(splitRelays(value)), 5)
        checkClientAddress(value)

    def test_emptyElement(self) -> None:
        """An empty element (two commas in a row) is a usage error saying so."""
        e = self.assertRaises(AddressError, splitRelays, "a:1,,b:2")
        self.assertIn("an empty relay in the list", str(e))

    def test_trailingComma(self) -> None:
        """A comma at the end leaves an empty element too."""
        self.assertRaises(AddressError, splitRelays, "a:1,")

    def test_duplicate(self) -> None:
        """A relay listed twice is refused, naming it."""
        e = self.assertRaises(AddressError, splitRelays, "a:1,b:2,a:1")
        self.assertIn("'a:1' is listed twice", str(e))

    def test_duplicateInAnotherForm(self) -> None:
        """8000 and localhost:8000 are the same relay."""
        e = self.assertRaises(AddressError, splitRelays, "8000,localhost:8000")
        self.assertIn("listed twice", str(e))

    def test_tooMany(self) -> None:
        """More than eight relays are refused."""
        value = ",".join(f"r{i}.example:8000" for i in range(MAX_RELAYS + 1))
        e = self.assertRaises(AddressError, splitRelays, value)
        self.assertIn(f"at most {MAX_RELAYS}", str(e))

    def test_eightAccepted(self) -> None:
        """Eight relays are fine."""
        value = ",".join(f"r{i}.example:8000" for i in range(MAX_RELAYS))
        self.assertEqual(len(splitRelays(value)), MAX_RELAYS)

    def test_badElementNamed(self) -> None:
        """A bad element's error names it."""
        e = self.assertRaises(AddressError, checkClientAddress, "a:1,b:99999")
        self.assertIn("b:99999", str(e))
        self.assertIn("out of range", str(e))

    def test_badDescriptionInList(self) -> None:
        """An element no endpoint parser takes is refused like a single one."""
        self.assertRaises(AddressError, checkClientAddress, "a:1,nosuch:1:2")

    def test_singleMessageUnchanged(self) -> None:
        """A single bad relay says what it always said, with no element prefix."""
        e = self.assertRaises(AddressError, checkClientAddress, "::1:8000")
        self.assertEqual(str(e), "IPv6 addresses need brackets: [::1]:8000")


class ClientEndpointTests(SynchronousTestCase):
    """clientEndpoint: one relay as ever, a list as a FailoverEndpoint over the same endpoints."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_singleIsPlain(self) -> None:
        """One relay is the plain endpoint it always was."""
        self.assertIsInstance(clientEndpoint(self.reactor, "relay.example:8000"), TCPClient)

    def test_listIsFailover(self) -> None:
        """A list is a FailoverEndpoint of one TCPClient per relay, in order, each with the timeout."""
        made = clientEndpoint(self.reactor, "a.example:8000,8001", timeout=3)
        self.assertIsInstance(made, FailoverEndpoint)
        self.assertEqual([r.name for r in made.relays], ["a.example:8000", "8001"])
        self.assertEqual(
            [(r.endpoint.host, r.endpoint.port, r.endpoint.timeout) for r in made.relays],
            [("a.example", 8000, 3), ("localhost", 8001, 3)],
        )


class FailoverEndpointTests(FailoverTestCase):
    """FailoverEndpoint.connect: in order, sticky, one error for all, cancellable."""

    def test_firstAnswers(self) -> None:
        """When the first relay connects, no other is tried."""
        endpoint = self.failover(self.relay("a"), self.relay("b"))
        self.successResultOf(self.connect(endpoint))
        self.assertEqual(self.network.connections, ["a"])

    def test_inOrder(self) -> None:
        """A relay that refuses is followed by the next, in the order given."""
        endpoint = self.failover(self.relay("a", REFUSED), self.relay("b", REFUSED), self.relay("c"))
        self.successResultOf(self.connect(endpoint))
        self.assertEqual(self.network.connections, ["a", "b", "c"])

    def test_failoverLogged(self) -> None:
        """Each relay given up on is logged with why, and the one tried next."""
        endpoint = self.failover(self.relay("a:8000", REFUSED), self.relay("b:8001"))
        with capturedLogs() as events:
            self.successResultOf(self.connect(endpoint))
        lines = [formatEvent(e) for e in events]
        self.assertIn("relay a:8000 unreachable (connection refused); trying b:8001", lines)

    def test_relayOf(self) -> None:
        """relayOf tells which relay a connection reached."""
        b = self.relay("b")
        endpoint = self.failover(self.relay("a", REFUSED), b)
        protocol = self.successResultOf(self.connect(endpoint))
        self.assertIs(endpoint.relayOf(protocol), b)
        self.assertIs(relayReached(endpoint, protocol), b)
        self.assertIs(endpointReached(endpoint, protocol), b.endpoint)

    def test_relayOfPlainEndpoint(self) -> None:
        """Through a plain endpoint there is no list: relayReached is None, endpointReached the endpoint."""
        plain = self.network.endpoint("plain", self.server)
        protocol = self.successResultOf(plain.connect(Factory.forProtocol(Protocol)))
        self.assertIsNone(relayReached(plain, protocol))
        self.assertIs(endpointReached(plain, protocol), plain)

    def test_sticky(self) -> None:
        """The relay that answered is tried first next time; the one that failed is not tried again first."""
        a, b = self.relay("a", REFUSED), self.relay("b")
        endpoint = self.failover(a, b)
        self.successResultOf(self.connect(endpoint))
        a.endpoint.error = None  # a is back: b still comes first
        self.successResultOf(self.connect(endpoint))
        self.assertEqual(self.network.connections, ["a", "b", "b"])
        self.assertIs(endpoint.preferred, b)

    def test_failedGoesLast(self) -> None:
        """A relay that failed is retried after the others: a, b, c with a down, then b down: c, then a."""
        a, b, c = self.relay("a", REFUSED), self.relay("b"), self.relay("c", REFUSED)
        endpoint = self.failover(a, b, c)
        self.successResultOf(self.connect(endpoint))  # a fails, b answers: b, c, a
        b.endpoint.error = REFUSED
        a.endpoint.error = None
        self.network.connections.clear()
        protocol = self.successResultOf(self.connect(endpoint))
        self.assertEqual(self.network.connections, ["b", "c", "a"])
        self.assertIs(endpoint.relayOf(protocol), a)

    def test_allFail(self) -> None:
        """When none connects: one AllRelaysFailed (a ConnectError) naming each relay and why, in the order tried."""
        endpoint = self.failover(
            self.relay("a:8000", REFUSED), self.relay("b:8001", TimeoutError()),
        )
        failure = self.failureResultOf(self.connect(endpoint), AllRelaysFailed)
        self.assertIsInstance(failure.value, ConnectError)
        self.assertEqual(
            str(failure.value), "no relay could be reached (a:8000: connection refused; b:8001: timed out)"
        )
        self.assertEqual([r.name for r, e in failure.value.failures], ["a:8000", "b:8001"])

    def test_allFailTriesEachOnce(self) -> None:
        """Failing over is one pass over the list, not a loop."""
        endpoint = self.failover(self.relay("a", REFUSED), self.relay("b", REFUSED))
        self.failureResultOf(self.connect(endpoint), AllRelaysFailed)
        self.assertEqual(self.network.connections, ["a", "b"])

    def test_cancelWhileTrying(self) -> None:
        """Cancelling while a relay is being tried cancels that attempt, and no later relay is tried."""
        pending = Pending(self.network, "a")
        endpoint = self.failover(Relay("a", pending), self.relay("b"))
        d = self.connect(endpoint)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(pending.cancelled, 1)
        self.assertEqual(self.network.connections, ["a"])

    def test_cancelAfterAFailure(self) -> None:
        """Cancelling while the second relay is tried stops there too."""
        pending = Pending(self.network, "b")
        endpoint = self.failover(self.relay("a", REFUSED), Relay("b", pending), self.relay("c"))
        d = self.connect(endpoint)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.network.connections, ["a", "b"])

    def test_oneRelayFailsAsItself(self) -> None:
        """A list of one (made in code) fails with that relay's own error, as a plain endpoint does."""
        endpoint = self.failover(self.relay("a", REFUSED))
        self.failureResultOf(self.connect(endpoint), ConnectionRefusedError)


# The registrar.


class TwoRelays:
    """Two independent in-memory relays (each its own registry), flushed together."""

    def __init__(self, clock: Clock, share) -> None:
        from p2prelay.node.server import FileServerFactory

        self.a = upkeep_support.FakeRelay(clock, None)
        self.b = upkeep_support.FakeRelay(clock, None)
        self.registries = {}
        for relay in (self.a, self.b):
            registry = Registry(clock.seconds, upkeep_support.TTL)
            self.registries[relay] = registry
            relay.factory = RelayFactory(
                registry,
                clock,
                dialback=relay.dialBack(FileServerFactory(share, clock, key=upkeep_support.KEY)),
            )
        self.endpoint = FailoverEndpoint([Relay("a:8000", self.a), Relay("b:8001", self.b)])

    silent: MemoryNetwork | None = None

    def flush(self) -> None:
        self.a.flush()
        self.b.flush()
        if self.silent is not None:
            self.silent.flush()

    def knows(self, relay) -> bool:
        return self.registries[relay].get(upkeep_support.NODE_ID) is not None


class RegistrarFailoverTests(upkeep_support.RegistrarTestCase):
    """A node with --relay a,b: registered at a, carried on through b when a dies."""

    def setUp(self) -> None:
        super().setUp()
        self.relays = TwoRelays(self.clock, self.share)
        self.relay = self.relays  # what advance() and stop() flush

    def start(self, **kw) -> Registrar:
        self.registrar = Registrar(
            self.clock, self.relays.endpoint, self.share, upkeep_support.KEY, 7000,
            rng=lambda: 0.5, rescan=None, heartbeat=10, relayName="a:8000,b:8001", **kw
        )
        self.registrar.start()
        self.addCleanup(self.stop)
        self.advance(0)
        return self.registrar

    def test_registersAtFirst(self) -> None:
        """With both up, the node registers with the first relay only, and says which."""
        with capturedLogs() as events:
            self.start()
        self.assertTrue(self.relays.knows(self.relays.a))
        self.assertFalse(self.relays.knows(self.relays.b))
        [line] = [formatEvent(e) for e in events if "announced" in formatEvent(e)]
        self.assertIn("to relay a:8000 as", line)

    def test_firstDownRegistersAtSecond(self) -> None:
        """With the first relay down from the start, the node registers with the second at once."""
        self.relays.a.down = True
        self.start()
        self.assertTrue(self.relays.knows(self.relays.b))
        self.assertTrue(self.registrar.registered)

    def test_relayDiesNodeMovesOn(self) -> None:
        """a dies: the next heartbeat reaches b, which does not know the node (404), and the node registers there."""
        self.start()
        self.relays.a.down = True
        with capturedLogs() as events:
            self.advance(11)
        self.assertTrue(self.relays.knows(self.relays.b))
        self.assertEqual(self.relays.b.verbs(), ["HEARTBEAT", "REGISTER"])
        lines = [formatEvent(e) for e in events]
        self.assertIn("relay a:8000 unreachable (connection refused); trying b:8001", lines)
        self.assertTrue(any("to relay b:8001 as" in line for line in lines), lines)

    def test_staysWithSecond(self) -> None:
        """Once at b, heartbeats keep going to b, even after a is back."""
        self.start()
        self.relays.a.down = True
        self.advance(11)
        self.relays.a.down = False
        attemptsAtA = len(self.relays.a.attempts)
        self.advance(30)
        self.assertEqual(len(self.relays.a.attempts), attemptsAtA)
        self.assertEqual(self.relays.b.verbs()[-3:], ["HEARTBEAT"] * 3)

    def test_bothDown(self) -> None:
        """With every relay down: one warning naming each relay and why, a backoff, and nothing counted as sent."""
        self.relays.a.down = self.relays.b.down = True
        with capturedLogs() as events:
            registrar = self.start()
        lines = [formatEvent(e) for e in events]
        self.assertTrue(
            any(line.startswith("no relay reachable (a:8000: connection refused; b:8001: connection refused);"
                                " retrying in ") for line in lines),
            lines,
        )
        self.assertFalse(registrar.registered)

    def test_recoversWhenOneReturns(self) -> None:
        """After both were down, the first relay to come back gets the registration."""
        self.relays.a.down = self.relays.b.down = True
        self.start()
        self.relays.b.down = False
        self.advance(5)
        self.assertTrue(self.relays.knows(self.relays.b))

    def test_silentRelaySetBack(self) -> None:
        """A relay that takes the connection but never answers is set back: after the timeout, the node registers at b."""
        silent = MemoryNetwork(self.clock)
        self.relays.silent = silent
        self.relays.endpoint = FailoverEndpoint(
            [Relay("a:8000", silent.endpoint("a", Factory.forProtocol(Protocol))), Relay("b:8001", self.relays.b)]
        )
        self.start()
        self.assertFalse(self.relays.knows(self.relays.b))
        self.advance(QUERY_TIMEOUT + 5)
        self.assertTrue(self.relays.knows(self.relays.b))
        self.assertEqual(silent.connections, ["a"])

    def test_busyRelaySetBack(self) -> None:
        """A relay answering 503 (its registry unreachable, say) is set back, and the next contact goes to b."""
        self.start()
        busy = Factory.forProtocol(lambda: _Says(wire.status(wire.BUSY, "registry unavailable", retry=1)))
        self.relays.a.factory = busy
        self.advance(11)  # the heartbeat at a: 503
        self.advance(5)  # the retry: at b, which registers the node
        self.assertTrue(self.relays.knows(self.relays.b))

    def test_channelFailureNamesItsRelay(self) -> None:
        """A heartbeat lost on the control connection is logged naming the relay that connection reached."""
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionLost

        class Channel:
            isOpen = True
            reached = Relay("b:8001", None)

            def heartbeat(self):
                return fail(ConnectionLost("the control connection was lost"))

        registrar = self.start()
        registrar.channel = Channel()
        with capturedLogs() as events:
            self.advance(11)
        lines = [formatEvent(e) for e in events]
        self.assertTrue(any(line.startswith("relay b:8001 unreachable (") for line in lines), lines)

    def test_unregistersWhereRegistered(self) -> None:
        """Stopping unregisters at the relay that holds the entry."""
        self.start()
        self.relays.a.down = True
        self.advance(11)
        self.relays.a.down = False
        self.stop()
        self.assertEqual(self.relays.b.verbs()[-1], "UNREGISTER")
        self.assertFalse(self.relays.knows(self.relays.b))


# The control connection.


class ControlFailoverTests(control_support.ControlTestCase):
    """A firewalled node's control connection through a relay list; its circuits go to its own relay."""

    def setUp(self) -> None:
        super().setUp()
        self.relayA = control_support.FakeRelay()
        self.relayB = self.relay
        self.endpointA = self.network.endpoint("a", self.relayA.factory(), REFUSED)
        self.endpointB = self.network.endpoint("b", self.relayB.factory())
        self.relayEndpoint = FailoverEndpoint([Relay("a:8000", self.endpointA), Relay("b:8001", self.endpointB)])

    def test_opensAtNext(self) -> None:
        """With a down, the control connection opens at b, and the log names b."""
        with capturedLogs() as events:
            control = self.opened(relayName="a:8000,b:8001")
        self.assertEqual(len(self.relayB.controls), 1)
        self.assertIs(control.reached.endpoint, self.endpointB)
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("control connection to relay b:8001 open", text)

    def test_circuitToOwnRelay(self) -> None:
        """A circuit ordered on b's control connection goes to b, though the failover would now pick a."""
        control = self.opened()
        # Something else (the registrar, say) found b down for a moment and a back:
        self.endpointA.error = None
        self.endpointB.error = REFUSED
        self.successResultOf(self.relayEndpoint.connect(Factory.forProtocol(Protocol)))
        self.assertIs(self.relayEndpoint.preferred.endpoint, self.endpointA)
        self.endpointB.error = None
        connectionsAtA = len(self.relayA.connections)
        token = identity.newNonce()
        self.relayB.controls[0].order(token=token)
        self.flush()
        circuit = self.relayB.connections[-1]
        self.assertEqual(circuit.lines[0], f"P2P/1 CIRCUIT token={token}\r".encode())
        self.assertTrue(circuit.body.endswith(b"alpha"))
        self.assertEqual(len(self.relayA.connections), connectionsAtA)
        self.assertEqual(control.orders, 0)

    def test_lostReconnectsToOther(self) -> None:
        """b goes away: the control connection is opened again at a."""
        control = self.opened()
        self.endpointA.error = None
        self.endpointB.error = REFUSED
        self.relayB.controls[0].transport.loseConnection()
        self.advance(3)
        self.assertTrue(control.isOpen)
        self.assertEqual(len(self.relayA.controls), 1)
        self.assertIs(control.reached.endpoint, self.endpointA)


# The client.


class ClientFailoverTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
        self.relayA = ClientRelay()
        self.relayB = ClientRelay()
        for relay in (self.relayA, self.relayB):
            relay.add("node1", "10.0.0.1", 5000, [FileEntry("a.txt", 5, "0" * 64)])
        self.endpointA = MemoryEndpoint(self.network, "a", self.relayA, REFUSED)
        self.endpointB = MemoryEndpoint(self.network, "b", self.relayB)
        self.relays = FailoverEndpoint([Relay("a:8000", self.endpointA), Relay("b:8001", self.endpointB)])

    def drive(self, coroutine) -> Deferred:
        d = ensureDeferred(coroutine)
        for _ in range(100):
            self.network.flush()
            if d.called:
                break
            self.clock.advance(1)
        return d

    def preferA(self) -> None:
        """Make the failover prefer a from now on (b failed once, a answered)."""
        self.endpointA.error = None
        self.endpointB.error = REFUSED
        self.successResultOf(self.relays.connect(Factory.forProtocol(Protocol)))
        self.endpointB.error = None


class ClientFailoverTests(ClientFailoverTestCase):
    """The client asks the relays in order; what concerns a listed peer goes to the relay that listed it."""

    def test_queryReached(self) -> None:
        """queryReached returns the reply and the endpoint of the relay that gave it."""
        reply, at = self.successResultOf(
            self.drive(queryReached(self.relays, wire.request(wire.PEERS), self.clock))
        )
        self.assertEqual(len(reply.items), 1)
        self.assertIs(at, self.endpointB)

    def test_silentRelaySkipped(self) -> None:
        """A relay that takes the connection and never answers is given up on at the timeout, and the next asked."""
        self.endpointA.error = None
        self.endpointA.factory = Factory.forProtocol(Protocol)
        fetcher = Fetcher(self.clock, self.relays, timeout=5)
        [peer] = self.successResultOf(self.drive(fetcher.peers()))
        self.assertIs(peer.relay, self.endpointB)
        self.assertIs(self.relays.preferred.endpoint, self.endpointB)

    def test_busyRelaySkipped(self) -> None:
        """A relay answering 503 is set back and the next one asked."""
        self.endpointA.error = None
        self.endpointA.factory = Factory.forProtocol(lambda: _Says(wire.status(wire.BUSY, "registry unavailable")))
        fetcher = Fetcher(self.clock, self.relays)
        self.assertEqual(len(self.successResultOf(self.drive(fetcher.peers()))), 1)
        self.assertEqual(self.network.connections, ["a", "b"])

    def test_refusalNotSkipped(self) -> None:
        """Any other refusal (403, 404...) is the relay's answer: not asked again elsewhere."""
        self.endpointA.error = None
        self.endpointA.factory = Factory.forProtocol(lambda: _Says(wire.status(403, "forbidden")))
        fetcher = Fetcher(self.clock, self.relays)
        failure = self.failureResultOf(self.drive(fetcher.peers()), wire.ProtocolError)
        self.assertEqual(failure.value.status, 403)
        self.assertEqual(self.network.connections, ["a"])

    def test_holdersRememberRelay(self) -> None:
        """The holders a WHOHAS lists remember the relay that answered it."""
        fetcher = Fetcher(self.clock, self.relays)
        [holder] = self.successResultOf(self.drive(fetcher.holders("a.txt")))
        self.assertIs(holder.relay, self.endpointB)

    def test_deadToListingRelay(self) -> None:
        """A DEAD report goes to the relay that listed the peer, not to whichever the failover picks now."""
        fetcher = Fetcher(self.clock, self.relays)
        [holder] = self.successResultOf(self.drive(fetcher.holders("a.txt")))
        self.preferA()
        self.successResultOf(self.drive(fetcher.reportDead(holder)))
        self.assertEqual(self.relayB.dead, ["10.0.0.1:5000"])
        self.assertEqual(self.relayA.dead, [])

    def test_allDown(self) -> None:
        """With every relay down, asking fails with NoRelayReachable (a RelayUnreachable) naming each relay."""
        self.endpointB.error = REFUSED
        fetcher = Fetcher(self.clock, self.relays)
        failure = self.failureResultOf(self.drive(fetcher.peers()), NoRelayReachable)
        self.assertIsInstance(failure.value, RelayUnreachable)
        self.assertEqual(
            str(failure.value),
            "no relay could be reached (a:8000: connection refused; b:8001: connection refused)",
        )

    def test_peerAddressEquality(self) -> None:
        """The relay a peer was listed by is no part of its identity."""
        self.assertEqual(PeerAddress("h", 1, relay=self.endpointA), PeerAddress("h", 1, relay=self.endpointB))


class PathFailoverTests(SynchronousTestCase):
    """REVERSE and RELAY for a firewalled peer go to the relay that listed it."""

    def setUp(self) -> None:
        from . import test_client_paths as paths

        self.paths = paths
        self.case = paths.PathTestCase("setUp")
        self.case.setUp()
        self.addCleanup(self.case.cooperator.stop)
        case = self.case
        self.relayA = paths.PathRelay(case.network)
        self.endpointA = MemoryEndpoint(case.network, "a", self.relayA, REFUSED)
        self.endpointB = case.relayEndpoint
        case.relayEndpoint = FailoverEndpoint([Relay("a:8000", self.endpointA), Relay("b:8001", self.endpointB)])

    def test_relayedAtListingRelay(self) -> None:
        """A firewalled holder listed by b is fetched via b (RELAY at b), though the failover prefers a by then."""
        case = self.case
        case.holder()
        case.relays()
        for relay in (self.relayA, case.relay):
            relay.onReverse = lambda m: wire.status(404, "no control connection")
        fetcher = case.fetcher(listen=False)
        [holder] = self.successResultOf(case.drive(ensureDeferred(fetcher.holders("a.txt"))))
        self.assertIs(holder.relay, self.endpointB)
        self.endpointA.error = None
        self.endpointB.error = REFUSED
        self.successResultOf(case.relayEndpoint.connect(Factory.forProtocol(Protocol)))
        self.endpointB.error = None
        d = case.drive(ensureDeferred(fetcher.fetch("a.txt", case.sink(), holders=[holder])))
        case.assertFetched(d, "relay")
        self.assertEqual(case.relay.asked, ["WHOHAS", "RELAY"])
        self.assertEqual(self.relayA.asked, [])


class FetchCommandTests(CommandTestCase):
    """p2p-fetch with --relay a,b: exit 3 only when none answers, naming each."""

    def relays(self, *errors):
        clock = Clock()
        network = MemoryNetwork(clock)
        factory = ClientRelay()
        factory.add("node1", "10.0.0.1", 5000, [FileEntry("a.txt", 5, "0" * 64)])
        names = ["a.example:8000", "b.example:8001"]
        endpoint = FailoverEndpoint(
            [Relay(name, MemoryEndpoint(network, name, factory, error)) for name, error in zip(names, errors)]
        )
        return clock, network, endpoint

    def run_(self, argv, *errors):
        clock, network, endpoint = self.relays(*errors)
        args = parseArgs(["--relay", "a.example:8000,b.example:8001", *argv])
        fetcher = buildFetcher(clock, args, self.terminal.console.err, relay=endpoint)
        from p2prelay.cli.fetch import run

        d = Deferred.fromCoroutine(run(clock, args, self.terminal.console, fetcher))
        for _ in range(100):
            network.flush()
            if d.called:
                break
            clock.advance(1)
        return self.successResultOf(d)

    def test_allDownExit3(self) -> None:
        """--peers with both relays refusing: exit 3, one line naming each relay and why."""
        status = self.run_(["--peers"], REFUSED, REFUSED)
        self.assertEqual(status, EXIT_RELAY)
        self.assertIn(
            "p2p-fetch: no relay could be reached (a.example:8000: connection refused; "
            "b.example:8001: connection refused)",
            self.terminal.stderr,
        )

    def test_secondAnswers(self) -> None:
        """--peers with the first relay down: the second answers, exit 0."""
        status = self.run_(["--peers"], REFUSED, None)
        self.assertEqual(status, 0)
        self.assertIn("node=node1", self.terminal.stdout.decode())

    def test_statsFailOver(self) -> None:
        """--stats asks the next relay too (this fake answers STATS 400, the relay's answer, not exit 3)."""
        status = self.run_(["--stats"], REFUSED, None)
        self.assertNotEqual(status, EXIT_RELAY)

    def test_verboseNarratesFailover(self) -> None:
        """-v says each relay given up on, and the next tried."""
        self.run_(["-v", "--peers"], REFUSED, None)
        self.assertIn("relay a.example:8000 unreachable (connection refused); trying b.example:8001",
                      self.terminal.stderr)

    def test_quietWithoutVerbose(self) -> None:
        """Without -v, a failover that worked says nothing."""
        self.run_(["--peers"], REFUSED, None)
        self.assertNotIn("trying b.example:8001", self.terminal.stderr)

    def test_fetchAllDown(self) -> None:
        """Fetching a name with every relay down: exit 3, each relay named."""
        status = self.run_(["a.txt"], REFUSED, TimeoutError())
        self.assertEqual(status, EXIT_RELAY)
        self.assertIn("a.example:8000: connection refused; b.example:8001: timed out", self.terminal.stderr)


class FetchOptionTests(SynchronousTestCase):
    """p2p-fetch's --relay list: usage errors exit 2 naming the problem."""

    def usageError(self, argv) -> str:
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            e = self.assertRaises(SystemExit, parseArgs, argv)
        self.assertEqual(e.code, EXIT_USAGE)
        return stderr.getvalue()

    def test_listAccepted(self) -> None:
        """A list of relays parses, kept as typed."""
        self.assertEqual(parseArgs(["--relay", "a:1,b:2", "x"]).relay, "a:1,b:2")

    def test_emptyElement(self) -> None:
        """--relay a:1,,b:2 is a usage error."""
        self.assertIn("--relay: 'a:1,,b:2': an empty relay in the list", self.usageError(["--relay", "a:1,,b:2"]))

    def test_duplicate(self) -> None:
        """A relay listed twice is a usage error."""
        self.assertIn("listed twice", self.usageError(["--relay", "a:1,a:1"]))

    def test_tooMany(self) -> None:
        """Nine relays are a usage error."""
        value = ",".join(f"r{i}:8000" for i in range(9))
        self.assertIn("at most 8", self.usageError(["--relay", value]))

    def test_builtFailover(self) -> None:
        """buildFetcher makes a FailoverEndpoint for a list, with --timeout as each relay's connect timeout."""
        args = parseArgs(["--relay", "a.example:1,b.example:2", "--timeout", "7", "x"])
        fetcher = buildFetcher(MemoryReactorClock(), args, lambda line: None)
        self.assertIsInstance(fetcher.relay, FailoverEndpoint)
        self.assertEqual([r.endpoint.timeout for r in fetcher.relay.relays], [7, 7])

    def test_helpDocumentsList(self) -> None:
        """--help documents the comma list."""
        from p2prelay.cli.options import parser

        self.assertIn("comma list", parser().format_help())


class NodeOptionTests(SynchronousTestCase):
    """twistd peernode / p2p-peer --relay lists: checked like p2p-fetch's."""

    def parse(self, *argv: str) -> NodeOptions:
        folder = Path(self.mktemp())
        folder.mkdir()
        options = NodeOptions()
        options.parseOptions(["--dir", str(folder), "--key", str(folder / "node.key"), *argv])
        return options

    def test_listAccepted(self) -> None:
        """A list of relays is accepted."""
        self.assertEqual(self.parse("--relay", "a.example:8000,b.example:8000")["relay"],
                         "a.example:8000,b.example:8000")

    def test_emptyElement(self) -> None:
        """An empty element is a usage error naming --relay."""
        e = self.assertRaises(usage.UsageError, self.parse, "--relay", "a:1,,b:2")
        self.assertIn("--relay: ", str(e))
        self.assertIn("an empty relay", str(e))

    def test_duplicate(self) -> None:
        """A relay listed twice is a usage error."""
        e = self.assertRaises(usage.UsageError, self.parse, "--relay", "a:1,b:2,b:2")
        self.assertIn("listed twice", str(e))

    def test_helpDocumentsList(self) -> None:
        """--relay's help mentions the comma list."""
        self.assertIn("comma list", dict((o[0], o[3]) for o in NodeOptions.optParameters)["relay"])

    def test_peerHelpDocumentsList(self) -> None:
        """p2p-peer's --relay help mentions the comma list too."""
        from p2prelay.cli.peer import PeerOptions

        self.assertIn("comma list", PeerOptions().docs["relay"])

    def test_serviceRelayIsFailover(self) -> None:
        """makeNodeService gives the node a FailoverEndpoint over the relays listed."""
        from p2prelay.tap import makeNodeService

        config = self.parse("--relay", "a.example:8000,b.example:8000")
        service = makeNodeService(config, MemoryReactorClock())
        self.addCleanup(service.cache.close)
        self.assertIsInstance(service.relay, FailoverEndpoint)
        self.assertEqual([r.name for r in service.relay.relays], ["a.example:8000", "b.example:8000"])


# End to end.


class TwoRelaysEndToEndTests(SynchronousTestCase):
    """
    Two independent relays (plain in-memory registries) as real processes
    on OS-chosen loopback ports: a node with --relay A,B registers at A; A
    is killed; the node registers at B; p2p-fetch --relay A,B fetches its file.
    """

    def setUp(self) -> None:
        from .support import LOOPBACK, Network

        self.net = Network()
        self.addCleanup(self.net.close)
        self.a, self.relayA = self.net.address, self.net.relay
        self.relayB = self.net.daemon(["relay", "--port", LOOPBACK])
        host, port = self.relayB.listening()
        self.b = f"{host}:{port}"
        self.folder = self.net.folder("share", {"hello.txt": "hello from a node with two relays\n"})

    def peersAt(self, address: str) -> int:
        from .support import relayQuery

        try:
            return len(relayQuery(address, wire.request(wire.PEERS))) - 1
        except OSError:
            return -1

    def test_relayKilledNodeAndClientCarryOn(self) -> None:
        """The node moves to B when A dies, and a client given A,B fetches from it through B."""
        import re
        import signal

        from .support import LOOPBACK, waitUntil

        node = self.net.daemon(
            ["peernode", "--relay", f"{self.a},{self.b}", "--dir", str(self.folder), "--port", LOOPBACK,
             "--heartbeat", "1", "--no-udp"]
        )
        node.waitFor(re.compile(rf"announced 1 file .* to relay {re.escape(self.a)} as"))
        self.assertEqual((self.peersAt(self.a), self.peersAt(self.b)), (1, 0))

        self.relayA.stop(signal.SIGKILL)
        node.waitFor(re.compile(rf"announced 1 file .* to relay {re.escape(self.b)} as"), timeout=30)
        waitUntil(lambda: self.peersAt(self.b) == 1, timeout=10)
        self.assertTrue(any(f"relay {self.a} unreachable" in line for line in node.log), node.log[-10:])

        fetched = self.net.fetch("--relay", f"{self.a},{self.b}", "hello.txt")
        self.assertEqual(fetched.returncode, 0, fetched.stderr)
        self.assertEqual(fetched.stdout, b"hello from a node with two relays\n")

        gone = self.net.fetch("--relay", f"{self.a},127.0.0.1:1", "--peers")
        self.assertEqual(gone.returncode, EXIT_RELAY)
        self.assertIn(f"no relay could be reached ({self.a}: connection refused; 127.0.0.1:1: connection refused)",
                      gone.stderr.decode())
