"""
The relay: a directory of peer nodes, answered one request per connection.

The protocol only translates lines into calls on :class:`Registry` and the
results back into lines; every rule about who is alive lives there.
"""

from __future__ import annotations

import enum
import hashlib
import math
import uuid
from typing import Callable, Dict, List, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from .. import identity, wire
from ..addresses import plainHost
from ..human import humanSize, plural
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
    DIALBACK_BURST,
    DIALBACK_RATE,
    RECHECK_INTERVAL,
    REPORT_BURST,
    REPORT_RATE,
    DialBack,
    Outcome,
    TokenBucket,
)
from .registry import AddressTaken, Peer, Registry, RegistryFull

MAX_SEARCH_RESULTS = 1000
SEARCH_SLICE = 1  # search steps (SEARCH_STEP names each) run per reactor turn
NODE_ID_MAX = 64
INFLIGHT_RETRY = 5  # seconds (retry=) for a REGISTER refused over MAX_INFLIGHT_BYTES


def peerFields(peer: Peer) -> dict[str, object]:
    fields: dict[str, object] = {"node": peer.node, "host": peer.host, "port": peer.port, "udp": peer.udp}
    if peer.tls is not None:  # the key a client pins its TLS connection to
        fields.update(tls=peer.tls, key=peer.key)
    return fields


class _Phase(enum.Enum):
    """Where a relay connection is in its one negotiation."""

    REQUEST = "request"  # waiting for the request line
    FILES = "files"  # REGISTER: FILE lines up to END
    PROOF = "proof"  # challenged with 100: waiting for PROOF
    WORKING = "working"  # checking, dialling back: nothing more is read


