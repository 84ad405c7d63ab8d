"""
Starting the daemons: a port that cannot be had is a clear, immediate
failure, never a daemon that runs listening nowhere -- for TCP and for the
node's UDP port alike.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from p2prelay.listening import DatagramListeningService, ListenFailed, ListeningService

TAKEN = OSError(98, "Address already in use")


def syncThread(f, *args):
    return maybeDeferred(f, *args)


class FakeUDPPort:
    """What ``listenUDP`` returns, as far as a service uses it."""

    def __init__(self, number: int, interface: str, protocol) -> None:
        self.number = number
        self.interface = interface
        self.protocol = protocol
        self.listening = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.number)

    def stopListening(self) -> None:
        self.listening = False


class UDPReactor(MemoryReactorClock):
    """A memory reactor that also binds UDP ports; an OS-chosen one is 40000."""

    def __init__(self) -> None:
        super().__init__()
        self.udpPorts: list[FakeUDPPort] = []
        self.udpPacketSizes: list[int] = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        bound = FakeUDPPort(port or 40000, interface, protocol)
        self.udpPorts.append(bound)
        self.udpPacketSizes.append(maxPacketSize)
        return bound


class BusyReactor(UDPReactor):
    """Every TCP port is taken."""

    def listenTCP(self, port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, TAKEN)


class BusyUDPReactor(UDPReactor):
    """TCP ports are free; every UDP port is taken."""

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        raise CannotListenError(interface, port, TAKEN)


class RefusingRelay:
    """A relay endpoint that is not running."""

    def connect(self, factory):
        return fail(ConnectionRefusedError())


def critical(events) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"] == LogLevel.critical]


class ListeningServiceTests(SynchronousTestCase):
    def test_boundPortReadBack(self) -> None:
        """whenListening fires with the bound port."""
        reactor = MemoryReactorClock()
        service = ListeningService(reactor, "tcp:0:interface=127.0.0.1", Factory(), "relay")
        service.privilegedStartService()
        service.startService()
        self.successResultOf(service.whenListening)
        [(port, factory, backlog, interface)] = reactor.tcpServers  # once, not again
        self.assertEqual((port, interface), (0, "127.0.0.1"))

    def test_twistdExitsWhenPortTaken(self) -> None:
        """Under twistd (privileged start) a taken port ends the process with status 1."""
        service = ListeningService(BusyReactor(), "tcp:8000", Factory(), "relay")
        with self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        self.assertEqual(caught.exception.code, 1)

    def test_programSeesFailure(self) -> None:
        """Started directly (p2p-peer), the failure arrives on whenListening."""
        service = ListeningService(BusyReactor(), "tcp:8000", Factory(), "peernode")
        service.startService()
        self.failureResultOf(service.whenListening, CannotListenError)

    def test_lateFailureReported(self) -> None:
        """A listen that fails after startService returns still fails whenListening."""
        from p2prelay import listening as service_module

        pending: Deferred = Deferred()

        class LateEndpoint:
            def listen(self, factory):
                return pending

        self.patch(service_module, "serverFromString", lambda reactor, desc: LateEndpoint())
        service = ListeningService(MemoryReactorClock(), "tcp:8000", Factory(), "peernode")
        service.startService()
        self.assertNoResult(service.whenListening)
        pending.errback(CannotListenError("", 8000, TAKEN))
        self.failureResultOf(service.whenListening, CannotListenError)

    def test_badDescriptionIsAFailedListen(self) -> None:
        """A description no endpoint parser accepts is a failed listen, not a raise: under twistd, exit 1."""
        service = ListeningService(MemoryReactorClock(), "nosuch:8000", Factory(), "relay")
        with capturedLogs() as events, self.assertRaises(SystemExit):
            service.privilegedStartService()
        [line] = critical(events)
        self.assertIn("relay cannot listen on nosuch:8000", line)


class DatagramListeningServiceTests(SynchronousTestCase):
    def service(self, reactor, port: int = 0, interface: str = "127.0.0.1"):
        return DatagramListeningService(
            reactor, port, interface, DatagramProtocol(), "peernode", maxPacketSize=65536
        )

    def test_boundPortReadBack(self) -> None:
        """whenListening fires with the bound UDP port, bound once though both start methods run."""
        reactor = UDPReactor()
        service = self.service(reactor)
        service.privilegedStartService()
        service.startService()
        port = self.successResultOf(service.whenListening)
        self.assertEqual(reactor.udpPorts, [port])
        self.assertEqual((port.number, port.interface), (40000, "127.0.0.1"))
        self.assertEqual(reactor.udpPacketSizes, [65536])

    def test_twistdBindsBeforeTheReactorRuns(self) -> None:
        """Under twistd the UDP port is bound in privilegedStartService, like TCP."""
        reactor = UDPReactor()
        self.service(reactor).privilegedStartService()
        self.assertEqual(len(reactor.udpPorts), 1)

    def test_twistdExitsWhenPortTaken(self) -> None:
        """Under twistd a taken UDP port ends the process with status 1 and one critical line."""
        service = self.service(BusyUDPReactor(), 5555)
        with capturedLogs() as events, self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        self.assertEqual(caught.exception.code, 1)
        [line] = critical(events)
        self.assertIn("peernode cannot listen on udp:5555:interface=127.0.0.1", line)
        self.assertIn("Address already in use", line)

    def test_programSeesFailure(self) -> None:
        """Started directly, a taken UDP port fails whenListening, for the program to report."""
        service = self.service(BusyUDPReactor(), 5555, "")
        with capturedLogs() as events:
            service.startService()
        self.failureResultOf(service.whenListening, CannotListenError)
        self.assertEqual(critical(events), [])
        self.assertEqual(service.description, "udp:5555")

    def test_stopStopsListening(self) -> None:
        """Stopping the service closes the port."""
        reactor = UDPReactor()
        service = self.service(reactor)
        service.startService()
        self.successResultOf(maybeDeferred(service.stopService))
        self.assertFalse(reactor.udpPorts[0].listening)


class NodeServiceTests(SynchronousTestCase):
    def node(self, reactor, udp=(0, "127.0.0.1"), **kw):
        from p2prelay.node.service import NodeService

        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "a.txt").write_bytes(b"alpha")
        return NodeService(
            reactor,
            relay=RefusingRelay(),
            directory=str(folder),
            description="tcp:0:interface=127.0.0.1",
            udp=udp,
            runInThread=syncThread,
            **kw,
        )

    def stop(self, node) -> None:
        self.successResultOf(node.stopService())

    def test_readyFailsWhenListeningFails(self) -> None:
        """A node that cannot listen on TCP reports it on ready, naming the port."""
        node = self.node(BusyReactor())
        node.startService()
        failure = self.failureResultOf(node.ready, ListenFailed)
        self.assertEqual(failure.value.description, "tcp:0:interface=127.0.0.1")
        self.stop(node)

    def test_readyFailsWhenUDPListenFails(self) -> None:
        """A node whose UDP port is taken fails ready instead of never firing it."""
        node = self.node(BusyUDPReactor(), udp=(5555, "127.0.0.1"))
        node.startService()
        failure = self.failureResultOf(node.ready, ListenFailed)
        self.assertEqual(failure.value.description, "udp:5555:interface=127.0.0.1")
        self.assertIn("Address already in use", str(failure.value))
        self.stop(node)

    def test_noRegistrationAfterFailedListen(self) -> None:
        """A node that failed to listen never registers."""
        node = self.node(BusyUDPReactor())
        node.startService()
        self.failureResultOf(node.ready)
        self.assertIsNone(node.registrar)
        self.stop(node)

    def test_twistdExitsWhenUDPPortTaken(self) -> None:
        """Under twistd, a node whose UDP port is taken exits 1 before the reactor runs."""
        node = self.node(BusyUDPReactor())
        with self.assertRaises(SystemExit) as caught:
            node.privilegedStartService()
        self.assertEqual(caught.exception.code, 1)

    def test_twistdBindsBothPortsFirst(self) -> None:
        """Under twistd both the TCP and the UDP port are bound in privilegedStartService."""
        reactor = UDPReactor()
        node = self.node(reactor)
        node.privilegedStartService()
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertEqual([(p.number, p.interface) for p in reactor.udpPorts], [(40000, "127.0.0.1")])

    def test_readyAfterBothListen(self) -> None:
        """ready fires once both ports listen and the folder is scanned; the UDP port is registered."""
        reactor = UDPReactor()
        node = self.node(reactor)
        node.privilegedStartService()
        node.startService()
        self.successResultOf(node.ready)
        self.assertEqual(len(reactor.udpPorts), 1)
        self.assertEqual(list(node.share.entries), ["a.txt"])
        self.assertEqual(node.registrar.udp, 40000)
        self.stop(node)

    def test_noUDP(self) -> None:
        """udp=None serves TCP only and registers no UDP port."""
        reactor = UDPReactor()
        node = self.node(reactor, udp=None)
        node.startService()
        self.successResultOf(node.ready)
        self.assertEqual(reactor.udpPorts, [])
        self.assertIsNone(node.registrar.udp)
        self.stop(node)

    def test_stopClosesBothPorts(self) -> None:
        """Stopping the node closes its UDP port as well as its TCP one."""
        reactor = UDPReactor()
        node = self.node(reactor)
        node.startService()
        self.successResultOf(node.ready)
        self.stop(node)
        self.assertFalse(reactor.udpPorts[0].listening)
        self.assertEqual(reactor.getDelayedCalls(), [])


NO_IPV6 = OSError(97, "Address family not supported by protocol")


class _BoundTCP:
    """What ``listenTCP`` returns: a port number read back."""

    def __init__(self, host: str, number: int) -> None:
        self.host = host
        self.number = number
        self.listening = True

    def getHost(self):
        from twisted.internet.address import IPv6Address

        if ":" in self.host:
            return IPv6Address("TCP", self.host, self.number)
        return IPv4Address("TCP", self.host or "0.0.0.0", self.number)

    def stopListening(self):
        self.listening = False


class DualStackReactor(UDPReactor):
    """A memory reactor binding TCP ports (an OS-chosen one is 41000) on any interface."""

    ipv6 = True

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if not self.ipv6 and ":" in interface:
            raise CannotListenError(interface, port, NO_IPV6)
        self.tcpServers.append((port, factory, backlog, interface))
        return _BoundTCP(interface, port or 41000)

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if not self.ipv6 and ":" in interface:
            raise CannotListenError(interface, port, NO_IPV6)
        return super().listenUDP(port, protocol, interface, maxPacketSize)


class NoIPv6Reactor(DualStackReactor):
    """A host without IPv6: binding an IPv6 interface fails."""

    ipv6 = False


class DualStackTests(SynchronousTestCase):
    """The node's default port: both families, IPv4 alone where IPv6 is unavailable."""

    def node(self, reactor, description=None, udp=(0, "::")):
        from p2prelay.listening import NODE_DEFAULT_PORT
        from p2prelay.node.service import NodeService

        folder = Path(self.mktemp())
        folder.mkdir()
        node = NodeService(
            reactor,
            relay=RefusingRelay(),
            directory=str(folder),
            description=NODE_DEFAULT_PORT if description is None else description,
            udp=udp,
            runInThread=syncThread,
            lock=str(Path(self.mktemp())),
        )
        node.startService()
        self.addCleanup(node.stopService)
        return node

    def test_defaultIsDualStack(self) -> None:
        """By default the node listens on '::' (both families), TCP and UDP."""
        reactor = DualStackReactor()
        node = self.node(reactor)
        self.successResultOf(node.ready)
        self.assertEqual([interface for _, _, _, interface in reactor.tcpServers], ["::"])
        self.assertEqual([p.interface for p in reactor.udpPorts], ["::"])

    def test_boundPortRegistered(self) -> None:
        """What the registrar registers is the port bound on the dual-stack socket."""
        node = self.node(DualStackReactor())
        self.successResultOf(node.ready)
        self.assertEqual(node.registrar.port, 41000)

    def test_fallsBackWithoutIPv6(self) -> None:
        """Where IPv6 is unavailable the default listens on IPv4 (TCP and UDP) instead of failing."""
        reactor = NoIPv6Reactor()
        with capturedLogs() as events:
            node = self.node(reactor)
        self.successResultOf(node.ready)
        self.assertEqual([interface for _, _, _, interface in reactor.tcpServers], [""])
        self.assertEqual([p.interface for p in reactor.udpPorts], [""])
        self.assertEqual(node.registrar.port, 41000)
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("listening on tcp:0 instead", text)

    def test_typedPortNeverFallsBack(self) -> None:
        """A tcp6: port the user typed fails where IPv6 is unavailable, naming it."""
        node = self.node(NoIPv6Reactor(), description="tcp6:7000")
        failure = self.failureResultOf(node.ready, ListenFailed)
        self.assertEqual(failure.value.description, "tcp6:7000")

    def test_typedUDPNeverFallsBack(self) -> None:
        """Beside a port the user typed, UDP on '::' does not fall back either."""
        node = self.node(NoIPv6Reactor(), description="tcp:0", udp=(0, "::"))
        self.failureResultOf(node.ready, ListenFailed)


