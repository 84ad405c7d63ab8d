"""
The client's paths to firewalled peers (p2prelay.client.paths): the
reverse connection, the relayed one, the order they are tried in, and how
a fetch through them is reported -- against an in-memory relay and node.
"""

from __future__ import annotations

from pathlib import Path

import attrs
from typing import Callable, List, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.error import CannotListenError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import identity, wire
from p2prelay.client.download import Download
from p2prelay.client.fetcher import Fetcher, NotFetched, PeerAddress
from p2prelay.client.outcomes import NoUDP, PathRefused, describe, directFirst
from p2prelay.client.paths import (
    RELAY,
    REVERSE,
    PathEndpoint,
    _RelayedIntro,
    setupBudget,
    via,
)
from p2prelay.client.relay import secretProver
from p2prelay.negotiation import _OneShotFactory
from p2prelay.node.server import FileServerFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.wire import FileEntry

from .support import CLIENT, MemoryEndpoint, MemoryNetwork, sha, syncThread
from .test_fetch import FakeRelay, FakeRelayProtocol

DATA = b"behind a router, and still shared\n" * 30
CONNECT_TIMEOUT = 3.0
SECRET = b"s" * 32


class FakePort:
    """A listening port that remembers being closed."""

    def __init__(self, number: int, factory: Factory, interface: str) -> None:
        self.number = number
        self.factory = factory
        self.interface = interface
        self.closed = False

    def getHost(self):
        if self.interface == "::":
            return IPv6Address("TCP", "::", self.number)
        return IPv4Address("TCP", "0.0.0.0", self.number)

    def stopListening(self):
        self.closed = True
        return succeed(None)


class PortsReactor(MemoryReactorClock):
    """A clock whose listenTCP hands out ports 40000, 40001, ...; IPv6 may be missing."""

    def __init__(self, ipv6: bool = True) -> None:
        super().__init__()
        self.ipv6 = ipv6
        self.ports: List[FakePort] = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if interface == "::" and not self.ipv6:
            raise CannotListenError(interface, port, OSError("address family not supported"))
        listening = FakePort(40000 + len(self.ports), factory, interface)
        self.ports.append(listening)
        return listening


class ReverseNode(Protocol):
    """A firewalled node's side of a reverse connection: its intro, then a file server."""

    def __init__(self, intro: bytes, server: Factory) -> None:
        self.intro = intro
        self.server = server

    def connectionMade(self) -> None:
        self.transport.write(self.intro)
        self.inner = self.server.buildProtocol(CLIENT)
        self.inner.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason=None) -> None:
        self.inner.connectionLost(reason)


class Heard(Factory):
    """A node's server that only listens: what each connection received, and whether all closed."""

    def __init__(self) -> None:
        self.received: List[bytes] = []
        self.open = 0

    @property
    def closed(self) -> bool:
        return self.open == 0

    def buildProtocol(self, addr):
        factory = self
        index = len(self.received)
        self.received.append(b"")
        self.open += 1

        class Ear(Protocol):
            def dataReceived(inner, data: bytes) -> None:
                factory.received[index] += data

            def connectionLost(inner, reason=None) -> None:
                factory.open -= 1

        return Ear()


class CircuitEnd(Protocol):
    """The relay's side of a node's data connection: what it sends goes to the client."""

    def __init__(self, client: Protocol) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        self.client.transport.loseConnection()


