"""
p2p-fetch's interactive prompt: how typed lines are read, and ``help``.

On a terminal (stdin and stderr both ttys, and the console reading the real
stdin) lines are read with GNU readline, so they can be edited, recalled
(history in memory, and kept in ``$XDG_STATE_HOME/p2prelay/history``) and
completed with Tab from the names in the relay's index.  readline needs the
terminal itself, not Twisted's raw lines: it runs in a daemon thread of its
own, one line at a time when asked, and hands each line to the reactor
with ``callFromThread``.  The prompt and the echo go to stderr: stdout
carries only file contents.

Anywhere else (a pipe, a file, the tests' fake terminal) lines come from
the console's ``LineReceiver`` exactly as before.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .console import EOF, Console, visible

HELP = """\
Type the name of a file on the network and press Enter: its contents are
printed (or saved, with -o DIR).  Accepted forms:
  NAME                 one file; Tab completes names the relay knows
  a.txt, b.txt         several files, a comma list
  Send a.txt, b.txt    the same (a leading 'Send' or 'get' is dropped)
  help, ?              this text (a file named help: Send help)
  quit, exit, q        leave (so does Ctrl-D, end of input)
Ctrl-C leaves at once (exit status 130), during a download too.
Up and Down recall earlier lines."""

HELP_WORDS = ("help", "?")

# Completion: the relay's names, asked for at most every REFRESH seconds
# and at most MAX_NAMES of them (the relay's own cap on one SEARCH).
REFRESH = 5.0
MAX_NAMES = 1000
# A Tab before the first listing arrived waits this long for it.
FIRST_WAIT = 1.0

HISTORY_LENGTH = 1000
HISTORY_ENV = "P2PRELAY_HISTORY"  # a path; empty: keep no history file


def isHelp(line: str) -> bool:
    """Whether a typed line asks for :data:`HELP`."""
    return line.strip().lower() in HELP_WORDS


class Names:
    """
    The names completion offers: the relay's index (SEARCH with an empty
    pattern, at most :data:`MAX_NAMES`), asked again at most every
    :data:`REFRESH` seconds.  :meth:`refresh` runs in the reactor thread;
    :attr:`names` is a tuple replaced whole, so the readline thread may read
    it at any time; :attr:`ready` is set once the first answer (or failure)
    is in.
    """

    log = Logger()

    def __init__(self, search, clock, *, every: float = REFRESH, cap: int = MAX_NAMES) -> None:
        self.search = search
        self.clock = clock
        self.every = every
        self.cap = cap
        self.names: tuple[str, ...] = ()
        self.ready = threading.Event()
        self._asked: Optional[float] = None
        self._running = False

    def refresh(self) -> None:
        """Ask the relay for its names, unless asked less than ``every`` seconds ago."""
        now = self.clock.seconds()
        if self._running or (self._asked is not None and now - self._asked < self.every):
            return
        self._asked = now
        self._running = True
        Deferred.fromCoroutine(self._ask())

    async def _ask(self) -> None:
        try:
            files, _ = await self.search("", limit=self.cap)
            names = sorted({m.get("name") for m in files if m.get("name")})[: self.cap]
            self.names = tuple(names)
        except Exception as e:
            # Completion is a convenience: a relay that does not answer
            # shows up when a name is fetched, not here.
            self.log.debug("names for completion: {error}", error=e)
        finally:
            self._running = False
            self.ready.set()


def _pieceStarts(line: str) -> list[int]:
    """Where the name being typed may begin: the start, after a verb, after each comma."""
    starts = [0]
    verb = line.lstrip().split(" ", 1)
    if len(verb) == 2 and verb[0].lower() in ("send", "get"):
        starts.append(len(line) - len(verb[1]))
    starts += [i + 1 for i, ch in enumerate(line) if ch == "," and i + 1 > starts[-1]]
    return starts


def completions(line: str, names: Sequence[str]) -> list[tuple[str, str]]:
    """
    What Tab offers for ``line`` (the text up to the cursor): pairs of the
    whole line completed and the name it completes to.  The name being
    typed is the whole line, else the text after a leading ``Send``/``get``,
    else after a comma; the earliest such start that some name matches
    wins, so a name with commas (or spaces, or a leading 'Send') in it
    completes as one name.
    """
    for start in _pieceStarts(line):
        piece = line[start:].lstrip()
        head = line[: len(line) - len(piece)]
        found = [(head + name, name) for name in names if name.startswith(piece)]
        if found:
            return found
    return []


class Completer:
    """
    readline's completer (it runs in the readline thread): the whole line
    is the word (no delimiters), completed from :class:`Names`.
    ``buffer`` gives the line up to the cursor; ``wanted`` asks the reactor
    for a refresh of the names.
    """

    def __init__(
        self,
        names: Names,
        buffer: Callable[[], str],
        wanted: Callable[[], None] = lambda: None,
        firstWait: float = FIRST_WAIT,
    ) -> None:
        self.names = names
        self.buffer = buffer
        self.wanted = wanted
        self.firstWait = firstWait
        self.found: list[tuple[str, str]] = []

    def complete(self, text: str, state: int) -> Optional[str]:
        if state == 0:
            self.wanted()
            self.names.ready.wait(self.firstWait)
            self.found = completions(self.buffer(), self.names.names)
        return self.found[state][0] if state < len(self.found) else None

    def shown(self) -> list[str]:
        """The names of the last completions, as listed for the person."""
        return [visible(name) for _, name in self.found]


def columns(items: Sequence[str], width: int) -> str:
    """``items`` in as many left-aligned columns as fit in ``width``."""
    if not items:
        return ""
    cell = max(len(item) for item in items) + 2
    per = max(1, width // cell)
    rows = [items[i : i + per] for i in range(0, len(items), per)]
    return "\n".join("".join(item.ljust(cell) for item in row).rstrip() for row in rows)


def historyPath(env=os.environ) -> Optional[Path]:
    """Where the prompt's history is kept; None: nowhere."""
    if HISTORY_ENV in env:
        return Path(env[HISTORY_ENV]) if env[HISTORY_ENV] else None
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "p2prelay" / "history"


