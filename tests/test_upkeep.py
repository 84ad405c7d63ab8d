"""
The registrar (node/upkeep.py): a node's registration kept true at the
relay over time, and taken back on stop from whatever state the loop is in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2prelay.client.relay import QUERY_TIMEOUT
from p2prelay.identity import NodeKey
from p2prelay.node.server import FileServerFactory
from p2prelay.node.upkeep import MAX_RETRY, STOP_TIMEOUT, Registrar
from p2prelay.relay.dialback import DialBack
from p2prelay.relay.registry import Registry
from p2prelay.relay.protocol import RelayFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.wire import FileEntry

from .memory import flushPumps

TTL = 90.0
NODE = IPv4Address("TCP", "127.0.0.1", 40001)
RELAY = IPv4Address("TCP", "127.0.0.1", 8000)
KEY = NodeKey.generate()
NODE_ID = KEY.node


def syncThread(f, *args):
    return maybeDeferred(f, *args)


class _RelaySideTransport(iosim.FakeTransport):
    """The relay's end of a connection; notes the verb of each request."""

    def __init__(self, protocol, relay: "FakeRelay") -> None:
        super().__init__(protocol, True, peerAddress=NODE)
        self.relay = relay
        self.heard = False

    def bufferReceived(self, buf: bytes) -> None:
        if not self.heard:
            self.heard = True
            self.relay.requests.append((self.relay.clock.seconds(), buf.split(b" ", 2)[1].decode()))
        super().bufferReceived(buf)


class FakeRelay:
    """
    A client endpoint reaching a real relay in memory; while ``down`` it
    refuses connections, like a relay that is not running.
    """

    def __init__(self, clock: Clock, factory: RelayFactory) -> None:
        self.clock = clock
        self.factory = factory
        self.down = False
        self.pumps: list[iosim.IOPump] = []
        self.attempts: list[float] = []
        self.requests: list[tuple[float, str]] = []

    def connect(self, clientFactory):
        self.attempts.append(self.clock.seconds())
        if self.down:
            return fail(ConnectionRefusedError())
        server = self.factory.buildProtocol(NODE)
        client = clientFactory.buildProtocol(None)
        self.pumps.append(
            iosim.connect(
                server,
                _RelaySideTransport(server, self),
                client,
                iosim.FakeTransport(client, False),
                greet=False,
                clock=self.clock,
            )
        )
        return succeed(client)

    def dialBack(self, nodeFactory) -> DialBack:
        """The relay's dial-back, reaching ``nodeFactory`` in memory over these pumps."""
        return DialBack(self.clock, lambda host, port: _NodeEndpoint(self, nodeFactory))

    def flush(self) -> None:
        flushPumps(self.pumps)

    def verbs(self) -> list[str]:
        return [verb for _, verb in self.requests]


class _NodeEndpoint:
    """The relay's dial-back connection to the node's file server, in memory."""

    def __init__(self, relay: FakeRelay, factory) -> None:
        self.relay = relay
        self.factory = factory

    def connect(self, clientFactory):
        server = self.factory.buildProtocol(RELAY)
        client = clientFactory.buildProtocol(None)
        self.relay.pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, True, peerAddress=RELAY),
                client,
                iosim.FakeTransport(client, False),
                greet=False,
                clock=self.relay.clock,
            )
        )
        return succeed(client)



