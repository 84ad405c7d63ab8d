"""
The relay protocol on either registry backend, and several relays on one
Redis: the same answers from each, a node's heartbeats at any of them,
control connections held at one and seen by all, the registry lost and
back, Redis unreachable at the start.

The requests are played over ``StringTransport`` as in ``test_relay``;
with Redis their answers come after real round trips, so each exchange
waits (a few reactor turns) for the transport to change.  Every Redis test
runs against a real ``redis-server`` (skipped, one line, without one).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, List

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2prelay import wire
from p2prelay.identity import NodeKey
from p2prelay.relay.backends import redis as redisbackend
from p2prelay.relay.backends.memory import MemoryBackend
from p2prelay.relay.backends.url import parse as parseURL
from p2prelay.relay.dialback import DialBack
from p2prelay.relay.protocol import RelayFactory
from p2prelay.relay.registry import Registry
from p2prelay.relay.service import RelayService
from tests import redisserver
from tests.test_relay import KEY, Nodes, parse, proofFor, registration

TTL = 90.0
SHORT = 0.5  # seconds of every Redis deadline here
WAIT = 5.0  # seconds an exchange may take at most before the test fails
CLIENT = IPv4Address("TCP", "10.1.2.3", 40000)
ASKER = IPv4Address("TCP", "10.7.7.7", 41000)
HIDDEN = NodeKey.generate()  # a node nobody can reach at its address: firewalled
_prefixes = itertools.count()


async def turns(until, what: str = "an answer") -> None:
    """Let the reactor run (Redis answers) until ``until()`` holds."""
    deadline = time.monotonic() + WAIT
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {WAIT} s")
        await deferLater(reactor, 0.001, lambda: None)


async def answering(backend) -> None:
    """Wait until ``backend``'s Redis answers again (reconnected after a restart)."""
    from p2prelay.relay.backends.interface import RegistryUnavailable

    deadline = time.monotonic() + WAIT
    while True:
        try:
            await backend.client.ping()
            return
        except (RegistryUnavailable, Exception):
            if time.monotonic() > deadline:
                raise AssertionError(f"Redis not answering again within {WAIT} s") from None
            await deferLater(reactor, 0.01, lambda: None)


class Relays:
    """Relay factories on one registry, asked over StringTransports."""

    case: TestCase

    def factory(self, backend: Any, **options: Any) -> RelayFactory:
        nodes = Nodes()
        nodes.at[("10.1.2.3", 5000)] = KEY
        return RelayFactory(backend, reactor, dialback=DialBack(reactor, nodes), boot=self.boot, **options)

    boot = None

    def connect(self, factory: RelayFactory, peer=CLIENT):
        proto = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        self.case.addCleanup(lambda: proto.connectionLost(None) if not proto._lost else None)
        return proto, transport

    async def ask(self, factory: RelayFactory, data: bytes, peer=CLIENT, key: NodeKey = KEY) -> List[wire.Message]:
        """One request, its challenge answered as ``key``'s holder would; the answer's lines."""
        proto, transport = self.connect(factory, peer)
        proto.dataReceived(data)
        await turns(lambda: transport.value() or transport.disconnecting)
        sent = parse(transport.value())
        if sent and sent[0].status == wire.CONTINUE:
            transport.clear()
            proto.dataReceived(proofFor(data, sent[0], key))
        await turns(lambda: transport.disconnecting)
        return parse(transport.value())

    async def register(self, factory: RelayFactory, names=("a.txt",), key: NodeKey = KEY, port: int = 5000):
        [reply] = await self.ask(factory, registration(key, port, list(names)), key=key)
        self.case.assertEqual(reply.status, wire.OK, reply)
        return reply

    async def peers(self, factory: RelayFactory) -> List[tuple]:
        reply, *items, end = await self.ask(factory, wire.request(wire.PEERS), peer=ASKER)
        self.case.assertEqual(reply.status, wire.OK, reply)
        return sorted((m.get("node"), m.get("reach")) for m in items)

    async def whohas(self, factory: RelayFactory, name: str) -> List[str]:
        reply, *items, end = await self.ask(factory, wire.request(wire.WHOHAS, name=name), peer=ASKER)
        self.case.assertEqual(reply.status, wire.OK, reply)
        return sorted(m.get("node") for m in items)

    async def heartbeat(self, factory: RelayFactory, key: NodeKey = KEY) -> wire.Message:
        [reply] = await self.ask(factory, wire.request(wire.HEARTBEAT, node=key.node), key=key)
        return reply

    async def control(self, factory: RelayFactory, key: NodeKey = HIDDEN):
        """A control connection of ``key``'s node, open; its protocol and transport."""
        data = wire.request(wire.CONTROL, node=key.node)
        proto, transport = self.connect(factory, IPv4Address("TCP", "10.5.5.5", 42000))
        proto.dataReceived(data)
        await turns(lambda: transport.value())
        [challenge] = parse(transport.value())
        transport.clear()
        proto.dataReceived(proofFor(data, challenge, key))
        await turns(lambda: transport.value())
        [opened] = parse(transport.value())
        self.case.assertEqual(opened.status, wire.OK, opened)
        transport.clear()
        return proto, transport