class PathRelayProtocol(FakeRelayProtocol):
    """The fake relay, plus REVERSE and RELAY as :class:`PathRelay` scripts them."""

    circuit: Optional[CircuitEnd] = None

    def answer(self, message: wire.Message) -> None:
        relay = self.relay
        if message.word == wire.WHOHAS:
            relay.asked.append(message.word)
            name = message.require("name")
            items = [
                wire.item(wire.PEER, node=p.node, host=p.host, port=p.port, size=p.files[name][0],
                          sha256=p.files[name][1], reach=relay.reach.get(p.node))
                for p in relay.peers if name in p.files
            ]
            self.finish(wire.status(wire.OK, count=len(items)) + b"".join(items) + wire.end(len(items)))
        elif message.word == wire.REVERSE:
            relay.asked.append(message.word)
            relay.requests.append(message)
            answer = relay.onReverse(message)
            self.finish(answer)
        elif message.word == wire.RELAY:
            relay.asked.append(message.word)
            relay.requests.append(message)
            answer = relay.onRelay(message)
            if isinstance(answer, bytes):
                self.finish(answer)
            elif answer is not None:  # a node's file server: splice it in
                self.transport.write(wire.status(wire.OK, "relayed by this relay", circuit=identity.newNonce()))
                self.setRawMode()
                self.circuit = CircuitEnd(self)
                relay.network.connect(answer.buildProtocol(CLIENT), self.circuit)
            # None: never answered
        else:
            super().answer(message)

    def rawDataReceived(self, data: bytes) -> None:
        self.circuit.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        if self.circuit is not None and self.circuit.transport is not None:
            self.circuit.transport.loseConnection()


class PathRelay(FakeRelay):
    """FakeRelay's answers, each node's reach=, and scripted REVERSE and RELAY answers."""

    def __init__(self, network: "Network", secret: bytes | None = None) -> None:
        super().__init__(secret)
        self.network = network
        self.reach: dict = {}
        self.requests: List[wire.Message] = []
        self.onReverse: Callable[[wire.Message], bytes] = lambda m: wire.status(404, "no control connection")
        self.onRelay: Callable[[wire.Message], object] = lambda m: wire.status(404, "no control connection")

    def buildProtocol(self, addr):
        return PathRelayProtocol(self)


class Network(MemoryNetwork):
    def connect(self, server: Protocol, client: Protocol) -> None:
        """An in-memory connection; ``client`` is the side that dialled."""
        serverIO = iosim.FakeTransport(server, True, peerAddress=CLIENT)
        clientIO = iosim.FakeTransport(client, False)
        self.pumps.append(iosim.connect(server, serverIO, client, clientIO, greet=False, clock=self.clock))

    def dialBack(self, port: FakePort, node: Protocol) -> Optional[Protocol]:
        """``node`` connects to ``port``; the protocol the port built (None: refused)."""
        accepted = port.factory.buildProtocol(CLIENT)
        if accepted is None:
            return None
        self.connect(accepted, node)
        return accepted


class PathTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = PortsReactor()
        self.network = Network(self.reactor)
        self.cooperator = Cooperator(
            scheduler=lambda f: self.reactor.callLater(0, f),
            terminationPredicateFactory=lambda: (lambda: True),
        )
        self.addCleanup(self.cooperator.stop)
        self.relay = PathRelay(self.network)
        self.relayEndpoint = MemoryEndpoint(self.network, "relay", self.relay)
        self.reports: List[str] = []
        self.verbose: List[str] = []
        self.out = Path(self.mktemp()).absolute()
        self.server = self.fileServer({"a.txt": DATA})
        self.nextPort = 4000

    def fileServer(self, files: dict) -> FileServerFactory:
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data)
        return FileServerFactory(SharedDirectory(root, runInThread=syncThread), self.reactor, self.cooperator)

    def fetcher(self, **kw) -> Fetcher:
        kw.setdefault("connectTimeout", CONNECT_TIMEOUT)
        self.f = Fetcher(
            self.reactor,
            self.relayEndpoint,
            timeout=10.0,
            report=self.reports.append,
            verbose=self.verbose.append,
            runInThread=syncThread,
            **kw,
        )
        return self.f

    def holder(self, reach: Optional[str] = wire.FIREWALLED, data: bytes = DATA) -> PeerAddress:
        """A holder of a.txt listed at the fake relay; its address as the client sees it."""
        port = self.nextPort
        self.nextPort += 1
        node = f"node{port}"
        self.relay.add(node, "10.0.0.9", port, [FileEntry("a.txt", len(data), sha(data))])
        self.relay.reach[node] = reach
        return PeerAddress("10.0.0.9", port, node, size=len(data), sha256=sha(data), reach=reach or "direct")

    def sink(self) -> Download:
        download = Download(self.out)
        self.addCleanup(download.discard)
        return download

    def drive(self, d: Deferred, rounds: int = 200, step: float = 0.5) -> Deferred:
        for _ in range(rounds):
            self.network.flush()
            if d.called:
                break
            self.reactor.advance(step)
        return d

    def fetch(self, fetcher: Optional[Fetcher] = None) -> Deferred:
        fetcher = fetcher or self.fetcher()
        return self.drive(ensureDeferred(fetcher.fetch("a.txt", self.sink())))

    # The node's side, as the relay's control connection would make it act.

    def connectsBack(self, token: Optional[str] = None, server: Optional[Factory] = None):
        """A REVERSE answer: 200, and the node connects back (with ``token``, default the one asked)."""

        def onReverse(message: wire.Message) -> bytes:
            port = self.reactor.ports[-1]
            self.assertEqual(message.port(), port.number)
            intro = wire.request(wire.REVERSE, token=token or message.nonce("token"))
            self.reactor.callLater(0, self.network.dialBack, port, ReverseNode(intro, server or self.server))
            return wire.status(wire.OK, f"asked {message.get('node')} to connect to you")

        self.relay.onReverse = onReverse

    def neverConnects(self) -> None:
        """A REVERSE answer: 200, and nothing ever connects (we are behind NAT)."""
        self.relay.onReverse = lambda message: wire.status(wire.OK, "asked")

    def relays(self, server: Optional[Factory] = None) -> None:
        """A RELAY answer: 200, and the node's bytes spliced in."""
        self.relay.onRelay = lambda message: server or self.server

    def assertFetched(self, d: Deferred, path: str):
        fetched = self.successResultOf(d)
        self.assertEqual((fetched.size, fetched.sha256, fetched.path), (len(DATA), sha(DATA), path))
        return fetched


class HoldersTests(PathTestCase):
    def test_reachParsed(self):
        """reach=firewalled makes a firewalled peer; none, or a word we do not know, a direct one."""
        def parse(**fields):
            return PeerAddress.fromMessage(wire.parseLine(wire.item(wire.PEER, host="h", port=1, **fields).rstrip()))

        self.assertEqual(
            [parse(reach="firewalled").reach, parse(reach="direct").reach, parse().reach, parse(reach="cosmic").reach],
            ["firewalled", "direct", "direct", "direct"],
        )

    def test_directFirst(self):
        """Holders: the direct ones first, then the firewalled ones, each group in the relay's order."""
        order = [self.holder(wire.FIREWALLED), self.holder(None), self.holder(wire.FIREWALLED), self.holder("direct")]
        holders = self.successResultOf(self.drive(ensureDeferred(self.fetcher().holders("a.txt"))))
        self.assertEqual([p.port for p in holders], [order[1].port, order[3].port, order[0].port, order[2].port])

    def test_directFirstStable(self):
        """directFirst keeps the given order within each group."""
        a, b = PeerAddress("a", 1), PeerAddress("b", 2, reach=wire.FIREWALLED)
        c, d = PeerAddress("c", 3), PeerAddress("d", 4, reach=wire.FIREWALLED)
        self.assertEqual(directFirst([b, a, d, c]), [a, c, b, d])

    def test_firewalledEndpoint(self):
        """A firewalled peer gets a PathEndpoint; a direct one a plain TCP endpoint."""
        f = self.fetcher()
        self.assertIsInstance(f.peerEndpoint(self.holder()), PathEndpoint)
        self.assertNotIsInstance(f.peerEndpoint(self.holder(None)), PathEndpoint)

    def test_noUDPToFirewalled(self):
        """Over UDP a firewalled peer is a failed attempt at once: no path through the relay carries UDP."""
        peer = attrs.evolve(self.holder(), udp=4999)
        failure = self.failureResultOf(ensureDeferred(self.fetcher().transferUDP(peer, "a.txt", self.sink())), NoUDP)
        self.assertIn("firewalled", str(failure.value))

    def test_budget(self):
        """A firewalled peer's setup budget is two connect timeouts and a second."""
        self.assertEqual(setupBudget(3.0), 7.0)