class ConsoleReader:
    """Typed lines from the console's LineReceiver: pipes, files, tests."""

    def __init__(self, console: Console) -> None:
        self.console = console

    async def readLine(self, prompt: str) -> object:
        self.console.prompt(prompt)
        return await self.console.readLine()

    def close(self) -> None:
        pass


class ReadlineReader:
    """
    Typed lines from GNU readline on the terminal, read in a daemon thread
    (one that never takes SIGINT or SIGTERM, so Ctrl-C reaches the reactor
    at once).  The thread is left blocked if the run ends mid-line (Ctrl-C);
    :meth:`close` puts the terminal back as it was and saves the history.
    """

    log = Logger()

    def __init__(self, reactor, console: Console, names: Names, history: Optional[Path]) -> None:
        import readline
        import termios

        self.reactor = reactor
        self.readline = readline
        self.names = names
        self.history = history
        self.prompt = ""
        self._termios = termios
        self._saved = termios.tcgetattr(0)
        # readline reads the terminal itself from now on.
        console.stdio.pauseProducing()
        self.completer = Completer(
            names,
            lambda: readline.get_line_buffer()[: readline.get_endidx()],
            lambda: reactor.callFromThread(names.refresh),
        )
        readline.set_completer(self.completer.complete)
        readline.set_completer_delims("")
        readline.set_completion_display_matches_hook(self._display)
        readline.parse_and_bind("tab: complete")
        # One Tab lists the choices when there are several.
        readline.parse_and_bind("set show-all-if-ambiguous on")
        # Left on, a Ctrl-C mid-line would leave the shell's terminal in it.
        readline.parse_and_bind("set enable-bracketed-paste off")
        readline.set_history_length(HISTORY_LENGTH)
        if history is not None:
            try:
                readline.read_history_file(history)
            except OSError:
                pass
        api = ctypes.pythonapi
        self._readline = api.PyOS_Readline
        self._readline.restype = ctypes.c_void_p
        self._readline.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p]
        self._free = api.PyMem_Free
        self._free.argtypes = [ctypes.c_void_p]
        self._files = (
            ctypes.c_void_p.in_dll(api, "stdin").value,
            ctypes.c_void_p.in_dll(api, "stderr").value,
        )
        self._asks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, name="p2p-fetch prompt", daemon=True)
        self._thread.start()

    async def readLine(self, prompt: str) -> object:
        """The next typed line, or :data:`EOF`; cancelling leaves the terminal to :meth:`close`."""
        self.names.refresh()
        self.prompt = prompt
        d: Deferred = Deferred()
        self._asks.put((visible(prompt), d))
        return await d

    def _read(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        while True:
            prompt, d = self._asks.get()
            try:
                line = self._readOne(prompt)
            except BaseException as e:
                self.reactor.callFromThread(d.errback, e)
            else:
                self.reactor.callFromThread(d.callback, line)

    def _readOne(self, prompt: str) -> object:
        raw = self._readline(self._files[0], self._files[1], prompt.encode("utf-8", "replace"))
        if not raw:
            return EOF
        try:
            data = ctypes.string_at(raw)
        finally:
            self._free(raw)
        if not data.endswith(b"\n"):
            return EOF  # readline's end of input (Ctrl-D on an empty line)
        return data[:-1].decode("utf-8", "replace")

    def _display(self, substitution: str, matches: Sequence[str], longest: int) -> None:
        import shutil

        from .console import writeStderr

        width = shutil.get_terminal_size().columns
        writeStderr("\n" + columns(self.completer.shown(), width) + "\n")
        # The prompt and the line again below the list, all of it: readline's
        # own rl_forced_update_display, which the readline module leaves out.
        try:
            ctypes.CDLL(self.readline.__file__).rl_forced_update_display()
        except (AttributeError, OSError):
            writeStderr(visible(self.prompt) + self.readline.get_line_buffer())

    def close(self) -> None:
        try:
            self._termios.tcsetattr(0, self._termios.TCSADRAIN, self._saved)
        except Exception as e:
            self.log.debug("terminal not restored: {error}", error=e)
        if self.history is not None:
            try:
                self.history.parent.mkdir(parents=True, exist_ok=True)
                self.readline.write_history_file(self.history)
            except OSError as e:
                self.log.debug("history not saved: {error}", error=e)


def onTerminal(console: Console) -> bool:
    """Whether the console reads a real terminal, for readline to edit."""
    from twisted.internet.stdio import StandardIO

    if not isinstance(console.stdio, StandardIO):
        return False
    try:
        return os.isatty(0) and os.isatty(2)
    except OSError:
        return False


def lineReader(reactor, console: Console, fetcher):
    """How p2p-fetch's prompt reads lines: readline on a terminal, else the console."""
    if not onTerminal(console):
        return ConsoleReader(console)
    try:
        import readline  # noqa: F401
    except ImportError:
        return ConsoleReader(console)
    return ReadlineReader(reactor, console, Names(fetcher.search, reactor), historyPath())