class RelayProtocol(NegotiationProtocol):
    """
    One request from a node or a client: REGISTER (with its file list),
    UNREGISTER, HEARTBEAT, PEERS, WHOHAS, SEARCH or DEAD.

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
        self._phase = _Phase.REQUEST
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
        if self.finished or self._phase is _Phase.WORKING:
            return
        try:
            if self._phase is _Phase.PROOF:
                self._proofReceived(wire.parseLine(line))
                return
            # LineReceiver splits on LF and leaves any CR in the line, so
            # this is exactly the bytes that arrived.
            raw = line + self.delimiter
            self._received.update(raw)
            message = wire.parseLine(line)
            if self._phase is _Phase.REQUEST:
                self._dispatch(message, len(raw))
            else:
                self._hold(len(raw))
                self._fileLine(message)
        except wire.ProtocolError as e:
            self.log.info("refusing {peer}: {error}", peer=self.peerName(), error=str(e))
            self._settle(e.status)
            self.refuseWith(wire.status(e.status, e.message, retry=_retry(e.retry)))

    # What the metrics see: a request's verb, its latency and, for a
    # registration or lookup refused, how it ended.

    def refuse(self, error: wire.ProtocolError) -> None:
        self._settle(error.status)  # timeouts and over-long lines come this way
        super().refuse(error)

    def finish(self, data: bytes) -> None:
        metrics = self.factory.metrics
        if metrics is not None and self._began is not None and not self.finished:
            metrics.observeLatency(self.factory.clock.seconds() - self._began)
            self._began = None
        super().finish(data)

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
        }.get(message.word)
        if handler is None:
            raise wire.ProtocolError(wire.BAD_REQUEST, f"unknown request {message.word}")
        if self.factory.private and message.word not in (wire.UNREGISTER, wire.HEARTBEAT):
            # A private relay answers only holders of the secret.
            self._challenge(identity.CLIENT_PROOF, None, lambda: handler(message))
            return
        handler(message)

    # The challenge: 100 nonce=, then PROOF sig= [mac=].

    def _challenge(self, purpose: bytes, key: str | None, then: Callable[[], None]) -> None:
        nonce = identity.newNonce()
        self._pending = (purpose, nonce, key, then)
        self._phase = _Phase.PROOF
        secret = 1 if self.factory.secret is not None else None
        self.transport.write(wire.status(wire.CONTINUE, nonce=nonce, secret=secret))

    def _proofReceived(self, message: wire.Message) -> None:
        if message.word != wire.PROOF:
            raise wire.ProtocolError(wire.BAD_REQUEST, f"expected PROOF, not {message.word}")
        assert self._pending is not None
        purpose, nonce, key, then = self._pending
        self._pending = None
        self._phase = _Phase.WORKING
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

    # REGISTER: a header line, `files` FILE lines, END; the challenge; the
    # dial-back; the answer.

    def _register(self, message: wire.Message, size: int) -> None:
        key = message.publicKey()
        node = identity.nodeIdOf(key)
        if node is None:
            raise wire.ProtocolError(wire.BAD_REQUEST, "key= is not a public key")
        claimed = message.get("node")
        if claimed is not None and claimed != node:
            raise wire.ProtocolError(wire.BAD_REQUEST, "node= is not the id of key=")
        message.port()
        if message.get("udp") is not None:
            message.port("udp")
        if message.get("tls") is not None:
            message.port("tls")
        if message.get("host") is not None:
            checkHost(message.require("host"))
        self._expected = message.integer("files")
        if self._expected > wire.MAX_FILES:
            raise wire.ProtocolError(
                wire.TOO_LARGE, f"at most {wire.MAX_FILES} files per registration"
            )
        full = self.factory.registry.room(node, self.source)
        if full is not None:
            raise wire.ProtocolError(wire.BUSY, full, retry=self.factory.registry.ttl)
        if self.factory.inflight >= self.factory.maxInflight:
            raise wire.ProtocolError(
                wire.BUSY, "too many registrations in progress", retry=INFLIGHT_RETRY
            )
        self._key, self._node = key, node
        self._request = message
        self._hold(size)
        self._phase = _Phase.FILES

    def _hold(self, size: int) -> None:
        self._held += size
        self.factory.inflight += size

    def _release(self) -> None:
        self.factory.inflight -= self._held
        self._held = 0

    def _fileLine(self, message: wire.Message) -> None:
        if len(self._files) < self._expected:
            if message.word != wire.FILE:
                raise wire.ProtocolError(wire.BAD_REQUEST, "expected a FILE line")
            self._files.append(wire.fileEntry(message))
            return
        if message.word != wire.END:
            raise wire.ProtocolError(wire.TOO_LARGE, "more FILE lines than announced")
        if message.integer("count") != self._expected:
            raise wire.ProtocolError(wire.BAD_REQUEST, "END count does not match")
        self._challenge(identity.REGISTER_PROOF, self._key, self._proven)

    def _proven(self) -> None:
        request = self._request
        assert request is not None
        host = plainHost(request.get("host") or self.transport.getPeer().host)
        port = request.port()
        existing = self.factory.registry.get(self._node)
        same = existing is not None and existing.key == self._key and existing.address == (host, port)
        if same and existing.reachable:
            # Reached there before within its lifetime: no second dial-back.
            self._record(host, port, True, "")
            return
        wait = self.factory.dialbacks.take(self.source)
        if wait:
            if same:
                self._record(host, port, existing.reachable, "not checked again yet")
                return
            raise wire.ProtocolError(
                wire.BUSY, "too many dial-backs for your address", retry=wait
            )
        self.holdDeadline()
        self.transport.pauseProducing()
        d = self.factory.dialback.check(host, port, self._key)
        d.addCallback(self._dialled, host, port)
        d.addErrback(self._crashed)

    def _dialled(self, outcome: Outcome, host: str, port: int) -> None:
        if self.finished or self._lost:
            return  # the node gave up waiting: it will register again
        try:
            self._record(host, port, outcome.ok, outcome.reason)
        except wire.ProtocolError as e:
            self.log.info("refusing {peer}: {error}", peer=self.peerName(), error=str(e))
            self._settle(e.status)
            self.refuseWith(wire.status(e.status, e.message, retry=_retry(e.retry)))

    def _record(self, host: str, port: int, reachable: bool, reason: str) -> None:
        request = self._request
        assert request is not None
        udp = request.port("udp") if request.get("udp") else None
        tlsPort = request.port("tls") if request.get("tls") else None
        try:
            peer = self.factory.registry.register(
                self._node,
                host,
                port,
                self._files,
                udp=udp,
                tls=tlsPort,
                key=self._key,
                reachable=reachable,
                source=self.source,
            )
        except RegistryFull as e:
            raise wire.ProtocolError(wire.BUSY, str(e), retry=self.factory.registry.ttl) from None
        except (AddressTaken, ValueError) as e:
            raise wire.ProtocolError(
                wire.CONFLICT, f"{e}; the relay could not reach this key there ({reason})"
            ) from None
        self.factory.changed()
        self._settle(wire.OK)
        self.log.info(
            "registered {node} at {host}:{port} with {files}{how}",
            node=peer.node,
            host=peer.host,
            port=peer.port,
            count=len(peer.files),
            files=plural(len(peer.files), "file"),
            how="" if reachable else f", not listed: unreachable ({reason})",
        )
        if reachable:
            text = f"registered {plural(len(peer.files), 'file')}"
        else:
            text = f"registered, but the relay could not reach {host}:{port} ({reason})"
        self.finish(
            wire.status(
                wire.OK,
                text,
                node=peer.node,
                ttl=_seconds(self.factory.registry.ttl),
                boot=self.factory.boot,
                host=peer.host,
                reachable=int(reachable),
            )
        )

    def _crashed(self, failure) -> None:
        self.log.failure("bug while registering", failure)
        self.transport.abortConnection()

    # HEARTBEAT and UNREGISTER: proved with the key the entry holds.

    def _provedByOwner(self, message: wire.Message, purpose: bytes, then) -> None:
        node = nodeId(message)
        peer = self.factory.registry.get(node)
        if peer is None:
            self.finish(
                wire.status(
                    wire.NOT_FOUND,
                    "unknown node; register again" if purpose == identity.HEARTBEAT_PROOF else "no such node",
                    boot=self.factory.boot,
                )
            )
            return
        if peer.key is None:
            raise wire.ProtocolError(wire.UNAUTHORIZED, "this entry has no key to prove")
        self._challenge(purpose, peer.key, lambda: then(node))

    def _heartbeat(self, message: wire.Message) -> None:
        self._provedByOwner(message, identity.HEARTBEAT_PROOF, self._beat)

    def _beat(self, node: str) -> None:
        peer = self.factory.registry.refresh(node)
        if peer is None:
            self.finish(
                wire.status(wire.NOT_FOUND, "unknown node; register again", boot=self.factory.boot)
            )
            return
        self.factory.changed()
        if not peer.reachable:
            # It may be reachable again: check (as often as a DEAD report may).
            self.factory.recheck(peer, self.source)
        self.finish(
            wire.status(
                wire.OK,
                "alive",
                ttl=_seconds(self.factory.registry.ttl),
                boot=self.factory.boot,
                reachable=int(peer.reachable),
            )
        )

    def _unregister(self, message: wire.Message) -> None:
        self._provedByOwner(message, identity.UNREGISTER_PROOF, self._leave)

    def _leave(self, node: str) -> None:
        removed = self.factory.registry.unregister(node)
        if removed:
            self.factory.changed()
            self.log.info("unregistered {node}", node=node)
        self.finish(
            wire.status(
                wire.OK if removed else wire.NOT_FOUND,
                "unregistered" if removed else "no such node",
                boot=self.factory.boot,
            )
        )

    # Queries: a status line, the items, END.

    def _answerList(self, items: List[bytes], text: str, **extra: object) -> None:
        self.finish(
            b"".join(
                [
                    wire.status(wire.OK, text, count=len(items), boot=self.factory.boot),
                    *items,
                    wire.end(len(items), **extra),
                ]
            )
        )

    def _peers(self, message: wire.Message) -> None:
        peers = self.factory.registry.active()
        items = [
            wire.item(wire.PEER, **peerFields(p), files=len(p.files)) for p in peers
        ]
        if self.factory.verbose:
            self.log.debug("PEERS from {peer}: {count} active", peer=self.peerName(), count=len(items))
        self._answerList(items, f"{plural(len(items), 'active peer')}")

    def _whohas(self, message: wire.Message) -> None:
        name = message.name()
        holders = self.factory.registry.holders(name)
        items = [
            wire.item(wire.PEER, **peerFields(p), size=e.size, sha256=e.sha256, **_layout(e))
            for p, e in holders
        ]
        self._looked(name, len(items))
        self._answerList(items, f"{plural(len(items), 'peer')} {'holds' if len(items) == 1 else 'hold'} {name}")

    def _search(self, message: wire.Message) -> None:
        pattern = message.get("pattern", "") or ""
        if len(pattern.encode("utf-8")) > wire.MAX_NAME:
            raise wire.ProtocolError(wire.BAD_REQUEST, "pattern too long")
        limit = message.integer("limit", MAX_SEARCH_RESULTS, low=1, high=MAX_SEARCH_RESULTS)
        self._pattern = pattern
        self._phase = _Phase.WORKING
        self._searchStep(self.factory.registry.searchSteps(pattern, limit))

    def _searchStep(self, steps) -> None:
        # A few steps per reactor turn, so every other request is answered
        # between them however many names the search goes through.
        if self.finished or self._lost:
            steps.close()
            return
        for _ in range(SEARCH_SLICE):
            try:
                next(steps)
            except StopIteration as done:
                self._searched(*done.value)
                return
        self.holdDeadline()  # the relay's own work is not the client's slowness
        self.factory.clock.callLater(0, self._searchStep, steps)

    def _searched(self, hits, truncated: bool) -> None:
        items = [
            wire.item(wire.FILE, name=h.name, size=h.size, sha256=h.sha256, holders=h.holders)
            for h in hits
        ]
        self._looked(repr(self._pattern), len(items))
        self._answerList(
            items,
            f"{plural(len(items), 'file')} {'matches' if len(items) == 1 else 'match'}",
            truncated=1 if truncated else 0,
        )

    def _stats(self, message: wire.Message) -> None:
        """STATS: the headline figures on one status line (see docs/protocol.rst)."""
        figures = self.factory.registry.figures()
        uptime = max(0, int(self.factory.clock.seconds() - self.factory.started))
        if self.factory.verbose:
            self.log.debug("STATS from {peer}", peer=self.peerName())
        self.finish(
            wire.status(
                wire.OK,
                f"{plural(figures.peers, 'peer')}, {plural(figures.files, 'file')} "
                f"({humanSize(figures.bytes)})",
                peers=figures.peers,
                files=figures.files,
                entries=figures.entries,
                bytes=figures.bytes,
                lookups=self.factory.lookups,
                uptime=uptime,
                boot=self.factory.boot,
            )
        )

    def _dead(self, message: wire.Message) -> None:
        # A hint, not a verdict: the relay checks the node itself and hides
        # it only if its own check fails, so a client cannot hide a live peer.
        host = checkHost(message.require("host"))
        port = message.port()
        wait = self.factory.reports.take(self.source)
        if wait:
            raise wire.ProtocolError(wire.BUSY, "too many reports from your address", retry=wait)
        checking = [
            p for p in self.factory.registry.at(host, port) if p.reachable and self.factory.recheck(p)
        ]
        if checking:
            self.log.info(
                "a client reports {host}:{port} unreachable; checking", host=host, port=port
            )
        self.finish(wire.status(wire.OK, f"will check {len(checking)} peers"))

    def conclude(self) -> None:
        super().conclude()
        self._release()

    def connectionLost(self, reason: object = None) -> None:
        super().connectionLost(reason)
        self._lost = True
        self._release()
        if self._counted:
            self._counted = False
            self.factory.metrics.connectionClosed()


def _layout(entry: FileEntry) -> dict[str, object]:
    """A WHOHAS item's root= and piece= (always both, when the holder gave a root)."""
    if entry.root is None:
        return {}
    return {"root": entry.root, "piece": entry.pieceSize}


