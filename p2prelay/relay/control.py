"""
The control connections firewalled nodes hold to the relay, one per node.

A node the relay cannot reach keeps one connection open (CONTROL, proved
like a HEARTBEAT); its heartbeats travel over it and the relay sends it
``CONNECT`` orders on it: connect out to a client (the reverse path) or
back to the relay (a circuit).  While it is open the node's entry is
listed as firewalled (``Peer.control``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

from twisted.logger import Logger

from .. import wire
from ..human import plural
from .registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import RelayProtocol

MAX_CONTROL = 1024  # control connections the relay holds at most (--max-control)
CONTROL_RETRY = 60  # retry= (seconds) with a 503 at that cap


class Controls:
    """The open control connections by node, at most ``maximum``."""

    log = Logger()

    def __init__(self, registry: Registry, maximum: int = MAX_CONTROL) -> None:
        self.registry = registry
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
        self.registry.setControl(node, True)
        return old if old is not proto else None

    def closed(self, node: str, proto: "RelayProtocol") -> bool:
        """``proto`` closed: True if it was ``node``'s control connection (now none)."""
        if self._open.get(node) is not proto:
            return False
        del self._open[node]
        self.registry.setControl(node, False)
        return True

    def order(self, node: str, token: str, host: str | None = None, port: int | None = None) -> bool:
        """
        Send ``CONNECT token= [host= port=]`` to ``node`` over its control
        connection; False if it holds none here.
        """
        proto = self._open.get(node)
        if proto is None or proto.transport is None:
            return False
        proto.transport.write(wire.request(wire.CONNECT, token=token, host=host, port=port))
        return True
