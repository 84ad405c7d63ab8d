"""
The relay: a directory of peer nodes, answered one request per connection.

The protocol only translates lines into calls on the registry and the
results back into lines; every rule about who is alive lives there.  It
reaches the registry only through
:class:`~p2prelay.relay.backends.interface.IRegistryBackend`, whose every
answer is a Deferred (:meth:`RelayProtocol._await`): in memory one that has
fired already, on Redis a round trip, during which the connection is paused
and its deadline held.  A registry that cannot be reached is answered
``503 retry=N :the registry is unavailable (...)``.

This module holds the connection -- reading the request, dispatching it,
the challenge and its ``PROOF``, what the metrics see -- and
:class:`RelayFactory`.  The handlers it dispatches to are in
``relay/entries.py`` (REGISTER, HEARTBEAT, UNREGISTER),
``relay/queries.py`` (PEERS, WHOHAS, SEARCH, STATS, DEAD) and
``relay/paths.py`` (CONTROL, REVERSE, RELAY, CIRCUIT: the paths to
firewalled nodes, with ``relay/control.py`` and ``relay/circuits.py``).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Callable, List, Optional

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import identity, wire
from ..limits import (
    MAX_INFLIGHT_BYTES,
    RELAY_MAX_CONNECTIONS,
    RELAY_MAX_PER_ADDRESS,
    ConnectionLimit,
    sourceOf,
)
from ..negotiation import (
    CLOSE_DEADLINE,
    IDLE_TIMEOUT,
    MIN_RATE,
    NEGOTIATION_DEADLINE,
    NegotiationProtocol,
)
from ..wire import FileEntry
from .dialback import (
    Allowance,
    DIALBACK_BURST,
    DIALBACK_RATE,
    RECHECK_INTERVAL,
    REPORT_BURST,
    REPORT_RATE,
    DialBack,
    Outcome,
    TokenBucket,
)
from .circuits import CircuitLimits, Circuits
from .control import MAX_CONTROL, Controls
from .paths import PathRequests
from .phase import Phase
from .queries import QueryRequests
from .entries import EntryRequests, _retry
from .backends.interface import RETRY as REGISTRY_RETRY, IRegistryBackend, RegistryUnavailable
from .backends.memory import MemoryBackend
from .registry import Peer, Registry

LONG_REACHABLE = 300.0  # seconds direct after which one failed probe only counts a miss
CONFIRM_DELAY = 10.0  # seconds after such a miss until the confirming probe


UNCHALLENGED = (wire.UNREGISTER, wire.HEARTBEAT, wire.CONTROL, wire.CIRCUIT)


class RelayProtocol(EntryRequests, QueryRequests, PathRequests, NegotiationProtocol):
    """
    One request from a node or a client: REGISTER (with its file list),
    UNREGISTER, HEARTBEAT, PEERS, WHOHAS, SEARCH, STATS, DEAD, REVERSE;
    or a connection that outlives its request: a firewalled node's
    CONTROL connection, and both sides of a circuit (RELAY, CIRCUIT).

    A request that changes an entry is challenged (``100 nonce=``) and
    carried out only once its ``PROOF`` checks out: a signature by the
    node's key (and, when the relay has a shared secret, an HMAC under it)
    over the nonce and a digest of every byte received before the PROOF
    line, exactly as received.  On a private relay every query is
    challenged too, for the secret alone.
    """

    deadline = NEGOTIATION_DEADLINE  # the whole request, extended by bytes at MIN_RATE
    minRate = MIN_RATE

    def __init__(self, factory: "RelayFactory") -> None:
        super().__init__(factory.clock, factory.idleTimeout)
        self.factory = factory
        self.deadline = factory.deadline
        self.minRate = factory.minRate
        self.closeDeadline = factory.closeDeadline
        self._phase = Phase.REQUEST
        self._request: wire.Message | None = None
        self._files: List[FileEntry] = []
        self._expected = 0
        self._key = ""
        self._node = ""
        # Every request byte received before PROOF, as received (line
        # endings included): what the proof covers.
        self._received = hashlib.sha256()
        self._held = 0  # registration bytes counted in factory.inflight
        self._pending: tuple[bytes, str, str | None, Callable[[], None]] | None = None
        self._lost = False
        self._word: str | None = None  # the request's verb, once its line is read
        self._began: float | None = None  # when its line was read (for the latency histogram)
        self._settled = False  # its result counted (registrations, refused lookups)
        self._counted = False  # counted among the open connections
        self._awaiting = 0  # registry answers this connection is paused for

    def connectionMade(self) -> None:
        super().connectionMade()
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.connectionOpened()
            self._counted = True

    @property
    def source(self) -> str:
        """The address this connection comes from, as caps count it."""
        return sourceOf(self.transport.getPeer())

    def lineReceived(self, line: bytes) -> None:
        if self.finished or self._phase is Phase.WORKING:
            return
        try:
            if self._phase is Phase.CONTROL:
                self._controlLine(wire.parseLine(line))
                return
            if self._phase is Phase.PROOF:
                self._proofReceived(wire.parseLine(line))
                return
            # LineReceiver splits on LF and leaves any CR in the line, so
            # this is exactly the bytes that arrived.
            raw = line + self.delimiter
            self._received.update(raw)
            message = wire.parseLine(line)
            if self._phase is Phase.REQUEST:
                self._dispatch(message, len(raw))
            else:
                self._hold(len(raw))
                self._fileLine(message)
        except wire.ProtocolError as e:
            self._protocolError(e)

    def _protocolError(self, e: wire.ProtocolError) -> None:
        self.log.info("refusing {peer}: {error}", peer=self.peerName(), error=str(e))
        self._settle(e.status)
        self.refuseWith(wire.status(e.status, e.message, retry=_retry(e.retry)))

    # The registry's answers: Deferreds.

    def _await(self, d: defer.Deferred, then: Callable[..., None], *args: Any) -> None:
        """
        Call ``then(result, *args)`` when the registry's answer ``d`` fires;
        until then (unless it has fired already, as the in-memory backend's
        have) reading is paused and the request's deadline held: the wait is
        the relay's, not the peer's.  A ``ProtocolError`` raised by ``then``
        (or failing ``d``) is answered as if raised in ``lineReceived``; a
        :class:`RegistryUnavailable` is answered ``503 retry=``.
        """
        if d.called and not d.paused and not isinstance(d.result, (Failure, defer.Deferred)):
            # The in-memory backend's answer: no pause, no callbacks to add.
            result = d.result
            d.result = None
            try:
                then(result, *args)
            except wire.ProtocolError as e:
                self._protocolError(e)
            return
        wait = {"waited": False, "done": False}
        d.addCallbacks(self._fired, self._failed, (wait, then, args), errbackArgs=(wait,))
        d.addErrback(self._crashed)
        if not wait["done"]:
            wait["waited"] = True
            self._awaiting += 1
            if self._awaiting == 1:
                self.pauseProducing()
                self.holdDeadline()

    def _fired(self, result: Any, wait: dict, then: Callable[..., None], args: tuple) -> None:
        wait["done"] = True
        if wait["waited"]:
            self._awaiting -= 1
        if self.finished or self._lost:
            return
        try:
            then(result, *args)
        except wire.ProtocolError as e:
            self._protocolError(e)
        if wait["waited"]:
            self._resumeAfterWait()

    def _failed(self, failure: Failure, wait: dict) -> Optional[Failure]:
        wait["done"] = True
        if wait["waited"]:
            self._awaiting -= 1
        if failure.check(RegistryUnavailable):
            self.factory.registryLost(failure.value)
            error = wire.ProtocolError(
                wire.BUSY, f"the registry is unavailable ({failure.value})", retry=REGISTRY_RETRY
            )
        elif failure.check(wire.ProtocolError):
            error = failure.value
        elif failure.check(defer.CancelledError) and self._lost:
            return None  # given up on when the peer left
        else:
            return failure
        if not (self.finished or self._lost):
            self._protocolError(error)
        return None

    def _resumeAfterWait(self) -> None:
        """Read again once no registry answer is awaited (lines that came meanwhile are handled now)."""
        if self._awaiting == 0 and not self.finished and not self._lost and self.transport is not None:
            self.resumeDeadline()
            self.resumeProducing()

    def _crashed(self, failure: Failure) -> None:
        self.log.failure("bug while answering {peer}", failure, peer=self.peerName())
        if self.transport is not None:
            self.transport.abortConnection()

    # What the metrics see: a request's verb, its latency and, for a
    # registration or lookup refused, how it ended.

    def refuse(self, error: wire.ProtocolError) -> None:
        self._settle(error.status)  # timeouts and over-long lines come this way
        super().refuse(error)

    def finish(self, data: bytes) -> None:
        if not self.finished:
            self._answered()
        super().finish(data)

    def _answered(self) -> None:
        """The request is answered: its latency observed (once)."""
        metrics = self.factory.metrics
        if metrics is not None and self._began is not None:
            metrics.observeLatency(self.factory.clock.seconds() - self._began)
        self._began = None

    def _releaseSlots(self) -> None:
        """Give back the connection caps' slots: a long-lived connection has caps of its own."""
        slots, self.slots = self.slots, []
        for slot in slots:
            slot.release()

    def _settle(self, status: int) -> None:
        """Count how a REGISTER (or a WHOHAS/SEARCH refused) ended, once."""
        metrics = self.factory.metrics
        if self._settled or self._word is None:
            return
        self._settled = True
        if metrics is None:
            return
        if self._word == wire.REGISTER:
            if status == wire.OK:
                metrics.registration("accepted")
            elif status in (wire.BAD_REQUEST, wire.TOO_LARGE, wire.LINE_TOO_LONG):
                metrics.registration("invalid")
            else:
                metrics.registration("refused")
        elif self._word in (wire.WHOHAS, wire.SEARCH) and status != wire.OK:
            metrics.lookup("refused")

    def _looked(self, what: str, found: int) -> None:
        """A lookup answered: counted (for STATS and the metrics) and logged at debug level."""
        self._settled = True
        self.factory.lookups += 1
        if self.factory.metrics is not None:
            self.factory.metrics.lookup("hit" if found else "miss")
        if self.factory.verbose:
            self.log.debug(
                "{verb} {what} from {peer}: {found} found",
                verb=self._word,
                what=what,
                peer=self.peerName(),
                found=found,
            )

    def _dispatch(self, message: wire.Message, size: int) -> None:
        self._word = message.word
        self._began = self.factory.clock.seconds()
        if message.word == wire.REGISTER:
            self._register(message, size)
            return
        handler = {
            wire.UNREGISTER: self._unregister,
            wire.HEARTBEAT: self._heartbeat,
            wire.PEERS: self._peers,
            wire.WHOHAS: self._whohas,
            wire.SEARCH: self._search,
            wire.DEAD: self._dead,
            wire.STATS: self._stats,
            wire.CONTROL: self._control,
            wire.REVERSE: self._reverse,
            wire.RELAY: self._relay,
            wire.CIRCUIT: self._circuitOpened,
        }.get(message.word)
        if handler is None:
            raise wire.ProtocolError(wire.BAD_REQUEST, f"unknown request {message.word}")
        # Requests proved with a node's key, and CIRCUIT (its token, handed
        # over the proved control connection, is the capability), are not
        # challenged for the secret alone.
        if self.factory.private and message.word not in UNCHALLENGED:
            # A private relay answers only holders of the secret.
            self._challenge(identity.CLIENT_PROOF, None, lambda: handler(message))
            return
        handler(message)

    # The challenge: 100 nonce=, then PROOF sig= [mac=].

    def _challenge(self, purpose: bytes, key: str | None, then: Callable[[], None]) -> None:
        nonce = identity.newNonce()
        self._pending = (purpose, nonce, key, then)
        self._phase = Phase.PROOF
        secret = 1 if self.factory.secret is not None else None
        self.transport.write(wire.status(wire.CONTINUE, nonce=nonce, secret=secret))

    def _proofReceived(self, message: wire.Message) -> None:
        if message.word != wire.PROOF:
            raise wire.ProtocolError(wire.BAD_REQUEST, f"expected PROOF, not {message.word}")
        assert self._pending is not None
        purpose, nonce, key, then = self._pending
        self._pending = None
        self._phase = Phase.WORKING
        text = identity.transcriptOfDigest(purpose, nonce, self._received.digest())
        if key is not None and not identity.verify(key, message.get("sig") or "", text):
            raise wire.ProtocolError(wire.UNAUTHORIZED, "bad proof")
        secret = self.factory.secret
        if secret is not None:
            mac = message.get("mac")
            if mac is None:
                raise wire.ProtocolError(wire.UNAUTHORIZED, "this relay needs the shared secret")
            if not identity.checkSecretProof(secret, text, mac):
                raise wire.ProtocolError(wire.UNAUTHORIZED, "bad proof")
        then()

    def conclude(self) -> None:
        super().conclude()
        self._release()

    def connectionLost(self, reason: object = None) -> None:
        super().connectionLost(reason)
        self._lost = True
        self._release()
        self._pathLost()
        searching, self._searching = self._searching, None
        if searching is not None and not searching.called:
            searching.cancel()  # nobody to answer: the steps stop
        if self._counted:
            self._counted = False
            self.factory.metrics.connectionClosed()



