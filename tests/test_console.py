"""
The client's stdout: contents must be fully written before anything else
(a prompt on stderr) is shown, and a closed stdout is no crash.
"""

from __future__ import annotations

import io

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from p2prelay.cli.console import EOF, Console, Terminal, splitNames, visible

from .support import FakeStdio, FakeTerminal


def console(**stdioOptions) -> Console:
    return Console(None, False, stdio=lambda proto: FakeStdio(proto, **stdioOptions), stderr=lambda text: None)


class SendTests(SynchronousTestCase):
    def test_firesOnlyAfterDrain(self) -> None:
        """send() completes only once stdout has taken every byte and drained."""
        c = console(autoDrain=False)
        stdout = c.stdio
        d = Deferred.fromCoroutine(c.send(io.BytesIO(b"x" * 300_000)))
        self.assertNoResult(d)
        while not d.called:
            stdout.drain()
        self.successResultOf(d)
        self.assertEqual(stdout.value(), b"x" * 300_000)
        self.assertIsNone(stdout.producer)

    def test_lastChunkNotYetDrained(self) -> None:
        """Having written the last chunk is not enough: it must have left the buffer."""
        c = console(autoDrain=False)
        stdout = c.stdio
        d = Deferred.fromCoroutine(c.send(io.BytesIO(b"short")))
        self.assertEqual(stdout.value(), b"short")
        self.assertNoResult(d)
        stdout.drain()
        self.successResultOf(d)

    def test_closedStdout(self) -> None:
        """A stdout that stops the transfer (closed pipe) ends send() quietly."""
        c = console(autoDrain=False)
        stdout = c.stdio
        d = Deferred.fromCoroutine(c.send(io.BytesIO(b"y" * 1_000_000)))
        stdout.producer.stopProducing()
        self.successResultOf(d)
        self.assertTrue(c.stdoutClosed)
        self.successResultOf(Deferred.fromCoroutine(c.send(io.BytesIO(b"more"))))

    def test_readerGoneMidFile(self) -> None:
        """A reader that goes away mid-file ('| head -c 10') gets its bytes; send() ends quietly."""
        c = console(closeAfter=10)
        self.successResultOf(Deferred.fromCoroutine(c.send(io.BytesIO(b"z" * 1_000_000))))
        self.assertEqual(c.stdio.value(), b"z" * 10)
        self.assertTrue(c.stdoutClosed)

    def test_closeWaitsForStdout(self) -> None:
        """close() releases stdout and returns once its write side is closed."""
        c = console()
        self.successResultOf(Deferred.fromCoroutine(c.close()))
        self.assertTrue(c.stdio.writeClosed)


class MessageTests(SynchronousTestCase):
    """
    Messages and prompts go to the console's stderr, never to stdout.
    """

    def test_errEndsTheLine(self) -> None:
        """err() writes a line: a newline is added when missing, never doubled."""
        t = FakeTerminal()
        t.console.err("one")
        t.console.err("two\n")
        self.assertEqual((t.stderr, t.stdout), ("one\ntwo\n", b""))

    def test_promptStaysOnTheLine(self) -> None:
        """prompt() leaves the line open for the answer."""
        t = FakeTerminal()
        t.console.prompt("name> ")
        self.assertEqual((t.stderr, t.stdout), ("name> ", b""))


class TerminalTests(SynchronousTestCase):
    """
    Typed input becomes a queue of lines, ended by EOF.
    """

    def lines(self, t: FakeTerminal) -> list:
        got = []
        while t.console.terminal.lines.pending:
            got.append(self.successResultOf(Deferred.fromCoroutine(t.console.readLine())))
        return got

    def test_linesInOrder(self) -> None:
        """Each typed line is read once, in order, without its line ending (CRLF too)."""
        t = FakeTerminal()
        t.type("a.txt\r\nb.txt\n")
        self.assertEqual(self.lines(t), ["a.txt", "b.txt"])

    def test_lastLineWithoutNewline(self) -> None:
        """A last line with no newline before EOF still counts, then EOF."""
        t = FakeTerminal()
        t.type("a.txt\nb.txt")
        t.eof()
        self.assertEqual(self.lines(t), ["a.txt", "b.txt", EOF])

    def test_eofOnce(self) -> None:
        """EOF is queued once, however the input ends."""
        t = FakeTerminal()
        t.eof()
        t.console.terminal.connectionLost(None)
        self.assertEqual(self.lines(t), [EOF])

    def test_tooLongLine(self) -> None:
        """A line over the limit is dropped with a message on stderr."""
        t = FakeTerminal()
        t.type("x" * (Terminal.MAX_LENGTH + 1) + "\n")
        self.assertEqual(self.lines(t), [])
        self.assertIn("input line too long; ignored", t.stderr)


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


ESC = "\x1b"


class VisibleTests(SynchronousTestCase):
    """
    Text from the network is shown with its control characters made
    visible, so a name or an error text cannot steer the terminal.
    """

    def test_plainUnchanged(self) -> None:
        """Printable text, non-ASCII letters and symbols included, is shown as it is."""
        text = "notes/été ☃ = draft: 50% [ok] \\ done"
        self.assertEqual(visible(text), text)

    def test_c0(self) -> None:
        """C0 controls (ESC, BEL, CR, tab, newline) are shown as \\xNN."""
        self.assertEqual(visible(f"a{ESC}]0;title\x07b\r\t\n"), "a\\x1b]0;title\\x07b\\x0d\\x09\\x0a")

    def test_delAndC1(self) -> None:
        """DEL and the C1 controls (CSI is one) are shown as \\xNN."""
        self.assertEqual(visible("x\x7f\x9b2J\x85"), "x\\x7f\\x9b2J\\x85")

    def test_bidi(self) -> None:
        """Bidi overrides, isolates and marks are shown as \\uNNNN."""
        self.assertEqual(visible("a\u202eexe.txt\u2066\u200f"), "a\\u202eexe.txt\\u2066\\u200f")

    def test_lineSeparators(self) -> None:
        """Unicode line and paragraph separators cannot start a new line either."""
        self.assertEqual(visible("a\u2028b\u2029"), "a\\u2028b\\u2029")

    def test_idempotent(self) -> None:
        """Escaping escaped text changes nothing more."""
        once = visible(f"{ESC}[2J\u202e")
        self.assertEqual(visible(once), once)

    def test_errVisible(self) -> None:
        """err() escapes what it prints and keeps its own line ending."""
        t = FakeTerminal()
        t.console.err(f"peer says {ESC}[2Jgone")
        self.assertEqual(t.stderr, "peer says \\x1b[2Jgone\n")

    def test_promptVisible(self) -> None:
        """prompt() escapes what it prints."""
        t = FakeTerminal()
        t.console.prompt(f"{ESC}]0;x\x07> ")
        self.assertEqual(t.stderr, "\\x1b]0;x\\x07> ")

    def test_lineVisible(self) -> None:
        """line() writes a visible line to stdout; line breaks within it stay line breaks."""
        t = FakeTerminal()
        t.console.line(f"one {ESC}[31m\ntwo")
        self.assertEqual(t.stdout, b"one \\x1b[31m\ntwo\n")

    def test_rawLine(self) -> None:
        """rawLine() writes JSON as it is."""
        t = FakeTerminal()
        t.console.rawLine('{"name": "\\u001b"}')
        self.assertEqual(t.stdout, b'{"name": "\\u001b"}\n')
