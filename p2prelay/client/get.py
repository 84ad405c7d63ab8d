"""
One GET from one peer node: the status line checked, the body streamed raw
into a :class:`~p2prelay.client.download.Download`.

A peer is a stranger: its status line must describe the file the relay's
index lists for it (when the client knows that), its range must be the one
asked for, its answer must start within a deadline, and its body must keep
up a minimum rate (as curl's ``--speed-limit``/``--speed-time``).  Whatever
it does wrong ends the attempt with an error, never with a traceback.
"""

from __future__ import annotations

from typing import AbstractSet, Optional, Tuple

from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer

from .. import wire
from ..negotiation import IncompleteAnswer, OneShotClient
from .download import Download, VerificationError

# Bytes per recv(); Twisted's default is 64 KiB.  Measured on a 1 GiB fetch:
# 1 MiB took 18 % less client CPU than 256 KiB; 2 and 4 MiB more (each
# buffer is then a fresh mmap, page-faulted in).
RECEIVE_SIZE = 1024 * 1024
SPEED_LIMIT = 1024  # bytes/s a body must keep up ...
SPEED_TIME = 20.0  # ... over this many seconds, else the attempt is abandoned
SPEED_CHECK = 1.0  # seconds between looks at the rate

# (size, sha256) pairs a peer's whole-file answer may announce.
Accepted = AbstractSet[Tuple[int, str]]


class IncompleteBody(IncompleteAnswer):
    """The peer closed the connection before the whole body arrived."""


class TooSlow(Exception):
    """The peer sent the body below the minimum rate for too long."""


def short(digest: str) -> str:
    return digest[:12] + "..."