class RelayFactory(Factory):
    """
    Shares one registry between connections: ``registry`` is a
    :class:`Registry` (held in memory, behind a
    :class:`~p2prelay.relay.backends.memory.MemoryBackend`) or any
    :class:`IRegistryBackend`.  ``boot`` identifies the registry's lifetime
    so nodes notice it lost them: this run of the relay in memory, the
    backend's epoch when ``boot`` is given (a Redis several relays share).

    ``secret`` (bytes) closes the network: every proof must also carry an
    HMAC under it; with ``private`` clients' queries must prove it too.
    ``dialback`` checks addresses (default: a :class:`DialBack` dialling
    through the reactor given as ``clock``).  ``metrics`` is a
    :class:`~p2prelay.metrics.RelayMetrics` (None: no ``--metrics``);
    ``verbose`` logs every lookup at debug level.  ``circuits`` are the
    limits of the relayed path (:class:`CircuitLimits`) and ``maxControl``
    the control connections held at most.
    """

    protocol = RelayProtocol
    log = Logger()
    noisy = False  # no "Starting factory <RelayFactory ...>": the service logs its port

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        onChange: Callable[[], None] = lambda: None,
        maxConnections: int = RELAY_MAX_CONNECTIONS,
        maxPerAddress: int = RELAY_MAX_PER_ADDRESS,
        *,
        secret: Optional[bytes] = None,
        private: bool = False,
        dialback: Optional[DialBack] = None,
        maxInflight: int = MAX_INFLIGHT_BYTES,
        deadline: float = NEGOTIATION_DEADLINE,
        minRate: float = MIN_RATE,
        idleTimeout: float = IDLE_TIMEOUT,
        closeDeadline: float = CLOSE_DEADLINE,
        dialbackRate: float = DIALBACK_RATE,
        dialbackBurst: int = DIALBACK_BURST,
        reportRate: float = REPORT_RATE,
        reportBurst: int = REPORT_BURST,
        recheckInterval: float = RECHECK_INTERVAL,
        metrics=None,
        verbose: bool = False,
        circuits: CircuitLimits = CircuitLimits(),
        maxControl: int = MAX_CONTROL,
        boot: Optional[str] = None,
    ) -> None:
        self.registry = registry
        if IRegistryBackend.providedBy(registry):
            self.backend = registry
        else:
            # One search step per reactor turn, between other requests.
            cooperator = task.Cooperator(
                terminationPredicateFactory=lambda: lambda: True,
                scheduler=lambda step: clock.callLater(0, step),
            )
            self.backend = MemoryBackend(registry, boot, cooperator, now=clock.seconds)
        # Log each lookup (WHOHAS, PEERS, SEARCH, STATS) at debug level:
        # twistd's observer shows every level, so the flag decides.
        self.verbose = verbose
        self.clock = clock
        self.metrics = metrics  # a p2prelay.metrics.RelayMetrics, or None (no --metrics)
        self.started = clock.seconds()
        self.lookups = 0  # WHOHAS and SEARCH answered since the start (STATS)
        self.connections = ConnectionLimit(
            clock,
            maxConnections,
            maxPerAddress,
            what="relay",
            onRefused=None if metrics is None else metrics.connectionRefused,
        )
        self.boot = boot if boot is not None else uuid.uuid4().hex[:16]
        self.registryDown: Optional[str] = None  # why the registry cannot be reached, while it cannot
        self._onChange = onChange
        assert secret is not None or not private, "a private relay needs a secret"
        self.secret = secret
        self.private = private
        self.dialback = dialback if dialback is not None else DialBack(clock)
        self.maxInflight = maxInflight
        self.inflight = 0  # registration bytes received and not yet settled
        self.deadline = deadline  # seconds for one whole request, extended at minRate
        self.minRate = minRate
        self.idleTimeout = idleTimeout
        self.closeDeadline = closeDeadline  # seconds a peer has to take the answer
        # Rates are per second; bursts are how many at once.  The buckets
        # are the backend's (see allowance): in memory these very
        # TokenBuckets, on Redis shared by every relay on it.
        self.dialbacks = self._allowance("dialback", dialbackRate, dialbackBurst)
        self.reports = self._allowance("report", reportRate, reportBurst)
        self.recheckInterval = recheckInterval
        self.controls = Controls(self.backend, maxControl)
        self.circuits = Circuits(clock, circuits, metrics)
        # REVERSE and RELAY requests from one source address.
        self.pathRequests = TokenBucket(clock.seconds, circuits.requestRate, circuits.requestBurst)
        if metrics is not None:
            metrics.circuitsOpen = lambda: len(self.circuits.open)
            metrics.controlsOpen = lambda: len(self.controls)

    def _allowance(self, name: str, rate: float, burst: int) -> "TokenBucket | Allowance":
        if isinstance(self.backend, MemoryBackend):
            return self.backend.bucket(name, rate, burst)
        return Allowance(name, rate, burst)

    def allowance(self, name: str, source: str) -> "defer.Deferred[float]":
        """
        Spend one of ``source``'s tokens of the allowance ``name`` (``dialback``
        or ``report``): 0, or the seconds until one will be (the backend's
        ``take``, so one allowance however many relays share the registry).
        """
        figures = {"dialback": self.dialbacks, "report": self.reports}[name]
        return self.backend.take(name, source, figures.rate, figures.burst)

    def changed(self) -> None:
        self._onChange()

    def registryLost(self, why: object) -> None:
        """The registry could not be reached: one warning until it is back (not one per request)."""
        if self.registryDown is None:
            self.registryDown = str(why)
            self.log.warn("the registry is unavailable: {why}; answering 503 until it is back", why=str(why))

    def registryBack(self) -> None:
        """The registry answered again (after :meth:`registryLost`): one line saying so."""
        if self.registryDown is not None:
            self.registryDown = None
            self.log.info("the registry is available again")

    def orderForwarded(self, node: str, line: bytes) -> None:
        """Another relay forwarded an order for a node whose control connection is here."""
        if self.controls.send(node, line):
            self.log.info("passed on an order for {node} from another relay", node=node)

    def recheck(self, peer: Peer, source: Optional[str] = None) -> "defer.Deferred[bool]":
        """
        Dial ``peer`` back to see whether it is still there, at most once
        per node per ``recheckInterval`` by any relay on the registry (and,
        for a ``source``, within its dial-back allowance); its entry is
        hidden only if the check fails, and listed again if a later one
        succeeds.  Fires with True if a check started (the check itself
        goes on), and fails with ``RegistryUnavailable`` if the registry
        cannot say.
        """
        node = peer.node

        def claimed(ok: bool) -> Any:
            if not ok:
                return False
            if source is None:
                return started(0.0)
            return self.allowance("dialback", source).addCallback(started)

        def started(wait: float) -> Any:
            if wait:  # not checked after all: the claim is given back
                return self.backend.releaseRecheck(node).addCallback(lambda _: False)
            self._probe(peer)
            return True

        return self.backend.claimRecheck(node, self.recheckInterval).addCallback(claimed)

    def _probe(self, peer: Peer) -> None:
        d = self.dialback.check(peer.host, peer.port, peer.key)
        d.addCallback(lambda outcome: self._current(peer).addCallback(lambda current: self._rechecked(outcome, peer, current)))
        self._guard(d, "re-checking a node")

    def _guard(self, d: defer.Deferred, what: str) -> defer.Deferred:
        """The end of a chain of the relay's own: an unreachable registry is a warning, anything else a bug."""

        def failed(failure: Failure) -> None:
            if failure.check(RegistryUnavailable):
                self.registryLost(failure.value)
            else:
                self.log.failure("bug while " + what, failure)

        return d.addErrback(failed)

    def _current(self, peer: Peer) -> defer.Deferred:
        """``peer``'s entry now (a Deferred), None if it is gone or was registered anew meanwhile."""

        def same(current: Peer | None) -> Peer | None:
            if current is None or (current.key, current.address) != (peer.key, peer.address):
                return None
            return current

        return self.backend.get(peer.node).addCallback(same)

    def _rechecked(self, outcome: Outcome, peer: Peer, current: Peer | None) -> Any:
        """
        A re-check's outcome, with hysteresis: a node direct for at least
        ``LONG_REACHABLE`` seconds survives one failed probe as a miss
        (listed after the others) and is probed again ``CONFIRM_DELAY``
        seconds later; a second failure in a row, or a first one of a node
        direct for less long, makes it firewalled.  A success clears misses.
        """
        if current is None:
            return None
        if outcome.ok:
            if current.reachable and current.misses == 0:
                return None
            again = not current.reachable

            def listed(_: object) -> None:
                self.changed()
                if again:
                    self.log.info("{node} at {host}:{port} is reachable again", node=peer.node, host=peer.host, port=peer.port)

            return self.backend.setReachable(peer.node, True).addCallback(listed)
        if not current.reachable:
            return None
        since = current.directSince
        longReachable = since is not None and self.clock.seconds() - since >= LONG_REACHABLE
        if longReachable and current.misses == 0:
            return self.backend.missed(peer.node).addCallback(self._missed, peer, current, outcome)

        def hidden(_: object) -> None:
            self.changed()
            self.log.info(
                "{node} at {host}:{port} is unreachable ({why}); firewalled{how}",
                node=peer.node,
                host=peer.host,
                port=peer.port,
                why=outcome.reason,
                how="" if current.control else ", hidden until it holds a control connection",
            )

        return self.backend.setReachable(peer.node, False).addCallback(hidden)

    def _missed(self, _: object, peer: Peer, current: Peer, outcome: Outcome) -> None:
        """One probe missed of a node long direct: confirmed by another in ``CONFIRM_DELAY``."""
        self.changed()
        self.log.info(
            "{node} at {host}:{port} missed a probe ({why}); confirming in {delay:g} s",
            node=peer.node,
            host=peer.host,
            port=peer.port,
            why=outcome.reason,
            delay=CONFIRM_DELAY,
        )
        self.clock.callLater(CONFIRM_DELAY, self._confirm, current)

    def _confirm(self, peer: Peer) -> None:
        """The confirming probe after a miss: past the recheck interval and any allowance."""

        def probe(current: Peer | None) -> Any:
            if current is not None and current.reachable and current.misses:
                # Recorded as a check, so the interval counts from it.
                claim = self.backend.claimRecheck(current.node, self.recheckInterval, force=True)
                return claim.addCallback(lambda _: self._probe(current))
            return None

        self._guard(self._current(peer).addCallback(probe), "confirming a miss")

    def buildProtocol(self, addr: object):
        return self.connections.build(addr, lambda: RelayProtocol(self))