class SharedProtocolTests(Relays):
    """What the relay protocol does on every backend."""

    backend: Any  # async: the backend under test (a subclass's)

    async def asyncSetUp(self) -> None:
        self.case = self
        self.relay = self.factory(await self.backend())

    def setUp(self):
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(self.asyncSetUp())

    async def test_registerAndFind(self):
        """A registered node is in PEERS and in the WHOHAS of its files, with the factory's boot."""
        reply = await self.register(self.relay, ["a.txt", "b.txt"])
        self.assertEqual(reply.get("boot"), self.relay.boot)
        self.assertEqual(await self.peers(self.relay), [(KEY.node, "direct")])
        self.assertEqual(await self.whohas(self.relay, "b.txt"), [KEY.node])
        self.assertEqual(await self.whohas(self.relay, "c.txt"), [])

    async def test_heartbeat(self):
        """A heartbeat of a registered node is answered alive, with the boot."""
        await self.register(self.relay)
        reply = await self.heartbeat(self.relay)
        self.assertEqual((reply.status, reply.get("boot"), reply.get("reachable")), (wire.OK, self.relay.boot, "1"))

    async def test_heartbeatUnknown(self):
        """A heartbeat of a node the registry does not hold asks it to register again."""
        reply = await self.heartbeat(self.relay)
        self.assertEqual((reply.status, reply.text), (wire.NOT_FOUND, "unknown node; register again"))

    async def test_unregister(self):
        """UNREGISTER, proved, removes the entry."""
        await self.register(self.relay)
        [reply] = await self.ask(self.relay, wire.request(wire.UNREGISTER, node=KEY.node))
        self.assertEqual(reply.status, wire.OK)
        self.assertEqual(await self.peers(self.relay), [])

    async def test_stats(self):
        """STATS counts the listed peers and their entries."""
        await self.register(self.relay, ["a.txt", "b.txt"])
        [reply] = await self.ask(self.relay, wire.request(wire.STATS), peer=ASKER)
        self.assertEqual((reply.get("peers"), reply.get("entries")), ("1", "2"))

    async def test_search(self):
        """SEARCH finds the names matching its pattern."""
        await self.register(self.relay, ["song.mp3", "notes.txt"])
        reply, *items, end = await self.ask(self.relay, wire.request(wire.SEARCH, pattern="*.mp3"), peer=ASKER)
        self.assertEqual([m.get("name") for m in items], ["song.mp3"])

    async def test_pipelinedRequestWaits(self):
        """A REGISTER sent in one segment with its FILE lines and END is read whole, whatever the registry's pace."""
        data = registration(KEY, 5000, ["x", "y", "z"])
        proto, transport = self.connect(self.relay)
        for byte in range(0, len(data), 7):  # in pieces, while a room check may be awaited
            proto.dataReceived(data[byte : byte + 7])
        await turns(lambda: transport.value())
        [challenge] = parse(transport.value())
        self.assertEqual(challenge.status, wire.CONTINUE)
        transport.clear()
        proto.dataReceived(proofFor(data, challenge, KEY))
        await turns(lambda: transport.disconnecting)
        self.assertEqual(await self.whohas(self.relay, "z"), [KEY.node])

    async def test_firewalledListedWithControl(self):
        """A node the relay cannot reach is hidden until it holds a control connection, then listed firewalled."""
        await self.register(self.relay, ["f.txt"], key=HIDDEN, port=6000)
        self.assertEqual(await self.peers(self.relay), [])
        proto, transport = await self.control(self.relay)
        self.assertEqual(await self.peers(self.relay), [(HIDDEN.node, "firewalled")])
        self.assertEqual(await self.whohas(self.relay, "f.txt"), [HIDDEN.node])
        proto.connectionLost(None)
        await turns(lambda: True)
        await self.peers(self.relay)  # one more round trip: the close is recorded by now
        self.assertEqual(await self.peers(self.relay), [])

    async def test_controlHeartbeat(self):
        """A heartbeat on a control connection is answered alive on it."""
        await self.register(self.relay, ["f.txt"], key=HIDDEN, port=6000)
        proto, transport = await self.control(self.relay)
        proto.dataReceived(wire.request(wire.HEARTBEAT, node=HIDDEN.node))
        await turns(lambda: transport.value())
        [alive] = parse(transport.value())
        self.assertEqual((alive.status, alive.text), (wire.OK, "alive"))

    async def test_reverseHere(self):
        """A REVERSE for a node whose control connection is at this relay becomes a CONNECT on it."""
        await self.register(self.relay, ["f.txt"], key=HIDDEN, port=6000)
        proto, transport = await self.control(self.relay)
        [reply] = await self.ask(self.relay, wire.request(wire.REVERSE, node=HIDDEN.node, port=7000, token="t" * 32), peer=ASKER)
        self.assertEqual(reply.status, wire.OK, reply)
        [order] = parse(transport.value())
        self.assertEqual((order.word, order.get("host"), order.get("port")), (wire.CONNECT, "10.7.7.7", "7000"))


