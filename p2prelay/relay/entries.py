"""
The relay's requests that change a node's entry, as methods of
:class:`~p2prelay.relay.protocol.RelayProtocol`: REGISTER (a header line,
its FILE lines and END; the challenge; the dial-back; the answer), and
HEARTBEAT and UNREGISTER, proved with the key the entry holds.  Also the
checks of ``node=`` and ``host=`` and the ``ttl=``/``retry=`` formats
these answers share with the rest of the protocol.
"""

from __future__ import annotations

import math

from .. import identity, wire
from ..addresses import hostPort, plainHost
from ..human import plural
from .dialback import Outcome
from .phase import Phase
from .registry import AddressTaken, RegistryFull

NODE_ID_MAX = 64
INFLIGHT_RETRY = 5  # seconds (retry=) for a REGISTER refused over MAX_INFLIGHT_BYTES


class EntryRequests:
    """REGISTER, HEARTBEAT and UNREGISTER, mixed into ``RelayProtocol``."""

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
        # The FILE lines that follow wait (reading paused) for the answer.
        self._await(self.factory.backend.room(node, self.source), self._roomChecked, message, size, key, node)

    def _roomChecked(self, full: str | None, message: wire.Message, size: int, key: str, node: str) -> None:
        if full is not None:
            raise wire.ProtocolError(wire.BUSY, full, retry=self.factory.backend.ttl)
        if self.factory.inflight >= self.factory.maxInflight:
            raise wire.ProtocolError(
                wire.BUSY, "too many registrations in progress", retry=INFLIGHT_RETRY
            )
        self._key, self._node = key, node
        self._request = message
        self._hold(size)
        self._phase = Phase.FILES

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
        self._await(self.factory.backend.get(self._node), self._found, host, port)

    def _found(self, existing, host: str, port: int) -> None:
        same = existing is not None and existing.key == self._key and existing.address == (host, port)
        if same and existing.reachable:
            # Reached there before within its lifetime: no second dial-back.
            self._record(host, port, True, "")
            return
        # The source's dial-back allowance is the registry's: shared by every relay on it.
        self._await(self.factory.allowance("dialback", self.source), self._allowed, existing, same, host, port)

    def _allowed(self, wait: float, existing, same: bool, host: str, port: int) -> None:
        if wait:
            if same:
                self._record(host, port, existing.reachable, "not checked again yet")
                return
            raise wire.ProtocolError(
                wire.BUSY, "too many dial-backs for your address", retry=wait
            )
        # Paused with its deadline held while the relay dials; a node that
        # gives up waiting meanwhile will register again.
        self._await(self.factory.dialback.check(host, port, self._key), self._dialled, host, port)

    def _dialled(self, outcome: Outcome, host: str, port: int) -> None:
        self._record(host, port, outcome.ok, outcome.reason)

    def _record(self, host: str, port: int, reachable: bool, reason: str) -> None:
        request = self._request
        assert request is not None
        udp = request.port("udp") if request.get("udp") else None
        tlsPort = request.port("tls") if request.get("tls") else None
        backend = self.factory.backend
        d = backend.register(
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

        def refused(failure):
            failure.trap(RegistryFull, AddressTaken, ValueError)
            if failure.check(RegistryFull):
                raise wire.ProtocolError(wire.BUSY, str(failure.value), retry=backend.ttl)
            raise wire.ProtocolError(
                wire.CONFLICT, f"{failure.value}; the relay could not reach this key there ({reason})"
            )

        d.addErrback(refused)
        self._await(d, self._registered, reachable, reason)

    def _registered(self, peer, reachable: bool, reason: str) -> None:
        host, port = peer.host, peer.port
        self.factory.changed()
        self._settle(wire.OK)
        self.log.info(
            "registered {node} at {where} with {files}{how}",
            node=peer.node,
            where=hostPort(host, port),
            host=peer.host,
            port=peer.port,
            count=len(peer.files),
            files=plural(len(peer.files), "file"),
            how=""
            if reachable
            else f"; firewalled: the relay cannot reach it ({reason}), so it is listed only "
            "while it holds a control connection",
        )
        if reachable:
            text = f"registered {plural(len(peer.files), 'file')}"
        else:
            text = f"registered, but the relay could not reach {hostPort(host, port)} ({reason})"
        self.finish(
            wire.status(
                wire.OK,
                text,
                node=peer.node,
                ttl=_seconds(self.factory.backend.ttl),
                boot=self.factory.boot,
                host=peer.host,
                reachable=int(reachable),
            )
        )

    # HEARTBEAT and UNREGISTER: proved with the key the entry holds.

    def _provedByOwner(self, message: wire.Message, purpose: bytes, then) -> None:
        node = nodeId(message)
        self._await(self.factory.backend.get(node), self._owned, node, purpose, then)

    def _owned(self, peer, node: str, purpose: bytes, then) -> None:
        if peer is None:
            if purpose in (identity.HEARTBEAT_PROOF, identity.CONTROL_PROOF):
                self.finish(self._forgottenLine())
            else:
                self.finish(wire.status(wire.NOT_FOUND, "no such node", boot=self.factory.boot))
            return
        if peer.key is None:
            raise wire.ProtocolError(wire.UNAUTHORIZED, "this entry has no key to prove")
        self._challenge(purpose, peer.key, lambda: then(node))

    def _heartbeat(self, message: wire.Message) -> None:
        self._provedByOwner(message, identity.HEARTBEAT_PROOF, self._beat)

    def _beat(self, node: str) -> None:
        self._await(self.factory.backend.refresh(node), self._beaten)

    def _forgottenLine(self) -> bytes:
        """The answer to a heartbeat (on its own or on a control connection) of an entry the relay no longer has."""
        return wire.status(wire.NOT_FOUND, "unknown node; register again", boot=self.factory.boot)

    def _aliveLine(self, peer) -> bytes:
        """The answer to a heartbeat that refreshed ``peer``: on its own connection or a control one."""
        return wire.status(
            wire.OK,
            "alive",
            ttl=_seconds(self.factory.backend.ttl),
            boot=self.factory.boot,
            reachable=int(peer.reachable),
        )

    def _beaten(self, peer) -> None:
        if peer is None:
            self.finish(self._forgottenLine())
            return
        self.factory.changed()
        if not peer.reachable:
            # It may be reachable again: check (as often as a DEAD report may).
            self._await(self.factory.recheck(peer, self.source), self._alive, peer)
            return
        self._alive(False, peer)

    def _alive(self, _: bool, peer) -> None:
        self.finish(self._aliveLine(peer))

    def _unregister(self, message: wire.Message) -> None:
        self._provedByOwner(message, identity.UNREGISTER_PROOF, self._leave)

    def _leave(self, node: str) -> None:
        self._await(self.factory.backend.unregister(node), self._left, node)

    def _left(self, removed: bool, node: str) -> None:
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
