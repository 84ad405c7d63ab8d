"""
A firewalled node's control connection (node/control.py): the handshake
and its proof, heartbeats over it, the relay's CONNECT orders carried out
(reverse and relayed), the cap on orders, reconnection with backoff, and
the node service switching it on and off as the relay says.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, Cooperator
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import identity, wire
from p2prelay.identity import NodeKey
from p2prelay.node.control import (
    CONNECT_TIMEOUT,
    HEARTBEAT_TIMEOUT,
    MAX_ORDERS,
    ControlConnection,
    NotOpen,
)
from p2prelay.node.server import FileServerFactory
from p2prelay.node.share import SharedDirectory

from .support import MemoryNetwork

KEY = NodeKey.generate()
SECRET = b"a shared secret of the network"
BOOT = "b00t"


def syncThread(f, *args):
    return maybeDeferred(f, *args)


class FakeRelay:
    """
    What the tests script a relay to do, shared by every connection made
    to it: answer CONTROL (challenge, then check the PROOF exactly as the
    relay does), heartbeats, REGISTER; and act as the client of a circuit.
    """

    def __init__(self) -> None:
        self.connections: list[RelaySide] = []
        self.secret: bytes | None = None
        self.refusal: bytes | None = None  # answer CONTROL with this instead of a challenge
        self.circuitRefusal: bytes | None = None  # answer CIRCUIT with this instead of a GET
        self.heartbeatAnswer: bytes | None = wire.status(wire.OK, "alive", ttl=90, boot=BOOT, reachable=0)
        self.reachable = 0  # what REGISTER answers say
        self.registrations = 0
        self.proofs: list[bool] = []

    def factory(self) -> Factory:
        return Factory.forProtocol(lambda: RelaySide(self))

    @property
    def controls(self) -> list["RelaySide"]:
        return [c for c in self.connections if c.verb == wire.CONTROL]


class RelaySide(LineReceiver):
    """The relay's end of one connection from the node."""

    delimiter = b"\n"

    def __init__(self, relay: FakeRelay) -> None:
        self.relay = relay
        self.lines: list[bytes] = []
        self.verb: str | None = None
        self.received = hashlib.sha256()  # every byte before PROOF, as the relay hashes it
        self.nonce: str | None = None
        self.open = False
        self.lost = False
        self.body = b""
        self.files = 0

    def connectionMade(self) -> None:
        self.relay.connections.append(self)

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        message = wire.parseLine(line)
        if self.verb is None:
            self.verb = message.word
            self.received.update(line + self.delimiter)
            self.first(message)
        elif self.verb == wire.CONTROL and message.word == wire.PROOF:
            self.proved(message)
        elif self.verb == wire.REGISTER:
            if message.word == wire.END:
                self.relay.registrations += 1
                self.transport.write(
                    wire.status(wire.OK, "registered", ttl=90, boot=BOOT, host="127.0.0.1",
                                reachable=self.relay.reachable)
                )
                self.transport.loseConnection()
        elif self.verb == wire.CONTROL and message.word == wire.HEARTBEAT:
            if self.relay.heartbeatAnswer is not None:
                self.transport.write(self.relay.heartbeatAnswer)

    def first(self, message: wire.Message) -> None:
        if message.word == wire.CONTROL:
            if self.relay.refusal is not None:
                self.transport.write(self.relay.refusal)
                self.transport.loseConnection()
                return
            self.nonce = identity.newNonce()
            self.transport.write(
                wire.status(wire.CONTINUE, nonce=self.nonce, secret=1 if self.relay.secret else None)
            )
        elif message.word == wire.CIRCUIT:
            if self.relay.circuitRefusal is not None:
                self.transport.write(self.relay.circuitRefusal)
                return
            # The relay splices the client at once: here the client asks.
            self.transport.write(wire.request(wire.GET, name="a.txt"))
            self.setRawMode()
        elif message.word == wire.HEARTBEAT:
            self.transport.write(wire.status(wire.OK, "alive", ttl=90, boot=BOOT, reachable=self.relay.reachable))
            self.transport.loseConnection()

    def proved(self, message: wire.Message) -> None:
        text = identity.transcriptOfDigest(identity.CONTROL_PROOF, self.nonce, self.received.digest())
        ok = identity.verify(KEY.public, message.get("sig") or "", text)
        if self.relay.secret is not None:
            ok = ok and identity.checkSecretProof(self.relay.secret, text, message.get("mac") or "")
        self.relay.proofs.append(ok)
        if not ok:
            self.transport.write(wire.status(wire.UNAUTHORIZED, "bad proof"))
            self.transport.loseConnection()
            return
        self.open = True
        self.transport.write(
            wire.status(wire.OK, "control connection open", ttl=90, boot=BOOT, interval=30, reachable=0)
        )

    def rawDataReceived(self, data: bytes) -> None:
        self.body += data

    def order(self, **fields) -> None:
        self.transport.write(wire.request(wire.CONNECT, **fields))

    def connectionLost(self, reason=None) -> None:
        self.lost = True