class MemoryProtocolTests(SharedProtocolTests, TestCase):
    async def backend(self) -> Any:
        return MemoryBackend(Registry(reactor.seconds, TTL))


def server() -> redisserver.RedisServer:
    from tests.test_backends import server as shared

    return shared()


class RedisCase(Relays, TestCase):
    """Backends on a redis-server, each test under a prefix of its own."""

    url = None

    def setUp(self):
        self.case = self
        self.redis = server()
        self.prefix = f"relays{next(_prefixes)}:"

    async def backend(self, **options: Any) -> Any:
        options.setdefault("prefix", self.prefix)
        options.setdefault("timeout", SHORT)
        backend = await redisbackend.connect(parseURL(self.url or self.redis.url), reactor, ttl=TTL, **options)
        self.addCleanup(backend.close)
        return backend


class RedisProtocolTests(SharedProtocolTests, RedisCase):
    def setUp(self):
        RedisCase.setUp(self)
        return SharedProtocolTests.setUp(self)


class TwoRelaysTests(RedisCase):
    """Two relays (two factories, two Redis connections) on one Redis."""

    async def two(self):
        first, second = await self.backend(), await self.backend()
        self.boot = await first.epoch()
        a, b = self.factory(first), self.factory(second)
        await first.listen(a.orderForwarded)
        await second.listen(b.orderForwarded)
        return a, b

    async def test_sameAnswers(self):
        """A node registered at A is in the PEERS and WHOHAS of both, alike, with one boot."""
        a, b = await self.two()
        reply = await self.register(a, ["a.txt", "b.txt"])
        self.assertEqual(reply.get("boot"), b.boot)
        self.assertEqual(await self.peers(a), await self.peers(b))
        self.assertEqual(await self.whohas(b, "b.txt"), [KEY.node])
        self.assertEqual(await self.whohas(a, "b.txt"), await self.whohas(b, "b.txt"))

    async def test_heartbeatAtTheOther(self):
        """A node registered at A heartbeats at B (proved with the key the shared entry holds)."""
        a, b = await self.two()
        await self.register(a)
        reply = await self.heartbeat(b)
        self.assertEqual((reply.status, reply.get("boot")), (wire.OK, a.boot))

    async def test_proofCheckedAtTheOther(self):
        """A heartbeat at B for A's node, proved with another key, is refused."""
        a, b = await self.two()
        await self.register(a)
        [reply] = await self.ask(b, wire.request(wire.HEARTBEAT, node=KEY.node), key=HIDDEN)
        self.assertEqual(reply.status, wire.UNAUTHORIZED)

    async def test_relayStopped(self):
        """A relay that stops loses nothing: the other still lists its nodes."""
        a, b = await self.two()
        await self.register(a, ["a.txt"])
        await a.backend.close()
        self.assertEqual(await self.whohas(b, "a.txt"), [KEY.node])
        self.assertEqual((await self.heartbeat(b)).status, wire.OK)

    async def test_controlAtTheOther(self):
        """A firewalled node's control connection at A lists it at B too, until it closes."""
        a, b = await self.two()
        await self.register(a, ["f.txt"], key=HIDDEN, port=6000)
        proto, _ = await self.control(a)
        self.assertEqual(await self.peers(b), [(HIDDEN.node, "firewalled")])
        self.assertEqual(await self.whohas(b, "f.txt"), [HIDDEN.node])
        proto.connectionLost(None)
        await self.peers(a)  # the close recorded by the time this is answered
        self.assertEqual(await self.peers(b), [])

    async def test_controlHeartbeatRefreshes(self):
        """Heartbeats on A's control connection keep the record of it alive (its TTL renewed)."""
        a, b = await self.two()
        await self.register(a, ["f.txt"], key=HIDDEN, port=6000)
        proto, transport = await self.control(a)
        key = self.prefix + "control:" + HIDDEN.node
        await a.backend.client.execute_command("PEXPIRE", key, 1000)
        proto.dataReceived(wire.request(wire.HEARTBEAT, node=HIDDEN.node))
        await turns(lambda: transport.value())
        self.assertGreater(await a.backend.client.execute_command("PTTL", key), (TTL - 5) * 1000)

    async def test_reverseThroughTheOther(self):
        """A REVERSE at B reaches the node through A's control connection (Redis pub/sub)."""
        a, b = await self.two()
        await self.register(a, ["f.txt"], key=HIDDEN, port=6000)
        proto, transport = await self.control(a)
        [reply] = await self.ask(b, wire.request(wire.REVERSE, node=HIDDEN.node, port=7000, token="t" * 32), peer=ASKER)
        self.assertEqual(reply.status, wire.OK, reply)
        await turns(lambda: transport.value(), "order at A")
        [order] = parse(transport.value())
        self.assertEqual((order.word, order.get("token"), order.get("host"), order.get("port")),
                         (wire.CONNECT, "t" * 32, "10.7.7.7", "7000"))

    async def test_reverseWithoutControl(self):
        """A REVERSE at B for a node no relay holds a control connection of is 404."""
        a, b = await self.two()
        await self.register(a, ["f.txt"], key=HIDDEN, port=6000)
        [reply] = await self.ask(b, wire.request(wire.REVERSE, node=HIDDEN.node, port=7000, token="t" * 32), peer=ASKER)
        self.assertEqual(reply.status, wire.NOT_FOUND)

    async def test_relayAtTheOther(self):
        """A RELAY at B for a node whose control connection is at A is 404, saying so."""
        a, b = await self.two()
        await self.register(a, ["f.txt"], key=HIDDEN, port=6000)
        await self.control(a)
        [reply] = await self.ask(b, wire.request(wire.RELAY, node=HIDDEN.node, name="f.txt", size=1), peer=ASKER)
        self.assertEqual((reply.status, reply.text), (wire.NOT_FOUND, f"{HIDDEN.node}'s control connection is at another relay"))

    async def dead(self, factory: RelayFactory) -> wire.Message:
        [reply] = await self.ask(factory, wire.request(wire.DEAD, host="10.1.2.3", port=5000), peer=ASKER)
        return reply

    async def test_reportAllowanceShared(self):
        """One source's DEAD reports are one allowance at every relay: burst 2 spent at A and B, the third is 503."""
        first, second = await self.backend(), await self.backend()
        a, b = self.factory(first, reportBurst=2), self.factory(second, reportBurst=2)
        self.assertEqual([(await self.dead(relay)).status for relay in (a, b)], [wire.OK, wire.OK])
        reply = await self.dead(b)
        self.assertEqual((reply.status, reply.text), (wire.BUSY, "too many reports from your address"))
        self.assertIsNotNone(reply.get("retry"))
        self.assertEqual((await self.dead(a)).status, wire.BUSY)

    async def test_recheckShared(self):
        """A node re-checked at A on a DEAD report is not re-checked at B within the interval."""
        a, b = await self.two()
        await self.register(a)
        a.dialback.connector.dialled.clear()
        self.assertEqual((await self.dead(a)).text, "will check 1 peers")
        self.assertEqual((await self.dead(b)).text, "will check 0 peers")
        self.assertEqual(b.dialback.connector.dialled, [])

    async def test_missesAcrossRelays(self):
        """A probe missed at A (a node long direct) is seen at B, and a success at B clears it."""
        a, b = await self.two()
        await self.register(a)
        await a.backend.missed(KEY.node)
        self.assertEqual((await b.backend.get(KEY.node)).misses, 1)
        await b.backend.setReachable(KEY.node, True)
        self.assertEqual((await a.backend.get(KEY.node)).misses, 0)


