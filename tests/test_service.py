"""
Starting the daemons: a port that cannot be had is a clear, immediate
failure, never a daemon that runs listening nowhere.
"""

from __future__ import annotations

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2prelay.listening import ListeningService


class BusyReactor(MemoryReactorClock):
    def listenTCP(self, port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


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
        from twisted.internet.defer import Deferred

        from p2prelay import listening as service_module

        pending: Deferred = Deferred()

        class LateEndpoint:
            def listen(self, factory):
                return pending

        self.patch(service_module, "serverFromString", lambda reactor, desc: LateEndpoint())
        service = ListeningService(MemoryReactorClock(), "tcp:8000", Factory(), "peernode")
        service.startService()
        self.assertNoResult(service.whenListening)
        pending.errback(CannotListenError("", 8000, OSError(98, "Address already in use")))
        self.failureResultOf(service.whenListening, CannotListenError)


class NodeServiceTests(SynchronousTestCase):
    def test_readyFailsWhenListeningFails(self) -> None:
        """A node that cannot listen reports it on ready, not as success."""
        from p2prelay.node.service import NodeService

        node = NodeService(
            BusyReactor(), relay=None, directory=self.mktemp(), description="tcp:8000", udp=None
        )
        node.startService()
        self.failureResultOf(node.ready, CannotListenError)
