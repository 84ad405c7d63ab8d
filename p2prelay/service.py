"""
The long-running pieces as Twisted services, assembled by ``tap.py``.

twistd (and a ``.tac``) start and stop these; stopping a node unregisters
it first, so clients stop being sent to a node that is going away.
"""

from __future__ import annotations

import uuid
from typing import Optional

from twisted.application.service import MultiService, Service
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from .node import FileServerFactory
from .registrar import Registrar
from .registry import Registry
from .relay import RelayFactory
from .share import SharedDirectory
from .store import StateStore
from .udp import MAX_BLOCK, MAX_DATAGRAM, UDPFileServer

SWEEP_FRACTION = 4  # sweep expired peers this many times per lifetime
SAVE_DELAY = 0.5  # coalesce bursts of registrations into one write


def describeAddress(port: IListeningPort) -> str:
    address = port.getHost()
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return f"{host}:{address.port}"


class ListeningService(Service):
    """
    Listen on a server endpoint description; ``whenListening`` fires with
    the bound port, so an OS-chosen port (``tcp:0``) can be read back.
    Under twistd a port that cannot be had ends the process (exit 1);
    a program that starts the service itself sees ``whenListening`` fail.
    """

    log = Logger()

    def __init__(self, reactor, description: str, factory, what: str) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.what = what
        self.port: Optional[IListeningPort] = None
        self.whenListening: Deferred[IListeningPort] = Deferred()
        self._started = False

    def privilegedStartService(self) -> None:
        # twistd binds here, before the reactor runs (and before dropping
        # privileges): a port that cannot be had ends the daemon at once.
        super().privilegedStartService()
        self._listen(exitOnFailure=True)

    def startService(self) -> None:
        super().startService()
        if not self._started:
            self._listen(exitOnFailure=False)

    def _listen(self, exitOnFailure: bool) -> None:
        self._started = True
        d = serverFromString(self.reactor, self.description).listen(self.factory)
        d.addCallbacks(self._listening, self._failed)
        if exitOnFailure and self.port is None and self.whenListening.called:
            # Failed at once under twistd: logged above, and nobody else
            # will use the failure, so end the process quietly.
            self.whenListening.addErrback(lambda _: None)
            raise SystemExit(1)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info(
            "{what} listening on {address}", what=self.what, address=describeAddress(port)
        )
        self.whenListening.callback(port)
        return port

    def _failed(self, failure) -> None:
        self.log.critical(
            "{what} cannot listen on {desc}: {error}",
            what=self.what,
            desc=self.description,
            error=failure.getErrorMessage(),
        )
        self.whenListening.errback(failure)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class RelayService(MultiService):
    """
    The relay: a registry, its expiry sweep, the listening port and,
    with ``state``, the file that carries the registry across restarts.
    """

    log = Logger()

    def __init__(
        self, reactor, description: str, ttl: float, state: Optional[str] = None
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.registry = Registry(reactor.seconds, ttl)
        self.store = StateStore(state) if state else None
        self.factory = RelayFactory(self.registry, reactor, onChange=self._changed)
        self.listener = ListeningService(reactor, description, self.factory, "relay")
        self.listener.setServiceParent(self)
        self._sweep = task.LoopingCall(self._expire)
        self._sweep.clock = reactor
        self._saveCall = None

    def startService(self) -> None:
        if self.store is not None:
            peers = self.store.load()
            for peer in peers:
                self.registry.restore(peer)
            self.log.info(
                "restored {count} live peers from {path}",
                count=len(self.registry.all()),
                path=str(self.store.path),
            )
        super().startService()
        self._sweep.start(max(self.registry.ttl / SWEEP_FRACTION, 0.25), now=False)

    def stopService(self):
        if self._sweep.running:
            self._sweep.stop()
        if self._saveCall is not None and self._saveCall.active():
            self._saveCall.cancel()
        self._save()
        return super().stopService()

    def _changed(self) -> None:
        if self.store is not None and (self._saveCall is None or not self._saveCall.active()):
            self._saveCall = self.reactor.callLater(SAVE_DELAY, self._save)

    def _save(self) -> None:
        self._saveCall = None
        if self.store is None:
            return
        try:
            self.store.save(self.registry.all())
        except Exception as e:
            self.log.warn("cannot save state to {path}: {error}", path=str(self.store.path), error=e)

    def _expire(self) -> None:
        gone = self.registry.expire()
        for peer in gone:
            self.log.info(
                "expired {node} at {host}:{port}", node=peer.node, host=peer.host, port=peer.port
            )
        if gone:
            self._changed()


class NodeService(MultiService):
    """
    A peer node: scan the folder, serve it, and keep it registered.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        *,
        relay,
        directory: str,
        description: str,
        advertise: Optional[str] = None,
        heartbeat: Optional[float] = None,
        rescan: Optional[float] = None,
        node: Optional[str] = None,
        udp: Optional[tuple[int, str]] = (0, ""),
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.relay = relay
        self.share = SharedDirectory(directory)
        self.node = node or uuid.uuid4().hex[:16]
        self.advertise = advertise
        self.heartbeat = heartbeat
        self.rescan = rescan
        self.files = FileServerFactory(self.share, reactor)
        self.listener = ListeningService(reactor, description, self.files, "peernode")
        self.listener.setServiceParent(self)
        self.registrar: Optional[Registrar] = None
        self.udp = udp
        self.udpPort = None
        self.ready: Deferred[None] = Deferred()
        self._stopping: Optional[Deferred[None]] = None

    def startService(self) -> None:
        super().startService()
        ensureDeferred(self._start()).addErrback(
            lambda f: self.log.failure("peer node failed to start", f)
        )

    async def _start(self) -> None:
        try:
            port = await self.listener.whenListening
        except Exception as e:
            # The listener has logged it; whoever started us decides.
            self.ready.errback(e)
            return
        udpNumber = None
        if self.udp is not None:
            number, interface = self.udp
            # Serve blocks as large as a client asks for (up to 60 KiB on
            # loopback); clients default to blocks that fit Ethernet.
            self.udpPort = self.reactor.listenUDP(
                number,
                UDPFileServer(self.share, self.reactor, blockSize=MAX_BLOCK),
                interface=interface,
                maxPacketSize=MAX_DATAGRAM,
            )
            udpNumber = self.udpPort.getHost().port
            self.log.info(
                "peernode listening on udp {host}:{port}",
                host=self.udpPort.getHost().host,
                port=udpNumber,
            )
        await self.share.scan()
        self.log.info(
            "sharing {count} files from {dir}", count=len(self.share.entries), dir=self.share.root
        )
        self.registrar = Registrar(
            self.reactor,
            self.relay,
            self.share,
            self.node,
            port.getHost().port,
            advertise=self.advertise,
            udp=udpNumber,
            heartbeat=self.heartbeat,
            rescan=self.rescan,
        )
        if self.running:
            self.registrar.start()
        self.ready.callback(None)

    def stopService(self):
        # Called by twistd, by a reactor shutdown trigger, or both.
        if self._stopping is None:

            async def stop() -> None:
                if self.registrar is not None:
                    await self.registrar.stop()
                await super(NodeService, self).stopService()
                if self.udpPort is not None:
                    await self.udpPort.stopListening()

            self._stopping = ensureDeferred(stop())
        return self._stopping
