"""
A peer node as a Twisted service: bind its ports, scan the folder, serve
it, keep it registered.

Both ports are child services that bind the same way (under twistd, before
the reactor runs; a port that cannot be had ends the daemon with status 1).
``ready`` fires once everything is up, or fails with the reason the node
could not start, so a node never runs half-started.  Stopping a node
unregisters it first, so clients stop being sent to a node going away.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from ..limits import NODE_MAX_CONNECTIONS, NODE_MAX_GETS_PER_ADDRESS, NODE_MAX_PER_ADDRESS
from ..negotiation import CLOSE_DEADLINE, IDLE_TIMEOUT, REQUEST_DEADLINE
from .. import identity
from ..human import humanSize, plural
from ..listening import (
    DUAL_STACK_UDP,
    NODE_DEFAULT_PORT,
    NODE_IPV4_PORT,
    DatagramListeningService,
    ListenFailed,
    ListeningService,
)
from ..udp import MAX_BLOCK, MAX_DATAGRAM, UDPFileServer
from ..udp.server import (
    IDLE_TIMEOUT as UDP_IDLE_TIMEOUT,
    MAX_TRANSFERS,
    MAX_TRANSFERS_PER_ADDRESS,
    UNACKED_TIMEOUT,
)
from ..pieces import PIECE_SIZE
from .lock import FolderLock, defaultLockPath
from .manifest import ManifestCache, defaultCachePath
from .ratelimit import UploadLimiter
from .server import FileServerFactory
from .share import RunInThread, SharedDirectory
from .control import ControlConnection
from .upkeep import Registrar


class NodeService(MultiService):
    """
    A peer node: listen on TCP (and UDP unless ``udp`` is None), scan the
    folder, serve it, and keep it registered.

    ``udp`` is ``(port, interface)``; port 0 lets the OS choose.  ``tls``,
    a server endpoint description, adds a TLS port presenting the node's
    key, which clients pin to (see ``p2prelay/tls.py``).  ``key``
    is the node's :class:`identity.NodeKey` (default: a fresh one, for this
    run only); the node's id is the key's.  ``advertise`` is the host to
    register (None: the address the relay sees), ``advertisePort`` and
    ``advertiseUdp`` the TCP and UDP ports (None: the ones bound), for a
    node behind a router forwarding other ports to these.  ``secret`` is
    the shared secret of a closed network.  ``cache`` is the :class:`ManifestCache` the scan
    keeps its hashes in (default: the one beside the node's key, see
    :func:`manifest.defaultCachePath`); ``pieceSize`` the size of the
    pieces it hashes.  ``maxRate`` (bytes per second) caps the node's TCP
    uploads together, ``maxUploads`` how many GETs send at once (None: no
    cap).  ``metrics``, a server endpoint description, serves Prometheus
    metrics there; ``relayName`` is the relay as the user named it (for
    log lines); ``lock`` the lock file that tells a second node sharing the
    same folder (default: in the node's state folder); ``connectOut(host,
    port)`` the endpoint a reverse order connects to (default: TCP), see
    ``node/control.py``: the control connection kept while the relay says
    it cannot reach the node.  The other keyword arguments are the node's limits (see
    ``docs/limits.rst``), each defaulting to its constant.
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
        advertisePort: Optional[int] = None,
        advertiseUdp: Optional[int] = None,
        heartbeat: Optional[float] = None,
        rescan: Optional[float] = None,
        key: Optional[identity.NodeKey] = None,
        secret: Optional[bytes] = None,
        udp: Optional[tuple[int, str]] = (0, ""),
        tls: Optional[str] = None,
        runInThread: RunInThread = deferToThread,
        maxConnections: int = NODE_MAX_CONNECTIONS,
        maxPerAddress: int = NODE_MAX_PER_ADDRESS,
        maxGetsPerAddress: int = NODE_MAX_GETS_PER_ADDRESS,
        requestDeadline: float = REQUEST_DEADLINE,
        idleTimeout: float = IDLE_TIMEOUT,
        closeDeadline: float = CLOSE_DEADLINE,
        udpMaxTransfers: int = MAX_TRANSFERS,
        udpMaxPerAddress: int = MAX_TRANSFERS_PER_ADDRESS,
        udpIdleTimeout: float = UDP_IDLE_TIMEOUT,
        udpUnackedTimeout: float = UNACKED_TIMEOUT,
        cache: Optional[ManifestCache] = None,
        pieceSize: int = PIECE_SIZE,
        maxRate: Optional[float] = None,
        maxUploads: Optional[int] = None,
        metrics: Optional[str] = None,
        relayName: Optional[str] = None,
        lock: Optional[str] = None,
        connectOut=None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.relay = relay
        self.relayName = relayName
        self.directory = directory
        self.lock = FolderLock(lock if lock is not None else defaultLockPath(directory))
        self.cache = cache if cache is not None else ManifestCache(defaultCachePath(directory))
        self.share = SharedDirectory(
            directory, runInThread=runInThread, cache=self.cache, pieceSize=pieceSize
        )
        # One bucket for every upload of this node (TCP and TLS).
        self.limiter = UploadLimiter(reactor, maxRate) if maxRate is not None else None
        self.key = key if key is not None else identity.NodeKey.generate()
        self.node = self.key.node
        self.secret = secret
        self.advertise = advertise
        self.advertisePort = advertisePort
        self.advertiseUdp = advertiseUdp
        self.heartbeat = heartbeat
        self.rescan = rescan
        self.metrics = None
        if metrics is not None:
            from ..metrics import MetricsService, NodeMetrics

            share = self.share
            self.metrics = NodeMetrics(
                files=lambda: len(share.entries),
                sharedBytes=lambda: sum(entry.size for entry in share.entries.values()),
                backlog=lambda: share.backlog,
            )
            MetricsService(reactor, metrics, self.metrics.registry).setServiceParent(self)
        self.files = FileServerFactory(
            self.share,
            reactor,
            key=self.key,
            maxConnections=maxConnections,
            maxPerAddress=maxPerAddress,
            maxGetsPerAddress=maxGetsPerAddress,
            requestDeadline=requestDeadline,
            idleTimeout=idleTimeout,
            closeDeadline=closeDeadline,
            maxUploads=maxUploads,
            limiter=self.limiter,
            metrics=self.metrics,
        )
        # The default port is dual-stack; on a host without IPv6 it falls
        # back to IPv4 (UDP beside it too).  A port the user typed never does.
        default = description == NODE_DEFAULT_PORT
        self.listener = ListeningService(
            reactor, description, self.files, "peernode", fallback=NODE_IPV4_PORT if default else None
        )
        self.listener.setServiceParent(self)
        self.udpListener: Optional[DatagramListeningService] = None
        if udp is not None:
            # Serve blocks as large as a client asks for (up to 60 KiB on
            # loopback); clients default to blocks that fit Ethernet.
            server = UDPFileServer(
                self.share,
                reactor,
                blockSize=MAX_BLOCK,
                maxTransfers=udpMaxTransfers,
                maxPerAddress=udpMaxPerAddress,
                idleTimeout=udpIdleTimeout,
                unackedTimeout=udpUnackedTimeout,
            )
            server.noisy = False
            self.udpListener = DatagramListeningService(
                reactor,
                udp[0],
                udp[1],
                server,
                "peernode",
                maxPacketSize=MAX_DATAGRAM,
                fallback="" if default and udp[1] == DUAL_STACK_UDP else None,
            )
            self.udpListener.setServiceParent(self)
        self.tlsListener: Optional[ListeningService] = None
        if tls is not None:
            # The same file server (and the same caps) behind TLS with the
            # node's key; p2prelay.tls imports OpenSSL, so only when asked.
            from ..tls import nodeTLSFactory

            self.tlsListener = ListeningService(
                reactor, tls, nodeTLSFactory(self.key, self.files, reactor), "peernode TLS"
            )
            self.tlsListener.setServiceParent(self)
        # Kept open while the relay cannot reach us (see node/control.py);
        # ``connectOut(host, port)``, an endpoint for a reverse order (None: TCP).
        self.control = ControlConnection(
            reactor,
            relay,
            self.key,
            self.files,
            secret=secret,
            reactor=reactor,
            endpointFor=connectOut,
            onForgotten=self._forgotten,
            relayName=relayName,
        )
        self.registrar: Optional[Registrar] = None
        self.ready: Deferred[None] = Deferred()
        self._stopping: Optional[Deferred[None]] = None

    def startService(self) -> None:
        holder = self.lock.acquire()
        if holder is not None:
            self.log.warn(
                "another node ({holder}) already shares {dir} on this machine: clients will "
                "see its files twice, under two node ids (lock: {lock})",
                holder=holder,
                dir=self.directory,
                lock=str(self.lock.path),
            )
        super().startService()
        ensureDeferred(self._start()).addErrback(self._notStarted)

    def _notStarted(self, failure) -> None:
        if not failure.check(ListenFailed):  # a listener has logged those
            self.log.failure("peer node failed to start", failure)
        self.ready.errback(failure)

    async def _start(self) -> None:
        optional = (self.udpListener, self.tlsListener)
        listeners = [self.listener] + [listener for listener in optional if listener is not None]
        # Wait for every listener, so no failure is left unobserved.
        outcomes = await DeferredList(
            [listener.whenListening for listener in listeners], consumeErrors=True
        )
        for listener, (ok, result) in zip(listeners, outcomes):
            if not ok:
                raise ListenFailed(listener.description, result.getErrorMessage())
        bound = {listener: result for listener, (ok, result) in zip(listeners, outcomes)}
        port, udpPort, tlsPort = (bound.get(s) for s in (self.listener, *optional))
        began = self.reactor.seconds()
        await self.share.scan()
        self.log.info(
            "sharing {files} ({size}) from {dir}, scanned in {seconds:.1f} s",
            files=plural(len(self.share.entries), "file"),
            size=humanSize(sum(entry.size for entry in self.share.entries.values())),
            count=len(self.share.entries),
            dir=self.share.root,
            seconds=self.reactor.seconds() - began,
        )
        self.registrar = Registrar(
            self.reactor,
            self.relay,
            self.share,
            self.key,
            port.getHost().port,
            secret=self.secret,
            advertise=self.advertise,
            advertisePort=self.advertisePort,
            advertiseUdp=None if udpPort is None else self.advertiseUdp,
            udp=None if udpPort is None else udpPort.getHost().port,
            tls=None if tlsPort is None else tlsPort.getHost().port,
            heartbeat=self.heartbeat,
            rescan=self.rescan,
            relayName=self.relayName,
        )
        self.registrar.channel = self.control
        self.registrar.onReachable = self._reachability
        if self.running:
            self.registrar.start()
        self.ready.callback(None)

    def _reachability(self, reachable: bool) -> None:
        """The relay said whether it reaches us: keep a control connection only if not."""
        if reachable:
            if self.control.running:
                self.log.info("the relay reaches this node now; closing the control connection")
                self.control.stop()
        elif self.running and self._stopping is None and not self.control.running:
            self.control.start()

    def _forgotten(self) -> None:
        """The relay refused our control connection for want of an entry: register again."""
        if self.registrar is not None and self._stopping is None:
            self.registrar.registerSoon()

    def stopService(self):
        # Called by twistd, by a reactor shutdown trigger, or both.
        if self._stopping is None:

            async def stop() -> None:
                if self.registrar is not None:
                    await self.registrar.stop()
                await self.control.stop()
                await super(NodeService, self).stopService()
                if self.limiter is not None:
                    self.limiter.stop()
                self.cache.close()
                self.lock.release()

            self._stopping = ensureDeferred(stop())
        return self._stopping
