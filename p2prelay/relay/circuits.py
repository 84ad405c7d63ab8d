"""
The relayed path: a client's RELAY connection spliced with the data
connection a firewalled node opens (CIRCUIT) when the relay asks it to.

:class:`Circuits` holds the circuits waiting for their node and those
open, and enforces the operator's :class:`CircuitLimits`.  A
:class:`Circuit` is the splice: from the 200 on, bytes pass verbatim both
ways.  Each side's transport is registered as the streaming producer of
the other, so a full write buffer on one side pauses reading on the other
(Twisted's 64 KiB high-water mark per direction bounds what the relay
buffers).  With a rate cap, both directions of every circuit write
through one shared :class:`~p2prelay.node.ratelimit.UploadLimiter`, which
pauses the reading side while the shared bucket is in debt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .. import identity
from ..human import plural
from ..node.ratelimit import UploadLimiter
from .dialback import DIALBACK_TIMEOUT

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import RelayProtocol

MAX_CIRCUITS = 64  # circuits open (or being opened) at once, all nodes together
MAX_CIRCUITS_PER_NODE = 8  # ... to one node
CIRCUIT_BYTES = 2 << 30  # bytes one circuit may carry, both directions counted
CIRCUIT_SECONDS = 3600.0  # seconds one circuit may stay open
CIRCUIT_TIMEOUT = DIALBACK_TIMEOUT  # seconds the node has to open the circuit (504 after)
CIRCUIT_RETRY = 30  # retry= (seconds) with a 503 at a circuit cap
# A piece is one connection, so a 1 GiB file from a firewalled node is 256
# requests; the requester is the only address a REVERSE makes nodes dial and
# circuits have their own caps, so this guards the relay's CPU, not others.
PATH_RATE = 50.0  # REVERSE and RELAY requests per second from one source address...
PATH_BURST = 500  # ...with this many at once (a few files of a few hundred pieces)


@attrs.frozen
class CircuitLimits:
    """
    What the relay's operator allows the relayed path (``twistd relay``
    options in brackets): ``relaying`` (not ``--no-relaying``), circuits
    in total (``--max-circuits``) and per node (``--max-circuits-per-node``),
    bytes (``--circuit-bytes``) and seconds (``--circuit-seconds``) per
    circuit, ``rate`` in bytes per second over all circuits (``--relay-rate``,
    0: no cap), the seconds a node has to open a circuit, and how many
    REVERSE and RELAY requests one source address may make (per second,
    with a burst).
    """

    relaying: bool = True
    maxCircuits: int = MAX_CIRCUITS
    maxPerNode: int = MAX_CIRCUITS_PER_NODE
    bytes: int = CIRCUIT_BYTES
    seconds: float = CIRCUIT_SECONDS
    rate: float = 0
    timeout: float = CIRCUIT_TIMEOUT
    requestRate: float = PATH_RATE
    requestBurst: int = PATH_BURST


@attrs.define
class Pending:
    """A RELAY waiting for its node's CIRCUIT connection."""

    token: str
    node: str
    client: "RelayProtocol"
    timer: IDelayedCall