class ReverseClient(LineReceiver):
    """A client that listens for the node's reverse connection, then asks for a.txt."""

    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.body = b""
        self.lost = False

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        self.transport.write(wire.request(wire.GET, name="a.txt"))
        self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        self.body += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True


class Pending:
    """An endpoint whose connection attempts never complete (until cancelled)."""

    def __init__(self) -> None:
        self.attempts: list[Deferred] = []

    def connect(self, factory) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append(d)
        return d


class ControlTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
        self.relay = FakeRelay()
        self.relayEndpoint = self.network.endpoint("relay", self.relay.factory())
        root = Path(self.mktemp())
        root.mkdir()
        (root / "a.txt").write_bytes(b"alpha")
        self.share = SharedDirectory(root, runInThread=syncThread)
        self.successResultOf(self.share.scan())
        # Body chunks on clock ticks: flush() runs them.
        self.cooperator = Cooperator(
            scheduler=lambda f: self.clock.callLater(0, f),
            terminationPredicateFactory=lambda: (lambda: True),
        )
        self.addCleanup(self.cooperator.stop)
        self.files = FileServerFactory(self.share, self.clock, self.cooperator, key=KEY)
        self.clients: list[ReverseClient] = []
        self.dialled: list[tuple[str, int]] = []
        self.forgotten = 0

    def client(self, host: str, port: int):
        self.dialled.append((host, port))
        client = ReverseClient()
        self.clients.append(client)
        return self.network.endpoint(f"client {host}:{port}", Factory.forProtocol(lambda: client))

    def control(self, **kw) -> ControlConnection:
        def forgotten() -> None:
            self.forgotten += 1

        kw.setdefault("endpointFor", self.client)
        kw.setdefault("rng", lambda: 0.0)
        control = ControlConnection(
            self.clock, self.relayEndpoint, KEY, self.files, onForgotten=forgotten, **kw
        )
        self.addCleanup(lambda: (control.stop(), self.flush()))
        return control

    def opened(self, **kw) -> ControlConnection:
        control = self.control(**kw)
        control.start()
        self.flush()
        self.assertTrue(control.isOpen)
        return control

    def flush(self) -> None:
        """Move every byte, running what is due now (body chunks), until nothing moves."""
        for _ in range(50):
            self.network.flush()
            if not [c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()]:
                break
            self.clock.advance(0)

    def advance(self, seconds: float, step: float = 0.25) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.flush()


class HandshakeTests(ControlTestCase):
    def test_firstLine(self) -> None:
        """The node opens with CONTROL node=ID and nothing else."""
        self.control().start()
        self.flush()
        [conn] = self.relay.connections
        self.assertEqual(conn.lines[0], f"P2P/1 CONTROL node={KEY.node}\r".encode())

    def test_proofVerifies(self) -> None:
        """The PROOF answering the nonce passes the relay's check: the node's key over CONTROL_PROOF, the nonce and the CONTROL line."""
        control = self.opened()
        self.assertEqual(self.relay.proofs, [True])
        self.assertTrue(control.isOpen)

    def test_secretMac(self) -> None:
        """A relay asking secret=1 gets mac= under the shared secret, which checks out."""
        self.relay.secret = SECRET
        self.opened(secret=SECRET)
        self.assertEqual(self.relay.proofs, [True])
        self.assertIn(b"mac=", self.relay.controls[0].lines[1])

    def test_secretMissing(self) -> None:
        """A relay asking for the secret, and a node without one: no PROOF, a warning naming --secret-file."""
        self.relay.secret = SECRET
        control = self.control()
        with capturedLogs() as events:
            control.start()
            self.flush()
        self.assertFalse(control.isOpen)
        self.assertEqual(self.relay.proofs, [])
        self.assertTrue(any("--secret-file" in formatEvent(e) for e in events))

    def test_openLogged(self) -> None:
        """Opening is logged, saying clients can fetch via reverse or relayed paths."""
        with capturedLogs() as events:
            self.opened(relayName="relay.example:8000")
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("control connection to relay relay.example:8000 open", text)
        self.assertIn("reverse or relayed paths", text)

    def test_notFoundForgotten(self) -> None:
        """A 404 (no entry for the node) tells the node to register again."""
        self.relay.refusal = wire.status(wire.NOT_FOUND, "unknown node; register again")
        control = self.control()
        control.start()
        self.flush()
        self.assertFalse(control.isOpen)
        self.assertEqual(self.forgotten, 1)