@implementer(IPushProducer)
class GetProtocol(OneShotClient[None]):
    """
    Ask one peer for one file; write the body into a :class:`Download`.

    With ``start=False`` the connection is made but the GET waits for
    :meth:`begin` (the client races connections to several peers and
    sends its GET only to the first that connects).

    ``accept``, when given, holds the (size, sha256) pairs a whole-file
    answer may announce -- what the relay's index lists for this peer; any
    other is a failed attempt before a byte of the body is stored.
    ``answerTimeout`` bounds the wait for the status line; ``speedLimit``
    bytes/s over ``speedTime`` seconds bounds a slow body (0: no limit).

    While the download's consumer side has paused us (a slow sink), the
    transport is paused too, so bytes wait in the kernel, not in memory;
    neither the idle timeout nor the rate check runs meanwhile.
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
        *,
        accept: Optional[Accepted] = None,
        answerTimeout: Optional[float] = None,
        speedLimit: float = 0,
        speedTime: float = SPEED_TIME,
        start: bool = True,
    ) -> None:
        super().__init__(clock, timeout)
        self.name = name
        self.sink = sink
        self.offset = offset
        self.length = length
        self.accept = accept
        self.answerTimeout = answerTimeout
        self.speedLimit = speedLimit
        self.speedTime = speedTime
        self.start = start
        self.begun = False
        self.remaining = 0
        self._answerCall: Optional[IDelayedCall] = None
        self._speedCall: Optional[IDelayedCall] = None
        self._windowStart = 0.0
        self._windowBytes = 0
        self._paused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        if hasattr(self.transport, "bufferSize"):
            # Fewer, larger reads: fewer reactor turns and handoffs per MiB.
            self.transport.bufferSize = RECEIVE_SIZE
        if self.start:
            self.begin()

    def begin(self) -> None:
        """Send the GET (once); the body will go into the sink."""
        if self.begun or self.finished:
            return
        self.begun = True
        self.sink.registerProducer(self, True)
        if self.answerTimeout is not None:
            self._answerCall = self.clock.callLater(self.answerTimeout, self._noAnswer)
        self.transport.write(
            wire.request(
                wire.GET,
                name=self.name,
                offset=self.offset or None,
                length=self.length,
            )
        )

    def _noAnswer(self) -> None:
        self._answerCall = None
        self.fail(TimeoutError(f"no answer from the peer within {self.answerTimeout:g} seconds"))
        self.transport.abortConnection()

    def messageReceived(self, message: wire.Message) -> None:
        if not self.begun:
            raise wire.ProtocolError(wire.BAD_REQUEST, "peer spoke before it was asked")
        self._cancelAnswer()
        refusal = message.refusal()
        if refusal is not None:
            self.fail(refusal)
            return
        size = message.integer("size")
        digest = message.sha256()
        offset = message.integer("offset", 0)
        # Not below 0: an offset past the end is then an impossible range.
        length = message.integer("length", max(size - offset, 0))
        if offset + length > size:
            raise wire.ProtocolError(wire.BAD_REQUEST, "peer announced an impossible range")
        wanted = self.length if self.length is not None else size - self.offset
        if offset != self.offset or length != wanted:
            raise wire.ProtocolError(wire.BAD_REQUEST, "peer answered another range")
        # A whole file is checked against its hash; a range only by length.
        whole = (offset, length) == (0, size)
        if whole and self.accept is not None and (size, digest) not in self.accept:
            self.fail(VerificationError(self._notListed(size, digest)))
            return
        try:
            self.sink.expect(length, digest if whole else None)
        except Exception as e:  # no room for it: NoSpace
            self.fail(e)
            return
        self.remaining = length
        if length == 0:
            self.succeed(None)
            return
        self.setRawMode()
        self._newWindow()

    def _notListed(self, size: int, digest: str) -> str:
        listed = " or ".join(
            f"{s} bytes, sha256 {short(d)}" for s, d in sorted(self.accept or ())
        ) or "nothing"
        return (
            f"the peer offers another file ({size} bytes, sha256 {short(digest)}) "
            f"than the relay lists for it ({listed})"
        )

    def _cancelAnswer(self) -> None:
        if self._answerCall is not None and self._answerCall.active():
            self._answerCall.cancel()
        self._answerCall = None

    # The minimum rate, as curl: abandon a body that stays below
    # speedLimit bytes/s for speedTime seconds.  The window restarts
    # whenever the bytes since its start reach the limit's pace.

    def _newWindow(self) -> None:
        self._stopSpeedCheck()
        if not self.speedLimit or self.finished or self._paused:
            return
        self._windowStart = self.clock.seconds()
        self._windowBytes = self.sink.received
        self._speedCall = self.clock.callLater(SPEED_CHECK, self._checkSpeed)

    def _checkSpeed(self) -> None:
        self._speedCall = None
        now = self.clock.seconds()
        elapsed = now - self._windowStart
        if self.sink.received - self._windowBytes >= self.speedLimit * elapsed:
            self._newWindow()
            return
        if elapsed >= self.speedTime:
            self.fail(
                TooSlow(
                    f"slower than {self.speedLimit:g} bytes/s for {self.speedTime:g} seconds "
                    f"(got {self.sink.received} of {self.sink.expectedSize} bytes)"
                )
            )
            self.transport.abortConnection()
            return
        self._speedCall = self.clock.callLater(SPEED_CHECK, self._checkSpeed)

    def _stopSpeedCheck(self) -> None:
        if self._speedCall is not None and self._speedCall.active():
            self._speedCall.cancel()
        self._speedCall = None

    # IPushProducer, as the sink sees us: pausing for a slow sink pauses the
    # transport, the idle timeout and the rate check with it (a paused peer
    # is not a slow one).  LineReceiver's own versions also hold back bytes
    # already read.

    def pauseProducing(self) -> None:
        self._paused = True
        self.setTimeout(None)
        self._stopSpeedCheck()
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        super().resumeProducing()
        if not self.finished:
            self.setTimeout(self.idleTimeout)
            if self.remaining:
                self._newWindow()

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
        self._cancelAnswer()
        self._stopSpeedCheck()
        if self.begun:
            self.sink.unregisterProducer()

    def incomplete(self, reason: object) -> IncompleteBody:
        if self.remaining:
            return IncompleteBody(f"connection lost after {self.sink.received} bytes")
        return IncompleteBody("peer closed the connection without answering")
