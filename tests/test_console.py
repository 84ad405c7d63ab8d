"""
The client's stdout: contents must be fully written before anything else
(a prompt on stderr) is shown, and a closed stdout is no crash.
"""

from __future__ import annotations

import io

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from p2prelay.cli.console import Console, Terminal, splitNames


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


class SplitNamesTests(SynchronousTestCase):
    """
    What users type becomes a list of file names.
    """

    def test_words(self):
        """Separate words are separate names."""
        self.assertEqual(splitNames(["a.txt", "b.txt"]), ["a.txt", "b.txt"])

    def test_commaList(self):
        """A comma list is split and trimmed."""
        self.assertEqual(splitNames(["a.txt, b.txt,c.txt"]), ["a.txt", "b.txt", "c.txt"])

    def test_commaWords(self):
        """Commas attached to shell words ("a.txt," "b.txt") are dropped."""
        self.assertEqual(splitNames(["a.txt,", "b.txt"]), ["a.txt", "b.txt"])

    def test_spacesInsideNamesKept(self):
        """A name with inner spaces stays one name."""
        self.assertEqual(splitNames(["my file.txt, b"]), ["my file.txt", "b"])

    def test_emptyPiecesDropped(self):
        """Empty pieces between commas are ignored."""
        self.assertEqual(splitNames([", a,, ,b,"]), ["a", "b"])

    def test_duplicates(self):
        """Duplicates are dropped, keeping the first position."""
        self.assertEqual(splitNames(["b, a", "b", "a, c"]), ["b", "a", "c"])

    def test_sendVerb(self):
        """With allowVerb, "Send a, b" asks for a and b."""
        self.assertEqual(splitNames(["Send a.txt, b.txt"], allowVerb=True), ["a.txt", "b.txt"])

    def test_getVerbAnyCase(self):
        """With allowVerb, a leading get/GET/send is dropped whatever its case."""
        self.assertEqual(splitNames(["GET a.txt"], allowVerb=True), ["a.txt"])
        self.assertEqual(splitNames(["send", "a.txt"], allowVerb=True), ["a.txt"])

    def test_verbKeptWithoutAllowVerb(self):
        """Without allowVerb, "Send a" is a file name like any other."""
        self.assertEqual(splitNames(["Send a.txt, b.txt"]), ["Send a.txt", "b.txt"])

    def test_verbOnlyFirst(self):
        """Only a leading verb is dropped; a later "send x" is a name."""
        self.assertEqual(
            splitNames(["get a.txt, send b.txt"], allowVerb=True), ["a.txt", "send b.txt"]
        )

    def test_verbDuplicates(self):
        """Dropping the verb does not let a duplicate through."""
        self.assertEqual(splitNames(["Send a.txt, a.txt"], allowVerb=True), ["a.txt"])

    def test_nothing(self):
        """No input, or the verb alone, is no names."""
        self.assertEqual(splitNames([]), [])
        self.assertEqual(splitNames(["Send"], allowVerb=True), [])