class RefusalLogTests(ControlTestCase):
    def test_refusalTextEscaped(self) -> None:
        """A refusal's text from the relay is logged with its control characters escaped."""
        self.relay.refusal = b"P2P/1 503 retry=5 :\x1b]0;owned\x07busy\r\n"
        with capturedLogs() as events:
            self.control().start()
            self.flush()
        [line] = [formatEvent(e) for e in events if "refused the control connection" in formatEvent(e)]
        self.assertNotIn("\x1b", line)
        self.assertIn("\\x1b]0;owned\\x07busy", line)


class SilentRelayTests(ControlTestCase):
    def test_handshakeTimeout(self) -> None:
        """A relay that never answers the CONTROL line is dropped after the handshake timeout, and tried again."""
        silent = self.network.endpoint("silent", Factory.forProtocol(Protocol))
        control = ControlConnection(self.clock, silent, KEY, self.files, rng=lambda: 0.0)
        control.start()
        self.addCleanup(control.stop)
        self.flush()
        self.assertEqual(self.network.connections, ["silent"])
        self.advance(15)
        self.assertFalse(control.isOpen)
        self.advance(2)  # the first failure in a row: 2 s
        self.assertEqual(self.network.connections, ["silent", "silent"])


class HeartbeatTests(ControlTestCase):
    def test_heartbeatLine(self) -> None:
        """A heartbeat over the connection is a bare HEARTBEAT line, no proof."""
        control = self.opened()
        control.heartbeat()
        self.flush()
        self.assertEqual(self.relay.controls[0].lines[-1], b"P2P/1 HEARTBEAT\r")

    def test_heartbeatAnswered(self) -> None:
        """A heartbeat fires with the relay's 200 line."""
        control = self.opened()
        d = control.heartbeat()
        self.flush()
        answer = self.successResultOf(d)
        self.assertEqual((answer.status, answer.get("boot"), answer.get("reachable")), (200, BOOT, "0"))

    def test_heartbeatRefused(self) -> None:
        """A heartbeat answered 404 fails with that status, for the registrar to register again."""
        self.relay.heartbeatAnswer = wire.status(wire.NOT_FOUND, "unknown node; register again")
        control = self.opened()
        d = control.heartbeat()
        self.flush()
        self.assertEqual(self.failureResultOf(d, wire.ProtocolError).value.status, wire.NOT_FOUND)

    def test_heartbeatTimeout(self) -> None:
        """A heartbeat unanswered for HEARTBEAT_TIMEOUT fails, and the connection is dropped."""
        self.relay.heartbeatAnswer = None
        control = self.opened()
        d = control.heartbeat()
        self.advance(HEARTBEAT_TIMEOUT)
        self.failureResultOf(d, TimeoutError)
        self.assertFalse(control.isOpen)
        self.assertTrue(self.relay.controls[0].lost)

    def test_heartbeatLost(self) -> None:
        """A heartbeat in flight when the connection is lost fails."""
        self.relay.heartbeatAnswer = None
        control = self.opened()
        d = control.heartbeat()
        self.flush()
        self.relay.controls[0].transport.loseConnection()
        self.flush()
        self.failureResultOf(d, ConnectionLost)

    def test_notOpen(self) -> None:
        """With no open connection, a heartbeat fails at once with NotOpen."""
        control = self.control()
        self.failureResultOf(control.heartbeat(), NotOpen)

    def test_orderBetweenAnswers(self) -> None:
        """A CONNECT order arriving before a heartbeat's answer is an order, not the answer."""
        self.relay.heartbeatAnswer = None
        control = self.opened()
        d = control.heartbeat()
        self.flush()
        side = self.relay.controls[0]
        side.order(token=identity.newNonce(), host="127.0.0.1", port=5000)
        self.flush()
        self.assertNoResult(d)
        side.transport.write(wire.status(wire.OK, "alive", ttl=90, boot=BOOT, reachable=0))
        self.flush()
        self.assertEqual(self.successResultOf(d).status, 200)
        self.assertEqual(self.dialled, [("127.0.0.1", 5000)])


