"""
One request to a relay and its reply, for nodes and clients alike.

A reply is a status line, optionally followed by ``count`` items and an
``END`` line; a list that ends early or miscounts is an error, never a
silently short answer.
"""

from __future__ import annotations

from typing import List

import attrs
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from .. import wire
from ..negotiation import IncompleteAnswer, OneShotClient, negotiate

QUERY_TIMEOUT = 15.0


class IncompleteReply(IncompleteAnswer):
    """The relay closed the connection before its answer was complete."""


@attrs.frozen
class Reply:
    status: wire.Message
    items: List[wire.Message]
    end: wire.Message | None = None


class QueryProtocol(OneShotClient[Reply]):
    """Send one request, collect one reply, close."""

    role = "relay"

    def __init__(self, clock: IReactorTime, payload: bytes, timeout: float) -> None:
        super().__init__(clock, timeout)
        self.payload = payload
        self._status: wire.Message | None = None
        self._items: List[wire.Message] = []
        self._count = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self.payload)

    def messageReceived(self, message: wire.Message) -> None:
        if self._status is None:
            code = message.status
            if code is None:
                raise wire.ProtocolError(wire.BAD_REQUEST, "expected a status line")
            if not 200 <= code < 300:
                self.fail(wire.ProtocolError(code, message.text or "error"))
                return
            self._status = message
            if message.get("count") is None:
                self.succeed(Reply(message, []))
            else:
                self._count = message.integer("count", high=wire.MAX_LIST)
            return
        if message.word == wire.END:
            if message.integer("count") != self._count or len(self._items) != self._count:
                raise wire.ProtocolError(wire.BAD_REQUEST, "list count mismatch")
            self.succeed(Reply(self._status, self._items, message))
            return
        if len(self._items) >= self._count:
            raise wire.ProtocolError(wire.BAD_REQUEST, "more items than announced")
        self._items.append(message)

    def incomplete(self, reason: object) -> IncompleteReply:
        return IncompleteReply("relay closed the connection mid-answer")


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
    return await negotiate(endpoint, QueryProtocol(clock, payload, timeout))
