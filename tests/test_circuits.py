"""
The relayed path at the relay: RELAY from a client, the CONNECT order to
the firewalled node, its CIRCUIT connection, the splice with backpressure
both ways, and every operator limit.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.test import iosim
from twisted.logger import capturedLogs, formatEvent

from p2prelay import identity, wire
from p2prelay.metrics import RelayMetrics, newRegistry
from p2prelay.relay.circuits import CIRCUIT_RETRY, CIRCUIT_TIMEOUT, CircuitLimits

from .test_metrics import samples
from .test_relay import KEY, OTHER, parse, proofFor
from .test_relay_control import ASKER, ControlTestCase
from .test_relay_security import SECRET

NODE_DATA = IPv4Address("TCP", "10.1.2.3", 45000)  # where the node's CIRCUIT comes from


class CircuitTestCase(ControlTestCase):
    limits = CircuitLimits()

    def setUp(self) -> None:
        self.metrics = RelayMetrics(newRegistry(process=False))
        self.options = {"circuits": self.limits, "metrics": self.metrics}
        super().setUp()
        self.firewalled()
        self.nodeControl, self.orders = self.opened()

    def relay(self, peer=ASKER, **fields):
        """A client's RELAY: (protocol, transport, the CONNECT order the node got or None)."""
        proto, transport = self.connect(peer)
        data = wire.request(wire.RELAY, node=KEY.node, **fields)
        proto.dataReceived(data)
        self.prove(proto, transport, data, None)
        sent = parse(self.orders.value())
        self.orders.clear()
        return proto, transport, (sent[0] if sent else None)

    def circuit(self, token: str, extra: bytes = b""):
        """The node's CIRCUIT connection for ``token``: (protocol, transport)."""
        proto, transport = self.connect(NODE_DATA)
        proto.dataReceived(wire.request(wire.CIRCUIT, token=token) + extra)
        return proto, transport

    def spliced(self, extra: bytes = b""):
        """A circuit opened: client (proto, transport), node (proto, transport), token; the 200 cleared."""
        client, clientTransport, order = self.relay()
        token = order.nonce("token")
        node, nodeTransport = self.circuit(token, extra)
        status = clientTransport.value().split(b"\r\n", 1)[0] + b"\r\n"
        self.assertEqual(parse(status)[0].status, wire.OK)
        clientTransport.clear()
        return (client, clientTransport), (node, nodeTransport), token

    def counted(self, result: str) -> float:
        return samples(self.metrics.registry)[("p2prelay_relay_circuits_total", (("result", result),))]