class Circuits:
    """
    The relay's circuits: those waiting for their node (by token) and
    those open, within ``limits``.  ``metrics`` is a RelayMetrics or None.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, limits: CircuitLimits, metrics=None) -> None:
        self.clock = clock
        self.limits = limits
        self.metrics = metrics
        self.pending: Dict[str, Pending] = {}
        self.open: set[Circuit] = set()
        self.limiter: Optional[UploadLimiter] = (
            UploadLimiter(clock, limits.rate) if limits.rate > 0 else None
        )

    def count(self, node: str | None = None) -> int:
        """Circuits open or being opened (to ``node``, or in all)."""
        if node is None:
            return len(self.pending) + len(self.open)
        return sum(1 for p in self.pending.values() if p.node == node) + sum(
            1 for c in self.open if c.node == node
        )

    def room(self, node: str) -> str | None:
        """Why a new circuit to ``node`` would go over a cap, or None."""
        total = self.count()
        if total >= self.limits.maxCircuits:
            return f"{plural(total, 'circuit')} open"
        mine = self.count(node)
        if mine >= self.limits.maxPerNode:
            return f"{plural(mine, 'circuit')} open to {node}"
        return None

    def result(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.circuit(result)

    def expect(self, node: str, client: "RelayProtocol", onTimeout) -> str:
        """
        A new circuit to ``node`` for ``client``: its token, valid until
        ``limits.timeout`` has passed (then ``onTimeout()``).
        """
        token = identity.newNonce()
        timer = self.clock.callLater(self.limits.timeout, self._expired, token, onTimeout)
        self.pending[token] = Pending(token, node, client, timer)
        return token

    def _expired(self, token: str, onTimeout) -> None:
        if self.pending.pop(token, None) is not None:
            self.result("timeout")
            onTimeout()

    def cancel(self, token: str) -> None:
        """The client gave up before the node came."""
        pending = self.pending.pop(token, None)
        if pending is not None and pending.timer.active():
            pending.timer.cancel()

    def claim(self, token: str) -> Pending | None:
        """The node's CIRCUIT for ``token``: the waiting RELAY, or None if there is none."""
        pending = self.pending.pop(token, None)
        if pending is not None and pending.timer.active():
            pending.timer.cancel()
        return pending

    def splice(self, pending: Pending, server: "RelayProtocol") -> "Circuit":
        circuit = Circuit(self, pending.token, pending.node, pending.client, server)
        self.open.add(circuit)
        circuit.start()
        return circuit

    def stop(self) -> None:
        """The relay is stopping: no more wake-ups of the rate cap."""
        if self.limiter is not None:
            self.limiter.stop()


class Circuit:
    """
    One splice between a client's connection and a node's: bytes in
    (``received``) from one side are written to the other, counted against
    the limits; when one side is lost (``lost``) or a limit is reached the
    other side gets its pending bytes and is closed.
    """

    log = Logger()

    def __init__(
        self, circuits: Circuits, token: str, node: str, client: "RelayProtocol", server: "RelayProtocol"
    ) -> None:
        self.circuits = circuits
        self.token = token
        self.node = node
        self.client = client
        self.server = server
        self.bytes = 0  # relayed so far, both directions
        self.began = circuits.clock.seconds()
        self.ended = False
        self._timer: IDelayedCall | None = None
        self._toClient = None
        self._toServer = None

    def start(self) -> None:
        client, server = self.client.transport, self.server.transport
        limiter = self.circuits.limiter
        self._toClient = limiter.wrap(client) if limiter is not None else client
        self._toServer = limiter.wrap(server) if limiter is not None else server
        # Backpressure end to end: a side that cannot take more pauses
        # reading on the other.
        self._toClient.registerProducer(server, True)
        self._toServer.registerProducer(client, True)
        self._timer = self.circuits.clock.callLater(
            self.circuits.limits.seconds, self._end, "relay", "cut", "its time limit"
        )

    def received(self, side: "RelayProtocol", data: bytes) -> None:
        """Bytes from ``side``: to the other side, within the byte limit."""
        if self.ended:
            return
        room = self.circuits.limits.bytes - self.bytes
        over = len(data) > room
        if over:
            data = data[:room]
        if data:
            self.bytes += len(data)
            if self.circuits.metrics is not None:
                self.circuits.metrics.relayed(len(data))
            (self._toServer if side is self.client else self._toClient).write(data)
        if over:
            self._end("relay", "cut", "its byte limit")

    def lost(self, side: "RelayProtocol") -> None:
        """``side``'s connection is gone: the other side is closed after its pending bytes."""
        if not self.ended:
            self._end("client" if side is self.client else "node", "complete", "")

    def _end(self, closedBy: str, result: str, limit: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        for consumer in (self._toClient, self._toServer):
            if consumer is not None:
                consumer.unregisterProducer()
        for side in (self.client, self.server):
            if not side._lost:
                side.closeWithin()
        self.circuits.open.discard(self)
        self.circuits.result(result)
        seconds = self.circuits.clock.seconds() - self.began
        self.log.info(
            "circuit {token} for {node}: {bytes} bytes in {seconds:.1f} s ({how})",
            token=self.token,
            node=self.node,
            bytes=self.bytes,
            seconds=seconds,
            closedBy=closedBy,
            limit=limit,
            how=f"closed by the {closedBy}" if not limit else f"cut by the relay at {limit}",
        )
