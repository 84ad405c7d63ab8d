"""
A firewalled node's control connection to its relay.

A node the relay cannot dial back (``reachable=0``) keeps one persistent
connection to the relay, so clients can still fetch from it: over it the
relay orders the node to connect *out*, either to a client that listens
(reverse path) or back to the relay for a spliced circuit (relayed path).
The exchange (docs/protocol.rst, design of issue 12)::

    N> P2P/1 CONTROL node=ID
    R< P2P/1 100 nonce=N [secret=1]
    N> P2P/1 PROOF sig=S [mac=M]        # identity.CONTROL_PROOF over the CONTROL line
    R< P2P/1 200 ttl=90 boot=B interval=30 reachable=0 :control connection open
    N> P2P/1 HEARTBEAT                  # the registrar's heartbeats, no proof
    R< P2P/1 200 ttl=90 boot=B reachable=0 :alive
    R< P2P/1 CONNECT token=T host=H port=P   # connect to H:P, say REVERSE token=T, serve one request
    R< P2P/1 CONNECT token=T                 # connect to the relay, say CIRCUIT token=T, serve one request

Heartbeat answers come back in the order the heartbeats went; CONNECT
orders may arrive between them at any time.  The connection is kept by a
:class:`~twisted.application.internet.ClientService` that reconnects with
jittered exponential backoff (1 s up to 60 s); a connection the relay
refuses before its 200 counts as a failed attempt, so a relay that keeps
saying 404 or 503 is not hammered, and a ``503 retry=N`` is honoured.

Each order is served by the node's own :class:`FileServerProtocol`, so GET,
MANIFEST, ranges, sendfile, ``--max-rate``, ``--max-uploads`` and the
metrics apply unchanged; the node only ever connects to the host and port
an order names (an IP address, which the relay took from the client's
connection) or to its relay, and carries out at most :data:`MAX_ORDERS`
at once.

With several relays (``--relay a,b``: a
:class:`~p2prelay.addresses.FailoverEndpoint`), each reconnection goes to
the relay that last answered, else the next, and a circuit is always
opened at the relay that holds the control connection the order came on
(the one that has the client waiting), never wherever the failover would
go next.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from typing import Callable, List, Optional

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from .. import identity, wire
from ..addresses import hostPort, relayReached, tcpEndpoint
from ..cli.console import visible
from ..client.relay import ProofNeeded, keyProver
from .server import FileServerFactory, FileServerProtocol

FIRST_RETRY = 1.0  # seconds before the first reconnection (plus up to 1 s of jitter)
MAX_RETRY = 60.0  # the longest wait between attempts (plus jitter)
HANDSHAKE_TIMEOUT = 15.0  # seconds for the relay's 100 and 200
HEARTBEAT_TIMEOUT = 15.0  # seconds for a heartbeat's answer before the connection is given up
CONNECT_TIMEOUT = 5.0  # seconds to connect out for an order
MAX_ORDERS = 16  # outbound serving connections in flight at once; more orders are dropped


class NotOpen(Exception):
    """There is no open control connection to send a heartbeat over."""


class Phase(enum.Enum):
    CHALLENGED = "challenged"  # CONTROL sent; waiting for the relay's 100
    PROVING = "proving"  # PROOF sent; waiting for its 200
    OPEN = "open"  # long-lived: heartbeats and orders
    CLOSED = "closed"  # refused, failed or lost


class ControlProtocol(LineReceiver):
    """The node's end of one control connection."""

    delimiter = b"\n"
    MAX_LENGTH = wire.MAX_LINE + 1  # the limit excludes a CR before the LF
    log = Logger()

    def __init__(self, control: "ControlConnection") -> None:
        self.control = control
        self.clock = control.clock
        self.phase = Phase.CHALLENGED
        self._sent = b""  # every request byte sent before PROOF: what the proof covers
        self._handshake: Optional[IDelayedCall] = None
        # Heartbeats awaiting their answers, oldest first, each with its deadline.
        self._heartbeats: List[tuple[Deferred[wire.Message], IDelayedCall]] = []

    def connectionMade(self) -> None:
        self._sent = wire.request(wire.CONTROL, node=self.control.key.node)
        self.transport.write(self._sent)
        self._handshake = self.clock.callLater(HANDSHAKE_TIMEOUT, self._handshakeTimedOut)

    def lineReceived(self, line: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        try:
            message = wire.parseLine(line)
            if self.phase is Phase.OPEN:
                self._openLine(message)
            else:
                self._handshakeLine(message)
        except wire.ProtocolError as e:
            self.log.info("the relay sent a bad control line ({error}); closing", error=str(e))
            self._close()
        except ProofNeeded as e:
            self.log.warn("cannot open a control connection: {error}", error=str(e))
            self.control._refused(None, None)
            self._close()

    def _handshakeLine(self, message: wire.Message) -> None:
        code = message.status
        if code is None:
            raise wire.ProtocolError(wire.BAD_REQUEST, f"expected a status line, not {visible(message.word)}")
        if code == wire.CONTINUE and self.phase is Phase.CHALLENGED:
            prove = keyProver(self.control.key, identity.CONTROL_PROOF, self.control.secret)
            self.transport.write(prove(message.nonce(), message.flag("secret"), self._sent))
            self.phase = Phase.PROVING
            return
        if code != wire.OK:
            self.control._refused(code, message, self)
            self._close()
            return
        self._cancelHandshake()
        self.phase = Phase.OPEN
        self.control._opened(self, message)

    def _openLine(self, message: wire.Message) -> None:
        if message.word == wire.CONNECT:
            self.control._order(message, self)
            return
        if message.status is None:
            self.log.info("ignoring {word} on the control connection", word=visible(message.word))
            return
        if not self._heartbeats:
            self.log.info("ignoring an unasked-for {code} on the control connection", code=visible(message.word))
            return
        d, deadline = self._heartbeats.pop(0)
        if deadline.active():
            deadline.cancel()
        if d.called:
            return  # given up on (cancelled) meanwhile
        if message.status == wire.OK:
            d.callback(message)
        else:
            d.errback(wire.ProtocolError(message.status, message.text or "error", retry=message.retry()))

    def heartbeat(self) -> Deferred[wire.Message]:
        """Send a HEARTBEAT; fires with the relay's 200 line, or fails."""
        d: Deferred[wire.Message] = Deferred()
        deadline = self.clock.callLater(HEARTBEAT_TIMEOUT, self._heartbeatTimedOut)
        self._heartbeats.append((d, deadline))
        self.transport.write(wire.request(wire.HEARTBEAT))
        return d

    def _heartbeatTimedOut(self) -> None:
        self.log.info(
            "no answer to a heartbeat on the control connection in {seconds:g} s; dropping it",
            seconds=HEARTBEAT_TIMEOUT,
        )
        self._failHeartbeats(TimeoutError(f"no answer from the relay for {HEARTBEAT_TIMEOUT:g} seconds"))
        self._close(abort=True)

    def _handshakeTimedOut(self) -> None:
        self._handshake = None
        self.log.info("the relay did not open the control connection in {seconds:g} s", seconds=HANDSHAKE_TIMEOUT)
        self.control._refused(None, None)
        self._close(abort=True)

    def _cancelHandshake(self) -> None:
        if self._handshake is not None and self._handshake.active():
            self._handshake.cancel()
        self._handshake = None

    def _failHeartbeats(self, error: Exception) -> None:
        pending, self._heartbeats = self._heartbeats, []
        for d, deadline in pending:
            if deadline.active():
                deadline.cancel()
            if not d.called:
                d.errback(Failure(error))

    def _close(self, abort: bool = False) -> None:
        self.phase = Phase.CLOSED
        self._cancelHandshake()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.log.info("the relay sent an over-long line on the control connection; closing")
        self._close(abort=True)

    def connectionLost(self, reason: Failure = None) -> None:
        opened = self.phase is Phase.OPEN
        if self.phase is not Phase.CLOSED and not opened:
            self.control._refused(None, None)  # closed before it opened: a failed attempt
        self.phase = Phase.CLOSED
        self._cancelHandshake()
        self._failHeartbeats(ConnectionLost("the control connection was lost"))
        self.control._lost(self, opened, reason)


class _ControlFactory(Factory):
    noisy = False

    def __init__(self, control: "ControlConnection") -> None:
        self.control = control

    def buildProtocol(self, addr: object) -> ControlProtocol:
        return ControlProtocol(self.control)


class OrderedServing(FileServerProtocol):
    """
    The node's file server on a connection it made itself for an order:
    it says who it is (``intro``: ``REVERSE token=`` or ``CIRCUIT
    token=``) first, then serves one request as on any accepted
    connection.  Every cap it takes counts under the order (``source``),
    so the node-wide caps apply and no per-address cap of the far end does.
    """

    def __init__(self, factory: FileServerFactory, intro: bytes, source: str, done: Callable[[], None]) -> None:
        super().__init__(factory)
        self.intro = intro
        self.source = source
        self._done = done

    def connectionMade(self) -> None:
        self.transport.write(self.intro)
        super().connectionMade()

    def slotSource(self) -> str:
        return self.source  # the order, not the far end's address

    def lineReceived(self, line: bytes) -> None:
        if not self._requested and not self.finished:
            try:
                message = wire.parseLine(line)
            except wire.ProtocolError:
                message = None
            if message is not None and message.status is not None:
                # The relay refusing our CIRCUIT (404 no such circuit).
                self.log.info(
                    "{peer} refused the connection ordered: {code} {text}",
                    peer=self.peerName(),
                    code=visible(message.word),
                    text=visible(message.text),
                )
                self._requested = True
                self.conclude()
                self.transport.loseConnection()
                return
        super().lineReceived(line)

    def connectionLost(self, reason: Failure = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


class _OrderFactory(Factory):
    noisy = False

    def __init__(self, protocol: OrderedServing) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr: object) -> OrderedServing:
        return self.protocol


class _ClientService(ClientService):
    """ClientService without its own retry lines: ControlConnection logs its own, naming the relay."""

    _log = Logger(observer=lambda event: None)


class ControlConnection:
    """
    Keeps the control connection up between :meth:`start` and :meth:`stop`,
    and carries out the relay's orders with the node's ``files`` factory.

    ``relay`` is the relay's client endpoint (the one the registrar uses;
    circuits are opened there too, at the very relay the order came from
    when it is a failover list); ``endpointFor(host, port)`` makes the
    endpoint for a reverse order (default: plain TCP on ``reactor``).
    ``onForgotten`` is called when the relay refuses the connection because
    it holds no entry for the node (404), so the registrar registers again.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        relay: IStreamClientEndpoint,
        key: identity.NodeKey,
        files: FileServerFactory,
        *,
        secret: Optional[bytes] = None,
        reactor=None,
        endpointFor: Optional[Callable[[str, int], IStreamClientEndpoint]] = None,
        onForgotten: Optional[Callable[[], None]] = None,
        maxOrders: int = MAX_ORDERS,
        connectTimeout: float = CONNECT_TIMEOUT,
        rng: Callable[[], float] = random.random,
        relayName: Optional[str] = None,
    ) -> None:
        self.clock = clock
        self.relay = relay
        self.key = key
        self.files = files
        self.secret = secret
        if endpointFor is None:
            endpointFor = lambda host, port: tcpEndpoint(reactor, host, port, connectTimeout)  # noqa: E731
        self.endpointFor = endpointFor
        self.onForgotten = onForgotten
        self.maxOrders = maxOrders
        self.connectTimeout = connectTimeout
        self.relayName = relayName
        self.protocol: Optional[ControlProtocol] = None  # the open connection, if any
        # Of a relay list, the one the open connection reached (None: one relay).
        self.reached = None
        self.orders = 0  # orders in flight: connecting out, or serving
        self.dropped = 0  # orders dropped over maxOrders
        self._unopened = 0  # connections in a row that never got their 200
        self._retryHint: Optional[float] = None  # a 503's retry=, for the next wait
        self._stopping = False
        self._backoff = backoffPolicy(
            initialDelay=FIRST_RETRY / 2, factor=2.0, maxDelay=MAX_RETRY, jitter=rng
        )
        self._service = _ClientService(
            relay, _ControlFactory(self), retryPolicy=self._retryPolicy, clock=clock
        )

    # The public face.

    @property
    def running(self) -> bool:
        return bool(self._service.running)

    @property
    def isOpen(self) -> bool:
        """True while a control connection is open (heartbeats go over it)."""
        return self.protocol is not None

    def start(self) -> None:
        """Open the control connection, and keep it open until :meth:`stop`."""
        if self.running:
            return
        self._unopened = 0
        self._retryHint = None
        self.log.info("opening a control connection to {relay}", relay=self._relayName())
        self._service.startService()

    def stop(self) -> Deferred[None]:
        """Close the control connection (orders being served finish on their own)."""
        if not self.running:
            return succeed(None)
        self._stopping = True
        d = self._service.stopService()

        def stopped(result: object) -> object:
            self._stopping = False
            return result

        return d.addBoth(stopped)

    def heartbeat(self) -> Deferred[wire.Message]:
        """A HEARTBEAT over the open connection: fires with the 200 line, or fails."""
        if self.protocol is None:
            return fail(NotOpen("no control connection"))
        return self.protocol.heartbeat()

    # What the protocol reports.

    def _relayName(self, protocol: Optional[ControlProtocol] = None) -> str:
        """
        The relay, for log lines: ``relay HOST:PORT`` as the user named it
        (of a list, the one ``protocol`` reached, when known), or ``the relay``.
        """
        relay = None if protocol is None else relayReached(self.relay, protocol)
        if relay is not None:
            return f"relay {relay.name}"
        if self.relayName and "," in self.relayName:
            return f"one of the relays {self.relayName}"
        return f"relay {self.relayName}" if self.relayName else "the relay"

    def _retryPolicy(self, attempt: int) -> float:
        delay = self._backoff(attempt + self._unopened)
        if self._retryHint is not None:
            delay = max(delay, min(self._retryHint, MAX_RETRY))
            self._retryHint = None
        self.log.info("control connection: reconnecting in {delay:.1f} s", delay=delay, attempt=attempt)
        return delay

    def _opened(self, protocol: ControlProtocol, message: wire.Message) -> None:
        self._unopened = 0
        self.protocol = protocol
        self.reached = relayReached(self.relay, protocol)
        self.log.info(
            "control connection to {relay} open: clients can fetch from this node "
            "via reverse or relayed paths",
            relay=self._relayName(protocol),
            interval=message.get("interval"),
        )

    def _refused(
        self, code: Optional[int], message: Optional[wire.Message], protocol: Optional[ControlProtocol] = None
    ) -> None:
        """The relay refused (or never opened) the connection: a failed attempt."""
        self._unopened += 1
        if code is None or message is None:
            return
        retry = message.retry()
        if retry is not None:
            self._retryHint = retry
        relay = None if protocol is None else relayReached(self.relay, protocol)
        self.log.warn(
            "{relay} refused the control connection: {code} {why}",
            relay="the relay" if relay is None else f"relay {relay.name}",
            code=code,
            why=visible(message.text),
            retry=retry,
        )
        if code == wire.NOT_FOUND and self.onForgotten is not None:
            self.onForgotten()

    def _lost(self, protocol: ControlProtocol, opened: bool, reason: Optional[Failure]) -> None:
        if self.protocol is protocol:
            self.protocol = None
            self.reached = None
        if opened and self._stopping:
            self.log.info("control connection to {relay} closed", relay=self._relayName(protocol))
        elif opened:
            self.log.info(
                "control connection to {relay} lost ({why})",
                relay=self._relayName(protocol),
                why=reason.getErrorMessage() if reason is not None else "closed",
            )

    # Orders.

    def _order(self, message: wire.Message, via: Optional[ControlProtocol] = None) -> None:
        """
        Carry out a CONNECT order that came on the control connection
        ``via``: a circuit goes to the relay ``via`` reached.
        """
        try:
            token = message.nonce("token")
            host = message.get("host")
            port = None if host is None else message.port("port")
            if host is not None:
                host = str(ipaddress.ip_address(host.split("%", 1)[0]))
        except (wire.ProtocolError, ValueError) as e:
            self.log.info("ignoring a malformed CONNECT order: {error}", error=str(e))
            return
        total = self.files.connections.counter
        if self.orders >= self.maxOrders or (total.total is not None and len(total) >= total.total):
            self.dropped += 1
            self.log.warn(
                "dropping a CONNECT order: {count} ordered connections already in flight",
                count=self.orders,
                token=token,
            )
            return
        if host is None:
            relay = None if via is None else relayReached(self.relay, via)
            endpoint = self.relay if relay is None else relay.endpoint
            intro = wire.request(wire.CIRCUIT, token=token)
            where = self._relayName(via)
        else:
            endpoint = self.endpointFor(host, port)
            intro = wire.request(wire.REVERSE, token=token)
            where = hostPort(host, port)
        self.orders += 1
        # The connection's slot in the node's total, held until it ends.
        source = f"order {token}"
        slot = total.take(source)
        finished = []

        def done() -> None:
            if not finished:
                finished.append(True)
                self.orders -= 1
                if slot is not None:
                    slot.release()

        protocol = OrderedServing(self.files, intro, source, done)
        self.log.info(
            "connecting to {where} for a {path} order",
            where=where,
            path="relayed" if host is None else "reverse",
            token=token,
        )
        connecting = endpoint.connect(_OrderFactory(protocol))
        timer = self.clock.callLater(self.connectTimeout, connecting.cancel)

        def settled(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, CancelledError):
                why = f"no connection within {self.connectTimeout:g} s"
            else:
                why = str(error) or type(error).__name__
            self.log.info("could not connect to {where} for an order: {why}", where=where, why=why)
            done()

        connecting.addBoth(settled).addCallbacks(lambda _: None, failed)

