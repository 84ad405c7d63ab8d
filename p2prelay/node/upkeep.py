"""
Keeping a peer node's entry at the relay true for as long as it runs.

Phase 1 of the protocol is one REGISTER; everything after is upkeep:
heartbeats inside the lifetime the relay granted, a full registration again
when the relay forgot us (it restarted, or we expired) or our files changed,
jittered exponential backoff while the relay is unreachable (the node keeps
serving meanwhile), and an UNREGISTER on a clean stop.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from .. import wire
from ..client.relay import Reply, query
from .share import SharedDirectory

DEFAULT_RESCAN = 10.0
ASSUMED_TTL = 90.0  # until the relay tells us its own
FIRST_RETRY = 1.0
MAX_RETRY = 60.0
RESTART_JITTER = 1.0  # spread re-registrations after a relay restart
STOP_TIMEOUT = 3.0


class Registrar:
    """
    The upkeep loop for one node's registration.

    ``port`` and ``udp`` are what the node serves on; ``advertise`` is the
    host put in the registry (None: the address the relay sees us from).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        relay: IStreamClientEndpoint,
        share: SharedDirectory,
        node: str,
        port: int,
        *,
        advertise: Optional[str] = None,
        udp: Optional[int] = None,
        heartbeat: Optional[float] = None,
        rescan: Optional[float] = DEFAULT_RESCAN,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.clock = clock
        self.relay = relay
        self.share = share
        self.node = node
        self.port = port
        self.advertise = advertise
        self.udp = udp
        self.heartbeat = heartbeat
        self.rescanInterval = rescan
        self._rng = rng
        self.ttl = ASSUMED_TTL
        self.boot: Optional[str] = None
        self.registered = False
        self._needRegister = True
        self._failures = 0
        self._timer: Optional[IDelayedCall] = None
        self._rescanTimer: Optional[IDelayedCall] = None
        self._busy: Optional[Deferred[None]] = None
        self._running = False
        self.firstRegistration: Deferred[Reply] = Deferred()

    # Lifecycle.

    def start(self) -> None:
        self._running = True
        self._schedule(0)
        if self.rescanInterval:
            self._rescanTimer = self.clock.callLater(self.rescanInterval, self._rescan)

    async def stop(self) -> None:
        """Stop the loop and unregister, so clients stop being sent here."""
        self._running = False
        for timer in (self._timer, self._rescanTimer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._busy is not None:
            self._busy.cancel()
        if not self.registered:
            return
        try:
            await query(
                self.relay, wire.request(wire.UNREGISTER, node=self.node), self.clock, STOP_TIMEOUT
            )
            self.log.info("unregistered from the relay")
        except Exception as e:
            self.log.info("could not unregister: {error}", error=e)
        self.registered = False

    @property
    def interval(self) -> float:
        """Seconds between heartbeats: as configured, else a third of the TTL."""
        return self.heartbeat if self.heartbeat else self.ttl / 3

    def registerSoon(self, jitter: float = 0.0) -> None:
        """Send a full registration (files changed, relay restarted...)."""
        self._needRegister = True
        if self._running and self._busy is None:
            self._schedule(self._rng() * jitter)

    # The loop.

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        d = ensureDeferred(self._contact())
        d.addErrback(lambda f: self.log.failure("registration loop bug", f))
        if not d.called:
            self._busy = d
            d.addBoth(self._idle)

    def _idle(self, _: object) -> None:
        self._busy = None

    async def _contact(self) -> None:
        wasHeartbeat = not self._needRegister
        try:
            if self._needRegister:
                reply = await self._register()
            else:
                reply = await self._heartbeat()
        except wire.ProtocolError as e:
            if e.status == wire.NOT_FOUND and wasHeartbeat:
                self.log.info("the relay forgot this node; registering again")
                self._needRegister = True
                self._schedule(self._rng() * RESTART_JITTER)
                return
            self._retry(f"relay refused: {e}")
            return
        except Exception as e:
            self._retry(str(e) or e.__class__.__name__)
            return
        self._failures = 0
        ttl = reply.status.get("ttl")
        if ttl:
            try:
                self.ttl = max(float(ttl), 0.1)
            except ValueError:
                pass
        boot = reply.status.get("boot")
        restarted = self.boot is not None and boot != self.boot
        self.boot = boot
        if restarted and wasHeartbeat:
            self.log.info("the relay restarted; registering again")
            self._needRegister = True
            self._schedule(self._rng() * RESTART_JITTER)
            return
        if self._running:
            # Files may have changed while we were talking to the relay.
            self._schedule(0 if self._needRegister else self.interval)

    async def _register(self) -> Reply:
        entries = sorted(self.share.entries.values(), key=lambda e: e.name)
        payload = b"".join(
            [
                wire.request(
                    wire.REGISTER,
                    node=self.node,
                    port=self.port,
                    host=self.advertise,
                    udp=self.udp,
                    files=len(entries),
                ),
                *(
                    wire.item(wire.FILE, name=e.name, size=e.size, sha256=e.sha256)
                    for e in entries
                ),
                wire.end(len(entries)),
            ]
        )
        self._needRegister = False
        try:
            reply = await query(self.relay, payload, self.clock)
        except BaseException:
            self._needRegister = True
            raise
        self.registered = True
        self.log.info(
            "registered {count} files with the relay as {host}:{port}",
            count=len(entries),
            host=reply.status.get("host"),
            port=self.port,
        )
        if not self.firstRegistration.called:
            self.firstRegistration.callback(reply)
        return reply

    async def _heartbeat(self) -> Reply:
        return await query(
            self.relay, wire.request(wire.HEARTBEAT, node=self.node), self.clock
        )

    def _retry(self, why: str) -> None:
        self._failures += 1
        # Never back off past the heartbeat, so a relay that comes back
        # hears from every node within about one interval.
        cap = min(MAX_RETRY, self.interval * 1.5)
        base = min(cap, FIRST_RETRY * 2 ** (self._failures - 1))
        delay = base * (0.5 + self._rng() / 2)
        self.log.warn(
            "relay unreachable ({why}); retrying in {delay:.1f}s", why=why, delay=delay
        )
        if self._running:
            self._schedule(delay)

    def _rescan(self) -> None:
        self._rescanTimer = None
        d = self.share.scan()

        def scanned(changed: bool) -> None:
            if changed:
                self.log.info("shared files changed; registering again")
                self.registerSoon()

        d.addCallback(scanned)
        d.addErrback(lambda f: self.log.failure("rescan failed", f))
        d.addBoth(self._nextRescan)

    def _nextRescan(self, _: object) -> None:
        if self._running and self.rescanInterval:
            self._rescanTimer = self.clock.callLater(self.rescanInterval, self._rescan)