class RelayTests(CircuitTestCase):
    def test_orderWithoutAddress(self):
        """RELAY sends the node CONNECT token= with no host or port, and answers nothing yet."""
        client, transport, order = self.relay()
        self.assertEqual(order.word, wire.CONNECT)
        self.assertEqual(len(order.nonce("token")), 32)
        self.assertEqual((order.get("host"), order.get("port")), (None, None))
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_circuitAnswered(self):
        """The node's CIRCUIT makes the client's answer 200 circuit=T; the node gets no answer."""
        client, clientTransport, order = self.relay()
        token = order.nonce("token")
        node, nodeTransport = self.circuit(token)
        [reply] = parse(clientTransport.value())
        self.assertEqual((reply.status, reply.get("circuit"), reply.text), (200, token, "relayed by this relay"))
        self.assertEqual(nodeTransport.value(), b"")
        self.assertFalse(nodeTransport.disconnecting or clientTransport.disconnecting)

    def test_bytesBothWays(self):
        """From the 200 on, bytes pass verbatim both ways."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        client.dataReceived(b"P2P/1 GET name=a.txt\r\n")
        self.assertEqual(nodeTransport.value(), b"P2P/1 GET name=a.txt\r\n")
        node.dataReceived(b"P2P/1 200 size=3\r\nabc")
        self.assertEqual(clientTransport.value(), b"P2P/1 200 size=3\r\nabc")

    def test_earlyBytesPassedOn(self):
        """What the client sends before the circuit opens is held, then passed to the node first."""
        client, clientTransport, order = self.relay()
        client.dataReceived(b"P2P/1 GET name=a.txt\r\n")
        self.assertEqual(clientTransport.producerState, "paused")  # held: one read at most
        node, nodeTransport = self.circuit(order.nonce("token"))
        self.assertEqual(nodeTransport.value(), b"P2P/1 GET name=a.txt\r\n")
        self.assertEqual(clientTransport.producerState, "producing")

    def test_nodeBytesAfterCircuitLine(self):
        """Bytes in the same segment as the node's CIRCUIT line go to the client after the 200."""
        client, clientTransport, order = self.relay()
        self.circuit(order.nonce("token"), b"hello")
        self.assertTrue(clientTransport.value().endswith(b"\r\nhello"))

    def test_noDeadlines(self):
        """A spliced circuit is bound by its own limits, not the negotiation deadline or idle timeout."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        self.clock.advance(600)
        self.assertFalse(clientTransport.disconnecting or nodeTransport.disconnecting)

    def test_noControl(self):
        """RELAY to a node holding no control connection is 404."""
        self.nodeControl.connectionLost(None)
        client, transport, order = self.relay()
        [reply] = parse(transport.value())
        self.assertEqual((reply.status, reply.text), (404, f"{KEY.node} holds no control connection here"))
        self.assertIsNone(order)

    def test_unknownToken(self):
        """CIRCUIT with a token nobody waits for is 404 no such circuit, and closed."""
        node, transport = self.circuit(identity.newNonce())
        [reply] = parse(transport.value())
        self.assertEqual((reply.status, reply.text), (404, "no such circuit"))
        self.assertTrue(transport.disconnecting)

    def test_tokenUsedOnce(self):
        """A token opens one circuit: a second CIRCUIT with it is 404."""
        (client, _), (node, _), token = self.spliced()
        again, transport = self.circuit(token)
        self.assertEqual(parse(transport.value())[0].status, wire.NOT_FOUND)

    def test_timeout(self):
        """A node that does not open the circuit in time: the client gets 504, a late CIRCUIT 404."""
        client, transport, order = self.relay()
        self.clock.advance(CIRCUIT_TIMEOUT)
        [reply] = parse(transport.value())
        self.assertEqual(
            (reply.status, reply.text), (504, "the node did not open the circuit within 5 s")
        )
        self.assertTrue(transport.disconnecting)
        late, lateTransport = self.circuit(order.nonce("token"))
        self.assertEqual(parse(lateTransport.value())[0].status, wire.NOT_FOUND)
        self.assertEqual(self.counted("timeout"), 1)

    def test_clientGaveUp(self):
        """A client that closes before the node came leaves no circuit: the node's CIRCUIT is 404."""
        client, transport, order = self.relay()
        client.connectionLost(None)
        late, lateTransport = self.circuit(order.nonce("token"))
        self.assertEqual(parse(lateTransport.value())[0].status, wire.NOT_FOUND)
        self.assertEqual(self.factory.circuits.count(), 0)

    def test_metrics(self):
        """Bytes relayed and open circuits are in the metrics; a circuit closed by a side is complete."""
        (client, _), (node, _), _ = self.spliced()
        client.dataReceived(b"x" * 10)
        node.dataReceived(b"y" * 5)
        values = samples(self.metrics.registry)
        self.assertEqual(values[("p2prelay_relay_relayed_bytes_total", ())], 15)
        self.assertEqual(values[("p2prelay_relay_circuits_open", ())], 1)
        self.assertEqual(values[("p2prelay_relay_control_connections_open", ())], 1)
        node.connectionLost(None)
        self.assertEqual(samples(self.metrics.registry)[("p2prelay_relay_circuits_open", ())], 0)
        self.assertEqual(self.counted("complete"), 1)


