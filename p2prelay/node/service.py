"""
A peer node as a Twisted service: scan the folder, serve it, keep it registered.

Stopping a node unregisters it first, so clients stop being sent to a
node that is going away.
"""

from __future__ import annotations

import uuid
from typing import Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from ..listening import ListeningService
from ..udp import MAX_BLOCK, MAX_DATAGRAM, UDPFileServer
from .server import FileServerFactory
from .share import SharedDirectory
from .upkeep import Registrar


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
