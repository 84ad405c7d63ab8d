"""
p2p-fetch's interactive prompt (``p2prelay.cli.prompt``): Tab completion
from the relay's names, the refresh of those names, ``help``, the choice
between readline and the console's lines -- in process; and, on a
pseudo-terminal, the real thing: completion, history, ``help`` and Ctrl-C.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from p2prelay import wire
from p2prelay.cli import fetch, options, prompt, session
from p2prelay.cli.prompt import HELP, Completer, ConsoleReader, Names, columns, completions, historyPath

from .support import FakeTerminal
from .test_cli_fetch import FakeFetcher, fileItem

ROOT = Path(__file__).resolve().parent.parent


class CompletionTests(SynchronousTestCase):
    """What Tab offers for the text before the cursor."""

    names = ["alpha.txt", "alpine.bin", "beta.txt", "my file.txt", "a,b.txt", "Send me.txt"]

    def offered(self, line: str) -> list[str]:
        return [whole for whole, _ in completions(line, self.names)]

    def test_prefix(self) -> None:
        """Every name that starts with what is typed is offered, as the whole line completed."""
        self.assertEqual(self.offered("alp"), ["alpha.txt", "alpine.bin"])

    def test_caseMatters(self) -> None:
        """Names are matched as they are spelled: 'ALP' offers nothing."""
        self.assertEqual(self.offered("ALP"), [])

    def test_empty(self) -> None:
        """An empty line offers every name."""
        self.assertEqual(len(self.offered("")), len(self.names))

    def test_nameWithSpace(self) -> None:
        """A name with a space in it completes as one name."""
        self.assertEqual(self.offered("my f"), ["my file.txt"])

    def test_afterComma(self) -> None:
        """After a comma the next name completes, the list before it kept."""
        self.assertEqual(self.offered("beta.txt, al"), ["beta.txt, alpha.txt", "beta.txt, alpine.bin"])

    def test_afterVerb(self) -> None:
        """After the seeds' 'Send ' (any case) the name completes, the verb kept."""
        self.assertEqual(self.offered("send be"), ["send beta.txt"])

    def test_verbAndComma(self) -> None:
        """'Send a.txt, b' completes the name after the comma."""
        self.assertEqual(self.offered("Send beta.txt, my"), ["Send beta.txt, my file.txt"])

    def test_nameWithComma(self) -> None:
        """A name with a comma in it completes as one name, not as a list."""
        self.assertEqual(self.offered("a,"), ["a,b.txt"])

    def test_nameLikeVerb(self) -> None:
        """A name that begins like the verb still completes when no name follows the verb."""
        self.assertEqual(self.offered("Send m"), ["Send me.txt"])

    def test_noMatch(self) -> None:
        """Nothing matching: nothing offered."""
        self.assertEqual(self.offered("zeta"), [])


class CompleterTests(SynchronousTestCase):
    """readline's side: the state protocol, and asking for fresh names."""

    def setUp(self) -> None:
        self.names = Names(None, Clock())
        self.names.names = ("alpha.txt", "alpine.bin")
        self.names.ready.set()
        self.wanted = 0
        self.line = "al"

        def want() -> None:
            self.wanted += 1

        self.completer = Completer(self.names, lambda: self.line, want, firstWait=0)

    def test_states(self) -> None:
        """readline asks for matches 0, 1, ... until None."""
        got = [self.completer.complete(self.line, i) for i in range(3)]
        self.assertEqual(got, ["alpha.txt", "alpine.bin", None])

    def test_wantsRefreshOncePerTab(self) -> None:
        """Each Tab (state 0) asks the reactor for fresh names once."""
        for i in range(3):
            self.completer.complete(self.line, i)
        self.assertEqual(self.wanted, 1)

    def test_shownAsNames(self) -> None:
        """The listing of several matches shows the names, made visible, not the whole lines."""
        self.names.names = ("x, al\x1b[2J", "x, alpha")
        self.line = "x, al"
        self.completer.complete(self.line, 0)
        self.assertEqual(self.completer.shown(), ["x, al\\x1b[2J", "x, alpha"])

    def test_waitsForFirstNames(self) -> None:
        """A Tab before the first listing arrived waits for it (up to firstWait)."""
        names = Names(None, Clock())
        waited = []
        names.ready.wait = lambda timeout: waited.append(timeout)
        Completer(names, lambda: "", firstWait=0.5).complete("", 0)
        self.assertEqual(waited, [0.5])