class ReverseTests(PathTestCase):
    def test_fetchedViaReverse(self):
        """A firewalled holder connects back to our ephemeral port; its GET is answered there."""
        self.holder()
        self.connectsBack()
        fetched = self.assertFetched(self.fetch(), REVERSE)
        self.assertEqual(fetched.attempts, [])
        self.assertEqual(self.relay.asked, ["WHOHAS", "REVERSE"])

    def test_reverseRequest(self):
        """REVERSE names the node, the port we listen on and a fresh 32-character token."""
        peer = self.holder()
        self.connectsBack()
        self.fetch()
        (request,) = self.relay.requests
        self.assertEqual((request.get("node"), request.port()), (peer.node, self.reactor.ports[0].number))
        self.assertEqual(len(request.nonce("token")), 32)

    def test_listensOnBothFamilies(self):
        """The ephemeral port is on '::' (dual stack)."""
        self.holder()
        self.connectsBack()
        self.fetch()
        self.assertEqual([p.interface for p in self.reactor.ports], ["::"])

    def test_ipv4Fallback(self):
        """Without IPv6 the ephemeral port is IPv4 alone, and the reverse path still works."""
        self.reactor.ipv6 = False
        self.holder()
        self.connectsBack()
        self.assertFetched(self.fetch(), REVERSE)
        self.assertEqual([p.interface for p in self.reactor.ports], [""])

    def test_portClosedAfterward(self):
        """The ephemeral port is closed once the reverse connection came."""
        self.holder()
        self.connectsBack()
        self.fetch()
        self.assertTrue(self.reactor.ports[0].closed)

    def test_verboseSaysReverse(self):
        """-v: 'fetching NAME from PEER via reverse connection'."""
        peer = self.holder()
        self.connectsBack()
        self.fetch()
        self.assertIn(f"fetching a.txt from {peer} via reverse connection", self.verbose)

    def test_wrongTokenDropped(self):
        """A connection with another token is dropped, and the right one still accepted."""
        self.holder()
        heard = Heard()

        def onReverse(message: wire.Message) -> bytes:
            port = self.reactor.ports[-1]
            stranger = ReverseNode(wire.request(wire.REVERSE, token=identity.newNonce()), heard)
            self.network.dialBack(port, stranger)
            intro = wire.request(wire.REVERSE, token=message.nonce("token"))
            self.reactor.callLater(1, self.network.dialBack, port, ReverseNode(intro, self.server))
            return wire.status(wire.OK, "asked")

        self.relay.onReverse = onReverse
        self.assertFetched(self.fetch(), REVERSE)
        self.assertEqual(heard.received, [b""])  # connected, and dropped without a GET
        self.assertTrue(heard.closed)

    def test_notAReverseIntroDropped(self):
        """A connection whose first line is not REVERSE (a GET, say) is dropped."""
        self.holder()
        heard = Heard()

        def onReverse(message: wire.Message) -> bytes:
            port = self.reactor.ports[-1]
            self.network.dialBack(port, ReverseNode(wire.request(wire.GET, name="x"), heard))
            intro = wire.request(wire.REVERSE, token=message.nonce("token"))
            self.reactor.callLater(1, self.network.dialBack, port, ReverseNode(intro, self.server))
            return wire.status(wire.OK, "asked")

        self.relay.onReverse = onReverse
        self.assertFetched(self.fetch(), REVERSE)
        self.assertEqual((heard.received, heard.closed), ([b""], True))

    def test_onlyOneAccepted(self):
        """Once the reverse connection came, another one is refused."""
        self.holder()
        self.connectsBack()
        self.fetch()
        self.assertIsNone(self.reactor.ports[0].factory.buildProtocol(CLIENT))

    def test_relayRefusesReverse(self):
        """The relay's refusal of REVERSE is the attempt's error, with its status."""
        peer = self.holder()
        self.relay.onReverse = lambda m: wire.status(404, f"{m.get('node')} holds no control connection here")
        failure = self.failureResultOf(self.fetch(), NotFetched)
        self.assertEqual(
            [(a.peer, a.error) for a in failure.value.attempts],
            [(str(peer), f"relay answered 404 {peer.node} holds no control connection here")],
        )
        self.assertTrue(self.reactor.ports[0].closed)

    def test_privateRelayChallengesReverse(self):
        """A private relay's challenge of REVERSE is answered with the fetcher's prover."""
        self.relay.secret = SECRET
        self.holder()
        self.connectsBack()
        self.assertFetched(self.fetch(self.fetcher(prover=secretProver(SECRET))), REVERSE)
        self.assertEqual(self.relay.refused, 0)

    def test_cancelledClosesPort(self):
        """Giving up while waiting for the node closes the ephemeral port."""
        peer = self.holder()
        self.neverConnects()
        f = self.fetcher()
        proto = Protocol()
        d = PathEndpoint(f, peer).connect(_OneShotFactory(proto))
        self.network.flush()
        self.assertFalse(self.reactor.ports[0].closed)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.reactor.ports[0].closed)


