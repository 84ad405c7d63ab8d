"""
Keeping a peer node's entry at the relay true for as long as it runs.

Phase 1 of the protocol is one REGISTER; everything after is upkeep:
heartbeats inside the lifetime the relay granted, a full registration again
when the relay forgot us (it restarted, or we expired) or our files changed,
jittered exponential backoff while the relay is unreachable (the node keeps
serving meanwhile), and an UNREGISTER on a clean stop.

The loop is a state machine (automat); its transitions, in short::

    idle ------------start------> registering
    registering ---answered-----> waitingToHeartbeat    (after one interval)
    registering ---failed-------> waitingToRegister     (after a backoff)
    waitingToHeartbeat ---due---> heartbeating
    heartbeating --answered-----> waitingToHeartbeat
    heartbeating --failed-------> waitingToHeartbeat    (after a backoff)
    heartbeating --forgotten----> waitingToRegister     (404 or new boot; jitter)
    waitingToRegister ----due---> registering
    changed: registering -> registeringStale, heartbeating -> heartbeatingStale
             (each ends in waitingToRegister, due at once), waiting -> waitingToRegister
    stop:  idle -> stopped;  a REGISTER in flight -> finishing (its answer, or
           STOP_TIMEOUT) -> unregistering;  anything else -> unregistering
           (a HEARTBEAT in flight is abandoned);  unregistering -> stopped

``unregistering`` sends UNREGISTER only if the relay may hold our entry
(``registered``), so a node that never got through contacts nobody on the
way out, and one whose REGISTER was in flight leaves no ghost behind.

Every REGISTER, HEARTBEAT and UNREGISTER is challenged by the relay
(``100 nonce=``); the query answers with ``PROOF sig=`` made with the
node's key (and ``mac=`` with the shared secret when the relay asks).  A
relay that refuses for a while (``503 retry=N``) is not asked again sooner
than it said.

``relay`` may be a :class:`~p2prelay.addresses.FailoverEndpoint` (``--relay
a,b``): each contact goes to the relay that last answered, else the next;
a relay that does not know us answers a heartbeat 404 (or with another
boot) and is registered with afresh, so a node whose relay dies carries on
through the next one.  The log names the relay each contact reached.
"""

from __future__ import annotations

import random
from typing import Callable, List, Optional, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import identity, wire
from ..addresses import AllRelaysFailed, relayReached
from ..human import humanSize, plural
from ..client.relay import QUERY_TIMEOUT, ProofNeeded, QueryProtocol, Reply, answeredBadly, keyProver
from ..negotiation import negotiate
from .share import SharedDirectory

DEFAULT_RESCAN = 10.0
ASSUMED_TTL = 90.0  # until the relay tells us its own
FIRST_RETRY = 1.0
MAX_RETRY = 60.0
RESTART_JITTER = 1.0  # spread re-registrations after a relay restart
STOP_TIMEOUT = 3.0  # for the answer to a REGISTER in flight, and for the UNREGISTER


class _Loop(Protocol):
    """The inputs of the registration loop."""

    def start(self) -> None:
        "Begin: register at once."

    def stop(self) -> None:
        "Take the registration back, and halt."

    def due(self) -> None:
        "The timer for the next contact fired."

    def answered(self) -> None:
        "The relay accepted the REGISTER or HEARTBEAT in flight."

    def forgotten(self) -> None:
        "A heartbeat found a relay that no longer knows us (404, or a new boot)."

    def failed(self, why: str, retry: Optional[float] = None) -> None:
        "The contact in flight did not get through (retry: seconds the relay asked for)."

    def changed(self, jitter: float) -> None:
        "The shared files changed: register them again."

    def unregistered(self) -> None:
        "Taking the registration back is over, however it went."


class _Channel(Protocol):
    """What the registrar needs of a control connection (node/control.py)."""

    @property
    def isOpen(self) -> bool:
        "True while heartbeats can go over it."

    def heartbeat(self) -> Deferred[wire.Message]:
        "Send a HEARTBEAT; fires with the relay's 200 line, or fails."