class NamesTests(SynchronousTestCase):
    """The relay's names, asked for in the reactor thread, at most every few seconds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fetcher = FakeFetcher(listing=[fileItem("b.txt", 1), fileItem("a.txt", 2), fileItem("a.txt", 2)])
        self.names = Names(self.fetcher.search, self.clock, every=5, cap=10)

    def searches(self) -> int:
        return sum(1 for asked in self.fetcher.asked if asked[0] == "search")

    def test_refresh(self) -> None:
        """A refresh asks SEARCH with an empty pattern; the names come back sorted, once each."""
        self.names.refresh()
        self.assertEqual((self.fetcher.asked, self.names.names), ([("search", "")], ("a.txt", "b.txt")))
        self.assertTrue(self.names.ready.is_set())

    def test_limitAsked(self) -> None:
        """The relay is asked for at most ``cap`` names."""
        seen = []

        async def search(pattern, limit=None):
            seen.append(limit)
            return [], False

        Names(search, self.clock, cap=7).refresh()
        self.assertEqual(seen, [7])

    def test_capKept(self) -> None:
        """More names than ``cap`` in an answer: only ``cap`` are kept."""
        self.fetcher.listing = [fileItem(f"f{i:02}", 1) for i in range(30)]
        self.names.refresh()
        self.assertEqual(len(self.names.names), 10)

    def test_notTooOften(self) -> None:
        """Asked again within ``every`` seconds: the relay is not asked again."""
        self.names.refresh()
        self.clock.advance(4.9)
        self.names.refresh()
        self.assertEqual(self.searches(), 1)

    def test_againLater(self) -> None:
        """Asked again ``every`` seconds later: the relay is asked again, the names replaced."""
        self.names.refresh()
        self.fetcher.listing = [fileItem("c.txt", 1)]
        self.clock.advance(5)
        self.names.refresh()
        self.assertEqual((self.searches(), self.names.names), (2, ("c.txt",)))

    def test_oneAtATime(self) -> None:
        """While an answer is awaited, no second SEARCH is sent, however late."""
        pending: Deferred = Deferred()
        calls = []

        async def search(pattern, limit=None):
            calls.append(pattern)
            return await pending

        names = Names(search, self.clock, every=5)
        names.refresh()
        self.clock.advance(60)
        names.refresh()
        pending.callback(([fileItem("x", 1)], False))
        self.assertEqual((calls, names.names), ([""], ("x",)))

    def test_failureKeepsNames(self) -> None:
        """A relay that fails to answer leaves the names as they were, and nothing raised."""
        self.names.refresh()
        self.fetcher.errors["search"] = wire.ProtocolError(503, "busy")
        self.clock.advance(5)
        self.names.refresh()
        self.assertEqual(self.names.names, ("a.txt", "b.txt"))


class HelpTests(SynchronousTestCase):
    """``help`` at the prompt."""

    def test_words(self) -> None:
        """'help' and '?' (any case, spaces around) ask for help; a name does not."""
        self.assertEqual(
            [prompt.isHelp(w) for w in ("help", " HELP ", "?", "help.txt", "Send help")],
            [True, True, True, False, False],
        )

    def test_forms(self) -> None:
        """The help text names every accepted form: names, comma lists, Send, quit/exit/q, EOF, Ctrl-C."""
        for form in ("NAME", "a.txt, b.txt", "Send a.txt, b.txt", "quit, exit, q", "Ctrl-D", "Ctrl-C", "Tab"):
            self.assertIn(form, HELP)

    def test_atPrompt(self) -> None:
        """'help' typed at the prompt prints the help on stderr, fetches nothing, and prompts again."""
        terminal = FakeTerminal()
        fetcher = FakeFetcher({"a.txt": b"A"})
        d = Deferred.fromCoroutine(fetch.run(None, fetch.parseArgs([]), terminal.console, fetcher))
        terminal.type("help\n")
        terminal.eof()
        self.assertEqual(self.successResultOf(d), options.EXIT_OK)
        self.assertEqual(terminal.stderr, session.PROMPT + HELP + "\n" + session.PROMPT + "\n")
        self.assertEqual((fetcher.asked, terminal.stdout), ([], b""))


class ChoiceTests(SynchronousTestCase):
    """readline only where there is a terminal to edit on."""

    def test_fakeTerminal(self) -> None:
        """A console on anything but the real stdin reads its own lines (pipes, tests)."""
        terminal = FakeTerminal()
        reader = prompt.lineReader(None, terminal.console, FakeFetcher())
        self.assertIsInstance(reader, ConsoleReader)

    def test_columns(self) -> None:
        """Several matches are listed in columns that fit the width."""
        self.assertEqual(columns(["a", "bb", "ccc", "d"], 12), "a    bb\nccc  d")

    def test_historyPath(self) -> None:
        """History lives under $XDG_STATE_HOME/p2prelay, or where P2PRELAY_HISTORY says, or nowhere."""
        self.assertEqual(historyPath({"XDG_STATE_HOME": "/s"}), Path("/s/p2prelay/history"))
        self.assertEqual(historyPath({"HOME": "/h"}).parts[-3:], ("state", "p2prelay", "history"))
        self.assertEqual(historyPath({"P2PRELAY_HISTORY": "/x/h"}), Path("/x/h"))
        self.assertIsNone(historyPath({"P2PRELAY_HISTORY": ""}))


# The real terminal: p2p-fetch on a pseudo-terminal, against an in-process relay.

NAMES = ["alpha one.txt", "alpha two.txt", "beta.txt"]


def child() -> None:
    """
    p2p-fetch's main() (with -v), with a scripted relay on a loopback port
    listing NAMES, and slow.txt at a peer that accepts and never answers.
    """
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from .test_fetch import FakeRelay

    silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    relay = FakeRelay()
    relay.add("n1", "127.0.0.1", 9, [wire.FileEntry(n, 1, "a" * 64) for n in NAMES])
    relay.add("n2", "127.0.0.1", silent.getHost().port, [wire.FileEntry("slow.txt", 1, "a" * 64)])
    port = reactor.listenTCP(0, relay, interface="127.0.0.1")
    fetch.main(["-v", "--relay", f"127.0.0.1:{port.getHost().port}", "--timeout", "30"])


class PseudoTerminalTests(SynchronousTestCase):
    """On a terminal: Tab completion, help, history, Ctrl-C."""

    def setUp(self) -> None:
        try:
            import pty  # noqa: F401
            import readline  # noqa: F401
        except ImportError as e:
            raise SkipTest(f"no pseudo-terminals or readline here: {e}")
        self.history = Path(self.mktemp()).absolute()
        env = dict(os.environ, P2PRELAY_HISTORY=str(self.history), TERM="xterm", PYTHONPATH=str(ROOT))
        try:
            self.pid, self.fd = os.forkpty()
        except OSError as e:
            raise SkipTest(f"no pseudo-terminals here: {e}")
        if self.pid == 0:  # the child
            try:
                os.chdir(ROOT)
                os.execve(sys.executable, [sys.executable, "-m", "tests.test_prompt"], env)
            finally:
                os._exit(127)
        self.output = b""
        self.addCleanup(self.reap)

    def reap(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.fd)

    def expect(self, wanted: bytes, timeout: float = 5.0) -> None:
        """Read the terminal until ``wanted`` appears after what was expected before."""
        end = time.monotonic() + timeout
        while wanted not in self.output:
            left = end - time.monotonic()
            if left <= 0:
                self.fail(f"{wanted!r} not seen; the terminal showed {self.output!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the child is gone
                    data = b""
                if not data:
                    self.fail(f"{wanted!r} not seen before the end; the terminal showed {self.output!r}")
                self.output += data
        self.output = self.output[self.output.index(wanted) + len(wanted) :]

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def exitCode(self) -> int:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            self.drain()
        self.fail("p2p-fetch did not exit")

    def drain(self) -> None:
        ready, _, _ = select.select([self.fd], [], [], 0.05)
        if ready:
            try:
                self.output += os.read(self.fd, 4096)
            except OSError:
                pass

    def test_session(self) -> None:
        """
        Tab completes a unique name and lists the choices of an ambiguous
        one; help prints the forms; Up recalls the last line; Ctrl-C at the
        prompt exits 130 with its line ended, no traceback, the terminal
        back in its line mode with echo, and the history kept.
        """
        self.expect(session.PROMPT.encode())
        self.type(b"be\t")
        self.expect(b"beta.txt")
        self.type(b"\x15al\t")  # Ctrl-U clears the line; Tab lists the choices
        self.expect(b"\r\nalpha one.txt  alpha two.txt\r\n" + session.PROMPT.encode() + b"alpha ")
        self.type(b"\x15help\r")
        self.expect(b"Up and Down recall earlier lines.")
        self.expect(session.PROMPT.encode())
        self.type(b"\x1b[A")  # Up
        self.expect(b"help")
        self.type(b"\x15\x03")  # Ctrl-C
        self.assertEqual(self.exitCode(), 130)
        self.drain()
        self.assertIn(b"\r\np2p-fetch: interrupted", self.output)
        self.assertNotIn(b"Traceback", self.output)
        self.assertIn("help", self.history.read_text())
        import termios

        lflag = termios.tcgetattr(self.fd)[3]
        self.assertEqual(lflag & (termios.ECHO | termios.ICANON), termios.ECHO | termios.ICANON)

    def test_interruptFetch(self) -> None:
        """Ctrl-C during a fetch typed at the prompt exits 130, the line ended, no traceback."""
        self.expect(session.PROMPT.encode())
        self.type(b"slow.txt\r")
        self.expect(b"fetching slow.txt from")
        self.type(b"\x03")
        self.assertEqual(self.exitCode(), 130)
        self.drain()
        self.assertIn(b"p2p-fetch: interrupted", self.output)
        self.assertNotIn(b"Traceback", self.output)

    def test_eof(self) -> None:
        """Ctrl-D on an empty line ends the session as EOF does: exit 0."""
        self.expect(session.PROMPT.encode())
        self.type(b"\x04")
        self.assertEqual(self.exitCode(), 0)


if __name__ == "__main__":
    child()
