"""
The control connections firewalled nodes hold to the relay, one per node.

A node the relay cannot reach keeps one connection open (CONTROL, proved
like a HEARTBEAT); its heartbeats travel over it and the relay sends it
``CONNECT`` orders on it: connect out to a client (the reverse path) or
back to the relay (a circuit).  While it is open the node's entry is
listed as firewalled (``Peer.control``).  With a registry several relays
share, it is listed by all of them while one holds its control connection;
a REVERSE at another relay reaches it through the registry
(``IRegistryBackend.forward``), a RELAY there does not (the circuit's two
connections must meet at one relay).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

from twisted.logger import Logger

from .. import wire
from ..human import plural
from .backends.interface import IRegistryBackend

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import RelayProtocol

MAX_CONTROL = 1024  # control connections the relay holds at most (--max-control)
CONTROL_RETRY = 60  # retry= (seconds) with a 503 at that cap


class Controls:
    """The open control connections by node, at most ``maximum``."""

    log = Logger()

    def __init__(self, backend: IRegistryBackend, maximum: int = MAX_CONTROL) -> None:
        self.backend = backend
        self.maximum = maximum
        self._open: Dict[str, "RelayProtocol"] = {}

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, node: object) -> bool:
        return node in self._open

    def room(self, node: str) -> str | None:
        """Why a control connection from ``node`` would go over the cap, or None (a replacement always fits)."""
        if node in self._open or len(self._open) < self.maximum:
            return None
        return f"the relay holds {plural(len(self._open), 'control connection')}"

    def opened(self, node: str, proto: "RelayProtocol") -> "RelayProtocol | None":
        """``proto`` is now ``node``'s control connection; the one it replaces, if any."""
        old = self._open.get(node)
        self._open[node] = proto
        self.record(node, True)
        return old if old is not proto else None

    def record(self, node: str, control: bool) -> None:
        """Tell the registry the control connection opened or closed (logged if it cannot be told)."""
        d = self.backend.setControl(node, control)
        d.addErrback(
            lambda f: self.log.warn(
                "could not record {node}'s control connection: {error}", node=node, error=f.getErrorMessage()
            )
        )

    def closed(self, node: str, proto: "RelayProtocol") -> bool:
        """``proto`` closed: True if it was ``node``'s control connection (now none)."""
        if self._open.get(node) is not proto:
            return False
        del self._open[node]
        self.record(node, False)
        return True

    def order(self, node: str, token: str, host: str | None = None, port: int | None = None) -> bool:
        """
        Send ``CONNECT token= [host= port=]`` to ``node`` over its control
        connection; False if it holds none here.
        """
        return self.send(node, orderLine(token, host, port))

    def send(self, node: str, line: bytes) -> bool:
        """Write ``line`` (an order) on ``node``'s control connection; False if it holds none here."""
        proto = self._open.get(node)
        if proto is None or proto.transport is None:
            return False
        proto.transport.write(line)
        return True


def orderLine(token: str, host: str | None = None, port: int | None = None) -> bytes:
    """``CONNECT token= [host= port=]``: the order a control connection carries."""
    return wire.request(wire.CONNECT, token=token, host=host, port=port)
