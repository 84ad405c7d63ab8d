"""
Plumbing shared by every line-based protocol in p2prelay.

Each connection is one negotiation, so both servers and clients share the
same skeleton: bounded lines (an over-long one is answered with 414 and a
close), an idle timeout driven by an injected clock, for servers a deadline
on the whole request and on the close after the answer, and one way to
refuse bad input: answer a status line and close, so the peer learns why
and the server goes on serving everyone else.

The client side of a negotiation is :class:`OneShotClient`: one request,
one result in a Deferred that fires exactly once, whether the answer
arrives, is refused, times out, is cancelled or is cut off.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from . import limits, wire
from .addresses import describePeer

IDLE_TIMEOUT = 30.0  # seconds a connection may sit without traffic
NEGOTIATION_DEADLINE = 5.0  # seconds a relay gives one whole request (see MIN_RATE)
REQUEST_DEADLINE = 10.0  # seconds a node gives a request line to be complete
MIN_RATE = 64 * 1024  # bytes/s: each byte received buys 1/MIN_RATE s more for the request
CLOSE_DEADLINE = 10.0  # seconds a peer gets to take a server's last answer (plus its size / MIN_RATE)


class NegotiationProtocol(LineReceiver, TimeoutMixin):
    """
    A LineReceiver with p2prelay's limits and an injectable clock.

    Accepts CRLF or bare LF (the CR is stripped by :func:`wire.parseLine`).

    Three clocks bound a connection.  The idle timeout (``timeout``) closes
    one silent for that long.  A server's ``deadline`` bounds the whole
    request however busily bytes trickle in: it runs from the connection
    until :meth:`requestComplete` (or the answer); with ``minRate`` each
    byte received extends it by ``1 / minRate`` seconds, so a large request
    arriving at a decent rate can finish and a trickle cannot hold the
    connection.  Once a server has answered (:meth:`finish`, :meth:`refuse`)
    the peer has :attr:`closeDeadline` seconds, plus the answer's size at
    ``minRate`` (or :data:`MIN_RATE`), to take it; then the connection is
    aborted.  Clients (``deadline = None``) keep only the idle timeout.

    Slots in :attr:`slots` (connection and request caps, see
    :mod:`p2prelay.limits`) are released when the connection is lost.
    """

    delimiter = b"\n"
    MAX_LENGTH = wire.MAX_LINE + 1  # the limit excludes a CR before the LF
    log = Logger()

    deadline: float | None = None  # seconds for the whole request; None: no deadline
    minRate: float | None = None  # bytes/s a long request must keep up to extend the deadline
    closeDeadline: float = CLOSE_DEADLINE

    def __init__(self, clock: IReactorTime, timeout: float = IDLE_TIMEOUT) -> None:
        self.clock = clock
        self.callLater = clock.callLater  # TimeoutMixin schedules through this
        self.idleTimeout = timeout
        self.finished = False
        self.slots: list = []  # limits.Slot objects, released on connectionLost
        self._deadlineCall: IDelayedCall | None = None
        self._heldFor: float | None = None  # deadline seconds left while held
        self._closeCall: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.setTimeout(self.idleTimeout)
        if self.deadline is not None:
            self._deadlineCall = self.clock.callLater(self.deadline, self._deadlineExceeded)

    def peerName(self) -> str:
        """The other end as ``host:port``, for log lines."""
        return describePeer(self.transport.getPeer())

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self.minRate:
            extra = len(data) / self.minRate
            if self._deadlineCall is not None and self._deadlineCall.active():
                self._deadlineCall.delay(extra)
            elif self._heldFor is not None:
                self._heldFor += extra
        super().dataReceived(data)

    # The request deadline.

    def requestComplete(self) -> None:
        """The whole request is in: the deadline no longer applies."""
        self._cancelDeadline()
        self._heldFor = None

    def holdDeadline(self) -> None:
        """
        Stop the deadline's clock while the server works for this request
        (hashing, a dial-back): that wait is not the peer's slowness.
        """
        if self._deadlineCall is not None and self._deadlineCall.active():
            self._heldFor = max(self._deadlineCall.getTime() - self.clock.seconds(), 0.0)
            self._cancelDeadline()

    def resumeDeadline(self) -> None:
        """Start the deadline's clock again, with the time that was left."""
        if self._heldFor is not None and not self.finished and self.transport is not None:
            self._deadlineCall = self.clock.callLater(self._heldFor, self._deadlineExceeded)
        self._heldFor = None

    def _cancelDeadline(self) -> None:
        if self._deadlineCall is not None and self._deadlineCall.active():
            self._deadlineCall.cancel()
        self._deadlineCall = None

    def _deadlineExceeded(self) -> None:
        self._deadlineCall = None
        self.log.info(
            "closing {peer}: request not complete in time", peer=self.peerName()
        )
        self.refuse(wire.ProtocolError(wire.TIMEOUT, "request not complete in time"))

    def connectionLost(self, reason: object = None) -> None:
        self.setTimeout(None)
        self._cancelDeadline()
        self._heldFor = None
        if self._closeCall is not None and self._closeCall.active():
            self._closeCall.cancel()
        self._closeCall = None
        slots, self.slots = self.slots, []
        for slot in slots:
            slot.release()

    def slotSource(self) -> str:
        """What caps count this connection under: the peer's address (an IPv6 /64)."""
        return limits.sourceOf(self.transport.getPeer())

    def takeSlot(self, counter: limits.AddressCounter, text: str, retry: float = limits.BUSY_RETRY) -> bool:
        """
        Hold one unit of ``counter`` for the peer's address (see
        :meth:`slotSource`) until the connection is lost; when a cap is
        reached answer ``503 retry=`` with ``text``, close, and return False.
        """
        slot = counter.take(self.slotSource())
        if slot is None:
            self.log.info("refusing {peer}: {text}", peer=self.peerName(), text=text)
            self.refuseWith(limits.busy(retry, text))
            return False
        self.slots.append(slot)
        return True

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(wire.ProtocolError(wire.LINE_TOO_LONG, "line too long"))

    def timeoutConnection(self) -> None:
        self.log.info("closing idle connection from {peer}", peer=self.peerName())
        self.refuse(wire.ProtocolError(wire.TIMEOUT, "idle too long"))

    def refuse(self, error: wire.ProtocolError) -> None:
        """Answer an error status and close; nothing more is read."""
        self.refuseWith(wire.status(error.status, error.message))

    def refuseWith(self, line: bytes) -> None:
        """Answer ``line`` (an error status) and close; nothing more is read."""
        if self.finished:
            return
        self.finish(line)

    def conclude(self) -> None:
        """Mark the negotiation over: nothing more is handled or timed out."""
        self.finished = True
        self.setTimeout(None)
        self.requestComplete()

    def finish(self, data: bytes) -> None:
        """
        Send the last bytes of a negotiation and close gracefully; a peer
        that does not take them in time is cut off.
        """
        self.conclude()
        self.transport.write(data)
        self.closeWithin(len(data))

    def closeWithin(self, pending: int = 0) -> None:
        """
        Close once what is written has left, aborting if that takes longer
        than :attr:`closeDeadline` plus ``pending`` bytes at the minimum rate.
        """
        # Read again if a subclass paused the transport: a TLS close waits
        # for the peer's close_notify, which must not sit unread until the
        # deadline, holding the connection's slot.  Nothing read is handled.
        self.transport.resumeProducing()
        self.transport.loseConnection()
        if self._closeCall is None:
            grace = self.closeDeadline + pending / (self.minRate or MIN_RATE)
            self._closeCall = self.clock.callLater(grace, self._closeExpired)

    def _closeExpired(self) -> None:
        self._closeCall = None
        self.log.info("dropping {peer}: it does not read our answer", peer=self.peerName())
        self.transport.abortConnection()


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