def nodeId(message: wire.Message) -> str:
    node = message.require("node")
    if not 0 < len(node) <= NODE_ID_MAX or not node.isprintable() or " " in node:
        raise wire.ProtocolError(wire.BAD_REQUEST, "node= must be 1-64 printable characters")
    return node


def checkHost(host: str) -> str:
    if not 0 < len(host) <= 255 or not all(c.isalnum() or c in ".-:_%" for c in host):
        raise wire.ProtocolError(wire.BAD_REQUEST, "host= is not a host name or address")
    return plainHost(host)


def _seconds(value: float) -> str:
    return f"{value:g}"


def _retry(seconds: float | None) -> int | None:
    """A retry= hint in whole seconds, at least 1."""
    return None if seconds is None else max(1, math.ceil(seconds))


class RelayFactory(Factory):
    """
    Shares one registry between connections; ``boot`` identifies this run
    of the relay so nodes notice a restart.

    ``secret`` (bytes) closes the network: every proof must also carry an
    HMAC under it; with ``private`` clients' queries must prove it too.
    ``dialback`` checks addresses (default: a :class:`DialBack` dialling
    through the reactor given as ``clock``).  ``metrics`` is a
    :class:`~p2prelay.metrics.RelayMetrics` (None: no ``--metrics``);
    ``verbose`` logs every lookup at debug level.
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
    ) -> None:
        self.registry = registry
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
        self.boot = uuid.uuid4().hex[:16]
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
        # Rates are per second; bursts are how many at once.
        self.dialbacks = TokenBucket(clock.seconds, dialbackRate, dialbackBurst)
        self.reports = TokenBucket(clock.seconds, reportRate, reportBurst)
        self.recheckInterval = recheckInterval
        self._checked: Dict[str, float] = {}  # node -> when the relay last re-checked it

    def changed(self) -> None:
        self._onChange()

    def recheck(self, peer: Peer, source: Optional[str] = None) -> bool:
        """
        Dial ``peer`` back to see whether it is still there, at most once
        per node per ``recheckInterval`` (and, for a ``source``, within its
        dial-back allowance); its entry is hidden only if the check fails,
        and listed again if a later one succeeds.  True if a check started.
        """
        now = self.clock.seconds()
        last = self._checked.get(peer.node)
        if last is not None and now - last < self.recheckInterval:
            return False
        if source is not None and self.dialbacks.take(source):
            return False
        if len(self._checked) > self.registry.maxTotal:
            self._checked = {n: t for n, t in self._checked.items() if now - t < self.recheckInterval}
        self._checked[peer.node] = now
        d = self.dialback.check(peer.host, peer.port, peer.key)
        d.addCallback(self._rechecked, peer)
        d.addErrback(lambda f: self.log.failure("bug while re-checking a node", f))
        return True

    def _rechecked(self, outcome: Outcome, peer: Peer) -> None:
        current = self.registry.get(peer.node)
        if current is None or (current.key, current.address) != (peer.key, peer.address):
            return  # gone or registered anew meanwhile
        if current.reachable == outcome.ok:
            return
        self.registry.setReachable(peer.node, outcome.ok)
        self.changed()
        if outcome.ok:
            self.log.info("{node} at {host}:{port} is reachable again", node=peer.node, host=peer.host, port=peer.port)
        else:
            self.log.info(
                "{node} at {host}:{port} is unreachable ({why}); hiding it",
                node=peer.node,
                host=peer.host,
                port=peer.port,
                why=outcome.reason,
            )

    def buildProtocol(self, addr: object):
        return self.connections.build(addr, lambda: RelayProtocol(self))
