"""
The relay: a directory of peer nodes, answered one request per connection.

The protocol only translates lines into calls on :class:`Registry` and the
results back into lines; every rule about who is alive lives there.
"""

from __future__ import annotations

import uuid
from typing import Callable, List

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from .. import wire
from ..limits import RELAY_MAX_CONNECTIONS, RELAY_MAX_PER_ADDRESS, ConnectionLimit
from ..negotiation import MIN_RATE, NEGOTIATION_DEADLINE, NegotiationProtocol
from ..wire import FileEntry
from .registry import Peer, Registry

MAX_SEARCH_RESULTS = 1000
NODE_ID_MAX = 64


def peerFields(peer: Peer) -> dict[str, object]:
    return {"node": peer.node, "host": peer.host, "port": peer.port, "udp": peer.udp}


class RelayProtocol(NegotiationProtocol):
    """
    One request from a node or a client: REGISTER (with its file list),
    UNREGISTER, HEARTBEAT, PEERS, WHOHAS, SEARCH or DEAD.
    """

    deadline = NEGOTIATION_DEADLINE  # the whole request, extended by bytes at MIN_RATE
    minRate = MIN_RATE

    def __init__(self, factory: "RelayFactory") -> None:
        super().__init__(factory.clock)
        self.factory = factory
        self._request: wire.Message | None = None
        self._files: List[FileEntry] = []
        self._expected = 0

    def lineReceived(self, line: bytes) -> None:
        if self.finished:
            return
        try:
            message = wire.parseLine(line)
            if self._request is None:
                self._dispatch(message)
            else:
                self._fileLine(message)
        except wire.ProtocolError as e:
            self.log.info("refusing {peer}: {error}", peer=self.peerName(), error=str(e))
            self.refuse(e)

    def _dispatch(self, message: wire.Message) -> None:
        handler = {
            wire.REGISTER: self._register,
            wire.UNREGISTER: self._unregister,
            wire.HEARTBEAT: self._heartbeat,
            wire.PEERS: self._peers,
            wire.WHOHAS: self._whohas,
            wire.SEARCH: self._search,
            wire.DEAD: self._dead,
        }.get(message.word)
        if handler is None:
            raise wire.ProtocolError(wire.BAD_REQUEST, f"unknown request {message.word}")
        handler(message)

    # REGISTER: a header line, `files` FILE lines, then END.

    def _register(self, message: wire.Message) -> None:
        nodeId(message)
        message.port()
        if message.get("udp") is not None:
            message.port("udp")
        if message.get("host") is not None:
            checkHost(message.require("host"))
        self._expected = message.integer("files")
        if self._expected > wire.MAX_FILES:
            raise wire.ProtocolError(
                wire.TOO_LARGE, f"at most {wire.MAX_FILES} files per registration"
            )
        self._request = message

    def _fileLine(self, message: wire.Message) -> None:
        if len(self._files) < self._expected:
            if message.word != wire.FILE:
                raise wire.ProtocolError(wire.BAD_REQUEST, "expected a FILE line")
            self._files.append(
                FileEntry(message.name(), message.integer("size"), message.sha256())
            )
            return
        if message.word != wire.END:
            raise wire.ProtocolError(wire.TOO_LARGE, "more FILE lines than announced")
        if message.integer("count") != self._expected:
            raise wire.ProtocolError(wire.BAD_REQUEST, "END count does not match")
        self._completeRegistration()

    def _completeRegistration(self) -> None:
        request = self._request
        assert request is not None
        observed = self.transport.getPeer().host
        host = request.get("host") or observed
        udp = request.port("udp") if request.get("udp") else None
        peer = self.factory.registry.register(
            request.require("node"), host, request.port(), self._files, udp=udp
        )
        self.factory.changed()
        self.log.info(
            "registered {node} at {host}:{port} with {count} files",
            node=peer.node,
            host=peer.host,
            port=peer.port,
            count=len(peer.files),
        )
        self.finish(
            wire.status(
                wire.OK,
                f"registered {len(peer.files)} files",
                ttl=_seconds(self.factory.registry.ttl),
                boot=self.factory.boot,
                host=peer.host,
            )
        )

    def _heartbeat(self, message: wire.Message) -> None:
        peer = self.factory.registry.refresh(nodeId(message))
        if peer is None:
            self.finish(
                wire.status(wire.NOT_FOUND, "unknown node; register again", boot=self.factory.boot)
            )
            return
        self.factory.changed()
        self.finish(
            wire.status(
                wire.OK,
                "alive",
                ttl=_seconds(self.factory.registry.ttl),
                boot=self.factory.boot,
            )
        )

    def _unregister(self, message: wire.Message) -> None:
        node = nodeId(message)
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
        self._answerList(items, f"{len(items)} active peers")

    def _whohas(self, message: wire.Message) -> None:
        name = message.name()
        holders = self.factory.registry.holders(name)
        items = [
            wire.item(wire.PEER, **peerFields(p), size=e.size, sha256=e.sha256)
            for p, e in holders
        ]
        self._answerList(items, f"{len(items)} peers hold {name}")

    def _search(self, message: wire.Message) -> None:
        pattern = message.get("pattern", "") or ""
        if len(pattern.encode("utf-8")) > wire.MAX_NAME:
            raise wire.ProtocolError(wire.BAD_REQUEST, "pattern too long")
        limit = message.integer("limit", MAX_SEARCH_RESULTS, low=1, high=MAX_SEARCH_RESULTS)
        hits, truncated = self.factory.registry.search(pattern, limit)
        items = [
            wire.item(wire.FILE, name=h.name, size=h.size, sha256=h.sha256, holders=h.holders)
            for h in hits
        ]
        self._answerList(
            items, f"{len(items)} files match", truncated=1 if truncated else 0
        )

    def _dead(self, message: wire.Message) -> None:
        host = checkHost(message.require("host"))
        port = message.port()
        hidden = self.factory.registry.markDead(host, port)
        if hidden:
            self.factory.changed()
            self.log.info(
                "a client reports {host}:{port} unreachable; hiding it", host=host, port=port
            )
        self.finish(wire.status(wire.OK, f"hidden {len(hidden)} peers"))


def nodeId(message: wire.Message) -> str:
    node = message.require("node")
    if not 0 < len(node) <= NODE_ID_MAX or not node.isprintable() or " " in node:
        raise wire.ProtocolError(wire.BAD_REQUEST, "node= must be 1-64 printable characters")
    return node


def checkHost(host: str) -> str:
    if not 0 < len(host) <= 255 or not all(c.isalnum() or c in ".-:_%" for c in host):
        raise wire.ProtocolError(wire.BAD_REQUEST, "host= is not a host name or address")
    return host


def _seconds(value: float) -> str:
    return f"{value:g}"


class RelayFactory(Factory):
    """
    Shares one registry between connections; ``boot`` identifies this run
    of the relay so nodes notice a restart.
    """

    protocol = RelayProtocol
    noisy = False  # no "Starting factory <RelayFactory ...>": the service logs its port

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        onChange: Callable[[], None] = lambda: None,
        maxConnections: int = RELAY_MAX_CONNECTIONS,
        maxPerAddress: int = RELAY_MAX_PER_ADDRESS,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.connections = ConnectionLimit(clock, maxConnections, maxPerAddress, what="relay")
        self.boot = uuid.uuid4().hex[:16]
        self._onChange = onChange

    def changed(self) -> None:
        self._onChange()

    def buildProtocol(self, addr: object):
        return self.connections.build(addr, lambda: RelayProtocol(self))