class RegistrarTestCase(SynchronousTestCase):
    ttl = TTL

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock.seconds, self.ttl)
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()
        (self.root / "a.txt").write_bytes(b"alpha")
        self.share = SharedDirectory(self.root, runInThread=syncThread)
        self.successResultOf(self.share.scan())
        self.relay = FakeRelay(self.clock, None)
        self.relay.factory = RelayFactory(
            self.registry,
            self.clock,
            dialback=self.relay.dialBack(FileServerFactory(self.share, self.clock, key=KEY)),
        )
        self.registrar: Registrar | None = None

    def start(self, rng=lambda: 0.5, rescan=None, **kw) -> Registrar:
        self.registrar = Registrar(
            self.clock, self.relay, self.share, KEY, 7000, rng=rng, rescan=rescan, **kw
        )
        self.registrar.start()
        self.addCleanup(self.stop)
        self.advance(0)
        return self.registrar

    def stop(self):
        d = ensureDeferred(self.registrar.stop())
        self.relay.flush()
        return self.successResultOf(d)

    def startInFlight(self, **kw) -> Registrar:
        """Start, with the first REGISTER sent but not yet answered."""
        self.registrar = Registrar(
            self.clock, self.relay, self.share, KEY, 7000, rng=lambda: 0.5, rescan=None, **kw
        )
        self.registrar.start()
        self.addCleanup(self.stop)
        self.clock.advance(0)
        return self.registrar

    def advance(self, seconds: float) -> None:
        """Let time pass, delivering traffic at every moment something is due."""
        end = self.clock.seconds() + seconds
        self.relay.flush()
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.clock.rightNow = max(self.clock.seconds(), min(due))
            self.clock.advance(0)
            self.relay.flush()
        self.clock.rightNow = end
        self.clock.advance(0)
        self.relay.flush()

    def gaps(self, times: list[float]) -> list[float]:
        return [round(b - a, 6) for a, b in zip(times, times[1:])]


class RegistrationTests(RegistrarTestCase):
    def test_firstRegistration(self):
        """Starting registers at once, with every shared file."""
        registrar = self.start()
        self.assertEqual(self.relay.requests, [(0, "REGISTER")])
        peer = self.registry.get(NODE_ID)
        self.assertEqual((peer.host, peer.port, list(peer.files)), ("127.0.0.1", 7000, ["a.txt"]))
        self.assertEqual(peer.files["a.txt"].sha256, hashlib.sha256(b"alpha").hexdigest())
        self.assertTrue(registrar.registered)

    def test_firstRegistrationFires(self):
        """firstRegistration fires with the relay's reply, naming the host it saw."""
        registrar = self.start()
        reply = self.successResultOf(registrar.firstRegistration)
        self.assertEqual(reply.status.get("host"), "127.0.0.1")

    def test_learnsRelay(self):
        """The registrar adopts the relay's ttl and boot id."""
        registrar = self.start()
        self.assertEqual((registrar.ttl, registrar.boot), (TTL, self.relay.factory.boot))

    def test_advertiseAndUdp(self):
        """advertise= and udp= are what the relay records."""
        self.start(advertise="node.example", udp=7001)
        peer = self.registry.get(NODE_ID)
        self.assertEqual((peer.host, peer.udp), ("node.example", 7001))

    def test_advertisedPorts(self):
        """advertisePort= and advertiseUdp= (a router's forwarded ports) are registered instead of the bound ones."""
        self.start(advertise="203.0.113.7", advertisePort=17000, udp=7001, advertiseUdp=17001)
        peer = self.registry.get(NODE_ID)
        self.assertEqual((peer.host, peer.port, peer.udp), ("203.0.113.7", 17000, 17001))

    def test_advertisedPortLogged(self):
        """The announcement names the port registered, not the one bound."""
        with capturedLogs() as events:
            self.start(advertisePort=17000)
        [line] = [formatEvent(e) for e in events if "announced" in formatEvent(e)]
        self.assertIn(":17000", line)

    def test_advertiseUdpWithoutUdp(self):
        """A node serving no UDP registers none, whatever advertiseUdp says."""
        self.start(advertiseUdp=17001)
        self.assertIsNone(self.registry.get(NODE_ID).udp)

    def test_emptyShare(self):
        """A node with nothing shared still registers (it may download later)."""
        self.share.entries.clear()
        self.start()
        self.assertEqual(self.registry.get(NODE_ID).files, {})


class HeartbeatTests(RegistrarTestCase):
    def test_ttlThird(self):
        """By default a heartbeat goes every third of the relay's ttl."""
        self.start()
        self.advance(TTL)
        self.assertEqual(self.relay.requests, [(0, "REGISTER"), (30, "HEARTBEAT"), (60, "HEARTBEAT"), (90, "HEARTBEAT")])

    def test_configured(self):
        """A configured heartbeat interval wins over the ttl."""
        self.start(heartbeat=7)
        self.advance(21)
        self.assertEqual(self.relay.requests, [(0, "REGISTER"), (7, "HEARTBEAT"), (14, "HEARTBEAT"), (21, "HEARTBEAT")])

    def test_staysRegistered(self):
        """Heartbeats keep the node listed long past one ttl."""
        self.start()
        self.advance(TTL * 10)
        self.assertIsNotNone(self.registry.get(NODE_ID))
        self.assertEqual(self.relay.verbs().count("REGISTER"), 1)


