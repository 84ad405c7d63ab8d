"""
The node's upload cap: one token bucket shared by every upload, pausing
and resuming the transfers' producers (p2prelay.node.ratelimit), on
task.Clock and StringTransport.
"""

from __future__ import annotations

import io

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from p2prelay.node.producers import FileBodyProducer
from p2prelay.node.ratelimit import UploadLimiter, parseRate

KiB = 1024
MiB = 1024 * 1024
STEP = 0.001  # seconds between a running source's writes, and per clock advance


@implementer(IPushProducer)
class ManualSource:
    """A push producer that writes only when the test says so, and records what it was told."""

    def __init__(self, consumer) -> None:
        self.consumer = consumer
        self.paused = False
        self.stopped = False
        self.pauses = 0
        self.resumes = 0
        consumer.registerProducer(self, True)

    def send(self, count: int) -> None:
        self.consumer.write(b"x" * count)

    def pauseProducing(self) -> None:
        self.pauses += 1
        self.paused = True

    def resumeProducing(self) -> None:
        self.resumes += 1
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IPushProducer)
class TickingSource:
    """
    A push producer like the node's: a chunk every STEP while it runs,
    until ``total`` bytes are written (then it unregisters).  ``eager``
    also writes a chunk inside ``resumeProducing`` itself.
    """

    def __init__(self, clock, consumer, chunk: int = 64 * KiB, total: int | None = None, eager=False):
        self.clock = clock
        self.consumer = consumer
        self.chunk = chunk
        self.total = total
        self.eager = eager
        self.written = 0
        self.paused = False
        self.done = False
        self._call = None
        consumer.registerProducer(self, True)
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._call is None and not self.paused and not self.done:
            self._call = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        self._write()
        self._schedule(STEP)

    def _write(self) -> None:
        if self.paused or self.done:
            return
        count = self.chunk if self.total is None else min(self.chunk, self.total - self.written)
        self.written += count
        self.consumer.write(b"x" * count)
        if self.total is not None and self.written >= self.total:
            self.done = True
            self.consumer.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def resumeProducing(self) -> None:
        self.paused = False
        if self.eager:
            self._write()
        self._schedule(STEP if self.eager else 0)

    def stopProducing(self) -> None:
        self.done = True
        self.pauseProducing()


def run(clock: task.Clock, seconds: float) -> None:
    for _ in range(round(seconds / STEP)):
        clock.advance(STEP)


class Fixture:
    def setUp(self) -> None:
        self.clock = task.Clock()

    def transfer(self, limiter: UploadLimiter, source=ManualSource, **kwargs):
        transport = StringTransport()
        consumer = limiter.wrap(transport)
        if source is ManualSource:
            return transport, ManualSource(consumer)
        return transport, source(self.clock, consumer, **kwargs)


