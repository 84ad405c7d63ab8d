"""
Paths to a firewalled peer: the reverse connection, then the relayed one.

A peer the relay lists ``reach=firewalled`` takes no incoming connection;
it holds a control connection to the relay instead.  :class:`PathEndpoint`
reaches it as a client endpoint, so whatever speaks to a peer (a GET, a
MANIFEST, the pieces engine) works through it unchanged:

- **reverse** (unless the fetcher was told not to listen, ``--no-listen``,
  or a reverse attempt already timed out in this session): listen on an
  ephemeral port, ask the relay ``REVERSE node= port= token=``, and accept
  the one connection that opens with ``P2P/1 REVERSE token=`` and our
  token (any other is dropped), within ``connectTimeout``;
- **relayed**: connect to the relay, ``RELAY node= [size=]``, answer its
  challenge if it is private, and wait for ``200``: from there the relay
  splices the connection with one the node opened.

Either way the caller's protocol is connected only once the path's
preamble was consumed (the node's intro, the relay's ``200``), and
:attr:`PathEndpoint.path` says which path it was.  A refusal by the relay is
a :class:`~.outcomes.PathRefused` with the relay's status, text and
``retry=``.  Everything that arrives is still verified by the client's
hashes: the relay can cut a transfer, never alter it undetected.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Optional, Set

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import identity, wire
from ..addresses import describePeer
from ..negotiation import IncompleteAnswer, _OneShotFactory
from .outcomes import PathRefused, PeerAddress, describe
from .relay import proofFor

if TYPE_CHECKING:
    from .fetcher import Fetcher

DIRECT = wire.DIRECT
REVERSE = "reverse"
RELAY = "relay"
PATHS = (DIRECT, REVERSE, RELAY)
PATH_SLACK = 1.0  # seconds a firewalled peer gets beyond two connectTimeouts


def via(path: Optional[str]) -> str:
    """What a line about a transfer adds for ``path``: nothing for a direct one."""
    return {REVERSE: " via reverse connection", RELAY: " via relay"}.get(path or DIRECT, "")


def setupBudget(connectTimeout: float) -> float:
    """Seconds a firewalled peer gets to be connected: a reverse attempt, then a relayed one."""
    return 2 * connectTimeout + PATH_SLACK


class ReverseTimedOut(Exception):
    """The node did not connect back in time (we are probably not reachable)."""


class _Preamble(LineReceiver):
    """
    Reads a path's preamble line by line (:meth:`preambleLine`), then hands
    the connection over to the caller's protocol (:meth:`handOver`): raw
    mode from there, so it is connected to the same transport and gets
    every later byte, whatever followed the preamble in the same segment
    included, and the close.
    """

    delimiter = b"\n"  # a CR before it is left in the line, which wire.parseLine takes
    MAX_LENGTH = wire.MAX_LINE
    inner: Optional[Protocol] = None
    closed = False  # the preamble failed: nothing more is read

    def lineReceived(self, line: bytes) -> None:
        if self.closed:
            return
        try:
            message = wire.parseLine(line)
        except wire.ProtocolError as e:
            self.preambleFailed(e)
            return
        self.preambleLine(message)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.preambleFailed(wire.ProtocolError(wire.LINE_TOO_LONG, "over-long line"))

    def rawDataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)

    def handOver(self, inner: Protocol) -> None:
        """From now on the connection is ``inner``'s."""
        self.inner = inner
        inner.makeConnection(self.transport)
        self.setRawMode()  # what is buffered after this line goes to inner

    def connectionLost(self, reason: Failure = None) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
        else:
            self.closed = True
            self.preambleLost(reason)

    def preambleLine(self, message: wire.Message) -> None:
        raise NotImplementedError

    def preambleFailed(self, e: Exception) -> None:
        self.closed = True
        self.transport.abortConnection()

    def preambleLost(self, reason: Optional[Failure]) -> None:
        pass


class _ReverseIntro(_Preamble):
    """One inbound connection: its first line must be our ``REVERSE token=``."""

    def __init__(self, waiter: "_ReverseFactory") -> None:
        super().__init__()
        self.waiter = waiter

    def connectionMade(self) -> None:
        self.waiter.pending.add(self)

    def preambleLine(self, message: wire.Message) -> None:
        token = message.get("token") or ""
        if message.word == wire.REVERSE and hmac.compare_digest(
            token.encode("ascii", "replace"), self.waiter.token.encode("ascii")
        ):
            self.waiter.accept(self)
        else:
            # Not ours (a scan, a stale or forged intro): dropped, and we keep waiting.
            self.waiter.log.info(
                "dropped {peer}: not our reverse connection", peer=describePeer(self.transport.getPeer())
            )
            self.waiter.pending.discard(self)
            self.preambleFailed(wire.ProtocolError(wire.BAD_REQUEST, "not our reverse connection"))

    def preambleLost(self, reason: Optional[Failure]) -> None:
        self.waiter.pending.discard(self)


class _ReverseFactory(Factory):
    """The ephemeral port's factory: waits for the one connection with ``token``."""

    noisy = False
    log = Logger()

    def __init__(self, token: str, factory: Factory) -> None:
        self.token = token
        self.factory = factory
        self.pending: Set[_ReverseIntro] = set()
        self.settled = False
        self.connected: Deferred = Deferred()

    def buildProtocol(self, addr) -> Optional[Protocol]:
        if self.settled:
            return None  # closed at once
        return _ReverseIntro(self)

    def accept(self, intro: _ReverseIntro) -> None:
        inner = self.factory.buildProtocol(intro.transport.getPeer())
        self.pending.discard(intro)
        self.close()
        intro.handOver(inner)
        self.connected.callback(inner)

    def close(self) -> None:
        """No more connections: drop the ones that have not introduced themselves."""
        self.settled = True
        pending, self.pending = self.pending, set()
        for intro in pending:
            intro.closed = True
            intro.transport.abortConnection()