class FallbackTests(PathTestCase):
    def test_timeoutFallsBackToRelay(self):
        """No reverse connection within connectTimeout: the port is closed and the relayed path used."""
        self.holder()
        self.neverConnects()
        self.relays()
        self.assertFetched(self.fetch(), RELAY)
        self.assertEqual(self.relay.asked, ["WHOHAS", "REVERSE", "RELAY"])
        self.assertTrue(self.reactor.ports[0].closed)

    def test_timeoutSaid(self):
        """-v says the reverse connection did not come, and that the relay is tried instead."""
        peer = self.holder()
        self.neverConnects()
        self.relays()
        self.fetch()
        self.assertIn(
            f"peer {peer}: no reverse connection within 3 seconds; trying via relay (and for other peers from now on)",
            self.verbose,
        )

    def test_laterPeersSkipReverse(self):
        """Once a reverse attempt timed out, later firewalled peers go straight to the relay."""
        self.holder()
        self.neverConnects()
        self.relays()
        f = self.fetcher()
        self.fetch(f)
        self.relay.asked.clear()
        self.assertFetched(self.fetch(f), RELAY)
        self.assertEqual(self.relay.asked, ["WHOHAS", "RELAY"])
        self.assertEqual(len(self.reactor.ports), 1)

    def test_noListen(self):
        """listen=False (--no-listen): no port is opened, the relayed path is the only one."""
        self.holder()
        self.connectsBack()
        self.relays()
        self.assertFetched(self.fetch(self.fetcher(listen=False)), RELAY)
        self.assertEqual((self.relay.asked, self.reactor.ports), (["WHOHAS", "RELAY"], []))

    def test_noDeadReport(self):
        """A firewalled peer that cannot be reached at all is a failed attempt, never reported DEAD."""
        peer = self.holder()
        self.neverConnects()
        self.relay.onRelay = lambda m: None  # never answers
        failure = self.failureResultOf(self.fetch(), NotFetched)
        self.assertEqual([a.peer for a in failure.value.attempts], [str(peer)])
        self.assertIn("timed out", failure.value.attempts[0].error)
        self.assertEqual(self.relay.dead, [])
        self.assertNotIn("DEAD", self.relay.asked)

    def test_longerBudget(self):
        """A firewalled peer may take longer than connectTimeout to connect: up to its setup budget."""
        peer = self.holder()
        circuit: list = []

        def onRelay(message):
            circuit.append(self.reactor.seconds())
            return None

        self.relay.onRelay = onRelay
        d = PathEndpoint(self.fetcher(listen=False), peer).connect(_OneShotFactory(Protocol()))
        self.drive(d, step=0.25)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(self.reactor.seconds(), setupBudget(CONNECT_TIMEOUT))

    def test_directPeerStillReported(self):
        """A direct peer that times out is still reported DEAD (nothing changed for it)."""
        peer = self.holder(None)
        failure = self.failureResultOf(self.fetch(), NotFetched)
        self.assertEqual([a.peer for a in failure.value.attempts], [str(peer)])
        self.assertEqual(self.relay.dead, [str(peer)])


