"""
The relay's knowledge: which peers are alive and what each one holds.

A plain object with no Twisted in it, so every rule (replacement, expiry,
reachability, caps, search) is tested exhaustively without a network; the
relay protocol only translates lines into calls on it.  Time is a callable
returning seconds, so tests drive it with ``task.Clock().seconds``.

Entries are keyed by node id and carry the node's public key; proving the
key is the protocol's job, the registry only refuses what no proof can
allow: another key under a known id, or a verified address taken by an
unverified newcomer.  Only entries the relay could reach itself
(``reachable``) are ever handed to clients.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Dict, Iterable, List, Mapping, Tuple

import attrs

from ..wire import FileEntry

DEFAULT_TTL = 90.0
MAX_PER_SOURCE = 64  # live registrations made from one source address
MAX_TOTAL = 100_000  # live registrations in all


class RegistryFull(Exception):
    """A new registration would go over a cap; the message says which."""


class AddressTaken(Exception):
    """The address is held by a live, verified node with another key."""


@attrs.frozen
class Peer:
    """One registered peer node and the files it announced."""

    node: str
    host: str
    port: int
    files: Mapping[str, FileEntry]
    expires: float
    udp: int | None = None
    key: str | None = None  # the node's public key (base64url)
    reachable: bool = True  # the relay's own dial-back reached the node there
    source: str | None = None  # the address the registration came from
    tls: int | None = None  # the node's TLS port (pinned to key), if it has one

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
    Live peers keyed by node id; every answer leaves out expired peers,
    and the lists handed to clients leave out unreachable ones.

    A peer is also found by the address it serves on: a node that restarts
    with a fresh key on the same address replaces its old entry (once the
    relay has reached the new key there) instead of leaving a ghost behind.
    """

    def __init__(
        self,
        now: Callable[[], float],
        ttl: float = DEFAULT_TTL,
        *,
        maxPerSource: int = MAX_PER_SOURCE,
        maxTotal: int = MAX_TOTAL,
    ) -> None:
        self._now = now
        self.ttl = ttl
        self.maxPerSource = maxPerSource
        self.maxTotal = maxTotal
        self._peers: Dict[str, Peer] = {}
        self._order: Dict[str, int] = {}
        self._bySource: Dict[str, set[str]] = {}
        self._counter = 0

    def room(self, node: str, source: str | None) -> str | None:
        """
        Why a registration of ``node`` from ``source`` would go over a cap,
        or None if it fits.  Re-registering a live node always fits.
        """
        if self.get(node) is not None:
            return None
        if len(self._peers) >= self.maxTotal and self._live(self._peers) >= self.maxTotal:
            return f"the relay holds {self.maxTotal} registrations"
        if source is not None:
            mine = self._bySource.get(source, ())
            if len(mine) >= self.maxPerSource and self._live(mine) >= self.maxPerSource:
                return f"{self.maxPerSource} registrations from {source} already"
        return None

    def _live(self, nodes: Iterable[str]) -> int:
        now = self._now()
        return sum(1 for n in nodes if n in self._peers and self._peers[n].expires > now)

    def register(
        self,
        node: str,
        host: str,
        port: int,
        files: Iterable[FileEntry],
        udp: int | None = None,
        *,
        key: str | None = None,
        reachable: bool = True,
        source: str | None = None,
        tls: int | None = None,
    ) -> Peer:
        """
        Record a registration, replacing the node's earlier one.

        Raises :class:`RegistryFull` over a cap, :class:`AddressTaken` when
        an unverified newcomer claims a live verified node's address, and
        ValueError when ``key`` differs from the one the id was bound to.
        """
        existing = self.get(node)
        if existing is not None and existing.key != key:
            raise ValueError(f"node {node} is bound to another key")
        reason = self.room(node, source)
        if reason is not None:
            raise RegistryFull(reason)
        others = [p for p in self.at(host, port) if p.node != node]
        if not reachable and any(p.reachable for p in others):
            raise AddressTaken(f"{host}:{port} is held by another node")
        for other in others if reachable else ():
            self._remove(other.node)
        peer = Peer(
            node=node,
            host=host,
            port=port,
            files={entry.name: entry for entry in files},
            expires=self._now() + self.ttl,
            udp=udp,
            key=key,
            reachable=reachable,
            source=source,
            tls=tls,
        )
        self._add(peer)
        return peer

    def _add(self, peer: Peer) -> None:
        old = self._peers.get(peer.node)
        if old is not None:
            self._forgetSource(old)
        if peer.node not in self._order:
            self._counter += 1
            self._order[peer.node] = self._counter
        self._peers[peer.node] = peer
        if peer.source is not None:
            self._bySource.setdefault(peer.source, set()).add(peer.node)

    def _forgetSource(self, peer: Peer) -> None:
        if peer.source is not None:
            nodes = self._bySource.get(peer.source)
            if nodes is not None:
                nodes.discard(peer.node)
                if not nodes:
                    del self._bySource[peer.source]

    def restore(self, peer: Peer) -> None:
        """Put back a peer loaded from persistent state, if still alive."""
        if peer.expires > self._now():
            self._add(peer)

    def refresh(self, node: str) -> Peer | None:
        """A heartbeat: extend a live peer's lifetime; None if unknown."""
        peer = self.get(node)
        if peer is None:
            return None
        peer = attrs.evolve(peer, expires=self._now() + self.ttl)
        self._peers[node] = peer
        return peer

    def unregister(self, node: str) -> bool:
        return self._remove(node)

    def _remove(self, node: str) -> bool:
        self._order.pop(node, None)
        peer = self._peers.pop(node, None)
        if peer is None:
            return False
        self._forgetSource(peer)
        return True

    def at(self, host: str, port: int) -> List[Peer]:
        """Every live entry registered at host:port, listed or not."""
        now = self._now()
        return [p for p in self._peers.values() if p.address == (host, port) and p.expires > now]

    def setReachable(self, node: str, reachable: bool) -> Peer | None:
        """Record the outcome of the relay's own check of a live node."""
        peer = self.get(node)
        if peer is None or peer.reachable == reachable:
            return peer
        peer = attrs.evolve(peer, reachable=reachable)
        self._peers[node] = peer
        return peer

    def expire(self) -> List[Peer]:
        """Drop every peer whose lifetime has passed; returns them."""
        now = self._now()
        gone = [p for p in self._peers.values() if p.expires <= now]
        for peer in gone:
            self._remove(peer.node)
        return gone

    def all(self) -> List[Peer]:
        """Every live entry, including unreachable ones (for persistence)."""
        now = self._now()
        return [p for p in self._peers.values() if p.expires > now]

    def active(self) -> List[Peer]:
        """Live, reachable peers, oldest registration first."""
        now = self._now()
        live = [p for p in self._peers.values() if p.expires > now and p.reachable]
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