class _RelayedIntro(_Preamble):
    """``RELAY node= [size=]`` to the relay; its ``200`` opens the circuit."""

    def __init__(self, payload: bytes, prover, factory: Factory) -> None:
        super().__init__()
        self.payload = payload
        self.prover = prover
        self.factory = factory
        self.challenged = False
        self.opened: Deferred = Deferred(lambda d: self._abort())

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()

    def _fail(self, e: Exception) -> None:
        if not self.opened.called:
            self.opened.errback(Failure(e))

    def preambleLine(self, message: wire.Message) -> None:
        code = message.status
        if code == wire.CONTINUE and not self.challenged:
            self.challenged = True
            try:
                self.transport.write(proofFor(self.prover, message, self.payload))
            except Exception as e:
                self.preambleFailed(e)
            return
        if code is None or code == wire.CONTINUE:
            self.preambleFailed(
                wire.ProtocolError(wire.BAD_REQUEST, "bad answer from relay: expected a status line")
            )
            return
        if not 200 <= code < 300:
            self.preambleFailed(PathRefused(code, message.text or "error", retry=message.retry()))
            return
        inner = self.factory.buildProtocol(self.transport.getPeer())
        self.handOver(inner)
        if not self.opened.called:
            self.opened.callback(inner)

    def preambleFailed(self, e: Exception) -> None:
        super().preambleFailed(e)
        self._fail(e)

    def preambleLost(self, reason: Optional[Failure]) -> None:
        self._fail(IncompleteAnswer("relay closed the connection before the circuit opened"))


def listenEphemeral(reactor, factory: Factory):
    """
    An ephemeral TCP port for ``factory``: both families (``::``, Linux's
    dual-stack socket), or IPv4 alone where IPv6 is unavailable.
    """
    try:
        return reactor.listenTCP(0, factory, interface="::")
    except error.CannotListenError:
        return reactor.listenTCP(0, factory)


class PathEndpoint:
    """
    A client endpoint to a firewalled ``peer`` through ``fetcher``'s relay
    (of several, the one that listed the peer): reverse first, then
    relayed; :attr:`path` tells which one connected.
    """

    log = Logger()

    def __init__(self, fetcher: "Fetcher", peer: PeerAddress) -> None:
        self.fetcher = fetcher
        self.peer = peer
        self.path: Optional[str] = None
        # Bytes the request will move (a piece's length; None: the whole
        # file), told to the relay as RELAY's size= for its --circuit-bytes.
        self.length: Optional[int] = None

    def __repr__(self) -> str:
        return f"<PathEndpoint {self.peer} node={self.peer.node}>"

    def connect(self, protocolFactory: Factory) -> Deferred:
        f = self.fetcher
        d = Deferred.fromCoroutine(self._connect(protocolFactory))
        budget = setupBudget(f.connectTimeout)

        def late(result: object, timeout: float) -> object:
            raise error.TimeoutError(f"no path to a firewalled peer within {timeout:g} seconds")

        return d.addTimeout(budget, f.reactor, late)

    async def _connect(self, protocolFactory: Factory) -> Protocol:
        f = self.fetcher
        if f.listen and not f.reverseTimedOut:
            try:
                protocol = await self._reverse(protocolFactory)
                self.path = REVERSE
                return protocol
            except ReverseTimedOut as e:
                # Nobody can reach us, it seems: later peers go straight to the relay.
                f.reverseTimedOut = True
                f.verbose(f"peer {self.peer}: {e}; trying via relay (and for other peers from now on)")
            except error.CannotListenError as e:
                f.verbose(f"peer {self.peer}: cannot listen for a reverse connection ({e}); trying via relay")
        protocol = await self._relayed(protocolFactory)
        self.path = RELAY
        return protocol

    async def _reverse(self, protocolFactory: Factory) -> Protocol:
        f = self.fetcher
        waiter = _ReverseFactory(identity.newNonce(), protocolFactory)
        port = listenEphemeral(f.reactor, waiter)
        try:
            payload = wire.request(
                wire.REVERSE, node=self.peer.node, port=port.getHost().port, token=waiter.token
            )
            await self._ask(payload)
            timeout = f.connectTimeout

            def late(result: object, timeout: float) -> object:
                raise ReverseTimedOut(f"no reverse connection within {timeout:g} seconds")

            waiter.connected.addTimeout(timeout, f.reactor, late)
            return await waiter.connected
        finally:
            waiter.close()
            port.stopListening()

    async def _ask(self, payload: bytes) -> None:
        # To the relay that listed the peer: the one its control connection is at.
        at = {} if self.peer.relay is None else {"at": self.peer.relay}
        try:
            await self.fetcher.ask(payload, **at)
        except PathRefused:
            raise
        except wire.ProtocolError as e:
            raise PathRefused(e.status, e.message, retry=e.retry) from None

    async def _relayed(self, protocolFactory: Factory) -> Protocol:
        f = self.fetcher
        size = self.length if self.length is not None else self.peer.size
        payload = wire.request(wire.RELAY, node=self.peer.node, size=size)
        intro = _RelayedIntro(payload, f.prover, protocolFactory)
        try:
            relay = f.relay if self.peer.relay is None else self.peer.relay
            await relay.connect(_OneShotFactory(intro))
        except CancelledError:
            raise
        except (error.ConnectError, error.TimeoutError) as e:
            raise RelayPathFailed(f"the relay cannot be reached for a relayed path ({describe(e)})") from None
        return await intro.opened


class RelayPathFailed(Exception):
    """The relay itself could not be reached for a relayed path."""
