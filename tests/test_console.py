"""
The client's stdout: contents must be fully written before anything else
(a prompt on stderr) is shown, and a closed stdout is no crash.
"""

from __future__ import annotations

import io

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from p2prelay.console import Console, Terminal


class PullingStdout(StringTransport):
    """
    A stdout whose buffer drains only when the test says so.  Like a real
    FileDescriptor, it asks a pull producer for a first chunk at once.
    """

    def registerProducer(self, producer, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if not streaming:
            producer.resumeProducing()

    def drain(self) -> None:
        if self.producer is not None and not self.streaming:
            self.producer.resumeProducing()


def console(stdout: StringTransport) -> Console:
    c = Console.__new__(Console)  # no real stdio in unit tests
    c.terminal = Terminal()
    c.stdio = stdout
    c.stdoutClosed = False
    return c


class SendTests(SynchronousTestCase):
    def test_firesOnlyAfterDrain(self) -> None:
        """send() completes only once stdout has taken every byte and drained."""
        stdout = PullingStdout()
        c = console(stdout)
        d = Deferred.fromCoroutine(c.send(io.BytesIO(b"x" * 300_000)))
        self.assertNoResult(d)
        while not d.called:
            stdout.drain()
        self.successResultOf(d)
        self.assertEqual(stdout.value(), b"x" * 300_000)
        self.assertIsNone(stdout.producer)

    def test_lastChunkNotYetDrained(self) -> None:
        """Having written the last chunk is not enough: it must have left the buffer."""
        stdout = PullingStdout()
        c = console(stdout)
        d = Deferred.fromCoroutine(c.send(io.BytesIO(b"short")))
        self.assertEqual(stdout.value(), b"short")
        self.assertNoResult(d)
        stdout.drain()
        self.successResultOf(d)

    def test_closedStdout(self) -> None:
        """A stdout that stops the transfer (closed pipe) ends send() quietly."""
        stdout = PullingStdout()
        c = console(stdout)
        d = Deferred.fromCoroutine(c.send(io.BytesIO(b"y" * 1_000_000)))
        stdout.producer.stopProducing()
        self.successResultOf(d)
        self.assertTrue(c.stdoutClosed)
        self.successResultOf(Deferred.fromCoroutine(c.send(io.BytesIO(b"more"))))
