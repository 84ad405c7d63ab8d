"""
The relay as a Twisted service: registry, expiry sweep, port and state file.

Assembled by ``tap.py``; twistd (or a ``.tac``) starts and stops it.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import MultiService
from twisted.internet import task
from twisted.logger import Logger

from ..limits import RELAY_MAX_CONNECTIONS, RELAY_MAX_PER_ADDRESS
from ..listening import ListeningService
from ..negotiation import CLOSE_DEADLINE, IDLE_TIMEOUT, MIN_RATE, NEGOTIATION_DEADLINE
from .dialback import (
    DIALBACK_BURST,
    DIALBACK_RATE,
    DIALBACK_TIMEOUT,
    RECHECK_INTERVAL,
    REPORT_BURST,
    REPORT_RATE,
    DialBack,
)
from .circuits import CircuitLimits
from .control import MAX_CONTROL
from .protocol import MAX_INFLIGHT_BYTES, RelayFactory
from .registry import MAX_PER_SOURCE, MAX_TOTAL, Registry
from .store import StateStore, StateUnwritable, StateWriter, checkWritable

SWEEP_FRACTION = 4  # sweep expired peers this many times per lifetime
LISTEN_BACKLOG = 1024  # connections the kernel queues for accept (Twisted's default: 50)


class RelayService(MultiService):
    """
    The relay: a registry, its expiry sweep, the listening port and,
    with ``state``, the file that carries the registry across restarts
    (loaded at start, then written change by change on the store's own
    thread).

    Every limit is a keyword argument defaulting to its constant (see
    ``docs/limits.rst``): registrations per source address and in total,
    registration bytes being received, the negotiation deadline, minimum
    rate, idle timeout and close deadline, the dial-back's timeout and rates (per
    second, with bursts) for registrations and DEAD reports, the control
    connections held at most, and the relayed path's ``circuits`` limits
    (:class:`~p2prelay.relay.circuits.CircuitLimits`).

    ``metrics``, a server endpoint description, serves Prometheus metrics
    there (``/metrics``); ``verbose`` logs every lookup at debug level.
    A ``state`` file that cannot be written stops the start
    (:class:`~p2prelay.relay.store.StateUnwritable`; under twistd, exit 1).
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        description: str,
        ttl: float,
        state: Optional[str] = None,
        *,
        maxConnections: int = RELAY_MAX_CONNECTIONS,
        maxPerAddress: int = RELAY_MAX_PER_ADDRESS,
        secret: Optional[bytes] = None,
        private: bool = False,
        maxRegistrations: int = MAX_TOTAL,
        maxRegistrationsPerAddress: int = MAX_PER_SOURCE,
        maxRegisteringBytes: int = MAX_INFLIGHT_BYTES,
        deadline: float = NEGOTIATION_DEADLINE,
        minRate: float = MIN_RATE,
        idleTimeout: float = IDLE_TIMEOUT,
        closeDeadline: float = CLOSE_DEADLINE,
        dialbackTimeout: float = DIALBACK_TIMEOUT,
        dialbackRate: float = DIALBACK_RATE,
        dialbackBurst: int = DIALBACK_BURST,
        reportRate: float = REPORT_RATE,
        reportBurst: int = REPORT_BURST,
        recheckInterval: float = RECHECK_INTERVAL,
        metrics: Optional[str] = None,
        verbose: bool = False,
        circuits: CircuitLimits = CircuitLimits(),
        maxControl: int = MAX_CONTROL,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.registry = Registry(
            reactor.seconds,
            ttl,
            maxPerSource=maxRegistrationsPerAddress,
            maxTotal=maxRegistrations,
        )
        self.store = StateStore(state) if state else None
        self.writer: Optional[StateWriter] = None
        self.metrics = None
        if metrics is not None:
            from ..metrics import MetricsService, RelayMetrics

            self.metrics = RelayMetrics(
                peers=lambda: len(self.registry.active()),
                entries=lambda: self.registry.figures().entries,
            )
            MetricsService(reactor, metrics, self.metrics.registry).setServiceParent(self)
        self.factory = RelayFactory(
            self.registry,
            reactor,
            maxConnections=maxConnections,
            maxPerAddress=maxPerAddress,
            secret=secret,
            private=private,
            dialback=DialBack(reactor, timeout=dialbackTimeout),
            maxInflight=maxRegisteringBytes,
            deadline=deadline,
            minRate=minRate,
            idleTimeout=idleTimeout,
            closeDeadline=closeDeadline,
            dialbackRate=dialbackRate,
            dialbackBurst=dialbackBurst,
            reportRate=reportRate,
            reportBurst=reportBurst,
            recheckInterval=recheckInterval,
            metrics=self.metrics,
            verbose=verbose,
            circuits=circuits,
            maxControl=maxControl,
        )
        self.listener = ListeningService(
            reactor, description, self.factory, "relay", backlog=LISTEN_BACKLOG
        )
        self.listener.setServiceParent(self)
        self._sweep = task.LoopingCall(self._expire)
        self._sweep.clock = reactor

    def privilegedStartService(self) -> None:
        # twistd: a state file that cannot be written ends the relay at
        # once (exit 1, one line), before any port is bound.
        try:
            self._checkState()
        except StateUnwritable as e:
            self.log.critical("relay cannot start: {error}", error=str(e))
            raise SystemExit(1)
        super().privilegedStartService()

    def _checkState(self) -> None:
        if self.store is not None and self.writer is None:
            checkWritable(self.store.path)

    def startService(self) -> None:
        # Started without twistd: the caller sees StateUnwritable.
        self._checkState()
        if self.store is not None and self.writer is None:
            peers = self.store.load()
            stale = [peer.node for peer in peers if not self.registry.restore(peer)]
            self.log.info(
                "restored {count} live peers from {path}",
                count=len(self.registry),
                path=str(self.store.path),
            )
            self.writer = StateWriter(self.store)
            self.writer.start()
            for node in stale:
                self.writer.removed(node)
            self.registry.listener = self.writer
        super().startService()
        self._sweep.start(max(self.registry.ttl / SWEEP_FRACTION, 0.25), now=False)

    def stopService(self):
        if self._sweep.running:
            self._sweep.stop()
        self.factory.circuits.stop()
        d = super().stopService()
        if self.writer is not None:
            self.writer.close()  # what is queued is written before the relay exits
        return d

    def _expire(self) -> None:
        for peer in self.registry.expire():
            self.log.info(
                "expired {node} at {host}:{port}", node=peer.node, host=peer.host, port=peer.port
            )
