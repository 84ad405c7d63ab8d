"""
The relay as a Twisted service: registry (in memory, or a Redis several
relays share), expiry sweep, port and state file.

Assembled by ``tap.py``; twistd (or a ``.tac``) starts and stops it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

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
from .backends.interface import RegistryUnavailable
from .backends.url import RedisAddress
from .registry import MAX_PER_SOURCE, MAX_TOTAL, Figures, Registry
from .store import StateStore, StateUnwritable, StateWriter, checkWritable

SWEEP_FRACTION = 4  # sweep expired peers this many times per lifetime
LISTEN_BACKLOG = 1024  # connections the kernel queues for accept (Twisted's default: 50)
HEALTH_INTERVAL = 2.0  # seconds between two looks at a shared registry (its epoch, whether it answers)
FIGURES_MAX_AGE = 5.0  # seconds the metrics' peers and entries of a shared registry may be old


class CachedFigures:
    """
    The metrics' ``peers`` and ``entries`` of a shared registry: counting
    them is a full scan, so a scrape reads the last count, and starts a new
    one when that is older than ``maxAge`` seconds (one at a time).
    """

    def __init__(self, figures: Callable[[], Any], now: Callable[[], float], maxAge: float = FIGURES_MAX_AGE) -> None:
        self._figures = figures
        self._now = now
        self.maxAge = maxAge
        self.last = Figures(0, 0, 0, 0)
        self._when: Optional[float] = None
        self._counting = False

    def current(self) -> Figures:
        now = self._now()
        if not self._counting and (self._when is None or now - self._when >= self.maxAge):
            self._counting = True

            def counted(figures: Figures) -> None:
                self.last, self._when = figures, self._now()

            def done(result: object) -> None:
                self._counting = False

            d = self._figures()
            d.addCallback(counted)
            d.addErrback(lambda f: f.trap(RegistryUnavailable))
            d.addBoth(done)
        return self.last


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
        registry: Optional[RedisAddress] = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.registryAddress = registry
        assert registry is None or not state, "--state keeps the in-memory registry only"
        self.registry: Optional[Registry] = None
        if registry is None:
            self.registry = Registry(
                reactor.seconds,
                ttl,
                maxPerSource=maxRegistrationsPerAddress,
                maxTotal=maxRegistrations,
            )
            self.backend: Any = None  # the factory's MemoryBackend, below
        else:
            from .backends import redis

            self.backend = redis.lazy(
                registry,
                reactor,
                ttl=ttl,
                maxPerSource=maxRegistrationsPerAddress,
                maxTotal=maxRegistrations,
            )
        self.store = StateStore(state) if state else None
        self.writer: Optional[StateWriter] = None
        self.metrics = None
        if metrics is not None:
            from ..metrics import MetricsService, RelayMetrics

            if self.registry is not None:
                self.metrics = RelayMetrics(
                    peers=lambda: len(self.registry.active()),
                    entries=lambda: self.registry.figures().entries,
                )
            else:
                self.figures = CachedFigures(self.backend.figures, reactor.seconds)
                self.metrics = RelayMetrics(
                    peers=lambda: self.figures.current().peers,
                    entries=lambda: self.figures.current().entries,
                )
            MetricsService(reactor, metrics, self.metrics.registry).setServiceParent(self)
        self.factory = RelayFactory(
            self.registry if self.registry is not None else self.backend,
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
        if self.backend is None:
            self.backend = self.factory.backend
        self._sweep = task.LoopingCall(self._expire)
        self._sweep.clock = reactor
        self._health = task.LoopingCall(self._look)
        self._health.clock = reactor

    def privilegedStartService(self) -> None:
        # twistd: a state file that cannot be written ends the relay at
        # once (exit 1, one line), before any port is bound.
        try:
            self._checkState()
            self._firstLook()
        except StateUnwritable as e:
            self.log.critical("relay cannot start: {error}", error=str(e))
            raise SystemExit(1)
        except RegistryUnavailable as e:
            self.log.critical("relay cannot start: {error}", error=str(e))
            raise SystemExit(1)
        super().privilegedStartService()

    def _firstLook(self) -> None:
        """
        A shared registry answers before the relay listens, and its epoch is
        the relay's ``boot=``: a blocking round trip, once, before the
        reactor runs (nothing else is waiting yet).
        """
        if self.registryAddress is None or self._health.running:
            return
        from .backends import redis

        self.factory.boot = redis.preflight(self.registryAddress, self.backend.prefix, self.backend.timeout)

    def _checkState(self) -> None:
        if self.store is not None and self.writer is None:
            checkWritable(self.store.path)

    def startService(self) -> None:
        # Started without twistd: the caller sees StateUnwritable (or RegistryUnavailable).
        self._checkState()
        if not self.running:
            self._firstLook()
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
        self._sweep.start(max(self.backend.ttl / SWEEP_FRACTION, 0.25), now=False)
        if self.registryAddress is not None:
            self._health.start(HEALTH_INTERVAL, now=False)
            d = self.backend.listen(self.factory.orderForwarded)
            d.addErrback(lambda f: self.log.failure("bug while subscribing to forwarded orders", f))
            self.log.info(
                "registry: Redis at {where}, epoch {epoch}", where=self.backend.where, epoch=self.factory.boot
            )

    def stopService(self):
        if self._sweep.running:
            self._sweep.stop()
        if self._health.running:
            self._health.stop()
        self.factory.circuits.stop()
        d = super().stopService()
        if self.writer is not None:
            self.writer.close()  # what is queued is written before the relay exits
        if self.registryAddress is not None:
            d.addCallback(lambda _: self.backend.close())
            d.addErrback(lambda f: None)  # a Redis already gone has nothing to let go of
        return d

    def _expire(self):
        def dropped(peers) -> None:
            for peer in peers:
                self.log.info(
                    "expired {node} at {host}:{port}", node=peer.node, host=peer.host, port=peer.port
                )

        d = self.backend.expire()
        d.addCallback(dropped)
        return d.addErrback(self._unavailable)

    def _unavailable(self, failure) -> None:
        failure.trap(RegistryUnavailable)
        self.factory.registryLost(failure.value)

    def _look(self):
        """
        A shared registry's health: its epoch (new when Redis lost the
        entries: answers say so as ``boot=`` and nodes register again), and
        one log line when it is lost and one when it is back.
        """

        def answered(epoch: str) -> None:
            self.factory.registryBack()
            if epoch != self.factory.boot:
                self.log.warn(
                    "the registry's epoch is now {epoch} (was {old}): its entries were lost; "
                    "nodes register again",
                    epoch=epoch,
                    old=self.factory.boot,
                )
                self.factory.boot = epoch

        def lost(failure) -> None:
            self._unavailable(failure)
            self.backend.revive()  # if txredisapi gave up reconnecting

        d = self.backend.epoch()
        d.addCallback(answered)
        return d.addErrback(lost)