class OrderTests(ControlTestCase):
    def test_reverseServesGet(self) -> None:
        """CONNECT token= host= port=: the node connects there, says REVERSE token=, and serves the GET on it."""
        control = self.opened()
        token = identity.newNonce()
        self.relay.controls[0].order(token=token, host="127.0.0.1", port=5000)
        self.flush()
        self.assertEqual(self.dialled, [("127.0.0.1", 5000)])
        [client] = self.clients
        self.assertEqual(client.lines[0], f"P2P/1 REVERSE token={token}\r".encode())
        status, _, body = client.body.partition(b"\r\n")
        self.assertEqual(wire.parseLine(status).status, 200)
        self.assertEqual(body, b"alpha")
        self.assertTrue(client.lost)
        self.assertEqual(control.orders, 0)

    def test_circuitServesGet(self) -> None:
        """CONNECT token= alone: the node connects to the relay, says CIRCUIT token=, and serves the GET on it."""
        self.opened()
        token = identity.newNonce()
        self.relay.controls[0].order(token=token)
        self.flush()
        self.assertEqual(self.dialled, [])
        circuit = self.relay.connections[-1]
        self.assertEqual(circuit.lines[0], f"P2P/1 CIRCUIT token={token}\r".encode())
        status, _, body = circuit.body.partition(b"\r\n")
        self.assertEqual(wire.parseLine(status).get("sha256"), hashlib.sha256(b"alpha").hexdigest())
        self.assertEqual(body, b"alpha")

    def test_circuitRefused(self) -> None:
        """A relay answering the CIRCUIT with 404 gets nothing back; the connection is closed and the order is over."""
        control = self.opened()
        self.relay.circuitRefusal = wire.status(wire.NOT_FOUND, "no such circuit")
        self.relay.controls[0].order(token=identity.newNonce())
        self.flush()
        circuit = self.relay.connections[-1]
        self.assertEqual(len(circuit.lines), 1)
        self.assertTrue(circuit.lost)
        self.assertEqual(control.orders, 0)

    def test_malformedOrderIgnored(self) -> None:
        """An order without a valid token, or naming a host name instead of an address, connects nowhere."""
        control = self.opened()
        side = self.relay.controls[0]
        side.order(token="short", host="127.0.0.1", port=5000)
        side.order(token=identity.newNonce(), host="victim.example", port=80)
        self.flush()
        self.assertEqual(self.dialled, [])
        self.assertEqual(control.orders, 0)
        self.assertTrue(control.isOpen)

    def test_orderCap(self) -> None:
        """At most MAX_ORDERS ordered connections at once; one more is dropped with a log line."""
        pending = Pending()
        control = self.opened(endpointFor=lambda host, port: pending)
        side = self.relay.controls[0]
        with capturedLogs() as events:
            for _ in range(MAX_ORDERS + 1):
                side.order(token=identity.newNonce(), host="127.0.0.1", port=5000)
            self.flush()
        self.assertEqual(len(pending.attempts), MAX_ORDERS)
        self.assertEqual((control.orders, control.dropped), (MAX_ORDERS, 1))
        self.assertTrue(any("dropping a CONNECT order" in formatEvent(e) for e in events))

    def test_connectTimeout(self) -> None:
        """An order whose connection is not made within CONNECT_TIMEOUT is given up, freeing its place."""
        pending = Pending()
        control = self.opened(endpointFor=lambda host, port: pending)
        self.relay.controls[0].order(token=identity.newNonce(), host="127.0.0.1", port=5000)
        self.flush()
        self.assertEqual(control.orders, 1)
        self.clock.advance(CONNECT_TIMEOUT)
        self.assertEqual(control.orders, 0)
        self.assertEqual(len(self.files.connections.counter), 0)

    def test_nodeWideCap(self) -> None:
        """An ordered connection counts in the node's total of connections while it lasts."""
        pending = Pending()
        control = self.opened(endpointFor=lambda host, port: pending)
        self.relay.controls[0].order(token=identity.newNonce(), host="127.0.0.1", port=5000)
        self.flush()
        self.assertEqual(len(self.files.connections.counter), 1)
        self.assertEqual(control.orders, 1)

    def test_nodeFullDrops(self) -> None:
        """A node at its total connection cap drops orders."""
        self.files = FileServerFactory(self.share, self.clock, self.cooperator, key=KEY, maxConnections=1)
        pending = Pending()
        control = self.opened(endpointFor=lambda host, port: pending)
        side = self.relay.controls[0]
        side.order(token=identity.newNonce(), host="127.0.0.1", port=5000)
        side.order(token=identity.newNonce(), host="127.0.0.1", port=5000)
        self.flush()
        self.assertEqual((len(pending.attempts), control.dropped), (1, 1))


