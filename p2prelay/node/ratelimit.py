"""
The node's upload cap (``--max-rate``): one token bucket shared by every
upload, fair across clients, driven by the producers themselves.

Each transfer's producer writes into a :class:`LimitedConsumer` that
stands in front of the transport.  Every write goes straight through (no
buffering beyond the chunk the producer just made) and is paid for from
the shared bucket, which may go into debt by that one chunk.  A transfer
whose write leaves the bucket in debt is paused -- its producer, not the
transport -- and queued; when the debt has been refilled, the limiter
resumes the transfer at the head of the queue, and the next one only
after that one has written again.  Transfers therefore take turns, one
chunk each: two clients pulling at once get about half the rate each.

The transport's own flow control still works through the same wrapper:
the producer runs only while neither the transport nor the bucket holds
it, so a client that stops reading is never resumed by the bucket, and
its turn passes to the next transfer.

Time comes from an injected ``IReactorTime`` (tests pass ``task.Clock``).
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Optional

from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer

BURST_SECONDS = 0.1  # default burst: this much of the rate may go out at once


def parseRate(text: str) -> int:
    """
    Bytes per second from what a user typed: ``20M``, ``512K``, ``1G``,
    ``65536`` (K, M, G, T are powers of 1024).  ValueError for zero, a
    negative number or anything else.
    """
    from ..tap import parseSize  # the one size parser; tap imports this module's users

    return int(parseSize(text))


class UploadLimiter:
    """
    A token bucket of ``burst`` bytes refilled at ``rate`` bytes per second,
    shared by every transfer wrapped with :meth:`wrap`.
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: Optional[float] = None) -> None:
        if not rate > 0:
            raise ValueError(f"an upload rate must be positive, not {rate}")
        if burst is None:
            burst = rate * BURST_SECONDS
        if not burst > 0:
            raise ValueError(f"a burst must be positive, not {burst}")
        self.clock = clock
        self.rate = float(rate)
        self.burst = float(burst)
        self.sent = 0  # bytes written through this limiter, for logs and tests
        self._tokens = self.burst
        self._last = clock.seconds()
        # Float rounding near a large clock value: a debt this small is none.
        self._slack = max(1.0, self.rate * 1e-6)
        self._waiting: Deque[LimitedConsumer] = deque()
        self._granted: Optional[LimitedConsumer] = None  # resumed, has not written yet
        self._call: Optional[IDelayedCall] = None
        self._kicking = False
        self._again = False

    def wrap(self, consumer: IConsumer) -> "LimitedConsumer":
        """A consumer for one transfer, writing into ``consumer`` within the cap."""
        return LimitedConsumer(self, consumer)

    @property
    def waiting(self) -> int:
        """How many transfers the bucket holds paused right now."""
        return len(self._waiting)

    def stop(self) -> None:
        """Cancel the pending wake-up (the service is stopping)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    # The bucket.

    def _refill(self) -> None:
        now = self.clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def _spend(self, transfer: "LimitedConsumer", count: int) -> None:
        self.sent += count
        self._refill()
        self._tokens -= count
        if self._granted is transfer:
            self._granted = None  # its turn is used
        if self._tokens < -self._slack and transfer._hold():
            if transfer not in self._waiting:
                self._waiting.append(transfer)
        self._kick()

    def _admit(self, transfer: "LimitedConsumer") -> None:
        """A new transfer waits its turn, before it writes, while the bucket is in debt or others wait."""
        self._refill()
        if (self._tokens < -self._slack or self._waiting) and transfer._hold():
            self._waiting.append(transfer)
            self._kick()

    def _passTurn(self, transfer: "LimitedConsumer") -> None:
        """``transfer`` will not write soon (transport paused it, or it ended)."""
        try:
            self._waiting.remove(transfer)
        except ValueError:
            pass
        if self._granted is transfer:
            self._granted = None
        self._kick()

    def _kick(self) -> None:
        """Resume the next waiting transfer if its turn has come, else wake up later."""
        if self._kicking:  # a producer that writes inside resumeProducing
            self._again = True
            return
        self._kicking = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._refill()
                while self._granted is None and self._waiting and self._tokens >= -self._slack:
                    transfer = self._waiting.popleft()
                    # Granted before the producer runs: one that writes inside
                    # resumeProducing has used its turn by the time this returns.
                    self._granted = transfer
                    if not transfer._release() and self._granted is transfer:
                        self._granted = None  # the transport holds it: next one
            if self._waiting and self._granted is None:
                if self._call is None or not self._call.active():
                    delay = max(0.0, -self._tokens) / self.rate
                    self._call = self.clock.callLater(delay, self._wake)
            elif self._call is not None and self._call.active():
                self._call.cancel()
                self._call = None
        finally:
            self._kicking = False

    def _wake(self) -> None:
        self._call = None
        self._kick()


@implementer(IConsumer, IPushProducer)
class LimitedConsumer:
    """
    One transfer's view of the transport, within the node's upload cap.

    To the producer it is the consumer (``write``, ``registerProducer``);
    to the transport it is the producer, so the transport's
    ``pauseProducing`` and the bucket's holds combine: the real producer
    runs only when neither holds it.  Push producers only.
    """

    def __init__(self, limiter: UploadLimiter, consumer: IConsumer) -> None:
        self._limiter = limiter
        self._consumer = consumer
        self._producer: Optional[IPushProducer] = None
        self.bucketPaused = False
        self.transportPaused = False

    # IConsumer, for the producer.

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if not streaming:
            raise ValueError("the upload cap paces push producers only")
        self._producer = producer
        self._consumer.registerProducer(self, True)
        self._limiter._admit(self)

    def unregisterProducer(self) -> None:
        self._producer = None
        self._consumer.unregisterProducer()
        self._limiter._passTurn(self)

    def write(self, data: bytes) -> None:
        self._consumer.write(data)
        self._limiter._spend(self, len(data))

    # IPushProducer, for the transport.

    def pauseProducing(self) -> None:
        if self.transportPaused:
            return
        self.transportPaused = True
        if not self.bucketPaused and self._producer is not None:
            self._producer.pauseProducing()
        if not self.bucketPaused:
            self._limiter._passTurn(self)  # a granted turn it cannot use

    def resumeProducing(self) -> None:
        if not self.transportPaused:
            return
        self.transportPaused = False
        if not self.bucketPaused and self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        producer, self._producer = self._producer, None
        self._limiter._passTurn(self)
        if producer is not None:
            producer.stopProducing()

    # For the limiter.

    def _hold(self) -> bool:
        """The bucket pauses this transfer; False if there is nothing to pause."""
        if self._producer is None:
            return False
        if not self.bucketPaused:
            self.bucketPaused = True
            if not self.transportPaused:
                self._producer.pauseProducing()
        return True

    def _release(self) -> bool:
        """The bucket lets go; True if the producer runs again now."""
        self.bucketPaused = False
        if self.transportPaused or self._producer is None:
            return False
        self._producer.resumeProducing()
        return True