class BackpressureTests(CircuitTestCase):
    def test_eachSideProducesForTheOther(self):
        """Each side's transport is the streaming producer of the other side's transport."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        self.assertIs(clientTransport.producer, nodeTransport)
        self.assertIs(nodeTransport.producer, clientTransport)
        self.assertTrue(clientTransport.streaming and nodeTransport.streaming)

    def test_slowClientPausesNode(self):
        """A client whose buffer is full pauses reading from the node, and resumes it when drained."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        clientTransport.producer.pauseProducing()  # what a full transport does
        self.assertEqual(nodeTransport.producerState, "paused")
        self.assertEqual(clientTransport.producerState, "producing")
        clientTransport.producer.resumeProducing()
        self.assertEqual(nodeTransport.producerState, "producing")

    def test_slowNodePausesClient(self):
        """A node whose buffer is full pauses reading from the client."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        nodeTransport.producer.pauseProducing()
        self.assertEqual(clientTransport.producerState, "paused")
        self.assertEqual(nodeTransport.producerState, "producing")


class VanishingTests(CircuitTestCase):
    def test_nodeVanishes(self):
        """A node gone mid-transfer: the client keeps what was relayed, then is closed."""
        (client, clientTransport), (node, nodeTransport), token = self.spliced()
        node.dataReceived(b"P2P/1 200 size=100\r\n" + b"z" * 40)
        with capturedLogs() as events:
            node.connectionLost(None)
        self.assertTrue(clientTransport.value().endswith(b"z" * 40))
        self.assertTrue(clientTransport.disconnecting)
        self.assertIsNone(clientTransport.producer)
        [event] = [e for e in events if "bytes in" in e["log_format"]]
        self.assertEqual(
            (event["token"], event["node"], event["bytes"], event["closedBy"]),
            (token, KEY.node, 60, "node"),
        )

    def test_clientVanishes(self):
        """A client gone mid-transfer: the node gets the bytes already relayed, then is closed."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        client.dataReceived(b"P2P/1 GET name=a\r\n")
        client.connectionLost(None)
        self.assertEqual(nodeTransport.value(), b"P2P/1 GET name=a\r\n")
        self.assertTrue(nodeTransport.disconnecting)
        self.assertEqual(self.factory.circuits.count(), 0)

    def test_pausedSideClosed(self):
        """A side paused for the vanished one is resumed for its close (nothing it sends is relayed)."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        clientTransport.producer.pauseProducing()
        client.connectionLost(None)
        self.assertEqual(nodeTransport.producerState, "producing")
        self.assertTrue(nodeTransport.disconnecting)
        node.dataReceived(b"late")
        self.assertEqual(clientTransport.value(), b"")

    def test_logLine(self):
        """The end of a circuit is logged: bytes, seconds, and who closed it."""
        (client, _), (node, _), token = self.spliced()
        client.dataReceived(b"q" * 7)
        self.clock.advance(1.5)
        with capturedLogs() as events:
            client.connectionLost(None)
        [event] = [e for e in events if "bytes in" in e["log_format"]]
        self.assertEqual(formatEvent(event), f"circuit {token} for {KEY.node}: 7 bytes in 1.5 s (closed by the client)")


class ByteLimitTests(CircuitTestCase):
    limits = CircuitLimits(bytes=100)

    def test_cutAtLimit(self):
        """A circuit carries at most --circuit-bytes (both ways together), then both sides are closed."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        client.dataReceived(b"a" * 60)
        node.dataReceived(b"b" * 30)
        self.assertFalse(clientTransport.disconnecting)
        with capturedLogs() as events:
            node.dataReceived(b"c" * 30)
        self.assertEqual(clientTransport.value(), b"b" * 30 + b"c" * 10)
        self.assertTrue(clientTransport.disconnecting and nodeTransport.disconnecting)
        self.assertEqual(self.counted("cut"), 1)
        [event] = [e for e in events if "bytes in" in e["log_format"]]
        self.assertEqual((event["bytes"], event["closedBy"], event["limit"]), (100, "relay", "its byte limit"))

    def test_sizeOverLimit(self):
        """RELAY with size= over --circuit-bytes is 413 naming both, and orders nothing."""
        client, transport, order = self.relay(size=101, name="big.bin")
        [reply] = parse(transport.value())
        self.assertEqual(
            (reply.status, reply.text),
            (413, "big.bin's 101 bytes exceed this relay's circuit limit of 100"),
        )
        self.assertIsNone(order)
        self.assertEqual(self.counted("refused"), 1)

    def test_sizeWithinLimit(self):
        """RELAY with size= within the limit is ordered."""
        client, transport, order = self.relay(size=100)
        self.assertEqual(order.word, wire.CONNECT)


