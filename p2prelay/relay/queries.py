"""
The relay's queries, as methods of
:class:`~p2prelay.relay.protocol.RelayProtocol`: PEERS, WHOHAS (by name, or
by manifest root: the same bytes under any name), SEARCH
(a few steps per reactor turn), STATS and DEAD (a client's hint that a
peer is unreachable), each answered with one status line, or a status
line, its items and END.
"""

from __future__ import annotations

from typing import List

from twisted.internet.defer import Deferred

from .. import wire
from ..human import humanSize, plural
from ..wire import FileEntry
from .phase import Phase
from .entries import checkHost
from .registry import Peer

MAX_SEARCH_RESULTS = 1000
SEARCH_SLICE = 1  # in memory, search steps (SEARCH_STEP names each) run per reactor turn


def peerFields(peer: Peer) -> dict[str, object]:
    fields: dict[str, object] = {
        "node": peer.node,
        "host": peer.host,
        "port": peer.port,
        "udp": peer.udp,
        "reach": peer.reach,  # direct, or firewalled: reverse or relayed paths only
    }
    if peer.tls is not None:  # the key a client pins its TLS connection to
        fields.update(tls=peer.tls, key=peer.key)
    return fields


class QueryRequests:
    """PEERS, WHOHAS, SEARCH, STATS and DEAD, mixed into ``RelayProtocol``."""

    _searching = None  # the SEARCH in progress (a Deferred), until answered or abandoned

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
        self._await(self.factory.backend.active(), self._peersFound)

    def _peersFound(self, peers: List[Peer]) -> None:
        items = [
            wire.item(wire.PEER, **peerFields(p), files=len(p.files)) for p in peers
        ]
        if self.factory.verbose:
            self.log.debug("PEERS from {peer}: {count} active", peer=self.peerName(), count=len(items))
        self._answerList(items, f"{plural(len(items), 'active peer')}")

    def _whohas(self, message: wire.Message) -> None:
        # name= (holders of that name) or root= (of those bytes, under any name): exactly one.
        if "name" in message.fields and "root" in message.fields:
            raise wire.ProtocolError(wire.BAD_REQUEST, "WHOHAS takes name= or root=, not both")
        if "name" not in message.fields and "root" not in message.fields:
            raise wire.ProtocolError(wire.BAD_REQUEST, "WHOHAS needs name= or root=")
        if "root" in message.fields:
            root = message.sha256("root")
            self._await(self.factory.backend.holdersOfRoot(root), self._rootHoldersFound, root)
            return
        name = message.name()
        self._await(self.factory.backend.holders(name), self._holdersFound, name)

    def _holdersFound(self, holders, name: str) -> None:
        items = [
            wire.item(wire.PEER, **peerFields(p), size=e.size, sha256=e.sha256, **_layout(e))
            for p, e in holders
        ]
        self._looked(name, len(items))
        self._answerList(items, f"{plural(len(items), 'peer')} {'holds' if len(items) == 1 else 'hold'} {name}")

    def _rootHoldersFound(self, holders, root: str) -> None:
        # Each item says the name its holder has the bytes under: that is what a GET asks for.
        items = [
            wire.item(wire.PEER, **peerFields(p), name=e.name, size=e.size, sha256=e.sha256, **_layout(e))
            for p, e in holders
        ]
        self._looked(f"root {root[:12]}...", len(items))
        self._answerList(
            items, f"{plural(len(items), 'peer')} {'holds' if len(items) == 1 else 'hold'} root {root[:12]}..."
        )

    def _search(self, message: wire.Message) -> None:
        pattern = message.get("pattern", "") or ""
        if len(pattern.encode("utf-8")) > wire.MAX_NAME:
            raise wire.ProtocolError(wire.BAD_REQUEST, "pattern too long")
        limit = message.integer("limit", MAX_SEARCH_RESULTS, low=1, high=MAX_SEARCH_RESULTS)
        self._pattern = pattern
        self._phase = Phase.WORKING
        # In memory a few steps per reactor turn, so every other request is
        # answered between them however many names the search goes through;
        # the deadline is held meanwhile: the relay's work is not the client's slowness.
        # Kept, so a client that leaves stops the search (see connectionLost).
        self._searching = self.factory.backend.search(pattern, limit)
        self._await(self._searching, self._searched)

    def _searched(self, found) -> None:
        hits, truncated = found
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
        self._await(self.factory.backend.figures(), self._statsFigured)

    def _statsFigured(self, figures) -> None:
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
        # The allowance, and the re-check interval, are the registry's:
        # shared by every relay on it.
        self._await(self.factory.allowance("report", self.source), self._reportAllowed, host, port)

    def _reportAllowed(self, wait: float, host: str, port: int) -> None:
        if wait:
            raise wire.ProtocolError(wire.BUSY, "too many reports from your address", retry=wait)
        self._await(self.factory.backend.at(host, port), self._reported, host, port)

    def _reported(self, peers: List[Peer], host: str, port: int) -> None:
        self._await(Deferred.fromCoroutine(self._rechecking(peers)), self._checking, host, port)

    async def _rechecking(self, peers: List[Peer]) -> int:
        """Re-check each reachable one of ``peers`` (as allowed); how many checks started."""
        started = 0
        for p in peers:
            if p.reachable and (await self.factory.recheck(p)):
                started += 1
        return started

    def _checking(self, started: int, host: str, port: int) -> None:
        if started:
            self.log.info(
                "a client reports {host}:{port} unreachable; checking", host=host, port=port
            )
        self.finish(wire.status(wire.OK, f"will check {started} peers"))


def _layout(entry: FileEntry) -> dict[str, object]:
    """A WHOHAS item's root= and piece= (always both, when the holder gave a root)."""
    if entry.root is None:
        return {}
    return {"root": entry.root, "piece": entry.pieceSize}
