"""
The relay's requests for paths to firewalled nodes, as methods of
:class:`~p2prelay.relay.protocol.RelayProtocol`:

- CONTROL: a firewalled node's control connection, proved like a
  HEARTBEAT, then held open: HEARTBEAT lines refresh the entry, the relay
  sends ``CONNECT`` orders (``relay/control.py``);
- REVERSE: a client that can accept connections asks for the node to
  connect to it (at the client's address as the relay sees it);
- RELAY and CIRCUIT: a client's connection and the node's data
  connection spliced into one circuit (``relay/circuits.py``).
"""

from __future__ import annotations

from typing import List

from .. import identity, wire
from ..addresses import plainHost
from .circuits import CIRCUIT_RETRY
from .control import CONTROL_RETRY, orderLine
from .entries import _seconds, nodeId
from .phase import Phase

HEARTBEATS_PER_TTL = 3  # a control connection's interval= is the TTL over this


class PathRequests:
    """CONTROL, REVERSE, RELAY and CIRCUIT, mixed into ``RelayProtocol``."""

    _controlNode: str | None = None  # the node whose control connection this is
    _token: str | None = None  # RELAY: the circuit's token while its node is awaited
    _circuit = None  # the Circuit this connection is a side of
    _early: List[bytes]  # RELAY: bytes that came before the circuit opened (set by _relay)

    # CONTROL: proved like a HEARTBEAT, then held open.

    def _control(self, message: wire.Message) -> None:
        node = nodeId(message)
        full = self.factory.controls.room(node)
        if full is not None:
            raise wire.ProtocolError(wire.BUSY, full, retry=CONTROL_RETRY)
        self._provedByOwner(message, identity.CONTROL_PROOF, self._controlOpened)

    def _controlOpened(self, node: str) -> None:
        self._await(self.factory.backend.get(node), self._controlFound, node)

    def _controlFound(self, peer, node: str) -> None:
        factory = self.factory
        if peer is None:
            self.finish(self._forgottenLine())
            return
        full = factory.controls.room(node)
        if full is not None:  # others opened while this one proved itself
            raise wire.ProtocolError(wire.BUSY, full, retry=CONTROL_RETRY)
        self._phase = Phase.CONTROL
        self._controlNode = node
        self._answered()
        self.requestComplete()  # no negotiation deadline from here on
        self.setTimeout(factory.backend.ttl)  # closed when silent for a TTL
        self._releaseSlots()  # counted by --max-control, not the connection caps
        old = factory.controls.opened(node, self)
        if old is not None:
            self.log.info("{node} opened a new control connection; closing the old one", node=node)
            old.closeWithin()
        factory.changed()
        self.log.info("control connection from {node} at {peer} open", node=node, peer=self.peerName())
        ttl = factory.backend.ttl
        self.transport.write(
            wire.status(
                wire.OK,
                "control connection open",
                ttl=_seconds(ttl),
                boot=factory.boot,
                interval=_seconds(ttl / HEARTBEATS_PER_TTL),
                reachable=int(peer.reachable),
            )
        )

    def _controlLine(self, message: wire.Message) -> None:
        if message.word != wire.HEARTBEAT:
            raise wire.ProtocolError(
                wire.BAD_REQUEST, f"expected HEARTBEAT on a control connection, not {message.word}"
            )
        self._await(self.factory.backend.refresh(self._controlNode), self._controlBeaten)

    def _controlBeaten(self, peer) -> None:
        factory = self.factory
        if peer is None:
            self.finish(self._forgottenLine())
            return
        factory.changed()
        if not peer.control and self._controlNode is not None:
            # The registry lost the record of this connection (a Redis
            # restarted): the heartbeat puts it back.
            factory.controls.record(self._controlNode, True)
        if not peer.reachable:
            # It may be reachable again: check (as often as a DEAD report may).
            # (The answer does not wait for it: the registry unreachable is a warning.)
            factory._guard(factory.recheck(peer, self.source), "re-checking a node")
        self.transport.write(self._aliveLine(peer))

    def _controlClosed(self) -> None:
        node, self._controlNode = self._controlNode, None
        if node is not None and self.factory.controls.closed(node, self):
            self.factory.changed()
            self.log.info("control connection from {node} closed", node=node)

    # REVERSE: the node connects out to the client.

    def _pathAllowance(self) -> None:
        wait = self.factory.pathRequests.take(self.source)
        if wait:
            raise wire.ProtocolError(
                wire.BUSY, "too many reverse and relay requests from your address", retry=wait
            )

    def _reverse(self, message: wire.Message) -> None:
        node = nodeId(message)
        port = message.port()
        token = message.nonce("token")
        self._pathAllowance()
        # Always where the request comes from, never a host the client
        # names: nobody can make nodes connect to third parties.
        host = plainHost(self.transport.getPeer().host)
        line = orderLine(token, host, port)
        if self.factory.controls.send(node, line):
            self._reversed(True, node, host, port, "")
            return
        # Another relay sharing the registry may hold it: the order goes there.
        self._await(self.factory.backend.forward(node, line), self._reversed, node, host, port, " through another relay")

    def _reversed(self, sent: bool, node: str, host: str, port: int, how: str) -> None:
        if not sent:
            raise wire.ProtocolError(wire.NOT_FOUND, f"{node} holds no control connection here")
        self.log.info(
            "asked {node} to connect to {host}:{port}{how}", node=node, host=host, port=port, how=how
        )
        self.finish(wire.status(wire.OK, f"asked {node} to connect to you"))

    # RELAY: wait for the node's CIRCUIT, then splice.

    def _relay(self, message: wire.Message) -> None:
        factory = self.factory
        limits = factory.circuits.limits
        if not limits.relaying:
            factory.circuits.result("refused")
            raise wire.ProtocolError(wire.BUSY, "this relay does not relay")
        node = nodeId(message)
        size = message.integer("size") if message.get("size") is not None else None
        name = message.name() if message.get("name") is not None else None
        self._pathAllowance()
        if node not in factory.controls:
            self._await(factory.backend.get(node), self._elsewhere, node)
            return
        if size is not None and size > limits.bytes:
            factory.circuits.result("refused")
            raise wire.ProtocolError(
                wire.TOO_LARGE,
                f"{name or 'the file'}'s {size} bytes exceed this relay's circuit limit of {limits.bytes}",
            )
        full = factory.circuits.room(node)
        if full is not None:
            factory.circuits.result("refused")
            raise wire.ProtocolError(wire.BUSY, full, retry=CIRCUIT_RETRY)
        # Raw from here: what the client sends before the circuit opens is
        # held (one read at most: reading pauses) and passed on at the splice.
        self._phase = Phase.WAITING
        self._early = []
        self.setRawMode()
        self.holdDeadline()  # waiting for the node is not the client's slowness
        self._token = factory.circuits.expect(node, self, self._circuitTimedOut)
        factory.controls.order(node, self._token)

    def _elsewhere(self, peer, node: str) -> None:
        """A RELAY for a node with no control connection here: held at another relay, or none."""
        if peer is not None and peer.control:
            # The circuit's two connections must meet at one relay.
            raise wire.ProtocolError(wire.NOT_FOUND, f"{node}'s control connection is at another relay")
        raise wire.ProtocolError(wire.NOT_FOUND, f"{node} holds no control connection here")

    def _circuitTimedOut(self) -> None:
        self._token = None
        self._early = []
        if self._lost:
            return
        self.log.info("the node did not open circuit for {peer} in time", peer=self.peerName())
        self.finish(
            wire.status(
                wire.GATEWAY_TIMEOUT,
                f"the node did not open the circuit within {_seconds(self.factory.circuits.limits.timeout)} s",
            )
        )

    def _circuitOpened(self, message: wire.Message) -> None:
        """CIRCUIT token=: the node's data connection for a waiting RELAY."""
        token = message.nonce("token")
        pending = self.factory.circuits.claim(token)
        if pending is None:
            raise wire.ProtocolError(wire.NOT_FOUND, "no such circuit")
        client = pending.client
        client._token = None
        self._phase = Phase.SPLICED
        self.setRawMode()  # the rest of this segment is the node's, for the client
        for side in (client, self):
            side._phase = Phase.SPLICED
            side._answered()
            side.conclude()  # no deadline, no idle timeout: the circuit's limits apply
            side._releaseSlots()  # counted by --max-circuits, not the connection caps
        client.transport.write(wire.status(wire.OK, "relayed by this relay", circuit=token))
        early, client._early = client._early, []
        # Paused while it waited; from here the splice's producers (and the
        # rate cap) pause and resume it.
        client.transport.resumeProducing()
        circuit = self.factory.circuits.splice(pending, self)
        client._circuit = self._circuit = circuit
        self.log.info("circuit {token} for {node} open", token=token, node=pending.node)
        for data in early:
            circuit.received(client, data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._circuit is not None:
            self._circuit.received(self, data)
        elif self._phase is Phase.WAITING:
            self._early.append(data)
            self.transport.pauseProducing()  # more waits in the kernel

    def _pathLost(self) -> None:
        """The connection is gone: whatever path state it held is given up."""
        if self._circuit is not None:
            self._circuit.lost(self)
        elif self._token is not None:
            self.factory.circuits.cancel(self._token)
            self._token = None
        self._controlClosed()