class BadRelayTests(ControlTestCase):
    def test_overlongLine(self) -> None:
        """An over-long line from the relay drops the connection (it is opened again later)."""
        control = self.opened()
        side = self.relay.controls[0]
        side.transport.write(b"P2P/1 " + b"x" * wire.MAX_LINE + b"\r\n")
        self.flush()
        self.assertFalse(control.isOpen)
        self.assertTrue(side.lost)

    def test_unaskedAnswerIgnored(self) -> None:
        """A status line nobody asked for is ignored; the connection stays open."""
        control = self.opened()
        self.relay.controls[0].transport.write(wire.status(wire.OK, "alive"))
        self.flush()
        self.assertTrue(control.isOpen)


class ReconnectTests(ControlTestCase):
    def relayAttempts(self) -> int:
        return self.network.connections.count("relay")

    def test_reconnectAfterLoss(self) -> None:
        """A lost connection is opened again after about a second (plus jitter)."""
        control = self.opened()
        self.relay.controls[0].transport.loseConnection()
        self.flush()
        self.assertFalse(control.isOpen)
        self.advance(0.75)
        self.assertEqual(self.relayAttempts(), 1)
        self.advance(0.5)
        self.assertEqual(self.relayAttempts(), 2)
        self.assertTrue(control.isOpen)

    def test_lossLogged(self) -> None:
        """Losing the connection and reconnecting are logged."""
        self.opened()
        with capturedLogs() as events:
            self.relay.controls[0].transport.loseConnection()
            self.flush()
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("control connection to the relay lost", text)
        self.assertIn("reconnecting in 1.0 s", text)
        self.assertNotIn("Scheduling retry", text)  # one line per wait, not ClientService's too

    def test_refusalsBackOff(self) -> None:
        """Refusals in a row wait longer each time: 2, 4, 8 ... seconds."""
        self.relay.refusal = wire.status(wire.NOT_FOUND, "unknown node; register again")
        self.control().start()
        self.flush()
        times = [self.clock.seconds()]
        for _ in range(200):
            before = self.relayAttempts()
            self.advance(0.5, step=0.5)
            if self.relayAttempts() != before:
                times.append(self.clock.seconds())
            if len(times) == 4:
                break
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertEqual(gaps, [2.0, 4.0, 8.0])

    def test_retryHonoured(self) -> None:
        """A 503 retry=30 is not tried again sooner than 30 s."""
        self.relay.refusal = wire.status(wire.BUSY, "the relay holds 1024 control connections", retry=30)
        self.control().start()
        self.flush()
        self.advance(29.5)
        self.assertEqual(self.relayAttempts(), 1)
        self.advance(1)
        self.assertEqual(self.relayAttempts(), 2)

    def test_jitter(self) -> None:
        """The wait after a loss gets the rng's jitter added (up to a second)."""
        control = self.opened(rng=lambda: 0.5)
        self.relay.controls[0].transport.loseConnection()
        self.flush()
        self.advance(1.25)
        self.assertEqual(self.relayAttempts(), 1)
        self.advance(0.5)
        self.assertEqual(self.relayAttempts(), 2)
        self.assertTrue(control.isOpen)

    def test_stopCloses(self) -> None:
        """stop closes the connection and no reconnection follows."""
        control = self.opened()
        d = control.stop()
        self.flush()
        self.successResultOf(d)
        self.assertTrue(self.relay.controls[0].lost)
        self.advance(120, step=5)
        self.assertEqual(self.relayAttempts(), 1)
        self.assertFalse(control.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Refusing:
    """A dial-back endpoint that is refused: the relay cannot reach the node."""

    def connect(self, factory):
        return fail(ConnectionRefusedError())


class ServiceTests(SynchronousTestCase):
    """The node service and a real relay (in memory) whose dial-back is refused."""

    def setUp(self) -> None:
        from p2prelay.node.service import NodeService
        from p2prelay.relay.dialback import DialBack
        from p2prelay.relay.protocol import RelayFactory
        from p2prelay.relay.registry import Registry

        from .test_service import UDPReactor

        self.reactor = UDPReactor()
        self.registry = Registry(self.reactor.seconds, 90.0)
        self.relay = RelayFactory(
            self.registry, self.reactor, dialback=DialBack(self.reactor, lambda host, port: _Refusing())
        )
        self.network = MemoryNetwork(self.reactor)
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "a.txt").write_bytes(b"alpha")
        self.node = NodeService(
            self.reactor,
            relay=self.network.endpoint("relay", self.relay),
            directory=str(folder),
            description="tcp:0:interface=127.0.0.1",
            udp=None,
            key=KEY,
            runInThread=syncThread,
            lock=str(Path(self.mktemp())),
            advertisePort=7000,  # the memory reactor binds port 0
            connectOut=self.connectOut,
        )
        self.clients: list[tuple[str, int, ReverseClient]] = []

    def connectOut(self, host: str, port: int):
        client = ReverseClient()
        self.clients.append((host, port, client))
        return self.network.endpoint(f"client {host}:{port}", Factory.forProtocol(lambda: client))

    def advance(self, seconds: float, step: float = 0.5) -> None:
        end = self.reactor.seconds() + seconds
        self.network.flush()
        while self.reactor.seconds() < end:
            self.reactor.advance(min(step, end - self.reactor.seconds()))
            self.network.flush()

    def started(self) -> None:
        self.node.startService()
        self.addCleanup(self.stopped)
        self.advance(1)
        self.successResultOf(self.node.ready)

    def stopped(self) -> None:
        d = self.node.stopService()
        self.advance(5)
        self.successResultOf(d)

    def test_firewalledOpensControl(self) -> None:
        """A registration answered reachable=0 opens the control connection; the relay lists the node through it."""
        with capturedLogs() as events:
            self.started()
        self.assertFalse(self.node.registrar.reachable)
        self.assertTrue(self.node.control.isOpen)
        self.assertTrue(self.registry.get(KEY.node).control)
        self.assertIn(KEY.node, self.relay.controls)
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn(
            "keeping a control connection to it so clients can still fetch via reverse or relayed paths", text
        )

    def test_heartbeatsOverControl(self) -> None:
        """While the control connection is open, heartbeats go over it: no new connection to the relay."""
        self.started()
        before = len(self.network.connections)
        seen = self.registry.get(KEY.node).expires
        self.advance(95)
        self.assertEqual(len(self.network.connections), before)
        self.assertGreater(self.registry.get(KEY.node).expires, seen)

    def test_reachableClosesControl(self) -> None:
        """A heartbeat answered reachable=1 closes the control connection; heartbeats go on separately."""
        self.started()
        self.registry.setReachable(KEY.node, True)
        self.advance(31)
        self.assertFalse(self.node.control.running)
        self.assertFalse(self.registry.get(KEY.node).control)
        before = len(self.network.connections)
        self.advance(30)
        self.assertEqual(len(self.network.connections), before + 1)  # a plain HEARTBEAT

    def test_stopClosesControl(self) -> None:
        """Stopping the node closes its control connection and takes its entry back."""
        self.started()
        self.stopped()
        self.assertFalse(self.node.control.running)
        self.assertIsNone(self.registry.get(KEY.node))
        self.assertNotIn(KEY.node, self.relay.controls)

    def test_relayOrdersReverse(self) -> None:
        """A REVERSE at the relay reaches the node over its control connection: it connects to the client's address and introduces itself."""
        self.started()
        token = identity.newNonce()
        self.assertTrue(self.relay.controls.order(KEY.node, token, "10.77.4.1", 5000))
        self.advance(0.5)
        [(host, port, client)] = self.clients
        self.assertEqual((host, port), ("10.77.4.1", 5000))
        self.assertEqual(client.lines[0], f"P2P/1 REVERSE token={token}\r".encode())

    def test_relayedRequestReachesNode(self) -> None:
        """A client's RELAY is spliced with the circuit the node opens on the relay's order; the node answers the client's request."""
        self.started()
        client = RelayClient(wire.request(wire.RELAY, node=KEY.node) + wire.request(wire.GET, name="nosuch.txt"))
        self.network.endpoint("relay", self.relay).connect(Factory.forProtocol(lambda: client))
        self.advance(1)
        relayed, answer = [wire.parseLine(line) for line in client.lines[:2]]
        self.assertEqual((relayed.status, answer.status), (200, wire.NOT_FOUND))
        self.assertIsNotNone(relayed.get("circuit"))


class RelayClient(LineReceiver):
    """A client of the relay: sends ``request`` and notes every line of the answer."""

    delimiter = b"\n"

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.lines: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
