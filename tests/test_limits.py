"""
Caps on connections and requests per source address and in total
(p2prelay.limits), and how the relay's and the node's factories apply them.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import limits, wire
from p2prelay.limits import AddressCounter, ConnectionLimit, Refusal, sourceOf
from p2prelay.negotiation import NegotiationProtocol
from p2prelay.node.server import FileServerFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.relay.protocol import RelayFactory
from p2prelay.relay.registry import Registry
from p2prelay.udp import packets, receiver
from tests import test_udp
from tests.support import syncThread

ATTACKER = IPv4Address("TCP", "10.6.6.6", 40000)
HONEST = IPv4Address("TCP", "10.1.1.1", 40000)


def parse(data: bytes) -> list[wire.Message]:
    return [wire.parseLine(line) for line in data.split(b"\n") if line]


class SourceTests(SynchronousTestCase):
    def test_ipv4(self):
        """An IPv4 peer counts under its address."""
        self.assertEqual(sourceOf(IPv4Address("TCP", "192.0.2.7", 1)), "192.0.2.7")

    def test_ipv6ByPrefix(self):
        """IPv6 peers in one /64 count as one source, other /64s apart."""
        a = sourceOf(IPv6Address("TCP", "2001:db8:1:2::1", 1))
        b = sourceOf(IPv6Address("TCP", "2001:db8:1:2:ffff::9", 1))
        c = sourceOf(IPv6Address("TCP", "2001:db8:1:3::1", 1))
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_ipv4Mapped(self):
        """An IPv4-mapped IPv6 peer counts as the IPv4 address it maps."""
        self.assertEqual(sourceOf(IPv6Address("TCP", "::ffff:192.0.2.7", 1)), "192.0.2.7")

    def test_noHost(self):
        """Addresses without a host (UNIX sockets, None) all count as one source."""
        self.assertEqual(sourceOf(UNIXAddress(b"/tmp/x")), sourceOf(None))


class AddressCounterTests(SynchronousTestCase):
    def test_perAddressCap(self):
        """One source gets at most perAddress slots."""
        counter = AddressCounter(perAddress=2, total=10)
        self.assertIsNotNone(counter.take("a"))
        self.assertIsNotNone(counter.take("a"))
        self.assertIsNone(counter.take("a"))
        self.assertEqual(counter.refusal("a"), "per-address")

    def test_otherAddressesServed(self):
        """A source at its cap does not stop another source."""
        counter = AddressCounter(perAddress=2, total=10)
        counter.take("a"), counter.take("a")
        self.assertIsNotNone(counter.take("b"))

    def test_totalCap(self):
        """Everyone together gets at most total slots, whatever their sources."""
        counter = AddressCounter(perAddress=5, total=3)
        for source in "abc":
            self.assertIsNotNone(counter.take(source))
        self.assertIsNone(counter.take("d"))
        self.assertEqual(counter.refusal("d"), "total")

    def test_releaseFreesSlot(self):
        """A released slot can be taken again, by its source or another."""
        counter = AddressCounter(perAddress=1, total=1)
        slot = counter.take("a")
        self.assertIsNone(counter.take("b"))
        slot.release()
        self.assertIsNotNone(counter.take("b"))

    def test_releaseOnce(self):
        """Releasing a slot twice gives back one slot, not two."""
        counter = AddressCounter(perAddress=2, total=2)
        slot = counter.take("a")
        counter.take("a")
        slot.release()
        slot.release()
        self.assertEqual((len(counter), counter.holding("a")), (1, 1))

    def test_forgetsIdleSources(self):
        """A source holding nothing leaves no entry behind."""
        counter = AddressCounter(perAddress=2)
        counter.take("a").release()
        self.assertEqual(counter._held, {})

    def test_noTotal(self):
        """Without a total cap only the per-address one applies."""
        counter = AddressCounter(perAddress=1)
        for source in range(1000):
            self.assertIsNotNone(counter.take(str(source)))

    def test_capsAtLeastOne(self):
        """A cap below 1 is a programming error, caught at once."""
        self.assertRaises(ValueError, AddressCounter, 0)
        self.assertRaises(ValueError, AddressCounter, 1, 0)


class Echo(NegotiationProtocol):
    """A bare server negotiation, for the limit's bookkeeping."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)


class ConnectionLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limit = ConnectionLimit(self.clock, total=4, perAddress=2, retry=7)

    def connect(self, addr):
        proto = self.limit.build(addr, lambda: Echo(self.clock))
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def test_underCap(self):
        """Under the caps the factory's own protocol is built, holding a slot."""
        proto, _ = self.connect(ATTACKER)
        self.assertIsInstance(proto, Echo)
        self.assertEqual(self.limit.counter.holding(sourceOf(ATTACKER)), 1)

    def test_overPerAddressCap(self):
        """Over the per-address cap: 503 with a retry hint, then close."""
        self.connect(ATTACKER), self.connect(ATTACKER)
        proto, transport = self.connect(ATTACKER)
        self.assertIsInstance(proto, Refusal)
        [reply] = parse(transport.value())
        self.assertEqual(reply.status, wire.BUSY)
        self.assertEqual(reply.get("retry"), "7")
        self.assertTrue(transport.disconnecting)

    def test_refusalReadsNothing(self):
        """A refused connection ignores whatever it is sent and answers nothing more."""
        proto, transport = self.connect(ATTACKER)
        self.connect(ATTACKER)
        proto, transport = self.connect(ATTACKER)
        before = transport.value()
        proto.dataReceived(wire.request(wire.PEERS))
        self.assertEqual(transport.value(), before)

    def test_refusalAborted(self):
        """A refused peer that does not take its 503 is aborted after a grace."""
        self.connect(ATTACKER), self.connect(ATTACKER)
        proto, transport = self.connect(ATTACKER)
        self.clock.advance(limits.REFUSAL_GRACE)
        self.assertTrue(transport.disconnected)

    def test_refusalLeavesNoTimer(self):
        """A refused connection that closes leaves no timer behind."""
        self.connect(ATTACKER), self.connect(ATTACKER)
        before = list(self.clock.getDelayedCalls())
        proto, _ = self.connect(ATTACKER)
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), before)

    def test_honestServedWhileAttackerAtCap(self):
        """Another address is served while one address is at its cap."""
        self.connect(ATTACKER), self.connect(ATTACKER), self.connect(ATTACKER)
        proto, _ = self.connect(HONEST)
        self.assertIsInstance(proto, Echo)

    def test_overTotalCap(self):
        """Over the total cap everyone is refused, with 503."""
        for i in range(4):
            self.connect(IPv4Address("TCP", f"10.0.0.{i}", 1))
        proto, transport = self.connect(HONEST)
        self.assertIsInstance(proto, Refusal)
        self.assertEqual(parse(transport.value())[0].status, wire.BUSY)

    def test_releasedOnConnectionLost(self):
        """A connection's slot is released when it is lost, and only then."""
        first, _ = self.connect(ATTACKER)
        self.connect(ATTACKER)
        self.assertIsInstance(self.connect(ATTACKER)[0], Refusal)
        first.connectionLost(None)
        self.assertIsInstance(self.connect(ATTACKER)[0], Echo)

    def test_refusalsHoldNoSlot(self):
        """Refused connections take no slot, so their closing frees nothing."""
        self.connect(ATTACKER), self.connect(ATTACKER)
        for _ in range(5):
            self.connect(ATTACKER)[0].connectionLost(None)
        self.assertEqual(len(self.limit.counter), 2)

    def test_buildFails(self):
        """A protocol that cannot be built leaves its slot free."""

        def broken():
            raise RuntimeError("bug")

        self.assertRaises(RuntimeError, self.limit.build, ATTACKER, broken)
        self.assertEqual(len(self.limit.counter), 0)

    def test_oneWarningPerSpell(self):
        """Many refusals of one source log one warning, not one per socket."""
        self.connect(ATTACKER), self.connect(ATTACKER)
        with capturedLogs() as events:
            for _ in range(10):
                self.connect(ATTACKER)
        texts = [formatEvent(e) for e in events]
        self.assertEqual(len(texts), 1, texts)
        self.assertIn("10.6.6.6", texts[0])
        self.assertIn("per-address", texts[0])


class CoercerTests(SynchronousTestCase):
    def test_positive(self):
        """A whole number of at least 1 is accepted."""
        self.assertEqual(limits.positiveInteger("max-connections")("12"), 12)

    def test_refused(self):
        """Zero, negatives and non-numbers are refused naming the option."""
        coerce = limits.positiveInteger("max-connections")
        for bad in ("0", "-3", "many", "1.5"):
            with self.assertRaises(ValueError) as caught:
                coerce(bad)
            self.assertIn("--max-connections", str(caught.exception))


class RelayFactoryLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = RelayFactory(
            Registry(self.clock.seconds, 90.0), self.clock, maxConnections=3, maxPerAddress=2
        )

    def connect(self, addr):
        proto = self.factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def test_defaults(self):
        """By default a relay holds 512 connections, 32 from one address."""
        factory = RelayFactory(Registry(self.clock.seconds, 90.0), self.clock)
        counter = factory.connections.counter
        self.assertEqual((counter.total, counter.perAddress), (512, 32))

    def test_perAddress(self):
        """The relay answers 503 retry= to one address over its cap, and serves another."""
        self.connect(ATTACKER), self.connect(ATTACKER)
        _, refused = self.connect(ATTACKER)
        reply = parse(refused.value())[0]
        self.assertEqual((reply.status, reply.get("retry")), (wire.BUSY, str(limits.BUSY_RETRY)))
        proto, transport = self.connect(HONEST)
        proto.dataReceived(wire.request(wire.PEERS))
        self.assertEqual(parse(transport.value())[0].status, wire.OK)

    def test_total(self):
        """Over the total cap the relay refuses even a fresh address."""
        self.connect(ATTACKER), self.connect(ATTACKER), self.connect(HONEST)
        _, refused = self.connect(IPv4Address("TCP", "10.2.2.2", 1))
        self.assertEqual(parse(refused.value())[0].status, wire.BUSY)

    def test_answeredConnectionReleases(self):
        """An answered connection frees its slot once it is closed."""
        proto, _ = self.connect(ATTACKER)
        self.connect(ATTACKER)
        proto.dataReceived(wire.request(wire.PEERS))
        proto.connectionLost(None)
        self.assertIsNot(type(self.connect(ATTACKER)[0]), Refusal)


class NodeFactoryLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        root = Path(self.mktemp())
        root.mkdir()
        (root / "a.txt").write_bytes(b"hello")
        self.share = SharedDirectory(root, runInThread=syncThread)
        self.successResultOf(self.share.scan())
        self.cooperator = Cooperator(scheduler=lambda f: self.clock.callLater(0, f), started=True)
        self.factory = FileServerFactory(
            self.share,
            self.clock,
            self.cooperator,
            maxConnections=5,
            maxPerAddress=3,
            maxGetsPerAddress=2,
        )

    def connect(self, addr=ATTACKER):
        proto = self.factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def test_defaults(self):
        """By default a node holds 256 connections, 16 from one address, 8 GETs from one address."""
        factory = FileServerFactory(self.share, self.clock)
        counter = factory.connections.counter
        self.assertEqual((counter.total, counter.perAddress), (256, 16))
        self.assertEqual(factory.gets.perAddress, 8)

    def test_connectionsPerAddress(self):
        """A node answers 503 retry= to one address over its connection cap."""
        for _ in range(3):
            self.connect()
        _, refused = self.connect()
        self.assertEqual(parse(refused.value())[0].status, wire.BUSY)
        self.assertIsNotNone(parse(refused.value())[0].get("retry"))

    def test_getsPerAddress(self):
        """A GET beyond the per-address cap of GETs in flight is answered 503 retry= and closed."""
        for _ in range(2):
            proto, _ = self.connect()
            proto.dataReceived(wire.request(wire.GET, name="a.txt"))  # body unread: in flight
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.GET, name="a.txt"))
        [reply] = parse(transport.value())
        self.assertEqual(reply.status, wire.BUSY)
        self.assertIsNotNone(reply.get("retry"))
        self.assertTrue(transport.disconnecting)

    def test_getsOtherAddress(self):
        """One address at its GET cap does not stop GETs from another."""
        for _ in range(2):
            self.connect()[0].dataReceived(wire.request(wire.GET, name="a.txt"))
        proto, transport = self.connect(HONEST)
        proto.dataReceived(wire.request(wire.GET, name="a.txt"))
        self.assertEqual(parse(transport.value().split(b"\n")[0] + b"\n")[0].status, wire.OK)

    def test_getReleased(self):
        """A finished GET frees its place for the next one."""
        first, _ = self.connect()
        first.dataReceived(wire.request(wire.GET, name="a.txt"))
        self.connect()[0].dataReceived(wire.request(wire.GET, name="a.txt"))
        first.connectionLost(None)
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.GET, name="a.txt"))
        self.assertEqual(parse(transport.value().split(b"\n")[0] + b"\n")[0].status, wire.OK)

    def test_idleConnectionsHoldNoGet(self):
        """Connections that have not sent a request count as connections, not GETs."""
        self.connect(), self.connect()
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.GET, name="a.txt"))
        self.assertEqual(parse(transport.value().split(b"\n")[0] + b"\n")[0].status, wire.OK)