class RateTests(Fixture, SynchronousTestCase):
    def assertWithin(self, value: float, target: float, share: float = 0.10) -> None:
        self.assertLessEqual(abs(value - target), share * target, f"{value} is not within {share:.0%} of {target}")

    def test_singleTransferHoldsTheRate(self):
        """One transfer, at 1 MiB/s for 10 simulated seconds, sends 10 MiB within 10 %."""
        limiter = UploadLimiter(self.clock, 1 * MiB)
        transport, _ = self.transfer(limiter, TickingSource)
        run(self.clock, 10)
        self.assertWithin(len(transport.value()), 10 * MiB)
        self.assertEqual(limiter.sent, len(transport.value()))

    def test_steadyNotBursty(self):
        """Every simulated second of a long transfer carries the rate within 10 %."""
        limiter = UploadLimiter(self.clock, 2 * MiB)
        transport, _ = self.transfer(limiter, TickingSource, chunk=32 * KiB)
        run(self.clock, 1)
        for second in range(5):
            before = len(transport.value())
            run(self.clock, 1)
            self.assertWithin(len(transport.value()) - before, 2 * MiB)

    def test_twoTransfersShareFairly(self):
        """Two transfers at once get about half the rate each, and the total holds."""
        limiter = UploadLimiter(self.clock, 1 * MiB)
        first, _ = self.transfer(limiter, TickingSource)
        second, _ = self.transfer(limiter, TickingSource)
        run(self.clock, 10)
        self.assertWithin(len(first.value()), 5 * MiB)
        self.assertWithin(len(second.value()), 5 * MiB)
        self.assertWithin(len(first.value()) + len(second.value()), 10 * MiB)

    def test_lateArrivalGetsItsShare(self):
        """A transfer that starts while another runs gets half from then on."""
        limiter = UploadLimiter(self.clock, 1 * MiB)
        first, _ = self.transfer(limiter, TickingSource)
        run(self.clock, 5)
        before = len(first.value())
        second, _ = self.transfer(limiter, TickingSource)
        run(self.clock, 10)
        self.assertWithin(len(second.value()), 5 * MiB)
        self.assertWithin(len(first.value()) - before, 5 * MiB)

    def test_slowConsumerLeavesTheRateToOthers(self):
        """
        A transfer its client holds paused (transport backpressure) leaves
        the whole rate to the other one.
        """
        limiter = UploadLimiter(self.clock, 1 * MiB)
        stalled, _ = self.transfer(limiter, TickingSource)
        other, _ = self.transfer(limiter, TickingSource)
        run(self.clock, 1)
        stalled.producer.pauseProducing()
        before = len(stalled.value()), len(other.value())
        run(self.clock, 10)
        self.assertEqual(len(stalled.value()), before[0])
        self.assertWithin(len(other.value()) - before[1], 10 * MiB)

    def test_wholeFilesThroughTheNodesProducer(self):
        """
        The node's own FileBodyProducer, on a cooperator driven by the
        clock: two 4 MiB files at 1 MiB/s both arrive whole, in about 8 s,
        having shared the rate along the way.
        """
        cooperator = task.Cooperator(
            scheduler=lambda f: self.clock.callLater(STEP, f),
            terminationPredicateFactory=lambda: (lambda: True),  # one step per tick
        )
        self.addCleanup(cooperator.stop)
        limiter = UploadLimiter(self.clock, 1 * MiB)
        data = [bytes([i]) * (4 * MiB) for i in (1, 2)]
        transports = [StringTransport() for _ in data]
        done = []
        for body, transport in zip(data, transports):
            producer = FileBodyProducer(io.BytesIO(body), 0, len(body), cooperator, chunk=64 * KiB)
            producer.start(limiter.wrap(transport)).addCallback(lambda _: done.append(self.clock.seconds()))
        run(self.clock, 4)
        for transport in transports:
            self.assertWithin(len(transport.value()), 2 * MiB)
        while len(done) < 2 and self.clock.seconds() < 20:
            run(self.clock, 0.1)
        self.assertEqual([t.value() for t in transports], data)
        self.assertWithin(max(done), 8)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_doneWithTheLastWriteThoughPaused(self):
        """
        The node's producer is done as soon as its last byte is written,
        even when that write emptied the bucket and paused it: the
        connection closes then, not after the bucket refills (a finished
        piece must not hold the client's request slot meanwhile).
        """
        cooperator = task.Cooperator(
            scheduler=lambda f: self.clock.callLater(STEP, f),
            terminationPredicateFactory=lambda: (lambda: True),
        )
        self.addCleanup(cooperator.stop)
        limiter = UploadLimiter(self.clock, 1 * MiB, burst=64 * KiB)
        body = b"x" * (64 * KiB)
        transport = StringTransport()
        done = []
        FileBodyProducer(io.BytesIO(body), 0, len(body), cooperator, chunk=64 * KiB).start(
            limiter.wrap(transport)
        ).addCallback(done.append)
        self.clock.advance(STEP)  # the one step: it writes everything and is paused
        self.assertEqual(transport.value(), body)
        self.assertEqual(done, [None])

    def test_producerWritingInResume(self):
        """A producer that writes inside resumeProducing keeps its pace; the bucket never stalls."""
        limiter = UploadLimiter(self.clock, 1 * MiB)
        first, _ = self.transfer(limiter, TickingSource, eager=True)
        second, _ = self.transfer(limiter, TickingSource, eager=True)
        run(self.clock, 10)
        self.assertWithin(len(first.value()), 5 * MiB)
        self.assertWithin(len(second.value()), 5 * MiB)