class ShortTtlTests(RegistrarTestCase):
    ttl = 12.0

    def test_followsRelayTtl(self):
        """The interval follows the ttl the relay grants, not the assumed one."""
        self.start()
        self.advance(12)
        self.assertEqual([t for t, _ in self.relay.requests], [0, 4, 8, 12])


class BackoffTests(RegistrarTestCase):
    def test_exponential(self):
        """While the relay is unreachable, retries back off exponentially with jitter, up to a cap."""
        self.relay.down = True
        self.start(rng=lambda: 0.5)
        self.advance(200)
        gaps = self.gaps(self.relay.attempts)
        # base 1, 2, 4 ... times 0.75; capped at 1.5 heartbeat intervals (45 s).
        self.assertEqual(gaps[:8], [0.75, 1.5, 3, 6, 12, 24, 33.75, 33.75])
        self.assertEqual(set(gaps[6:]), {33.75})

    def test_jitter(self):
        """Each retry delay is between half and all of its base, as the rng says."""
        draws = iter([0.0, 1.0, 0.5, 0.0])
        self.relay.down = True
        self.start(rng=lambda: next(draws))
        self.advance(7)
        self.assertEqual(self.gaps(self.relay.attempts), [0.5, 2.0, 3.0])

    def test_capBelowHeartbeat(self):
        """Backoff never exceeds one and a half heartbeat intervals."""
        self.relay.down = True
        self.start(heartbeat=2)
        self.advance(12)
        self.assertEqual(set(self.gaps(self.relay.attempts)[2:]), {2.25})

    def test_recovers(self):
        """When the relay comes back, the next retry registers and heartbeats resume on time."""
        self.relay.down = True
        self.start()
        self.advance(10)
        self.relay.down = False
        self.advance(2)  # next retry due at 11.25
        self.assertEqual(self.relay.requests, [(11.25, "REGISTER")])
        self.advance(30)
        self.assertEqual(self.relay.requests[-1], (41.25, "HEARTBEAT"))
        self.assertIsNotNone(self.registry.get(NODE_ID))

    def test_heartbeatRetry(self):
        """A heartbeat that cannot reach the relay is retried with backoff, not dropped."""
        self.start()
        self.relay.down = True
        self.advance(31)
        self.relay.down = False
        self.advance(2)
        self.assertEqual(self.relay.requests, [(0, "REGISTER"), (30.75 + 1.5, "HEARTBEAT")])
        self.assertEqual(self.gaps(self.relay.attempts[1:]), [0.75, 1.5])


class RelayChangeTests(RegistrarTestCase):
    def test_forgotten(self):
        """A heartbeat answered 404 (the relay forgot us) leads to a full registration."""
        self.start()
        self.registry.unregister(NODE_ID)
        self.advance(31)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "HEARTBEAT", "REGISTER"])
        self.assertEqual(self.relay.requests[-1][0], 30.5)
        self.assertEqual(list(self.registry.get(NODE_ID).files), ["a.txt"])

    def test_relayRestarted(self):
        """A relay restarted with an empty registry gets the node back within one heartbeat."""
        self.start()
        self.registry = Registry(self.clock.seconds, TTL)
        self.relay.factory = RelayFactory(
            self.registry, self.clock, dialback=self.relay.factory.dialback
        )
        self.advance(31)
        self.assertIsNotNone(self.registry.get(NODE_ID))
        self.assertEqual(self.registrar.boot, self.relay.factory.boot)

    def test_bootChanged(self):
        """A heartbeat answered by a relay with another boot id leads to re-registration after jitter."""
        self.start()
        self.relay.factory.boot = "restarted"
        self.advance(31)
        self.assertEqual(self.relay.requests, [(0, "REGISTER"), (30, "HEARTBEAT"), (30.5, "REGISTER")])

    def test_restartJitter(self):
        """The re-registration delay after a relay restart comes from the rng, up to a second."""
        draws = iter([0.25])
        self.start(rng=lambda: next(draws))
        self.relay.factory.boot = "restarted"
        self.advance(31)
        self.assertEqual(self.relay.requests[-1], (30.25, "REGISTER"))