class RegistryLostTests(RedisCase):
    """Redis unreachable while the relays run, restarted, back."""

    def setUp(self):
        self.case = self
        self.redis = redisserver.started(self)
        self.prefix = "lost:"

    async def test_unavailableThenBack(self):
        """Redis gone: 503 retry= saying the registry is unavailable, one warning; back: answers and one line."""
        relay = self.factory(await self.backend())
        await self.register(relay)
        self.redis.stop()
        with capturedLogs() as events:
            for _ in range(2):
                [reply] = await self.ask(relay, wire.request(wire.WHOHAS, name="a.txt"), peer=ASKER)
                self.assertEqual(reply.status, wire.BUSY)
                self.assertEqual(reply.get("retry"), "5")
                self.assertTrue(reply.text.startswith("the registry is unavailable ("), reply.text)
            self.redis.start()
            await answering(relay.backend)
            await self.register(relay)
            relay.registryBack()  # what the service's health look does on an answer
        lines = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("the registry is unavailable", lines[0])
        self.assertIn("the registry is available again", [formatEvent(e) for e in events])
        self.assertEqual(await self.whohas(relay, "a.txt"), [KEY.node])

    async def test_reportWhileUnavailable(self):
        """A DEAD report while Redis is gone (its allowance unknown) is 503 retry= saying the registry is unavailable."""
        relay = self.factory(await self.backend())
        self.redis.stop()
        [reply] = await self.ask(relay, wire.request(wire.DEAD, host="10.1.2.3", port=5000), peer=ASKER)
        self.assertEqual((reply.status, reply.get("retry")), (wire.BUSY, "5"))
        self.assertTrue(reply.text.startswith("the registry is unavailable ("), reply.text)

    async def test_handshakeRefusedThenFine(self):
        """A Redis that refuses a reconnection's handshake (txredisapi then gives up) is reconnected to once it is fine."""
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("first\n")
        guarded = redisserver.started(self, password="first")
        service = RelayService(reactor, "tcp:0:interface=127.0.0.1", TTL, registry=parseURL(guarded.url, secret))
        service.startService()
        self.addCleanup(service.stopService)
        admin = await redisbackend.connect(parseURL(guarded.url, secret), reactor, prefix="admin:", timeout=SHORT)
        self.addCleanup(admin.close)
        await service.backend.client.ping()
        await admin.client.execute_command("CONFIG", "SET", "requirepass", "second")
        await admin.client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await turns(lambda: service.backend.client._factory.stopped, "txredisapi giving up")
        await admin.client.execute_command("CONFIG", "SET", "requirepass", "first")
        await service._look()  # fails (the connection is gone for good), and revives it
        await answering(service.backend)
        await service._look()
        self.assertIsNone(service.factory.registryDown)

    async def test_restartedNewEpoch(self):
        """Redis restarted empty: the service's health look takes up the new epoch as boot=; the node re-registers."""
        service = RelayService(reactor, "tcp:0:interface=127.0.0.1", TTL, registry=parseURL(self.redis.url))
        service.startService()
        self.addCleanup(service.stopService)
        relay = service.factory
        old = relay.boot
        self.assertEqual(old, await service.backend.epoch(), "boot= is the registry's epoch")
        relay.dialback = self.factory(MemoryBackend(Registry(reactor.seconds))).dialback
        await self.register(relay)
        self.redis.restart()
        await answering(relay.backend)
        self.assertEqual((await self.heartbeat(relay)).status, wire.NOT_FOUND, "the registry lost it")
        await service._look()
        self.assertNotEqual(relay.boot, old)
        reply = await self.register(relay)
        self.assertEqual(reply.get("boot"), relay.boot)
        self.assertEqual((await self.heartbeat(relay)).status, wire.OK)

    async def test_metricsFromTheSharedRegistry(self):
        """With --metrics, the peers and entries gauges count the shared registry (a cached count)."""
        service = RelayService(reactor, "tcp:0:interface=127.0.0.1", TTL, registry=parseURL(self.redis.url),
                               metrics="tcp:0:interface=127.0.0.1")
        service.startService()
        self.addCleanup(service.stopService)
        relay = service.factory
        relay.dialback = self.factory(MemoryBackend(Registry(reactor.seconds))).dialback
        await self.register(relay, ["a.txt", "b.txt"])
        gauges = service.metrics.registry
        gauges.get_sample_value("p2prelay_relay_peers")  # a scrape: starts the count
        await turns(lambda: gauges.get_sample_value("p2prelay_relay_peers") == 1, "the count")
        self.assertEqual(gauges.get_sample_value("p2prelay_relay_index_entries"), 2)

    async def test_twoServicesOneBoot(self):
        """Two relay services on one Redis answer with the same boot=; one restarted keeps it."""
        first = RelayService(reactor, "tcp:0:interface=127.0.0.1", TTL, registry=parseURL(self.redis.url))
        second = RelayService(reactor, "tcp:0:interface=127.0.0.1", TTL, registry=parseURL(self.redis.url))
        first.startService()
        second.startService()
        self.addCleanup(second.stopService)
        self.assertEqual(first.factory.boot, second.factory.boot)
        await first.stopService()
        again = RelayService(reactor, "tcp:0:interface=127.0.0.1", TTL, registry=parseURL(self.redis.url))
        again.startService()
        self.addCleanup(again.stopService)
        self.assertEqual(again.factory.boot, second.factory.boot)


