"""
The terminal, as Twisted sees it: typed lines in, file contents out.

Contents are streamed to stdout through ``twisted.internet.stdio`` with a
producer, so a slow pipe (``| less``) pauses the file reader instead of
blocking the reactor or filling memory.  Human messages go to stderr,
written so that a non-blocking terminal never raises mid-message.
"""

from __future__ import annotations

import codecs
import os
import select
import sys
from typing import IO, Any, Callable, Iterable, Optional

from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.stdio import StandardIO
from twisted.protocols.basic import FileSender, LineReceiver
from zope.interface import implementer

EOF = object()

# Characters that steer a terminal or reorder what it shows, besides the C0
# and C1 controls and DEL: the Unicode bidirectional overrides, embeddings,
# isolates and marks ("Trojan Source"), and the line and paragraph separators.
_BIDI = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return f"\\x{code:02x}"
    if ch in _BIDI:
        return f"\\u{code:04x}"
    return ch


def visible(text: str) -> str:
    """
    ``text`` from the network, safe to print: control and escape characters
    (C0, DEL, C1) shown as ``\\xNN``, bidi overrides and the like as
    ``\\uNNNN``; everything else, non-ASCII letters included, unchanged.
    Every name, peer id, address and error text that came from a relay or a
    peer goes through this before it reaches the terminal.
    """
    if text.isprintable() and text.isascii():
        return text
    return "".join(_escape(ch) for ch in text)


SNIFF = 64 * 1024  # bytes of a file's start looked at to tell text from binary


def looksBinary(head: bytes) -> bool:
    """
    Whether a file starting with ``head`` is not text: a NUL byte, or
    bytes that are not UTF-8 (a sequence cut short at the end of ``head``
    is not held against it).
    """
    head = head[:SNIFF]
    if b"\0" in head:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return True
    return False


def visibleLines(text: str) -> str:
    """:func:`visible` for each line of ``text``, keeping its line breaks."""
    return "\n".join(visible(line) for line in text.split("\n"))


class _StdoutSender(FileSender):
    """
    A pull producer: stdout asks for each chunk once the previous one is
    written, so the transfer's Deferred fires only when the last byte has
    left the buffer -- and a prompt on stderr can never overtake it.
    """

    CHUNK_SIZE = 256 * 1024


@implementer(IPushProducer)
class StdoutStream:
    """
    Bytes to stdout as they come (a download printed piece by piece): a
    push producer to the stdout transport, so :attr:`paused` says when the
    reader is behind (the writer should then stop fetching more) and
    :attr:`onResume` is called when it has caught up.  :attr:`closed` is
    set once the reader went away ('| head'); later writes are dropped.
    """

    def __init__(self, console: "Console", refuseBinary: bool = False) -> None:
        self.console = console
        self.paused = False
        self.closed = console.stdoutClosed
        # Look at the first bytes before writing any: binary ones are
        # refused (:attr:`refused` set, the stream closed, nothing written).
        self.refuseBinary = refuseBinary
        self.refused = False
        self.onResume: Callable[[], None] = lambda: None
        self.registered = False
        if not self.closed:
            console.stdio.registerProducer(self, True)
            self.registered = True

    def write(self, data: bytes) -> None:
        if self.refuseBinary and data:
            self.refuseBinary = False
            if looksBinary(data):
                self.refused = True
                self.closed = True
                self.close()
                self.onResume()
                return
        if not self.closed:
            self.console.stdio.write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.onResume()

    def stopProducing(self) -> None:
        # The reader closed stdout.
        self.closed = True
        self.registered = False
        self.console.stdoutClosed = True
        self.onResume()

    def close(self) -> None:
        """Done writing: let go of stdout (its bytes still drain)."""
        if self.registered:
            self.registered = False
            self.console.stdio.unregisterProducer()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def writeStderr(text: str) -> None:
    """Write text to stderr (fd 2), waiting out EAGAIN on a non-blocking tty."""
    data = text.encode("utf-8", "replace")
    try:
        sys.stderr.flush()
    except (BlockingIOError, ValueError):
        pass
    fd = 2
    while data:
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        except OSError:
            return  # stderr is gone; nothing sensible left to do
        data = data[written:]


def err(text: str) -> None:
    """Write a line to stderr, made :func:`visible`."""
    text = visibleLines(text)
    writeStderr(text if text.endswith("\n") else text + "\n")


def prompt(text: str) -> None:
    """Write a prompt to stderr, without a line ending, made :func:`visible`."""
    writeStderr(visibleLines(text))