class RelayedTests(PathTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.peer = self.holder()

    def test_fetchedViaRelay(self):
        """RELAY answered 200: the GET and the body pass through the circuit."""
        self.relays()
        fetched = self.assertFetched(self.fetch(self.fetcher(listen=False)), RELAY)
        self.assertEqual(fetched.peer, str(self.peer))

    def test_relayRequest(self):
        """RELAY names the node and the size the index lists."""
        self.relays()
        self.fetch(self.fetcher(listen=False))
        (request,) = self.relay.requests
        self.assertEqual((request.get("node"), request.integer("size")), (self.peer.node, len(DATA)))

    def test_verboseSaysRelay(self):
        """-v: 'fetching NAME from PEER via relay'."""
        self.relays()
        self.fetch(self.fetcher(listen=False))
        self.assertIn(f"fetching a.txt from {self.peer} via relay", self.verbose)

    def test_privateRelay(self):
        """A private relay's challenge of RELAY is answered; the circuit then opens."""
        self.relay.secret = SECRET
        self.relays()
        self.assertFetched(self.fetch(self.fetcher(listen=False, prover=secretProver(SECRET))), RELAY)
        self.assertEqual(self.relay.refused, 0)

    def test_privateRelayWithoutSecret(self):
        """A private relay's challenge without a secret: a failed attempt saying so."""
        self.relay.secret = SECRET
        self.relays()
        failure = self.failureResultOf(self.connect(), Exception)
        self.assertIn("asks for a proof", describe(failure.value))

    def connect(self) -> Deferred:
        endpoint = PathEndpoint(self.fetcher(listen=False), self.peer)
        return self.drive(endpoint.connect(_OneShotFactory(Protocol())))

    def refusal(self, line: bytes) -> PathRefused:
        self.relay.onRelay = lambda message: line
        return self.failureResultOf(self.connect(), PathRefused).value

    def test_busyWithRetry(self):
        """503 retry=60: a PathRefused with the status, the text and the retry hint."""
        e = self.refusal(wire.status(503, "64 circuits open", retry=60))
        self.assertEqual((e.status, e.message, e.retry), (503, "64 circuits open", 60))
        self.assertEqual(describe(e), "relay answered 503 64 circuits open")

    def test_noRelaying(self):
        """503 without retry= (--no-relaying): no retry hint."""
        e = self.refusal(wire.status(503, "this relay does not relay"))
        self.assertEqual((e.status, e.retry), (503, None))

    def test_unknownNode(self):
        """404 (no control connection): a clear refusal, not 'not found' of the file."""
        e = self.refusal(wire.status(404, "node holds no control connection here"))
        self.assertEqual(describe(e), "relay answered 404 node holds no control connection here")

    def test_gatewayTimeout(self):
        """504: the node did not open the circuit."""
        e = self.refusal(wire.status(wire.GATEWAY_TIMEOUT, "the node did not open the circuit within 5 s"))
        self.assertEqual(e.status, 504)

    def test_tooLarge(self):
        """413: the file is over the relay's circuit limit."""
        e = self.refusal(wire.status(413, "a.txt's 1020 bytes exceed this relay's circuit limit of 10"))
        self.assertEqual((e.status, e.message), (413, "a.txt's 1020 bytes exceed this relay's circuit limit of 10"))

    def test_refusedThenNextHolder(self):
        """A refused relayed path is a failed attempt; the fetch goes on to the next holder."""
        self.relay.onRelay = lambda message: wire.status(503, "busy", retry=60)
        failure = self.failureResultOf(self.fetch(self.fetcher(listen=False)), NotFetched)
        self.assertEqual(
            [a.error for a in failure.value.attempts], ["relay answered 503 busy"]
        )
        self.assertEqual(self.relay.dead, [])

    def test_relayClosesEarly(self):
        """The relay closing before its answer: an incomplete answer, not a hang."""
        class Closer(Protocol):
            def dataReceived(inner, data):
                inner.transport.loseConnection()

        self.relayEndpoint.factory = Factory.forProtocol(Closer)
        failure = self.failureResultOf(self.connect(), Exception)
        self.assertIn("before the circuit opened", str(failure.value))


class HandoverTests(SynchronousTestCase):
    """The preamble's protocol hands the connection over cleanly."""

    class Recorder(Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.made = False
            self.lost = None

        def connectionMade(self) -> None:
            self.made = True

        def dataReceived(self, data: bytes) -> None:
            self.data += data

        def connectionLost(self, reason=None) -> None:
            self.lost = reason

    def intro(self):
        inner = self.Recorder()
        intro = _RelayedIntro(wire.request(wire.RELAY, node="n"), None, _OneShotFactory(inner))
        transport = StringTransport()
        intro.makeConnection(transport)
        return intro, inner, transport

    def test_requestSent(self):
        """The RELAY line is sent at once."""
        _, _, transport = self.intro()
        self.assertEqual(transport.value(), b"P2P/1 RELAY node=n\r\n")

    def test_bytesAfterTheStatus(self):
        """Bytes after the 200 in the same segment reach the caller's protocol, connected first."""
        intro, inner, transport = self.intro()
        intro.dataReceived(b"P2P/1 200 circuit=x :relayed\nP2P/1 200 size=3\nabc")
        self.assertEqual((inner.made, inner.data), (True, b"P2P/1 200 size=3\nabc"))
        self.assertIs(inner.transport, transport)
        self.assertIs(self.successResultOf(intro.opened), inner)

    def test_statusSplit(self):
        """A status line split across segments is read whole."""
        intro, inner, _ = self.intro()
        intro.dataReceived(b"P2P/1 2")
        self.assertFalse(inner.made)
        intro.dataReceived(b"00 :ok\n")
        self.assertTrue(inner.made)

    def test_lostAfterHandover(self):
        """The close after the handover is the caller's protocol's."""
        intro, inner, _ = self.intro()
        intro.dataReceived(b"P2P/1 200\n")
        intro.connectionLost("gone")
        self.assertEqual(inner.lost, "gone")

    def test_notAStatus(self):
        """A verb where the status belongs: a 400, the connection aborted."""
        intro, inner, transport = self.intro()
        intro.dataReceived(b"P2P/1 GET name=x\n")
        self.assertEqual(self.failureResultOf(intro.opened, wire.ProtocolError).value.status, 400)
        self.assertTrue(transport.disconnecting or getattr(transport, "aborted", False))
        self.assertFalse(inner.made)

    def test_overlong(self):
        """An over-long first line: a 414, nothing handed over."""
        intro, inner, _ = self.intro()
        intro.dataReceived(b"x" * (wire.MAX_LINE + 10))
        self.assertEqual(self.failureResultOf(intro.opened, wire.ProtocolError).value.status, 414)

    def test_via(self):
        """What a line adds for each path."""
        self.assertEqual([via("direct"), via(None), via(REVERSE), via(RELAY)],
                         ["", "", " via reverse connection", " via relay"])
