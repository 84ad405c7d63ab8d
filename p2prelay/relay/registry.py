"""
The relay's knowledge: which peers are alive and what each one holds.

A plain object with no Twisted in it, so every rule (replacement, expiry,
dead-peer reports, search) is tested exhaustively without a network; the
relay protocol only translates lines into calls on it.  Time is a callable
returning seconds, so tests drive it with ``task.Clock().seconds``.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Dict, Iterable, List, Mapping, Tuple

import attrs

from ..wire import FileEntry

DEFAULT_TTL = 90.0


@attrs.frozen
class Peer:
    """One registered peer node and the files it announced."""

    node: str
    host: str
    port: int
    files: Mapping[str, FileEntry]
    expires: float
    udp: int | None = None

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)


@attrs.frozen
class SearchHit:
    name: str
    size: int
    sha256: str
    holders: int


class Registry:
    """
    Active peers keyed by node id; every answer leaves out expired peers.

    A peer is also keyed by the address it serves on: a node that restarts
    with a fresh id on the same address replaces its old entry instead of
    leaving a ghost behind.
    """

    def __init__(self, now: Callable[[], float], ttl: float = DEFAULT_TTL) -> None:
        self._now = now
        self.ttl = ttl
        self._peers: Dict[str, Peer] = {}
        self._order: Dict[str, int] = {}
        self._counter = 0
        # Peers a client reported unreachable; hidden until they register again.
        self._dead: set[str] = set()

    def register(
        self,
        node: str,
        host: str,
        port: int,
        files: Iterable[FileEntry],
        udp: int | None = None,
    ) -> Peer:
        for other in list(self._peers.values()):
            if other.node != node and other.address == (host, port):
                self._remove(other.node)
        peer = Peer(
            node=node,
            host=host,
            port=port,
            files={entry.name: entry for entry in files},
            expires=self._now() + self.ttl,
            udp=udp,
        )
        if node not in self._peers:
            self._counter += 1
            self._order[node] = self._counter
        self._peers[node] = peer
        self._dead.discard(node)
        return peer

    def restore(self, peer: Peer) -> None:
        """Put back a peer loaded from persistent state, if still alive."""
        if peer.expires > self._now():
            self._counter += 1
            self._order[peer.node] = self._counter
            self._peers[peer.node] = peer

    def refresh(self, node: str) -> Peer | None:
        """A heartbeat: extend a live peer's lifetime; None if unknown."""
        peer = self.get(node)
        if peer is None:
            return None
        peer = attrs.evolve(peer, expires=self._now() + self.ttl)
        self._peers[node] = peer
        self._dead.discard(node)
        return peer

    def unregister(self, node: str) -> bool:
        return self._remove(node)

    def _remove(self, node: str) -> bool:
        self._order.pop(node, None)
        self._dead.discard(node)
        return self._peers.pop(node, None) is not None

    def markDead(self, host: str, port: int) -> List[Peer]:
        """A client could not reach host:port; stop handing that peer out."""
        hit = [p for p in self._peers.values() if p.address == (host, port)]
        for peer in hit:
            self._dead.add(peer.node)
        return hit

    def expire(self) -> List[Peer]:
        """Drop every peer whose lifetime has passed; returns them."""
        now = self._now()
        gone = [p for p in self._peers.values() if p.expires <= now]
        for peer in gone:
            self._remove(peer.node)
        return gone

    def all(self) -> List[Peer]:
        """Every live entry, including those reported dead (for persistence)."""
        now = self._now()
        return [p for p in self._peers.values() if p.expires > now]

    def active(self) -> List[Peer]:
        """Live, reachable peers, oldest registration first."""
        now = self._now()
        live = [
            p for p in self._peers.values() if p.expires > now and p.node not in self._dead
        ]
        return sorted(live, key=lambda p: self._order[p.node])

    def get(self, node: str) -> Peer | None:
        peer = self._peers.get(node)
        return peer if peer is not None and peer.expires > self._now() else None

    def holders(self, name: str) -> List[Tuple[Peer, FileEntry]]:
        return [(p, p.files[name]) for p in self.active() if name in p.files]

    def search(self, pattern: str, limit: int) -> Tuple[List[SearchHit], bool]:
        """
        Files whose name matches a glob (when it has ``*?[``) or contains a
        substring, one hit per (name, size, sha256) version, capped at limit.
        """
        isGlob = any(c in pattern for c in "*?[")
        lowered = pattern.lower()

        def matches(name: str) -> bool:
            if isGlob:
                return fnmatch.fnmatchcase(name.lower(), lowered) or fnmatch.fnmatchcase(
                    name.rsplit("/", 1)[-1].lower(), lowered
                )
            return lowered in name.lower()

        counts: Dict[Tuple[str, int, str], int] = {}
        for peer in self.active():
            for entry in peer.files.values():
                if matches(entry.name):
                    key = (entry.name, entry.size, entry.sha256)
                    counts[key] = counts.get(key, 0) + 1
        hits = [SearchHit(n, s, h, c) for (n, s, h), c in sorted(counts.items())]
        return hits[:limit], len(hits) > limit