class UnreachableAtStartTests(SynchronousTestCase):
    """A relay whose Redis cannot be had does not start."""

    def test_exit1(self):
        """Under twistd, no Redis at --registry is one critical line naming it, exit 1, and no port bound."""
        port = redisserver.freePort()
        service = RelayService(reactor, "tcp:0:interface=127.0.0.1", TTL,
                               registry=parseURL(f"redis://127.0.0.1:{port}/0"))
        self.addCleanup(service.backend.client.disconnect)
        with capturedLogs() as events:
            with self.assertRaises(SystemExit) as caught:
                service.privilegedStartService()
        self.assertEqual(caught.exception.code, 1)
        [line] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(
            line, f"relay cannot start: cannot reach the registry's Redis at 127.0.0.1:{port} db 0: Connection refused"
        )
        self.assertIsNone(service.listener.port)

    def test_wrongPassword(self):
        """A Redis refusing the password fails the start with one line saying so (never the password)."""
        guarded = redisserver.started(self, password="right")
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("wrong\n")
        service = RelayService(reactor, "tcp:0:interface=127.0.0.1", TTL, registry=parseURL(guarded.url, secret))
        self.addCleanup(service.backend.client.disconnect)
        with capturedLogs() as events:
            self.assertRaises(SystemExit, service.privilegedStartService)
        [line] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.critical]
        self.assertIn("refused the relay", line)
        self.assertNotIn("wrong", line.replace("WRONGPASS", ""))


class CachedFiguresTests(SynchronousTestCase):
    """The metrics' figures of a shared registry are counted at most every few seconds."""

    def test_cached(self):
        """Scrapes within FIGURES_MAX_AGE read the last count; one after starts a new one."""
        from twisted.internet.defer import succeed

        from p2prelay.relay.registry import Figures
        from p2prelay.relay.service import FIGURES_MAX_AGE, CachedFigures

        clock = Clock()
        counted = []

        def figures():
            counted.append(clock.seconds())
            return succeed(Figures(len(counted), 0, 10 * len(counted), 0))

        cache = CachedFigures(figures, clock.seconds)
        self.assertEqual(cache.current().peers, 1)
        clock.advance(FIGURES_MAX_AGE / 2)
        self.assertEqual(cache.current().peers, 1)
        self.assertEqual(len(counted), 1)
        clock.advance(FIGURES_MAX_AGE)
        self.assertEqual(cache.current().entries, 20)
        self.assertEqual(len(counted), 2)