class TimeLimitTests(CircuitTestCase):
    limits = CircuitLimits(seconds=10)

    def test_cutAtLimit(self):
        """A circuit open for --circuit-seconds is cut: both sides closed."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        self.clock.advance(9.9)
        self.assertFalse(clientTransport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(clientTransport.disconnecting and nodeTransport.disconnecting)
        self.assertEqual(self.counted("cut"), 1)

    def test_endedCircuitNotCutLater(self):
        """A circuit that ended before its time limit is not counted again when it would have passed."""
        (client, _), (node, _), _ = self.spliced()
        client.connectionLost(None)
        self.clock.advance(10)
        self.assertEqual((self.counted("complete"), self.counted("cut")), (1, 0))


class RateLimitTests(CircuitTestCase):
    limits = CircuitLimits(rate=1000)

    def test_pacedByPausingReads(self):
        """Over --relay-rate the sending side's reads are paused, and resumed once the rate allows."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        node.dataReceived(b"d" * 1000)
        self.assertEqual(clientTransport.value(), b"d" * 1000)  # passed on, then paid for
        self.assertEqual(nodeTransport.producerState, "paused")
        self.clock.advance(0.5)
        self.assertEqual(nodeTransport.producerState, "paused")
        self.clock.advance(0.5)
        self.assertEqual(nodeTransport.producerState, "producing")

    def test_sharedByAllCircuits(self):
        """The rate is for all circuits together: one circuit's debt holds back another's reads."""
        (clientA, _), (nodeA, nodeTransportA), _ = self.spliced()
        (clientB, _), (nodeB, nodeTransportB), _ = self.spliced()
        nodeA.dataReceived(b"d" * 1000)
        nodeB.dataReceived(b"e" * 10)
        self.assertEqual(nodeTransportB.producerState, "paused")

    def test_backpressureStillWorks(self):
        """A full client still pauses the node under the rate cap."""
        (client, clientTransport), (node, nodeTransport), _ = self.spliced()
        clientTransport.producer.pauseProducing()
        self.assertEqual(nodeTransport.producerState, "paused")
        clientTransport.producer.resumeProducing()
        self.assertEqual(nodeTransport.producerState, "producing")


class CapTests(CircuitTestCase):
    limits = CircuitLimits(maxCircuits=2, maxPerNode=1)

    def test_perNode(self):
        """Over --max-circuits-per-node, RELAY is 503 retry= naming the circuits open to the node."""
        self.spliced()
        client, transport, order = self.relay()
        [reply] = parse(transport.value())
        self.assertEqual(
            (reply.status, reply.get("retry"), reply.text),
            (503, str(CIRCUIT_RETRY), f"1 circuit open to {KEY.node}"),
        )
        self.assertIsNone(order)
        self.assertEqual(self.counted("refused"), 1)

    def test_waitingCounts(self):
        """A circuit still waiting for its node counts against the caps."""
        self.relay()
        client, transport, order = self.relay()
        self.assertEqual(parse(transport.value())[0].status, wire.BUSY)

    def test_total(self):
        """Over --max-circuits, RELAY to any node is 503 retry= naming the circuits open."""
        self.spliced()
        self.nodes.at.pop(("10.1.2.3", 5001), None)
        self.firewalled(OTHER, 5001)
        other, otherOrders = self.opened(OTHER, IPv4Address("TCP", "10.1.2.3", 46000))
        proto, transport = self.connect(ASKER)
        proto.dataReceived(wire.request(wire.RELAY, node=OTHER.node))
        self.assertEqual(parse(otherOrders.value())[0].word, wire.CONNECT)
        proto, transport = self.connect(ASKER)
        proto.dataReceived(wire.request(wire.RELAY, node=OTHER.node))
        [reply] = parse(transport.value())
        self.assertEqual((reply.status, reply.text), (503, "2 circuits open"))

    def test_freedWhenClosed(self):
        """A circuit that ended frees its place."""
        (client, _), _, _ = self.spliced()
        client.connectionLost(None)
        client, transport, order = self.relay()
        self.assertEqual(order.word, wire.CONNECT)