class Registrar:
    """
    The upkeep loop for one node's registration.

    ``key`` is the node's :class:`identity.NodeKey` (its id is the key's);
    ``secret`` the shared secret of a closed network, if any.  ``port``,
    ``udp`` and ``tls`` are what the node serves on; ``advertise`` is the host put in
    the registry (None: the address the relay sees us from), ``advertisePort``
    and ``advertiseUdp`` the ports put there (None: ``port`` and ``udp``), for
    a router that forwards other external ports to these.
    ``registered`` is true while the relay may hold our entry;
    ``reachable`` whether the relay last said it could reach us.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        relay: IStreamClientEndpoint,
        share: SharedDirectory,
        key: identity.NodeKey,
        port: int,
        *,
        secret: Optional[bytes] = None,
        advertise: Optional[str] = None,
        advertisePort: Optional[int] = None,
        advertiseUdp: Optional[int] = None,
        udp: Optional[int] = None,
        tls: Optional[int] = None,
        heartbeat: Optional[float] = None,
        rescan: Optional[float] = DEFAULT_RESCAN,
        rng: Callable[[], float] = random.random,
        relayName: Optional[str] = None,
    ) -> None:
        self.clock = clock
        self.relay = relay
        # The relay as the user named it (--relay), for warnings: "relay HOST:PORT unreachable".
        self.relayName = relayName
        self.share = share
        self.key = key
        self.node = key.node
        self.secret = secret
        self.port = port
        self.advertise = advertise
        self.advertisePort = advertisePort
        self.advertiseUdp = advertiseUdp
        self.udp = udp
        self.tls = tls
        self.heartbeat = heartbeat
        self.rescanInterval = rescan
        self._rng = rng
        self.ttl = ASSUMED_TTL
        self.boot: Optional[str] = None
        self.registered = False
        self.reachable: Optional[bool] = None
        # Told whether the relay reaches us, after every answer that says
        # (the node opens or closes its control connection on it).
        self.onReachable: Optional[Callable[[bool], None]] = None
        # The control connection while the node keeps one: heartbeats go
        # over it while it is open (see node/control.py).
        self.channel: Optional[_Channel] = None
        self.firstRegistration: Deferred[Reply] = Deferred()
        self._sentAt = 0.0  # when the contact in flight was sent
        # Who the last failure is about, for its log line: a relay's name,
        # or None when every relay of a list failed (see _backOff).
        self._failedAt: Optional[str] = relayName
        self._failures = 0
        self._timer: Optional[IDelayedCall] = None
        self._inflight: Optional[Deferred[Reply]] = None
        self._rescans: Optional[LoopingCall] = None
        self._stopWaiters: List[Deferred[None]] = []
        self._loop: _Loop = _machine(self)

    # The public face.

    @property
    def registeredPort(self) -> int:
        """The TCP port put in the registry: the one clients connect to."""
        return self.port if self.advertisePort is None else self.advertisePort

    @property
    def registeredUdp(self) -> Optional[int]:
        """The UDP port put in the registry (None: the node serves no UDP)."""
        return self.udp if self.udp is None or self.advertiseUdp is None else self.advertiseUdp

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        """Stop the loop and unregister, so clients stop being sent here."""
        done: Deferred[None] = Deferred()
        self._stopWaiters.append(done)
        self._loop.stop()
        await done

    def registerSoon(self, jitter: float = 0.0) -> None:
        """Send a full registration (files changed, relay restarted...)."""
        self._loop.changed(jitter)

    @property
    def interval(self) -> float:
        """Seconds between heartbeats: as configured, else a third of the TTL."""
        return self.heartbeat if self.heartbeat else self.ttl / 3

    # What the transitions do.

    def _wait(self, delay: float) -> None:
        """The next contact (whichever the state says) in ``delay`` seconds."""
        self._cancelTimer()
        self._timer = self.clock.callLater(delay, self._loop.due)

    def _waitAtMost(self, delay: float) -> None:
        if self._timer is None or self._timer.getTime() > self.clock.seconds() + delay:
            self._wait(delay)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _backOff(self, why: str, retry: Optional[float] = None) -> None:
        self._failures += 1
        # Never back off past the heartbeat, so a relay that comes back
        # hears from every node within about one interval...
        cap = min(MAX_RETRY, self.interval * 1.5)
        base = min(cap, FIRST_RETRY * 2 ** (self._failures - 1))
        delay = base * (0.5 + self._rng() / 2)
        if retry is not None:
            # ...unless it asked for longer (503 retry=), within reason.
            delay = max(delay, min(retry, MAX_RETRY))
        if self._failedAt is None and self.relayName is not None and "," in self.relayName:
            self.log.warn("no relay reachable ({why}); retrying in {delay:.1f} s", why=why, delay=delay)
        else:
            self.log.warn(
                "relay {relay}unreachable ({why}); retrying in {delay:.1f} s",
                relay=f"{self._failedAt} " if self._failedAt else "",
                why=why,
                delay=delay,
            )
        self._wait(delay)

    def _startRescans(self) -> None:
        if self.rescanInterval:
            self._rescans = LoopingCall(self._rescan)
            self._rescans.clock = self.clock
            self._rescans.start(self.rescanInterval, now=False)

    def _halt(self) -> None:
        """No more timers and no more rescans (one in progress finishes unheard)."""
        self._cancelTimer()
        if self._rescans is not None and self._rescans.running:
            self._rescans.stop()

    def _send(self, verb: str) -> None:
        """Send a REGISTER or a HEARTBEAT; its outcome becomes an input."""
        count = 0
        if verb == wire.REGISTER:
            payload, count = self._registration()
            purpose = identity.REGISTER_PROOF
        else:
            payload = wire.request(wire.HEARTBEAT, node=self.node)
            purpose = identity.HEARTBEAT_PROOF
        channel = self.channel
        protocol: Optional[QueryProtocol] = None
        if verb == wire.HEARTBEAT and channel is not None and channel.isOpen:
            # Over the control connection: it is proved already.
            d = channel.heartbeat().addCallback(lambda status: Reply(status, []))
        else:
            protocol = QueryProtocol(self.clock, payload, QUERY_TIMEOUT, self._prover(purpose))
            d = Deferred.fromCoroutine(negotiate(self.relay, protocol))
        self._inflight = d
        self._sentAt = self.clock.seconds()
        d.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(verb, count, d, protocol),
            errbackArgs=(verb, d, protocol),
        )

    def _relayOf(self, protocol: Optional[QueryProtocol]) -> Optional[str]:
        """The relay a contact reached, by name: of a list, the one it reached; else as named."""
        if protocol is None:  # over the control connection: the relay it reached
            relay = getattr(self.channel, "reached", None)
        else:
            relay = relayReached(self.relay, protocol)
        return relay.name if relay is not None else self.relayName

    def _prover(self, purpose: bytes):
        return keyProver(self.key, purpose, self.secret)

    def _abandon(self) -> None:
        """Drop the contact in flight without hearing how it ends."""
        d, self._inflight = self._inflight, None
        if d is not None:
            d.cancel()

    def _giveUp(self) -> None:
        """Stop waiting for the contact in flight; it ends as failed."""
        self._timer = None
        if self._inflight is not None:
            self._inflight.cancel()

    def _unregister(self) -> None:
        self._cancelTimer()
        if not self.registered:
            self._loop.unregistered()
            return
        protocol = QueryProtocol(
            self.clock,
            wire.request(wire.UNREGISTER, node=self.node),
            STOP_TIMEOUT,
            self._prover(identity.UNREGISTER_PROOF),
        )
        d = Deferred.fromCoroutine(negotiate(self.relay, protocol))

        def done(result: object) -> None:
            if isinstance(result, Failure):
                self.log.info("could not unregister: {error}", error=result.value)
            else:
                relay = relayReached(self.relay, protocol)
                self.log.info(
                    "unregistered from {relay}",
                    relay="the relay" if relay is None else f"relay {relay.name}",
                )
            self.registered = False
            self._loop.unregistered()

        d.addBoth(done)

    def _notifyStopped(self) -> None:
        waiters, self._stopWaiters = self._stopWaiters, []
        for d in waiters:
            d.callback(None)

    # Outcomes of contacts, turned into inputs.

    def _answered(
        self, reply: Reply, verb: str, count: int, d: Deferred, protocol: Optional[QueryProtocol] = None
    ) -> None:
        if d is not self._inflight:
            return  # abandoned
        self._inflight = None
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
        if verb == wire.HEARTBEAT:
            if restarted:
                self.log.info("the relay restarted; registering again")
                self._loop.forgotten()
            else:
                self._loop.answered()
                self._learnReach(reply, registering=False)
            return
        self.registered = True
        reachable = reply.status.get("reachable") != "0"  # absent: an older relay, no dial-back
        size = sum(entry.size for entry in self.share.entries.values())
        self.log.info(
            "announced {files} ({size}) in {seconds:.1f} s to relay {relay}as {host}:{port}",
            files=plural(count, "file"),
            size=humanSize(size),
            seconds=self.clock.seconds() - self._sentAt,
            relay=f"{name} " if (name := self._relayOf(protocol)) else "",
            count=count,
            bytes=size,
            host=reply.status.get("host"),
            port=self.registeredPort,
        )
        if not reachable and self.reachable is not False:
            self.log.warn(
                "the relay cannot reach this node ({why}); keeping a control connection to it "
                "so clients can still fetch via reverse or relayed paths",
                why=reply.status.text,
            )
        self._loop.answered()
        self._learnReach(reply, registering=True)
        if not self.firstRegistration.called:
            self.firstRegistration.callback(reply)

    def _learnReach(self, reply: Reply, registering: bool) -> None:
        """
        What an answer's ``reachable=`` says; a REGISTER answer without
        one means reachable, a heartbeat answer without one changes nothing.
        """
        value = reply.status.get("reachable")
        if value is None and not registering:
            return
        reachable = value != "0"
        if reachable and self.reachable is False:
            self.log.info("the relay reaches this node again: clients connect to it directly")
        self.reachable = reachable
        if self.onReachable is not None:
            self.onReachable(reachable)

    def _failed(
        self, failure: Failure, verb: str, d: Deferred, protocol: Optional[QueryProtocol] = None
    ) -> None:
        if d is not self._inflight:
            return  # abandoned
        self._inflight = None
        error = failure.value
        self._failedAt = None if isinstance(error, AllRelaysFailed) else self._relayOf(protocol)
        if isinstance(error, AllRelaysFailed):
            self._loop.failed(error.reasons)  # nothing was sent
            return
        if protocol is not None and answeredBadly(error):
            # Connected, yet no good answer (a hung relay still accepts
            # connections): of a list, the next contact tries the others first.
            relay = relayReached(self.relay, protocol)
            if relay is not None:
                self.relay.demote(relay)
        if isinstance(error, wire.ProtocolError):
            if error.status == wire.NOT_FOUND and verb == wire.HEARTBEAT:
                self.log.info("the relay forgot this node; registering again")
                self.registered = False
                self._failures = 0
                self._loop.forgotten()
                return
            why = f"relay refused: {error}"
            self._loop.failed(why, error.retry)
            return
        elif isinstance(error, ProofNeeded):
            why = str(error)
        else:
            neverSent = isinstance(error, ConnectError) and not isinstance(error, TimeoutError)
            if verb == wire.REGISTER and not neverSent:
                # It was sent, or may have been: the relay may hold it.
                self.registered = True
            why = str(error) or error.__class__.__name__
        self._loop.failed(why)

    def _registration(self) -> tuple[bytes, int]:
        entries = sorted(self.share.entries.values(), key=lambda e: e.name)
        payload = b"".join(
            [
                wire.request(
                    wire.REGISTER,
                    key=self.key.public,
                    node=self.node,
                    port=self.registeredPort,
                    host=self.advertise,
                    udp=self.registeredUdp,
                    tls=self.tls,
                    files=len(entries),
                ),
                *(
                    wire.item(
                        wire.FILE, name=e.name, size=e.size, sha256=e.sha256, **wire.pieceFields(e)
                    )
                    for e in entries
                ),
                wire.end(len(entries)),
            ]
        )
        return payload, len(entries)

    def _rescan(self) -> Deferred[None]:
        d = self.share.scan()

        def scanned(changed: bool) -> None:
            if changed:
                self.log.info("shared files changed; registering again")
                self.registerSoon()

        d.addCallback(scanned)
        d.addErrback(lambda f: self.log.failure("rescan failed", f))
        return d


# The machine.  Each transition's body is what the registrar does on it.

_builder = TypeMachineBuilder(_Loop, Registrar)
idle = _builder.state("idle")
registering = _builder.state("registering")
registeringStale = _builder.state("registeringStale")  # files changed since it was sent
waitingToHeartbeat = _builder.state("waitingToHeartbeat")
heartbeating = _builder.state("heartbeating")
heartbeatingStale = _builder.state("heartbeatingStale")
waitingToRegister = _builder.state("waitingToRegister")
finishing = _builder.state("finishing")  # stopping; waiting for the REGISTER in flight
unregistering = _builder.state("unregistering")
stopped = _builder.state("stopped")


@idle.upon(_Loop.start).to(registering)
def _begin(loop: _Loop, r: Registrar) -> None:
    r._startRescans()
    r._send(wire.REGISTER)


@waitingToRegister.upon(_Loop.due).to(registering)
def _register(loop: _Loop, r: Registrar) -> None:
    r._send(wire.REGISTER)


@waitingToHeartbeat.upon(_Loop.due).to(heartbeating)
def _heartbeat(loop: _Loop, r: Registrar) -> None:
    r._send(wire.HEARTBEAT)


@registering.upon(_Loop.answered).to(waitingToHeartbeat)
@heartbeating.upon(_Loop.answered).to(waitingToHeartbeat)
def _keepAlive(loop: _Loop, r: Registrar) -> None:
    r._wait(r.interval)


@registeringStale.upon(_Loop.answered).to(waitingToRegister)
@heartbeatingStale.upon(_Loop.answered).to(waitingToRegister)
def _registerAgain(loop: _Loop, r: Registrar) -> None:
    r._wait(0)


@heartbeating.upon(_Loop.forgotten).to(waitingToRegister)
@heartbeatingStale.upon(_Loop.forgotten).to(waitingToRegister)
def _reintroduce(loop: _Loop, r: Registrar) -> None:
    r._wait(r._rng() * RESTART_JITTER)


@registering.upon(_Loop.failed).to(waitingToRegister)
@registeringStale.upon(_Loop.failed).to(waitingToRegister)
@heartbeatingStale.upon(_Loop.failed).to(waitingToRegister)
@heartbeating.upon(_Loop.failed).to(waitingToHeartbeat)
def _retry(loop: _Loop, r: Registrar, why: str, retry: Optional[float] = None) -> None:
    r._backOff(why, retry)


@waitingToHeartbeat.upon(_Loop.changed).to(waitingToRegister)
@waitingToRegister.upon(_Loop.changed).loop()
def _registerSoon(loop: _Loop, r: Registrar, jitter: float) -> None:
    r._waitAtMost(r._rng() * jitter)


for _state in (idle, registeringStale, heartbeatingStale, finishing, unregistering, stopped):
    # Nothing to do: the next REGISTER sends the files as they are then,
    # or there will be no next REGISTER.
    _state.upon(_Loop.changed).loop().returns(None)
del _state
registering.upon(_Loop.changed).to(registeringStale).returns(None)
heartbeating.upon(_Loop.changed).to(heartbeatingStale).returns(None)


@idle.upon(_Loop.stop).to(stopped)
@unregistering.upon(_Loop.unregistered).to(stopped)
@stopped.upon(_Loop.stop).loop()
def _over(loop: _Loop, r: Registrar) -> None:
    r._notifyStopped()


@registering.upon(_Loop.stop).to(finishing)
@registeringStale.upon(_Loop.stop).to(finishing)
def _finish(loop: _Loop, r: Registrar) -> None:
    # The REGISTER may be at the relay already: hear its answer (or give up
    # after STOP_TIMEOUT), then take it back.  Cancelling it instead would
    # leave the entry there for a whole TTL.
    r._halt()
    r._timer = r.clock.callLater(STOP_TIMEOUT, r._giveUp)


@finishing.upon(_Loop.answered).to(unregistering)
@finishing.upon(_Loop.failed).to(unregistering)
def _finished(loop: _Loop, r: Registrar, *why: object) -> None:
    r._unregister()


@heartbeating.upon(_Loop.stop).to(unregistering)
@heartbeatingStale.upon(_Loop.stop).to(unregistering)
@waitingToHeartbeat.upon(_Loop.stop).to(unregistering)
@waitingToRegister.upon(_Loop.stop).to(unregistering)
def _leave(loop: _Loop, r: Registrar) -> None:
    # A heartbeat in flight can go: it never creates an entry.
    r._halt()
    r._abandon()
    r._unregister()


finishing.upon(_Loop.stop).loop().returns(None)
unregistering.upon(_Loop.stop).loop().returns(None)

_machine = _builder.build()