class BucketTests(Fixture, SynchronousTestCase):
    def test_burstThenPause(self):
        """Up to the burst goes out at once; the write that overdraws it pauses the producer."""
        limiter = UploadLimiter(self.clock, 1000, burst=5000)
        _, source = self.transfer(limiter)
        for _ in range(5):
            source.send(1000)
        self.assertFalse(source.paused)
        source.send(1000)
        self.assertTrue(source.paused)
        self.assertEqual(limiter.waiting, 1)

    def test_newTransferWaitsForTheDebt(self):
        """
        A transfer that starts while the bucket is in debt is paused at
        once, before it writes: short uploads one after another (a piece
        per connection) stay within the cap.
        """
        limiter = UploadLimiter(self.clock, 1000, burst=1000)
        _, first = self.transfer(limiter)
        first.send(3000)  # 2000 in debt
        first.consumer.unregisterProducer()  # that piece is done
        _, second = self.transfer(limiter)
        self.assertTrue(second.paused)
        self.clock.advance(2)
        self.assertFalse(second.paused)

    def test_resumedWhenTheDebtIsPaid(self):
        """A paused transfer resumes exactly when the bucket has refilled its debt."""
        limiter = UploadLimiter(self.clock, 1000, burst=1000)
        _, source = self.transfer(limiter)
        source.send(3000)  # 2000 in debt
        self.clock.advance(1.99)
        self.assertTrue(source.paused)
        self.clock.advance(0.01)
        self.assertFalse(source.paused)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleRefillCapped(self):
        """However long a node idles, no more than the burst goes out at once."""
        limiter = UploadLimiter(self.clock, 1000, burst=2000)
        _, source = self.transfer(limiter)
        self.clock.advance(3600)
        source.send(2000)
        self.assertFalse(source.paused)
        source.send(1000)
        self.assertTrue(source.paused)

    def test_turnsAlternate(self):
        """Paused transfers resume in turn, the next only after the last one wrote."""
        limiter = UploadLimiter(self.clock, 1000, burst=1000)
        _, a = self.transfer(limiter)
        _, b = self.transfer(limiter)
        a.send(1000)
        b.send(1000)  # 1000 in debt: b waits
        a.send(1000)  # 2000: a waits behind b
        self.clock.advance(2)
        self.assertEqual((a.paused, b.paused), (True, False))
        b.send(1000)
        self.assertEqual((a.paused, b.paused), (True, True))
        self.clock.advance(1)
        self.assertEqual((a.paused, b.paused), (False, True))
        a.send(1000)
        self.clock.advance(1)
        self.assertEqual((a.paused, b.paused), (True, False))

    def test_finishedTransferLeavesTheQueue(self):
        """A waiting transfer that ends is dropped; the others go on and no timer is left."""
        limiter = UploadLimiter(self.clock, 1000, burst=1000)
        transport, a = self.transfer(limiter)
        _, b = self.transfer(limiter)
        a.send(1500)
        b.send(500)
        transport.producer.unregisterProducer()  # a's transfer ends while it waits
        self.assertEqual(limiter.waiting, 1)
        self.clock.advance(1)
        self.assertFalse(b.paused)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(a.resumes, 0)

    def test_connectionLostWhileWaiting(self):
        """A transport that stops a waiting transfer stops its producer, which is never resumed."""
        limiter = UploadLimiter(self.clock, 1000, burst=1000)
        transport, a = self.transfer(limiter)
        a.send(2000)
        transport.producer.stopProducing()
        self.assertTrue(a.stopped)
        self.clock.advance(10)
        self.assertEqual(a.resumes, 0)
        self.assertEqual(limiter.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop(self):
        """Stopping the limiter cancels its pending wake-up."""
        limiter = UploadLimiter(self.clock, 1000, burst=1000)
        _, a = self.transfer(limiter)
        a.send(2000)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        limiter.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refusesNonPositive(self):
        """A rate or burst of zero or less is refused."""
        self.assertRaises(ValueError, UploadLimiter, self.clock, 0)
        self.assertRaises(ValueError, UploadLimiter, self.clock, -5)
        self.assertRaises(ValueError, UploadLimiter, self.clock, 1000, burst=0)

    def test_pullProducerRefused(self):
        """Only push producers can be paced."""
        limiter = UploadLimiter(self.clock, 1000)
        consumer = limiter.wrap(StringTransport())
        self.assertRaises(ValueError, consumer.registerProducer, object(), False)


class BackpressureTests(Fixture, SynchronousTestCase):
    """The transport's pauses and the bucket's combine: the producer runs only when neither holds it."""

    def setUp(self) -> None:
        super().setUp()
        self.limiter = UploadLimiter(self.clock, 1000, burst=1000)

    def test_transportPauseSurvivesTheBucket(self):
        """A transfer paused by the transport is not resumed when the bucket refills."""
        transport, a = self.transfer(self.limiter)
        a.send(2000)  # held by the bucket
        transport.producer.pauseProducing()  # and by the transport
        self.clock.advance(10)
        self.assertTrue(a.paused)
        self.assertEqual(a.resumes, 0)
        transport.producer.resumeProducing()
        self.assertFalse(a.paused)
        self.assertEqual((a.pauses, a.resumes), (1, 1))

    def test_bucketSurvivesTheTransport(self):
        """A transport that resumes a transfer the bucket holds does not resume its producer."""
        transport, a = self.transfer(self.limiter)
        a.send(2000)  # 1000 in debt
        transport.producer.pauseProducing()
        transport.producer.resumeProducing()
        self.assertTrue(a.paused)
        self.clock.advance(0.5)
        self.assertTrue(a.paused)
        self.clock.advance(0.5)
        self.assertFalse(a.paused)
        self.assertEqual((a.pauses, a.resumes), (1, 1))

    def test_transportPauseAlone(self):
        """Without the bucket involved, the transport pauses and resumes the producer as ever."""
        transport, a = self.transfer(self.limiter)
        transport.producer.pauseProducing()
        self.assertTrue(a.paused)
        transport.producer.resumeProducing()
        self.assertFalse(a.paused)

    def test_turnPassesOnWhenTheTransportPauses(self):
        """
        A transfer whose turn came but whose client stops reading before it
        writes hands the turn to the next transfer at once.
        """
        ta, a = self.transfer(self.limiter)
        tb, b = self.transfer(self.limiter)
        a.send(1000)
        b.send(500)  # b waits
        a.send(500)  # a waits behind it
        self.clock.advance(1)
        self.assertEqual((a.paused, b.paused), (True, False))
        tb.producer.pauseProducing()
        self.assertEqual((a.paused, b.paused), (False, True))
        self.clock.advance(100)
        self.assertEqual(b.resumes, 1)  # only the bucket's; the transport still holds it
        tb.producer.resumeProducing()
        self.assertFalse(b.paused)

    def test_pausedByTransportWhileWaiting(self):
        """
        A waiting transfer the transport then pauses gives up its place in
        the queue: when its turn comes the bucket skips it to the next one.
        """
        ta, a = self.transfer(self.limiter)
        tb, b = self.transfer(self.limiter)
        a.send(1500)  # a waits
        b.send(500)  # b waits behind it
        ta.producer.pauseProducing()
        self.clock.advance(2)
        self.assertEqual((a.paused, b.paused), (True, False))
        self.assertEqual(a.resumes, 0)


class ParseRateTests(SynchronousTestCase):
    def test_suffixes(self):
        """K, M and G are powers of 1024; a plain number is bytes per second."""
        self.assertEqual(parseRate("20M"), 20 * MiB)
        self.assertEqual(parseRate("512K"), 512 * KiB)
        self.assertEqual(parseRate("1G"), 1024 * MiB)
        self.assertEqual(parseRate("65536"), 65536)
        self.assertEqual(parseRate("20m"), 20 * MiB)

    def test_refused(self):
        """Zero, negative numbers and garbage are ValueErrors."""
        for text in ("0", "0K", "-1", "-20M", "", "fast", "20X", "0.5"):
            self.assertRaises(ValueError, parseRate, text)

    def test_int(self):
        """The result is a plain int."""
        self.assertIs(type(parseRate("20M")), int)
