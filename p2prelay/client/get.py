"""
One GET from one peer node: the status line checked, the body streamed raw
into a :class:`~p2prelay.client.download.Download`.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import implementer

from .. import wire
from ..negotiation import IncompleteAnswer, OneShotClient
from .download import Download

RECEIVE_SIZE = 256 * 1024  # bytes per recv(); Twisted's default is 64 KiB


class IncompleteBody(IncompleteAnswer):
    """The peer closed the connection before the whole body arrived."""


@implementer(IPushProducer)
class GetProtocol(OneShotClient[None]):
    """
    Ask one peer for one file; write the body into a :class:`Download`.

    While the download's consumer side has paused us (a slow sink), the
    transport is paused too, so bytes wait in the kernel, not in memory.
    """

    role = "peer"

    def __init__(
        self,
        clock: IReactorTime,
        name: str,
        sink: Download,
        timeout: float,
        offset: int = 0,
        length: Optional[int] = None,
    ) -> None:
        super().__init__(clock, timeout)
        self.name = name
        self.sink = sink
        self.offset = offset
        self.length = length
        self.remaining = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        if hasattr(self.transport, "bufferSize"):
            # Fewer, larger reads: measured 4x fewer reactor turns per MiB.
            self.transport.bufferSize = RECEIVE_SIZE
        self.sink.registerProducer(self, True)
        self.transport.write(
            wire.request(
                wire.GET,
                name=self.name,
                offset=self.offset or None,
                length=self.length,
            )
        )

    def messageReceived(self, message: wire.Message) -> None:
        code = message.status
        if code is None:
            raise wire.ProtocolError(wire.BAD_REQUEST, "peer sent no status line")
        if code != wire.OK:
            self.fail(wire.ProtocolError(code, message.text or wire.REASONS.get(code, "")))
            return
        size = message.integer("size")
        digest = message.sha256()
        offset = message.integer("offset", 0)
        # Not below 0: an offset past the end is then an impossible range.
        length = message.integer("length", max(size - offset, 0))
        if offset != self.offset or (self.length is not None and length != self.length):
            raise wire.ProtocolError(wire.BAD_REQUEST, "peer answered another range")
        if offset + length > size:
            raise wire.ProtocolError(wire.BAD_REQUEST, "peer announced an impossible range")
        # A whole file is checked against its hash; a range only by length.
        whole = (offset, length) == (0, size)
        self.sink.expect(length, digest if whole else None)
        self.remaining = length
        if length == 0:
            self.succeed(None)
            return
        self.setRawMode()

    # IPushProducer, as the sink sees us: pausing for a slow sink pauses the
    # transport and the idle timeout with it (a paused peer is not a dead
    # one).  LineReceiver's own versions also hold back bytes already read.

    def pauseProducing(self) -> None:
        self.setTimeout(None)
        super().pauseProducing()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if not self.finished:
            self.setTimeout(self.idleTimeout)

    def rawDataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        chunk = data[: self.remaining]
        self.remaining -= len(chunk)
        self.sink.write(chunk)
        if self.remaining == 0:
            self.succeed(None)

    def conclude(self) -> None:
        super().conclude()
        self.sink.unregisterProducer()

    def incomplete(self, reason: object) -> IncompleteBody:
        if self.remaining:
            return IncompleteBody(f"connection lost after {self.sink.received} bytes")
        return IncompleteBody("peer closed the connection without answering")