class OptionTests(SynchronousTestCase):
    """The caps are the daemons' options, passed down to the factories."""

    def test_relayDefaults(self):
        """Without options the relay's factory has the default caps."""
        from twisted.internet import reactor

        from p2prelay.tap import RelayOptions, makeRelayService

        config = RelayOptions()
        config.parseOptions(["--port", "tcp:0:interface=127.0.0.1"])
        counter = makeRelayService(config, reactor).factory.connections.counter
        self.assertEqual(
            (counter.total, counter.perAddress),
            (limits.RELAY_MAX_CONNECTIONS, limits.RELAY_MAX_PER_ADDRESS),
        )

    def test_relayOptions(self):
        """--max-connections and --max-per-address set the relay's caps."""
        from twisted.internet import reactor

        from p2prelay.tap import RelayOptions, makeRelayService

        config = RelayOptions()
        config.parseOptions(
            ["--port", "tcp:0:interface=127.0.0.1", "--max-connections", "7", "--max-per-address", "3"]
        )
        counter = makeRelayService(config, reactor).factory.connections.counter
        self.assertEqual((counter.total, counter.perAddress), (7, 3))

    def test_nodeOptions(self):
        """--max-connections, --max-per-address and --max-gets-per-address set the node's caps."""
        from twisted.internet import reactor

        from p2prelay.tap import NodeOptions, makeNodeService

        folder = self.mktemp()
        os.mkdir(folder)
        config = NodeOptions()
        config.parseOptions(
            ["--dir", folder, "--no-udp", "--max-connections", "9",
             "--max-per-address", "4", "--max-gets-per-address", "2"]
        )
        factory = makeNodeService(config, reactor, runInThread=syncThread).files
        counter = factory.connections.counter
        self.assertEqual((counter.total, counter.perAddress, factory.gets.perAddress), (9, 4, 2))

    def test_badOption(self):
        """A cap that is not a whole number of at least 1 is a usage error."""
        from twisted.python.usage import UsageError

        from p2prelay.tap import RelayOptions

        config = RelayOptions()
        self.assertRaises(UsageError, config.parseOptions, ["--max-per-address", "0"])


class UnacknowledgedUDPTests(test_udp.UDPTestCase):
    """UDP: a transfer nobody acknowledges frees its slot within UNACKED_TIMEOUT."""

    def vanishingClient(self, name: str = "many.bin"):
        """A client that completes the handshake, then acknowledges nothing."""
        self.network.drop = lambda s, d, g: test_udp.kind(g) == packets.ACK
        client = receiver.UDPClient(
            self.reactor, test_udp.SERVER, name, test_udp.Sink(), 0, None, 60.0, test_udp.BLOCK
        )
        self.network.ephemeral(client)
        self.addCleanup(lambda: client.deferred.cancel() if not client.deferred.called else None)
        client.deferred.addErrback(lambda f: None)
        return client

    def test_default(self):
        """By default a never-acknowledged UDP transfer is dropped after 3 s (30 s once acknowledged)."""
        self.assertEqual((self.server.unackedTimeout, self.server.idleTimeout), (3.0, 30.0))

    def test_neverAcknowledgedFreed(self):
        """A transfer whose META is never acknowledged frees its slot, and its address's, within UNACKED_TIMEOUT."""
        self.vanishingClient()
        self.advance(0.05)
        self.assertEqual(len(self.server.transfers), 1)
        self.advance(self.server.unackedTimeout + 0.1)
        self.assertEqual(self.server.transfers, {})
        self.assertEqual(self.server.perAddress, {})

    def test_floodOfUnacknowledgedFreed(self):
        """Requests filling every slot from one address are all freed within seconds, not 30."""
        self.server.maxPerAddress = 4
        for _ in range(4):
            self.vanishingClient()
        self.advance(0.05)
        self.assertEqual(len(self.server.transfers), 4)
        self.advance(self.server.unackedTimeout + 0.1)
        self.assertEqual(self.server.transfers, {})