class RescanTests(RegistrarTestCase):
    def test_newFile(self):
        """A rescan that finds a new file re-registers with it."""
        self.start(rescan=10)
        (self.root / "b.txt").write_bytes(b"beta")
        self.advance(10)
        self.assertEqual(self.relay.requests, [(0, "REGISTER"), (10, "REGISTER")])
        self.assertEqual(sorted(self.registry.get(NODE_ID).files), ["a.txt", "b.txt"])

    def test_removedFile(self):
        """A rescan that finds a file gone re-registers without it."""
        self.start(rescan=10)
        (self.root / "a.txt").unlink()
        self.advance(10)
        self.assertEqual(self.registry.get(NODE_ID).files, {})

    def test_nothingChanged(self):
        """Rescans that find no change send nothing extra."""
        self.start(rescan=10)
        self.advance(29)
        self.assertEqual(self.relay.verbs(), ["REGISTER"])

    def test_changeDuringRegistration(self):
        """Files changing while a registration is in flight are registered right after it."""
        self.registrar = Registrar(self.clock, self.relay, self.share, KEY, 7000, rng=lambda: 0.5, rescan=None)
        self.registrar.start()
        self.addCleanup(self.stop)
        self.clock.advance(0)  # the first REGISTER is sent but not answered yet
        self.share.add(FileEntry("late.txt", 1, "c" * 64))
        self.registrar.registerSoon()
        self.relay.flush()
        self.assertEqual(self.relay.requests, [(0, "REGISTER"), (0, "REGISTER")])
        self.assertIn("late.txt", self.registry.get(NODE_ID).files)


class StopTests(RegistrarTestCase):
    def test_unregisters(self):
        """stop() sends UNREGISTER, so clients stop being sent here."""
        self.start()
        self.stop()
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertIsNone(self.registry.get(NODE_ID))
        self.assertFalse(self.registrar.registered)

    def test_quiet(self):
        """After stop() no timer is left and nothing more is sent."""
        self.start(rescan=10)
        self.advance(5)
        self.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.advance(TTL)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])

    def test_neverRegistered(self):
        """stop() before any registration succeeded contacts nobody."""
        self.relay.down = True
        self.start()
        attempts = len(self.relay.attempts)
        self.stop()
        self.assertEqual(len(self.relay.attempts), attempts)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_relayGone(self):
        """stop() when the relay has gone away finishes anyway."""
        self.start()
        self.relay.down = True
        self.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SilentRelay(Protocol):
    """A relay that accepts connections and never answers."""