class RealDualStackTests(SynchronousTestCase):
    """The default port on this machine's sockets: one socket for both families."""

    def setUp(self) -> None:
        import socket

        if not socket.has_ipv6:
            raise SkipTest("no IPv6 in this Python")
        try:
            probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            probe.bind(("::", 0))
            probe.close()
        except OSError as e:
            raise SkipTest(f"IPv6 unavailable here: {e}")

    def test_tcpTakesIPv4(self) -> None:
        """The default TCP port accepts an IPv4 connection (the socket is not IPv6-only)."""
        import socket

        from twisted.internet import reactor

        from p2prelay.listening import NODE_DEFAULT_PORT

        service = ListeningService(reactor, NODE_DEFAULT_PORT, Factory(), "peernode")
        service.startService()
        port = self.successResultOf(service.whenListening)
        self.addCleanup(service.stopService)
        self.assertEqual(port.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 0)
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5):
            pass  # the kernel accepts it into the backlog: no reactor turn needed

    def test_udpBothFamilies(self) -> None:
        """UDP beside the default port binds '::' without IPV6_V6ONLY: IPv4 datagrams arrive too."""
        import socket

        from twisted.internet import reactor

        service = DatagramListeningService(reactor, 0, "::", DatagramProtocol(), "peernode")
        service.startService()
        port = self.successResultOf(service.whenListening)
        self.addCleanup(service.stopService)
        self.assertEqual(port.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 0)
