"""
Plumbing shared by every line-based protocol in p2prelay.

Each connection is one negotiation, so both servers and clients share the
same skeleton: bounded lines (an over-long one is answered with 414 and a
close), an idle timeout driven by an injected clock, and one way to refuse
bad input: answer a status line and close, so the peer learns why and the
server goes on serving everyone else.

The client side of a negotiation is :class:`OneShotClient`: one request,
one result in a Deferred that fires exactly once, whether the answer
arrives, is refused, times out, is cancelled or is cut off.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from . import wire
from .addresses import describePeer

IDLE_TIMEOUT = 30.0  # seconds a connection may sit without traffic


class NegotiationProtocol(LineReceiver, TimeoutMixin):
    """
    A LineReceiver with p2prelay's limits and an injectable clock.

    Accepts CRLF or bare LF (the CR is stripped by :func:`wire.parseLine`).
    """

    delimiter = b"\n"
    MAX_LENGTH = wire.MAX_LINE + 1  # the limit excludes a CR before the LF
    log = Logger()

    def __init__(self, clock: IReactorTime, timeout: float = IDLE_TIMEOUT) -> None:
        self.clock = clock
        self.callLater = clock.callLater  # TimeoutMixin schedules through this
        self.idleTimeout = timeout
        self.finished = False

    def connectionMade(self) -> None:
        self.setTimeout(self.idleTimeout)

    def peerName(self) -> str:
        """The other end as ``host:port``, for log lines."""
        return describePeer(self.transport.getPeer())

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)

    def connectionLost(self, reason: object = None) -> None:
        self.setTimeout(None)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(wire.ProtocolError(wire.LINE_TOO_LONG, "line too long"))

    def timeoutConnection(self) -> None:
        self.log.info("closing idle connection from {peer}", peer=self.peerName())
        self.refuse(wire.ProtocolError(wire.TIMEOUT, "idle too long"))

    def refuse(self, error: wire.ProtocolError) -> None:
        """Answer an error status and close; nothing more is read."""
        if self.finished:
            return
        self.finished = True
        self.transport.write(wire.status(error.status, error.message))
        self.transport.loseConnection()

    def conclude(self) -> None:
        """Mark the negotiation over: nothing more is handled or timed out."""
        self.finished = True
        self.setTimeout(None)

    def finish(self, data: bytes) -> None:
        """Send the last bytes of a negotiation and close gracefully."""
        self.conclude()
        self.transport.write(data)
        self.transport.loseConnection()


T = TypeVar("T")


class IncompleteAnswer(Exception):
    """The server closed the connection before its answer was complete."""


class OneShotClient(NegotiationProtocol, Generic[T]):
    """
    The client side of one negotiation; its outcome is :attr:`deferred`.

    ``deferred`` fires exactly once: with :meth:`succeed`'s value, or with
    :meth:`fail`'s reason -- a malformed or over-long line from the server
    (:class:`wire.ProtocolError`), the idle timeout (``TimeoutError``, and the
    connection is aborted), or a close before the answer was complete (an
    :class:`IncompleteAnswer` that :meth:`incomplete` makes).  Cancelling it
    aborts the connection.  Whatever happens on the connection afterwards is
    ignored.

    Subclasses write their request in ``connectionMade`` and handle each
    parsed line in :meth:`messageReceived`.
    """

    role = "server"  # who answers, for error messages: "relay", "peer"

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        super().__init__(clock, timeout)
        self.deferred: Deferred[T] = Deferred(self._cancel)

    def lineReceived(self, line: bytes) -> None:
        if self.finished:
            return
        try:
            self.messageReceived(wire.parseLine(line))
        except wire.ProtocolError as e:
            self.fail(wire.ProtocolError(e.status, f"bad answer from {self.role}: {e.message}"))

    def messageReceived(self, message: wire.Message) -> None:
        """
        Handle one line of the answer; raise :class:`wire.ProtocolError`
        for one that breaks the protocol.
        """
        raise NotImplementedError

    def incomplete(self, reason: Failure | None) -> IncompleteAnswer:
        """The error for a connection closed before the answer was complete."""
        return IncompleteAnswer(f"{self.role} closed the connection mid-answer")

    def succeed(self, value: T) -> None:
        """The answer is complete: close, and fire :attr:`deferred` with value."""
        if self.finished:
            return
        self.conclude()
        self.transport.loseConnection()
        self.deferred.callback(value)

    def fail(self, reason: Exception) -> None:
        """The negotiation failed: close, and fail :attr:`deferred` with reason."""
        if self.finished:
            return
        self.conclude()
        self.transport.loseConnection()
        self.deferred.errback(Failure(reason))

    def _cancel(self, d: Deferred[T]) -> None:
        # The caller gave up: drop the connection now, and let nothing that
        # happens on it later touch the (already failed) Deferred.
        self.conclude()
        if self.transport is not None:
            self.transport.abortConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.fail(wire.ProtocolError(wire.LINE_TOO_LONG, f"{self.role} sent an over-long line"))

    def timeoutConnection(self) -> None:
        self.fail(TimeoutError(f"nothing from the {self.role} for {self.idleTimeout:g} seconds"))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if not self.finished:
            self.fail(self.incomplete(reason))


class _OneShotFactory(Factory):
    """
    Hands out one protocol instance, quietly.

    ``twisted.internet.endpoints.connectProtocol`` does the same with a
    default (noisy) factory, which logs ``Starting factory`` and ``Stopping
    factory`` around every connection: two lines per heartbeat or query.
    """

    noisy = False

    def __init__(self, protocol: OneShotClient) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> OneShotClient:
        return self._protocol


async def negotiate(endpoint: IStreamClientEndpoint, protocol: OneShotClient[T]) -> T:
    """
    Connect ``protocol`` through ``endpoint`` and return its outcome.

    Connection failures raise Twisted's ConnectError family; cancelling
    (through ``Deferred.fromCoroutine``) cancels the connection attempt or
    aborts the connection, whichever is under way.
    """
    await endpoint.connect(_OneShotFactory(protocol))
    return await protocol.deferred
