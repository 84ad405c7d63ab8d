"""
One request to a relay and its reply, for nodes and clients alike.

A reply is a status line, optionally followed by ``count`` items and an
``END`` line; a list that ends early or miscounts is an error, never a
silently short answer.
"""

from __future__ import annotations

from typing import List

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from .. import wire
from ..negotiation import NegotiationProtocol

QUERY_TIMEOUT = 15.0


class IncompleteReply(Exception):
    """The relay closed the connection before its answer was complete."""


@attrs.frozen
class Reply:
    status: wire.Message
    items: List[wire.Message]
    end: wire.Message | None = None


class QueryProtocol(NegotiationProtocol):
    """Send one request, collect one reply, close."""

    def __init__(self, clock: IReactorTime, payload: bytes, timeout: float) -> None:
        super().__init__(clock, timeout)
        self.payload = payload
        self.deferred: Deferred[Reply] = Deferred(self._cancel)
        self._status: wire.Message | None = None
        self._items: List[wire.Message] = []
        self._count = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self.payload)

    def lineReceived(self, line: bytes) -> None:
        if self.finished:
            return
        try:
            message = wire.parseLine(line)
            self._receive(message)
        except wire.ProtocolError as e:
            self._fail(Failure(wire.ProtocolError(e.status, f"bad reply from relay: {e.message}")))

    def _receive(self, message: wire.Message) -> None:
        if self._status is None:
            code = message.status
            if code is None:
                raise wire.ProtocolError(wire.BAD_REQUEST, "expected a status line")
            if not 200 <= code < 300:
                self._fail(Failure(wire.ProtocolError(code, message.text or "error")))
                return
            self._status = message
            if message.get("count") is None:
                self._succeed(Reply(message, []))
            else:
                self._count = message.integer("count", high=wire.MAX_LIST)
            return
        if message.word == wire.END:
            if message.integer("count") != self._count or len(self._items) != self._count:
                raise wire.ProtocolError(wire.BAD_REQUEST, "list count mismatch")
            self._succeed(Reply(self._status, self._items, message))
            return
        if len(self._items) >= self._count:
            raise wire.ProtocolError(wire.BAD_REQUEST, "more items than announced")
        self._items.append(message)

    def _cancel(self, d: Deferred) -> None:
        # The caller gave up: drop the connection now, and let nothing that
        # happens on it later touch the (already failed) Deferred.
        self.conclude()
        self.transport.abortConnection()

    def _succeed(self, reply: Reply) -> None:
        self.conclude()
        self.transport.loseConnection()
        self.deferred.callback(reply)

    def _fail(self, failure: Failure) -> None:
        if self.finished:
            return
        self.conclude()
        self.transport.loseConnection()
        self.deferred.errback(failure)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(Failure(wire.ProtocolError(wire.LINE_TOO_LONG, "relay sent an over-long line")))

    def timeoutConnection(self) -> None:
        self._fail(Failure(TimeoutError("relay did not answer in time")))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        super().connectionLost(reason)
        if not self.finished:
            self._fail(Failure(IncompleteReply("relay closed the connection mid-answer")))


async def query(
    endpoint: IStreamClientEndpoint,
    payload: bytes,
    clock: IReactorTime,
    timeout: float = QUERY_TIMEOUT,
) -> Reply:
    """
    Connect, send ``payload``, and return the reply.

    Error statuses raise :class:`wire.ProtocolError`; connection problems
    raise Twisted's ConnectError family or TimeoutError.
    """
    protocols: list[QueryProtocol] = []

    def build() -> QueryProtocol:
        proto = QueryProtocol(clock, payload, timeout)
        protocols.append(proto)
        return proto

    await endpoint.connect(Factory.forProtocol(build))
    return await protocols[0].deferred

