"""
What a ``p2p-fetch`` run imports, and the plain TCP client endpoint that
lets it leave twisted.internet.endpoints (and with it the TLS stack) alone.

The import checks run a fresh interpreter, since this one has imported
everything already; the endpoint is driven on a MemoryReactorClock.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from p2prelay.addresses import TCPClient, clientEndpoint, tcpEndpoint
from p2prelay.cli import fetch, options
from p2prelay.client.fetcher import Fetcher, PeerAddress

# Modules a plain TCP p2p-fetch has no use for.
HEAVY = ("OpenSSL", "cryptography", "service_identity", "automat", "p2prelay.udp",
         "twisted.internet.endpoints", "prometheus_client", "twisted.web", "p2prelay.metrics")

PROBE = textwrap.dedent(
    """
    import atexit, json, sys
    HEAVY = {heavy!r}
    atexit.register(lambda: print(json.dumps(sorted(
        m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in HEAVY)))))
    from p2prelay.cli.fetch import main
    main()
    """
)


def closedPort() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def heavyModulesAfter(argv: list[str]) -> tuple[int, list[str], str]:
    """Run p2p-fetch ``argv`` in a fresh interpreter: exit status, heavy modules, stderr."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


class ImportTests(SynchronousTestCase):
    """A plain TCP fetch imports neither the TLS stack nor the UDP code."""

    def test_plainFetchImportsNothingHeavy(self) -> None:
        """A whole TCP fetch (parser, reactor, a refused relay connection) loads no TLS, UDP or automat."""
        code, heavy, stderr = heavyModulesAfter(
            ["--relay", f"127.0.0.1:{closedPort()}", "--connect-timeout", "5", "a.txt"]
        )
        self.assertEqual((code, heavy), (options.EXIT_RELAY, []), stderr)
        self.assertIn("unreachable: connection refused", stderr)

    def test_namedRelayImportsNothingHeavy(self) -> None:
        """A relay given by name is resolved and dialled without twisted.internet.endpoints."""
        code, heavy, stderr = heavyModulesAfter(["--relay", f"localhost:{closedPort()}", "a.txt"])
        self.assertEqual((code, heavy), (options.EXIT_RELAY, []), stderr)

    def test_descriptionImportsEndpoints(self) -> None:
        """--relay as a description goes through twisted.internet.endpoints (the checks above can fail)."""
        code, heavy, stderr = heavyModulesAfter(["--relay", f"tcp:127.0.0.1:{closedPort()}", "a.txt"])
        self.assertEqual(code, options.EXIT_RELAY, stderr)
        self.assertIn("twisted.internet.endpoints", heavy)
        self.assertIn("OpenSSL", heavy)

    def test_tlsFetchKeepsTLS(self) -> None:
        """With --tls the reactor is installed with the TLS stack, as ever."""
        probe = textwrap.dedent(
            """
            import sys
            from p2prelay.cli import fetch, options
            fetch.installReactor(fetch.needsTLS(fetch.parseArgs(["--tls", "a.txt"])))
            from twisted.internet import posixbase
            print(posixbase.ssl is not None, "OpenSSL" in sys.modules)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
        )
        self.assertEqual(out.stdout.split(), ["True", "True"])


class NeedsTLSTests(SynchronousTestCase):
    def test_plainHostPort(self) -> None:
        """HOST:PORT and no TLS option: the run speaks no TLS."""
        for relay in ("127.0.0.1:8000", "relay.example:8000", "[::1]:8000"):
            self.assertFalse(fetch.needsTLS(fetch.parseArgs(["--relay", relay, "a.txt"])), relay)

    def test_tlsOptions(self) -> None:
        """--tls, or --relay as an endpoint description, may speak TLS."""
        self.assertTrue(fetch.needsTLS(fetch.parseArgs(["--relay", "h:1", "--tls", "a.txt"])))
        self.assertTrue(fetch.needsTLS(fetch.parseArgs(["--relay", "tcp:h:1", "a.txt"])))


class Recorder(Protocol):
    def __init__(self) -> None:
        self.events: list[object] = []

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.events.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.events.append(reason.type)


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append("read closed")

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")


class Resolver:
    """An injected resolver: each lookup waits for the test to answer it."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []
        self.pending: list[Deferred] = []

    def __call__(self, host: str, port: int) -> Deferred:
        self.asked.append((host, port))
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


class TCPClientTests(SynchronousTestCase):
    """TCPClient: connectTCP, a Deferred, timeouts and cancellation."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.protocol = Recorder()
        self.factory = Factory.forProtocol(lambda: self.protocol)
        self.resolver = Resolver()

    def endpoint(self, host: str = "127.0.0.1", timeout: float = 3) -> TCPClient:
        return TCPClient(self.reactor, host, 5001, timeout=timeout, resolve=self.resolver)

    def accept(self, index: int = -1) -> StringTransport:
        """Complete the connection attempt at ``index``."""
        factory = self.reactor.tcpClients[index][2]
        transport = StringTransport()
        wrapper = factory.buildProtocol(None)
        wrapper.makeConnection(transport)
        transport.protocol = wrapper
        return transport

    def refuse(self, index: int = -1) -> None:
        factory = self.reactor.tcpClients[index][2]
        connector = self.reactor.connectors[index]
        factory.clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))

    def test_addressDialledAtOnce(self) -> None:
        """An IP address is dialled at once, with the timeout, and no lookup."""
        for host in ("127.0.0.1", "::1"):
            self.endpoint(host).connect(self.factory)
            self.assertEqual(self.reactor.tcpClients[-1][:2], (host, 5001))
            self.assertEqual(self.reactor.tcpClients[-1][3], 3)
        self.assertEqual(self.resolver.asked, [])

    def test_firesWithConnectedProtocol(self) -> None:
        """The Deferred fires with the factory's protocol once its connection is made."""
        d = self.endpoint().connect(self.factory)
        self.assertNoResult(d)
        self.accept()
        self.assertIs(self.successResultOf(d), self.protocol)
        self.assertEqual(self.protocol.events, ["made"])
        self.assertIsNotNone(self.protocol.transport)

    def test_eventsPassedOn(self) -> None:
        """Bytes and the connection's loss reach the protocol."""
        self.endpoint().connect(self.factory)
        transport = self.accept()
        transport.protocol.dataReceived(b"hello")
        transport.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.protocol.events, ["made", b"hello", error.ConnectionDone])

    def test_halfCloseableStaysSo(self) -> None:
        """A half-closeable protocol is seen as one, and hears of each half closing."""
        self.protocol = HalfCloser()
        self.endpoint().connect(self.factory)
        wrapper = self.accept().protocol
        self.assertTrue(IHalfCloseableProtocol.providedBy(wrapper))
        wrapper.readConnectionLost()
        wrapper.writeConnectionLost()
        self.assertEqual(self.protocol.events, ["made", "read closed", "write closed"])

    def test_refused(self) -> None:
        """A refused connection fails the Deferred with ConnectionRefusedError."""
        d = self.endpoint().connect(self.factory)
        self.refuse()
        self.failureResultOf(d, error.ConnectionRefusedError)

    def test_noProtocol(self) -> None:
        """A factory that builds no protocol fails the attempt."""
        class Nothing(Factory):
            def buildProtocol(self, addr):
                return None

        d = self.endpoint().connect(Nothing())
        factory = self.reactor.tcpClients[-1][2]
        self.assertIsNone(factory.buildProtocol(None))
        self.failureResultOf(d, error.NoProtocol)

    def test_cancel(self) -> None:
        """Cancelling stops the attempt and fails it with ConnectingCancelledError."""
        d = self.endpoint().connect(self.factory)
        d.cancel()
        self.failureResultOf(d, error.ConnectingCancelledError)
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)

    def test_nameResolvedThenDialled(self) -> None:
        """A name is looked up, then its address dialled."""
        d = self.endpoint("relay.example").connect(self.factory)
        self.assertEqual((self.resolver.asked, self.reactor.tcpClients), ([("relay.example", 5001)], []))
        self.resolver.pending[0].callback(["10.0.0.1"])
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("10.0.0.1", 5001))
        self.accept()
        self.assertIs(self.successResultOf(d), self.protocol)

    def test_nextAddressOnFailure(self) -> None:
        """The name's next address is dialled as soon as one fails; all failing, the first error."""
        d = self.endpoint("relay.example").connect(self.factory)
        self.resolver.pending[0].callback(["::1", "127.0.0.1", "::1"])
        self.refuse()
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["::1", "127.0.0.1"])
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(None, Failure(error.NoRouteError()))
        self.failureResultOf(d, error.ConnectionRefusedError)

    def test_unknownName(self) -> None:
        """A name that does not resolve fails with DNSLookupError (NoSuchHost), naming host and port."""
        d = self.endpoint("nowhere.invalid").connect(self.factory)
        self.resolver.pending[0].errback(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        f = self.failureResultOf(d, error.DNSLookupError)
        self.assertIn("nowhere.invalid:5001: no such host", str(f.value))

    def test_slowLookupTimesOut(self) -> None:
        """A lookup that outlasts the timeout fails the attempt with TimeoutError."""
        d = self.endpoint("slow.example", timeout=3).connect(self.factory)
        self.reactor.advance(2.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.failureResultOf(d, error.TimeoutError)

    def test_lookupLeavesLessTime(self) -> None:
        """The time a lookup took is taken from the connection's timeout."""
        self.endpoint("relay.example", timeout=3).connect(self.factory)
        self.reactor.advance(1)
        self.resolver.pending[0].callback(["10.0.0.1"])
        self.assertAlmostEqual(self.reactor.tcpClients[-1][3], 2)

    def test_cancelDuringLookup(self) -> None:
        """Cancelling while the name is looked up fails with ConnectingCancelledError, dials nothing."""
        d = self.endpoint("relay.example").connect(self.factory)
        d.cancel()
        self.failureResultOf(d, error.ConnectingCancelledError)
        self.resolver.pending[0].callback(["10.0.0.1"])  # late: ignored
        self.assertEqual(self.reactor.tcpClients, [])

    def test_cancelAfterLookup(self) -> None:
        """Cancelling while an address is dialled stops that attempt."""
        d = self.endpoint("relay.example").connect(self.factory)
        self.resolver.pending[0].callback(["10.0.0.1"])
        d.cancel()
        self.failureResultOf(d, error.ConnectingCancelledError)
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)

    def test_clientEndpointUsesIt(self) -> None:
        """HOST:PORT, for the relay or a peer, becomes a TCPClient; descriptions do not."""
        for made in (clientEndpoint(self.reactor, "relay.example:8000", timeout=4),
                     tcpEndpoint(self.reactor, "relay.example", 8000, timeout=4)):
            self.assertIsInstance(made, TCPClient)
            self.assertEqual((made.host, made.port, made.timeout), ("relay.example", 8000, 4))
        self.assertNotIsInstance(clientEndpoint(self.reactor, "tcp:relay.example:8000"), TCPClient)

    def test_fetcherDialsPeersWithIt(self) -> None:
        """The fetcher's default peer endpoint is a TCPClient given --connect-timeout."""
        fetcher = Fetcher(self.reactor, None, connectTimeout=2.5)
        made = fetcher.peerEndpoint(PeerAddress("10.0.0.7", 5001))
        self.assertIsInstance(made, TCPClient)
        self.assertEqual((made.host, made.port, made.timeout), ("10.0.0.7", 5001, 2.5))


class GetaddrinfoTests(SynchronousTestCase):
    def test_defaultResolverOnThreadPool(self) -> None:
        """Without a resolver, names go to getaddrinfo on the reactor's thread pool."""
        calls = []

        class Reactor(MemoryReactorClock):
            def getThreadPool(self):
                return "pool"

        reactor = Reactor()
        import p2prelay.addresses as addresses

        def fakeDefer(r, pool, f):
            calls.append((r, pool))
            try:
                return succeed(f())
            except Exception:
                return fail()

        self.patch(addresses, "deferToThreadPool", fakeDefer)
        self.patch(
            addresses.socket,
            "getaddrinfo",
            lambda host, port, family, kind: [(socket.AF_INET, kind, 6, "", ("10.1.2.3", port))],
        )
        TCPClient(reactor, "relay.example", 8000).connect(Factory.forProtocol(Protocol))
        self.assertEqual(calls, [(reactor, "pool")])
        self.assertEqual(reactor.tcpClients[-1][:2], ("10.1.2.3", 8000))
