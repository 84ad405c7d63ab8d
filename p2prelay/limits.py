"""
Caps on what one source address, and everyone together, may hold open.

A server exposed to a network must keep serving honest users while one
address opens socket after socket.  :class:`AddressCounter` counts what
each source address holds (connections, GETs in flight) against a cap per
address and a cap in total; :class:`ConnectionLimit` puts one in front of
a factory's ``buildProtocol``: a connection over a cap is answered
``P2P/1 503 retry=N :busy`` and closed without reading anything, and a
connection under the caps holds its slot until ``connectionLost``.

Twisted's own ``policies.LimitConnectionsByPeer`` rejects every connection
in Twisted 26.10 (a TypeError), hence this module.

"Address" means the source host: an IPv4 address, or an IPv6 /64 (one
host is usually given a whole /64, so counting single IPv6 addresses would
let it open a cap's worth from each of 2**64 of them).  An IPv4-mapped
IPv6 address counts as the IPv4 address it maps.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, Dict, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from . import wire

# Defaults, overridable from the daemons' command lines.
RELAY_MAX_CONNECTIONS = 512  # open connections at a relay, all addresses together
RELAY_MAX_PER_ADDRESS = 32  # open connections at a relay from one address
NODE_MAX_CONNECTIONS = 256  # open connections at a node
NODE_MAX_PER_ADDRESS = 16  # open connections at a node from one address
NODE_MAX_GETS_PER_ADDRESS = 8  # GETs one address may have in flight at a node
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024  # registration bytes a relay is receiving, all connections

BUSY_RETRY = 5  # seconds a refused client is told to wait (retry=)
REFUSAL_GRACE = 2.0  # seconds a refused connection gets to take its 503 before an abort
_IPV6_GROUP = 64  # IPv6 addresses are counted by this prefix
_WARNED_MAX = 1024  # sources remembered as already warned about


def sourceOf(addr: object) -> str:
    """
    The key a connection from ``addr`` is counted under: its host (an IPv6
    host by its /64), or ``"?"`` for an address without a host (UNIX sockets,
    test doubles), which all count as one source.
    """
    host = getattr(addr, "host", None)
    if not isinstance(host, str) or not host:
        return "?"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{_IPV6_GROUP}", strict=False))
    return str(ip)


class Slot:
    """One unit held by one source; :meth:`release` gives it back (once)."""

    def __init__(self, counter: "AddressCounter", source: str) -> None:
        self._counter = counter
        self.source = source
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._counter._release(self.source)


class AddressCounter:
    """
    How many units (connections, requests) each source holds, capped per
    source and in total.  ``total=None`` means no total cap.  No Twisted in
    it: a plain object, tested on its own.
    """

    def __init__(self, perAddress: int, total: Optional[int] = None) -> None:
        if perAddress < 1 or (total is not None and total < 1):
            raise ValueError("caps must be at least 1")
        self.perAddress = perAddress
        self.total = total
        self._held: Dict[str, int] = {}
        self._count = 0

    def __len__(self) -> int:
        """Units held by everyone together."""
        return self._count

    def holding(self, source: str) -> int:
        """Units ``source`` holds now."""
        return self._held.get(source, 0)

    def refusal(self, source: str) -> Optional[str]:
        """Why ``source`` may not take one more unit now, or None if it may."""
        if self.total is not None and self._count >= self.total:
            return "total"
        if self.holding(source) >= self.perAddress:
            return "per-address"
        return None

    def take(self, source: str) -> Optional[Slot]:
        """A slot for ``source``, or None when a cap is reached."""
        if self.refusal(source) is not None:
            return None
        self._held[source] = self.holding(source) + 1
        self._count += 1
        return Slot(self, source)

    def _release(self, source: str) -> None:
        left = self._held[source] - 1
        if left:
            self._held[source] = left
        else:
            del self._held[source]  # no entry per address ever seen
        self._count -= 1


def busy(retry: float = BUSY_RETRY, text: str = "busy") -> bytes:
    """The status line a refused client reads: ``P2P/1 503 retry=5 :busy``."""
    return wire.status(wire.BUSY, text, retry=f"{retry:g}")


class Refusal(Protocol):
    """
    The protocol of a connection over a cap: write the 503, close, read
    nothing; abort if the peer has not taken the line within
    :data:`REFUSAL_GRACE`.
    """

    def __init__(self, clock: IReactorTime, line: bytes) -> None:
        self._clock = clock
        self._line = line
        self._abort = None

    def connectionMade(self) -> None:
        self.transport.write(self._line)
        self.transport.loseConnection()
        self._abort = self._clock.callLater(REFUSAL_GRACE, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        pass  # whatever arrives before the close is ignored

    def connectionLost(self, reason: object = None) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None


class ConnectionLimit:
    """
    Caps on the connections a factory accepts, per source and in total.

    ``build(addr, make)`` is a factory's ``buildProtocol``: under the caps it
    calls ``make()`` and ties a slot to that protocol (released when its
    connection is lost: the protocol must call :meth:`Slot.release` from
    ``connectionLost``, as :class:`NegotiationProtocol` does for every slot
    in its ``slots``); over a cap it returns a :class:`Refusal`.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        total: int,
        perAddress: int,
        retry: float = BUSY_RETRY,
        what: str = "server",
        onRefused: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.clock = clock
        self.counter = AddressCounter(perAddress, total)
        self.retry = retry
        self.what = what
        # Told of every refusal, with which cap: "per-address" or "total" (metrics).
        self.onRefused = onRefused
        self._warned: set[str] = set()

    def build(self, addr: object, make: Callable[[], Protocol]) -> Protocol:
        source = sourceOf(addr)
        slot = self.counter.take(source)
        if slot is None:
            self._refused(source)
            return Refusal(self.clock, busy(self.retry))
        self._warned.discard(source)
        self._warned.discard("")
        try:
            proto = make()
            proto.slots.append(slot)
        except BaseException:
            slot.release()
            raise
        return proto

    def _refused(self, source: str) -> None:
        why = self.counter.refusal(source)
        if self.onRefused is not None and why is not None:
            self.onRefused(why)
        # One line per spell of refusals (per source, or for the total), not
        # one per socket.
        key = source if why == "per-address" else ""
        if key in self._warned:
            return
        if len(self._warned) >= _WARNED_MAX:
            self._warned.clear()
        self._warned.add(key)
        self.log.warn(
            "{what} busy: refusing connections from {source} ({why} cap reached: "
            "{count} open, {held} from {source})",
            what=self.what,
            source=source,
            why=why,
            count=len(self.counter),
            held=self.counter.holding(source),
        )


def positiveInteger(option: str) -> Callable[[str], int]:
    """A coercer for ``--option N``: a whole number, at least 1."""

    def coerce(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            raise ValueError(f"--{option} {value}: not a whole number of at least 1")
        return number

    return coerce