class StopInEveryStateTests(RegistrarTestCase):
    """
    stop() from each state of the loop: whatever the loop was doing, the
    relay is left holding no entry for this node, no timer is left behind,
    and nothing is sent afterwards.
    """

    def assertStoppedClean(self) -> None:
        self.assertIsNone(self.registry.get(NODE_ID))
        self.assertFalse(self.registrar.registered)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        sent = len(self.relay.requests)
        self.registrar.registerSoon()
        self.advance(TTL * 2)
        self.assertEqual(len(self.relay.requests), sent, self.relay.verbs())

    def test_idle(self):
        """stop() before start() contacts nobody and leaves nothing behind."""
        self.registrar = Registrar(self.clock, self.relay, self.share, KEY, 7000, rescan=10)
        self.stop()
        self.assertEqual(self.relay.attempts, [])
        self.assertStoppedClean()

    def test_firstRegisterInFlight(self):
        """stop() while the first REGISTER is unanswered unregisters after its answer: no ghost."""
        self.startInFlight()
        self.stop()
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertStoppedClean()

    def test_firstRegisterReceivedNotAnswered(self):
        """stop() after the relay took the REGISTER but before its answer arrived leaves no ghost."""
        self.startInFlight()
        [exchange] = self.relay.pumps
        for _ in range(3):  # REGISTER, the relay's challenge, the PROOF
            exchange.pump()
        flushPumps(self.relay.pumps[1:])  # the dial-back; the relay's answer is on the way
        self.assertIsNotNone(self.registry.get(NODE_ID))
        self.stop()
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertStoppedClean()

    def test_registerInFlightWaitIsBounded(self):
        """A REGISTER the relay never answers holds stop() up for STOP_TIMEOUT at most, then stop unregisters anyway."""
        self.relay.factory = Factory.forProtocol(SilentRelay)
        self.startInFlight()
        d = ensureDeferred(self.registrar.stop())
        self.relay.flush()
        self.advance(STOP_TIMEOUT)
        self.assertNoResult(d)  # now sending the UNREGISTER, to a relay as silent
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.advance(STOP_TIMEOUT)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_staleRegisterInFlight(self):
        """stop() while a REGISTER is in flight and files changed since sends no second REGISTER."""
        self.startInFlight()
        self.share.add(FileEntry("late.txt", 1, "c" * 64))
        self.registrar.registerSoon()
        self.stop()
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertStoppedClean()

    def test_stopTwiceDuringRegister(self):
        """A second stop() while the first waits for the REGISTER's answer finishes with it; one UNREGISTER."""
        self.startInFlight()
        first = ensureDeferred(self.registrar.stop())
        second = ensureDeferred(self.registrar.stop())
        self.assertNoResult(second)
        self.relay.flush()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertStoppedClean()

    def test_waitingToHeartbeat(self):
        """stop() between heartbeats cancels the next one and unregisters."""
        self.start(rescan=10)
        self.advance(15)
        self.stop()
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertStoppedClean()

    def test_heartbeatInFlight(self):
        """stop() while a HEARTBEAT is unanswered abandons it and unregisters."""
        self.start()
        self.advance(29)
        self.clock.advance(1)  # the heartbeat is sent, not answered
        self.stop()
        self.assertEqual(self.relay.verbs()[-1], "UNREGISTER")
        self.assertNotIn("REGISTER", self.relay.verbs()[1:])
        self.assertStoppedClean()

    def test_staleHeartbeatInFlight(self):
        """stop() while a HEARTBEAT is in flight and files changed since sends no REGISTER."""
        self.start()
        self.advance(29)
        self.clock.advance(1)
        self.share.add(FileEntry("late.txt", 1, "c" * 64))
        self.registrar.registerSoon()
        self.stop()
        self.assertNotIn("REGISTER", self.relay.verbs()[1:])
        self.assertStoppedClean()

    def test_backingOffAfterHeartbeatFailed(self):
        """stop() while retrying a heartbeat the relay did not take unregisters (the relay may still list us)."""
        self.start()
        self.relay.down = True
        self.advance(31)
        self.relay.down = False
        self.stop()
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertStoppedClean()

    def test_backingOffNeverRegistered(self):
        """stop() while retrying a first REGISTER that never reached the relay contacts nobody."""
        self.relay.down = True
        self.start()
        self.advance(5)
        self.relay.down = False
        attempts = len(self.relay.attempts)
        self.stop()
        self.assertEqual(len(self.relay.attempts), attempts)
        self.assertStoppedClean()

    def test_registerDueWhileRegistered(self):
        """stop() while a re-registration waits out its jitter unregisters instead."""
        self.start()
        self.registrar.registerSoon(jitter=1.0)  # due in 0.5 s
        self.stop()
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertStoppedClean()

    def test_registerDueAfterForgotten(self):
        """stop() after the relay said it forgot us (404), before registering again, sends nothing."""
        self.start()
        self.registry.unregister(NODE_ID)
        self.advance(30.25)  # HEARTBEAT answered 404; REGISTER due at 30.5
        self.stop()
        self.assertEqual(self.relay.verbs(), ["REGISTER", "HEARTBEAT"])
        self.assertStoppedClean()

    def test_unregisterInFlight(self):
        """A second stop() while the UNREGISTER is in flight waits for it; nothing more is sent."""
        self.start()
        first = ensureDeferred(self.registrar.stop())
        second = ensureDeferred(self.registrar.stop())
        self.assertNoResult(second)
        self.relay.flush()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertStoppedClean()

    def test_stopped(self):
        """stop() on a stopped registrar returns at once and sends nothing."""
        self.start()
        self.stop()
        self.successResultOf(ensureDeferred(self.registrar.stop()))
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertStoppedClean()

    def test_rescanInFlight(self):
        """A rescan that finishes after stop() finds changes but registers nothing."""
        scans: list[Deferred] = []

        def slowThread(f, *args):
            d = Deferred()
            d.addCallback(lambda _: f(*args))
            scans.append(d)
            return d

        self.share = SharedDirectory(self.root, runInThread=slowThread)
        self.share.entries = {}
        self.start(rescan=10)
        self.advance(10)
        self.assertEqual(len(scans), 1)  # the rescan is walking the folder
        self.stop()
        while scans:
            scans.pop(0).callback(None)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertStoppedClean()

    def test_uncertainRegisterUnregistered(self):
        """A REGISTER that timed out may have landed: a later stop() unregisters anyway."""
        self.relay.factory = Factory.forProtocol(SilentRelay)
        self.start()
        self.advance(QUERY_TIMEOUT + 0.5)  # timed out at 15; the retry is due at 15.75
        d = ensureDeferred(self.registrar.stop())
        self.advance(STOP_TIMEOUT)
        self.successResultOf(d)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class IdentityTests(RegistrarTestCase):
    """The registrar's side of the relay's challenges."""

    SECRET = b"the network's shared secret"

    def closedRelay(self) -> None:
        self.relay.factory.secret = self.SECRET

    def test_registersUnderKeyId(self):
        """The relay records the node under its key's id, with its key."""
        self.start()
        peer = self.registry.get(KEY.node)
        self.assertEqual(peer.key, KEY.public)
        self.assertTrue(self.registrar.reachable)

    def test_heartbeatAndUnregisterProved(self):
        """Heartbeats and the UNREGISTER on stop pass the relay's proof checks."""
        self.start()
        self.advance(TTL)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "HEARTBEAT", "HEARTBEAT", "HEARTBEAT"])
        self.assertIsNotNone(self.registry.get(KEY.node))
        self.stop()
        self.assertIsNone(self.registry.get(KEY.node))

    def test_secret(self):
        """With the relay's secret, a closed relay registers the node."""
        self.closedRelay()
        self.start(secret=self.SECRET)
        self.assertIsNotNone(self.registry.get(KEY.node))

    def test_secretMissing(self):
        """A closed relay and no secret: nothing registered, the log says --secret-file, retried later."""
        self.closedRelay()
        with capturedLogs() as events:
            self.start()
        self.assertIsNone(self.registry.get(KEY.node))
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("--secret-file", text)
        self.advance(1)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "REGISTER"])

    def test_wrongSecret(self):
        """A wrong secret is refused (401) and backed off from, never registered."""
        self.closedRelay()
        self.start(secret=b"some other secret entirely")
        self.assertIsNone(self.registry.get(KEY.node))
        self.assertFalse(self.registrar.registered)

    def test_unreachableWarned(self):
        """A relay that cannot dial the node back: registered, reachable False, one warning."""
        self.relay.factory.dialback = DialBack(
            self.clock, lambda host, port: _Refusing()
        )
        with capturedLogs() as events:
            self.start()
            self.advance(0)
        self.assertTrue(self.registrar.registered)
        self.assertFalse(self.registrar.reachable)
        warnings = [formatEvent(e) for e in events if "cannot reach this node" in formatEvent(e)]
        self.assertEqual(len(warnings), 1)
        self.assertIn("connection refused", warnings[0])

    def test_retryHonoured(self):
        """A 503 retry=N makes the registrar wait at least N seconds (capped at MAX_RETRY)."""
        self.registry.maxTotal = 0  # full: 503 retry=90 (the ttl)
        self.start()
        self.assertIsNone(self.registry.get(KEY.node))
        self.advance(MAX_RETRY - 1)
        self.assertEqual(self.relay.verbs(), ["REGISTER"])
        self.advance(1)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "REGISTER"])