class NoRelayingTests(CircuitTestCase):
    limits = CircuitLimits(relaying=False)

    def test_refused(self):
        """With --no-relaying, RELAY is 503 this relay does not relay, with no retry hint."""
        client, transport, order = self.relay()
        [reply] = parse(transport.value())
        self.assertEqual((reply.status, reply.text, reply.get("retry")), (503, "this relay does not relay", None))
        self.assertIsNone(order)


class PrivateCircuitTests(CircuitTestCase):
    secret = SECRET
    private = True

    def relay(self, peer=ASKER, **fields):
        proto, transport = self.connect(peer)
        data = wire.request(wire.RELAY, node=KEY.node, **fields)
        proto.dataReceived(data)
        [challenge] = parse(transport.value())
        self.assertEqual(challenge.status, wire.CONTINUE)  # challenged like any query
        transport.clear()
        proto.dataReceived(proofFor(data, challenge, None, SECRET))
        sent = parse(self.orders.value())
        self.orders.clear()
        return proto, transport, (sent[0] if sent else None)

    def test_circuitNotChallenged(self):
        """On a private relay RELAY is challenged, CIRCUIT is not: the token is the capability."""
        client, clientTransport, order = self.relay()
        node, nodeTransport = self.circuit(order.nonce("token"))
        self.assertEqual(nodeTransport.value(), b"")
        self.assertEqual(parse(clientTransport.value())[0].status, wire.OK)


class _Side(Protocol):
    """One end of a circuit in memory: sends ``first`` on connection, keeps what it receives."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.received = b""
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.write(self.first)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.closed = True


class InMemoryCircuitTests(CircuitTestCase):
    """A whole exchange through a circuit, both connections pumped in memory."""

    def test_exchange(self):
        """A request and a 1 MiB answer pass through the relay intact, and the node's close reaches the client."""
        client = _Side(wire.request(wire.RELAY, node=KEY.node))
        relayForClient = self.factory.buildProtocol(ASKER)
        clientPump = iosim.connect(
            relayForClient, iosim.FakeTransport(relayForClient, True, peerAddress=ASKER),
            client, iosim.FakeTransport(client, False),
            clock=self.clock,
        )
        clientPump.flush()
        [order] = parse(self.orders.value())
        node = _Side(wire.request(wire.CIRCUIT, token=order.nonce("token")))
        relayForNode = self.factory.buildProtocol(NODE_DATA)
        nodePump = iosim.connect(
            relayForNode, iosim.FakeTransport(relayForNode, True, peerAddress=NODE_DATA),
            node, iosim.FakeTransport(node, False),
            clock=self.clock,
        )
        nodePump.flush()
        clientPump.flush()
        status, _, rest = client.received.partition(b"\r\n")
        self.assertEqual(parse(status + b"\r\n")[0].status, wire.OK)
        client.transport.write(b"P2P/1 GET name=a.txt\r\n")
        clientPump.flush()
        nodePump.flush()
        self.assertEqual(node.received, b"P2P/1 GET name=a.txt\r\n")
        body = bytes(range(256)) * 4096
        node.transport.write(b"P2P/1 200 size=1048576\r\n" + body)
        node.transport.loseConnection()
        for _ in range(3):
            nodePump.flush()
            clientPump.flush()
        self.assertEqual(client.received, status + b"\r\n" + b"P2P/1 200 size=1048576\r\n" + body)
        self.assertTrue(client.closed)


class RateLimitedEarlyBytesTests(CircuitTestCase):
    limits = CircuitLimits(rate=1000)

    def test_earlyBytesPaidFor(self):
        """Early bytes over the rate leave the client paused at the splice: the cap holds from the first byte."""
        client, clientTransport, order = self.relay()
        client.dataReceived(b"g" * 1000)
        node, nodeTransport = self.circuit(order.nonce("token"))
        self.assertEqual(nodeTransport.value(), b"g" * 1000)
        self.assertEqual(clientTransport.producerState, "paused")
        self.clock.advance(1)
        self.assertEqual(clientTransport.producerState, "producing")