@implementer(IHalfCloseableProtocol)
class Terminal(LineReceiver):
    """
    stdin as a queue of typed lines, stdout as a consumer for contents.
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self, report: Callable[[str], None] = err) -> None:
        self.report = report
        self.lines: DeferredQueue[object] = DeferredQueue()
        self.writeClosed: Deferred[None] = Deferred()
        self._readDone = False

    def lineReceived(self, line: bytes) -> None:
        self.lines.put(line.rstrip(b"\r").decode("utf-8", "replace"))

    def lineLengthExceeded(self, line: bytes) -> None:
        self.report("input line too long; ignored")

    def readConnectionLost(self) -> None:
        if not self._readDone:
            self._readDone = True
            if self._buffer:
                self.lines.put(self._buffer.decode("utf-8", "replace"))
                self._buffer = b""
            self.lines.put(EOF)

    def writeConnectionLost(self) -> None:
        if not self.writeClosed.called:
            self.writeClosed.callback(None)

    def connectionLost(self, reason: object = None) -> None:
        self.readConnectionLost()
        self.writeConnectionLost()


class Console:
    """
    Owns the terminal for one run of a console program: typed lines from
    stdin, contents to stdout, messages and prompts to stderr.

    ``stdio`` builds the transport for the :class:`Terminal` protocol the
    way ``StandardIO(protocol)`` does (it is the default), and ``stderr``
    writes text to the person at the terminal; tests pass fakes of both.
    """

    def __init__(
        self,
        reactor,
        interactive: bool,
        *,
        stdio: Optional[Callable[[Terminal], Any]] = None,
        stderr: Callable[[str], None] = writeStderr,
        stdoutTTY: Optional[bool] = None,
        stderrTTY: Optional[bool] = None,
    ) -> None:
        self.stderr = stderr
        # Whether stdout and stderr are terminals (a person reads them, not
        # a pipe); with fakes, unless told, they are not.
        real = stdio is None
        self.stdoutTTY = _isatty(1) if stdoutTTY is None and real else bool(stdoutTTY)
        self.stderrTTY = (
            _isatty(2) if stderrTTY is None and real and stderr is writeStderr else bool(stderrTTY)
        )
        self.terminal = Terminal(report=self.err)
        self._devnull: Optional[int] = None
        if stdio is None:
            stdin = 0
            if not interactive:
                # Never read (or wait on) the user's stdin when not asked to.
                self._devnull = stdin = os.open(os.devnull, os.O_RDONLY)
            self.stdio = StandardIO(self.terminal, stdin=stdin, reactor=reactor)
        else:
            self.stdio = stdio(self.terminal)
        self.stdoutClosed = False

    def err(self, text: str) -> None:
        """A line for the person at the terminal, on stderr, made :func:`visible`."""
        text = visibleLines(text)
        self.stderr(text if text.endswith("\n") else text + "\n")

    def prompt(self, text: str) -> None:
        """A question on stderr, left open for the answer, made :func:`visible`."""
        self.stderr(visibleLines(text))

    def line(self, text: str = "") -> None:
        """A line of a listing or a menu on stdout, made :func:`visible`."""
        self.stdio.write((visibleLines(text) + "\n").encode("utf-8"))

    def rawLine(self, text: str) -> None:
        """A line on stdout as it is: JSON, which is already escaped."""
        self.stdio.write((text + "\n").encode("utf-8"))

    async def readLine(self) -> object:
        return await self.terminal.lines.get()

    def stream(self, refuseBinary: bool = False) -> StdoutStream:
        """
        stdout as a stream to write bytes into as they come; :meth:`StdoutStream.close` it.
        With ``refuseBinary``, a first write that :func:`looksBinary` is refused.
        """
        return StdoutStream(self, refuseBinary)

    async def send(self, f: IO[bytes]) -> None:
        """Stream an open file to stdout; returns once it is all written. Closes f."""
        if self.stdoutClosed:
            f.close()
            return
        try:
            await _StdoutSender().beginFileTransfer(f, self.stdio)
        except Exception:
            # FileSender's only failure: stdout stopped it because it was
            # closed ('| head').  The reader has what it wanted.
            self.stdoutClosed = True
        finally:
            f.close()

    async def close(self) -> None:
        """Flush stdout and release it; returns once every byte is out."""
        self.stdio.loseWriteConnection()
        await self.terminal.writeClosed
        if self._devnull is not None:
            try:
                os.close(self._devnull)
            except OSError:
                pass
            self._devnull = None


def splitNames(words: Iterable[str], *, allowVerb: bool = False) -> list[str]:
    """
    Split command-line or prompt input into file names.

    Accepts separate words and comma lists (``"a.txt, b.txt"``, the seeds'
    ``Send FILE1, FILE2`` form) and drops duplicates, keeping the order.
    With ``allowVerb`` (typed input) a leading ``Send``/``get`` is dropped.
    """
    pieces = [piece.strip() for word in words for piece in word.split(",")]
    pieces = [piece for piece in pieces if piece]
    if allowVerb and pieces and pieces[0].split(" ", 1)[0].lower() in ("send", "get"):
        first = pieces[0].split(" ", 1)
        pieces[0:1] = [first[1].strip()] if len(first) > 1 and first[1].strip() else []
    names: list[str] = []
    for piece in pieces:
        if piece not in names:
            names.append(piece)
    return names