class _Refusing:
    def connect(self, factory):
        return fail(ConnectionRefusedError())


class FakeChannel:
    """A control connection as the registrar sees it: open or not, heartbeats answered by the test."""

    def __init__(self, isOpen: bool = True) -> None:
        self.isOpen = isOpen
        self.heartbeats: list[Deferred] = []

    def heartbeat(self) -> Deferred:
        d: Deferred = Deferred()
        self.heartbeats.append(d)
        return d


class ChannelTests(RegistrarTestCase):
    """Heartbeats over a firewalled node's control connection, and what their answers say."""

    def alive(self, reachable: object = 0):
        from p2prelay import wire

        return wire.parseLine(
            wire.status(wire.OK, "alive", ttl=90, boot=self.relay.factory.boot, reachable=reachable)
        )

    def firewalled(self, channel: FakeChannel) -> Registrar:
        self.relay.factory.dialback = DialBack(self.clock, lambda host, port: _Refusing())
        registrar = self.start()
        registrar.channel = channel
        return registrar

    def test_heartbeatOverChannel(self):
        """With the control connection open, a heartbeat goes over it, not as a HEARTBEAT connection."""
        channel = FakeChannel()
        self.firewalled(channel)
        self.advance(30)
        self.assertEqual(self.relay.verbs(), ["REGISTER"])
        self.assertEqual(len(channel.heartbeats), 1)

    def test_answeredOverChannel(self):
        """A heartbeat answered over the channel schedules the next one an interval later, over it too."""
        channel = FakeChannel()
        self.firewalled(channel)
        self.advance(30)
        channel.heartbeats[0].callback(self.alive())
        self.advance(30)
        self.assertEqual(len(channel.heartbeats), 2)
        self.assertEqual(self.relay.verbs(), ["REGISTER"])

    def test_closedChannel(self):
        """A channel that is not open leaves heartbeats to their own connections."""
        channel = FakeChannel(isOpen=False)
        self.firewalled(channel)
        self.advance(30)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "HEARTBEAT"])
        self.assertEqual(channel.heartbeats, [])

    def test_notFoundOverChannel(self):
        """A 404 over the channel (the relay forgot us) leads to a full registration."""
        from p2prelay import wire

        channel = FakeChannel()
        self.firewalled(channel)
        self.advance(30)
        channel.heartbeats[0].errback(wire.ProtocolError(wire.NOT_FOUND, "unknown node; register again"))
        self.advance(1)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "REGISTER"])

    def test_newBootOverChannel(self):
        """An answer over the channel from a relay with a new boot id leads to a full registration."""
        from p2prelay import wire

        channel = FakeChannel()
        self.firewalled(channel)
        self.advance(30)
        channel.heartbeats[0].callback(wire.parseLine(wire.status(wire.OK, "alive", ttl=90, boot="other")))
        self.advance(1)
        self.assertEqual(self.relay.verbs(), ["REGISTER", "REGISTER"])

    def test_reachableLearnt(self):
        """The registrar learns reachable= from heartbeat answers and tells onReachable each time."""
        channel = FakeChannel()
        told: list[bool] = []
        registrar = self.firewalled(channel)
        registrar.onReachable = told.append
        self.advance(30)
        channel.heartbeats[0].callback(self.alive(1))
        self.assertTrue(registrar.reachable)
        self.assertEqual(told, [True])

    def test_reachableToldOnRegistration(self):
        """A registration answered reachable=0 tells onReachable False."""
        self.relay.factory.dialback = DialBack(self.clock, lambda host, port: _Refusing())
        told: list[bool] = []
        registrar = Registrar(self.clock, self.relay, self.share, KEY, 7000, rng=lambda: 0.5, rescan=None)
        registrar.onReachable = told.append
        self.registrar = registrar
        registrar.start()
        self.addCleanup(self.stop)
        self.advance(0)
        self.assertEqual(told, [False])

    def test_silentAnswerChangesNothing(self):
        """A heartbeat answer without reachable= leaves what the registrar knows as it was."""
        channel = FakeChannel()
        told: list[bool] = []
        registrar = self.firewalled(channel)
        registrar.onReachable = told.append
        self.advance(30)
        channel.heartbeats[0].callback(self.alive(None))
        self.assertFalse(registrar.reachable)
        self.assertEqual(told, [])
