"""
Plumbing shared by every line-based protocol in p2prelay.

Each connection is one negotiation, so both servers and clients share the
same skeleton: bounded lines (an over-long one is answered with 414 and a
close), an idle timeout driven by an injected clock, and one way to refuse
bad input: answer a status line and close, so the peer learns why and the
server goes on serving everyone else.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin

from . import wire

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

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)

    def connectionLost(self, reason: object = None) -> None:
        self.setTimeout(None)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(wire.ProtocolError(wire.LINE_TOO_LONG, "line too long"))

    def timeoutConnection(self) -> None:
        self.log.info("closing idle connection from {peer}", peer=self.transport.getPeer())
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
