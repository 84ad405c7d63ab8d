"""
``p2p-peer``: one process that shares a folder and downloads into it.

The seeds' third design: a peer with a menu that is a server for other
peers while it is a client of others.  The node service, the menu and
every download share one reactor; nothing blocks it, so serving, several
downloads and typing at the menu all proceed at once.  A finished download
is announced to the relay immediately, making this peer a source for it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.internet.threads import deferToThread
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

from .. import __version__, wire
from ..client.download import DestinationError, Download, destination
from ..addresses import splitRelays
from ..client.fetcher import PEER_TIMEOUT, Fetcher, NotFetched, RelayUnreachable
from ..client.outcomes import NoRelayReachable
from ..client.paths import via
from ..client.relay import secretProver
from ..human import humanSize, plural
from ..listening import ListenFailed, describeAddress
from ..node.service import NodeService
from ..tap import NodeOptions, makeNodeService, relayEndpoint, seconds
from ..wire import FileEntry
from .console import EOF, Console, splitNames, visible, visibleLines
from .options import DEFAULT_RELAY, RELAY_ENV

EXIT_OK = 0
EXIT_CANNOT_START = 1
EXIT_USAGE = 2
EXIT_SIGNAL = 128  # + the signal's number: 130 after Ctrl-C (SIGINT), 143 after SIGTERM

MINE = "*"  # marks this peer's own files in the network's listing

MENU = """\
  1) list the network's files     4) list my files
  2) search                       5) transfers in progress
  3) download file(s)             6) quit"""

EPILOG = """
Quitting with downloads running asks whether to wait for them or cancel
them; Ctrl-C quits, and Ctrl-C again cancels the downloads.

Exit status:
  0    the menu was quit (6, or end of input)
  1    the node cannot start (its TCP or UDP port cannot be had)
  2    usage error
  130  interrupted (Ctrl-C; 143 after SIGTERM, which also cancels downloads)
"""


class PeerOptions(NodeOptions):
    """
    ``twistd peernode``'s options, plus what only the interactive peer
    needs; one definition, so the two commands cannot drift apart.
    """

    synopsis = "Usage: p2p-peer --dir DIR [--relay HOST:PORT] [options]"
    longdesc = (
        "Share a folder with a p2prelay network and download into it, from a menu, "
        "while serving other peers. Over UDP too, on the --port interface, unless --no-udp."
    )
    optParameters = [
        ["timeout", None, PEER_TIMEOUT, "Connect and idle timeout for every connection, "
         "in seconds.", seconds("timeout")],
        ["log", None, None, "Write the node's log to FILE (default: warnings on stderr)."],
    ]
    optFlags = [
        ["no-listen", None, "Downloads never accept connections, e.g. behind NAT: reach "
         "firewalled peers via the relay (default: ask a firewalled peer to connect back "
         "to an ephemeral port first)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["relay"] = self.defaults["relay"] = os.environ.get(RELAY_ENV, DEFAULT_RELAY)
        self.docs["relay"] = (
            f"The relay: PORT (on localhost), HOST (port 8000), HOST:PORT, [IPV6]:PORT "
            f"or a client endpoint description; several as a comma list (a.example:8000,"
            f"b.example:8000, at most 8), tried in order with failover by the node and its "
            f"downloads alike; ${RELAY_ENV} sets the default, else {DEFAULT_RELAY}."
        )
        # Options whose default is "none": say what that means.
        for option, default in (
            ("relay-ca", "plain TCP to the relay"),
            ("secret-file", "none, an open network"),
        ):
            if "default" not in self.docs.get(option, ""):
                self.docs[option] = f"{self.docs[option].rstrip('.')} (default: {default})."

    def opt_version(self) -> None:
        """Display the version and exit."""
        print(f"p2p-peer {__version__}")
        sys.exit(EXIT_OK)

    def opt_h(self) -> None:
        """Display this help and exit."""
        self.opt_help()

    def getUsage(self, width: Optional[int] = None) -> str:
        return super().getUsage(width) + EPILOG

    def postOptions(self) -> None:
        super().postOptions()
        self["dir"] = str(Path(self["dir"]).resolve())


def parseOptions(argv: Sequence[str]) -> PeerOptions:
    """The command line as options; a usage error exits 2 with one line."""
    options = PeerOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        sys.stderr.write(f"p2p-peer: {e}\nTry 'p2p-peer --help' for usage.\n")
        raise SystemExit(EXIT_USAGE) from None
    return options


class PeerConsole:
    """
    The menu, and the downloads it started.

    Lines that arrive while a question is open (a download finishing)
    are printed on a line of their own and the question asked again, so
    the prompt is always the last thing on the screen.  :meth:`interrupt`
    is Ctrl-C or SIGTERM: at the menu it quits; while quitting (or on
    SIGTERM) it cancels the downloads running.
    """

    def __init__(self, reactor, node: NodeService, console: Console, fetcher: Fetcher) -> None:
        self.reactor = reactor
        self.node = node
        self.console = console
        self.fetcher = fetcher
        self.transfers: Dict[str, Download] = {}
        self.pending: Dict[str, Deferred] = {}
        self.prompting: Optional[str] = None  # the question on screen, waiting for its answer
        self.interrupted: Optional[int] = None  # the first signal's number
        self.quitting = False
        self.cancelled = False
        self._reading: Optional[Deferred] = None
        self.endOfInput = False  # stdin is closed: every question is answered None at once

    def out(self, text: str = "") -> None:
        """A line of the menu or of a listing; what came from the network is made visible."""
        self.console.line(text)

    def note(self, text: str) -> None:
        """A line that may come while a question is open: printed, then the question again."""
        if self.prompting is None:
            self.out(text)
            return
        self.console.stdio.write(b"\n")
        self.out(text)
        self._showPrompt(self.prompting)

    def _showPrompt(self, question: str) -> None:
        self.console.stdio.write(visibleLines(question).encode("utf-8"))

    async def ask(self, question: str) -> Optional[str]:
        """The answer typed, or None at end of input or when interrupted."""
        if self.endOfInput:
            return None
        self.prompting = question
        self._showPrompt(question)
        self._reading = reading = Deferred.fromCoroutine(self.console.readLine())
        try:
            line = await reading
        except CancelledError:
            self.console.stdio.write(b"\n")  # the prompt's line is left unanswered
            return None
        finally:
            self.prompting = None
            self._reading = None
        if line is EOF:
            self.endOfInput = True
            return None
        return str(line).strip()

    def _stopAsking(self) -> None:
        if self._reading is not None:
            self._reading.cancel()

    async def loop(self) -> None:
        while self.interrupted is None:
            self.out(MENU)
            choice = await self.ask("choice> ")
            if choice is None or choice.lower() in ("6", "q", "quit", "exit"):
                return
            try:
                await self.dispatch(choice)
            except NoRelayReachable as e:
                self.out(str(e))  # names each relay and why
            except RelayUnreachable as e:
                self.out(f"relay unreachable: {e}")
            except wire.ProtocolError as e:
                self.out(f"relay answered {e}")

    async def dispatch(self, choice: str) -> None:
        if choice == "1":
            await self.listNetwork("")
        elif choice == "2":
            pattern = await self.ask("pattern (substring or glob)> ")
            if pattern is not None:
                await self.listNetwork(pattern)
        elif choice == "3":
            line = await self.ask("file name(s), comma separated> ")
            if line:
                await self.download(splitNames([line], allowVerb=True))
        elif choice == "4":
            self.listMine()
        elif choice == "5":
            self.listTransfers()
        elif choice:
            self.out(f"no such choice: {choice}")

    def table(self, rows: List[Sequence[str]], right: Sequence[int] = ()) -> None:
        """Rows of cells, each column as wide as its widest cell; columns in ``right`` flush right."""
        shown = [[visible(cell) for cell in row] for row in rows]
        widths = [max(len(row[i]) for row in shown) for i in range(len(shown[0]))] if shown else []
        for row in shown:
            cells = [
                cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                for i, cell in enumerate(row)
            ]
            self.out("  " + "  ".join(cells).rstrip())

    async def listNetwork(self, pattern: str) -> None:
        files, truncated = await self.fetcher.search(pattern)
        if not files:
            self.out("no files match")
            return
        mine = self.node.share.entries
        rows = [
            (
                f"{MINE if m.require('name') in mine else ' '} {m.require('name')}",
                humanSize(m.integer("size")),
                plural(m.integer("holders"), "holder"),
            )
            for m in files
        ]
        self.table(rows, right=(1, 2))
        notes = []
        if any(m.require("name") in mine for m in files):
            notes.append(f"{MINE} mine")
        if truncated:
            notes.append("truncated; narrow the pattern")
        if notes:
            self.out(f"  ({'; '.join(notes)})")

    def listMine(self) -> None:
        entries = sorted(self.node.share.entries.values(), key=lambda e: e.name)
        self.table([(entry.name, humanSize(entry.size)) for entry in entries], right=(1,))
        total = sum(entry.size for entry in entries)
        self.out(f"  {plural(len(entries), 'file')}, {humanSize(total)}, in {self.node.share.root}")

    def listTransfers(self) -> None:
        if not self.transfers:
            self.out("  no transfers in progress")
            return
        rows = []
        for name, sink in self.transfers.items():
            total = sink.expectedSize
            if total:
                rows.append((name, f"{humanSize(sink.received)} of {humanSize(total)}",
                             f"{100 * sink.received // total}%"))
            else:
                rows.append((name, "connecting", ""))
        self.table(rows, right=(1, 2))

    async def download(self, names: Sequence[str]) -> None:
        """
        Start downloads and return to the menu: a name that cannot be
        saved, or that the relay lists no holder for, is refused at once.
        """
        for name in names:
            if name in self.pending or name in self.transfers:
                self.out(f"{name}: already downloading")
                continue
            try:
                wire.checkName(name)
                final = destination(self.node.share.root, name)
                if final.exists():
                    raise DestinationError(f"{name} is already in {self.node.share.root}")
            except (wire.ProtocolError, DestinationError) as e:
                self.out(f"{name}: {getattr(e, 'message', e)}")
                continue
            if not await self.fetcher.holders(name):
                self.out(f"{name}: no peer holds it")
                continue
            self.out(f"{name}: downloading in the background")
            d = Deferred.fromCoroutine(self._download(name, final))
            if not d.called:
                self.pending[name] = d
                d.addBoth(self._finished, name)

    def _finished(self, result: object, name: str) -> object:
        # Pass the result on: returning the popped Deferred itself would
        # make it wait on itself, and quitting would hang.
        self.pending.pop(name, None)
        if self.quitting and not self.pending:
            self._stopAsking()  # "wait or cancel?" has nothing left to ask about
        return result

    async def _download(self, name: str, final: Path) -> None:
        try:
            result = await self.fetcher.save(
                name, final, onStart=lambda sink: self.transfers.__setitem__(name, sink)
            )
        except CancelledError:
            self.note(f"{name}: cancelled")
            return
        except (NotFetched, RelayUnreachable, DestinationError, OSError) as e:
            if self.cancelled:
                # A race of attempts may report its cancelled attempts as failures.
                self.note(f"{name}: cancelled")
                return
            why = e.why if isinstance(e, NotFetched) else str(e)
            self.note(f"{name}: not fetched: {why}")
            return
        finally:
            self.transfers.pop(name, None)
        st = final.stat()
        self.node.share.add(FileEntry(name, result.size, result.sha256, st.st_mtime_ns))
        if self.node.registrar is not None:
            self.node.registrar.registerSoon()
        self.note(f"{name}: done, {humanSize(result.size)} from {result.peer}{via(result.path)}; now shared")

    async def finish(self) -> None:
        """Quitting: wait for the downloads running, or cancel them, as the user says."""
        self.quitting = True
        while self.pending and not self.cancelled:
            count = plural(len(self.pending), "download")
            answer = await self.ask(f"{count} running; wait (w) or cancel (c)? ")
            if self.cancelled or not self.pending:
                break
            if answer is not None and answer.lower() in ("c", "cancel"):
                self.cancel()
            elif answer is None or answer.lower() in ("w", "wait", ""):
                self.out(f"waiting for {count} to finish (Ctrl-C cancels)...")
                break
            else:
                self.out(f"{answer}: answer w or c")
        for d in list(self.pending.values()):
            await d

    def cancel(self) -> None:
        """Cancel every download running; each says so and leaves nothing behind."""
        self.cancelled = True
        for d in list(self.pending.values()):
            d.cancel()

    def interrupt(self, signum: int) -> None:
        """Ctrl-C (SIGINT) or SIGTERM: quit; while quitting, or on SIGTERM, cancel the downloads."""
        if self.interrupted is None:
            self.interrupted = signum
        if self.quitting or signum != signal.SIGINT:
            self.cancel()
        self.quitting = True
        self._stopAsking()

    def exitCode(self) -> int:
        return EXIT_OK if self.interrupted is None else EXIT_SIGNAL + self.interrupted


class VisibleStderr:
    """stderr for the log: each line made :func:`visible` (log events quote the network)."""

    def write(self, text: str) -> None:
        sys.stderr.write(visibleLines(text))

    def flush(self) -> None:
        sys.stderr.flush()


def startLogging(path: Optional[str]) -> None:
    if path:
        observer = textFileLogObserver(open(path, "a", encoding="utf-8"))
    else:
        observer = FilteringLogObserver(
            textFileLogObserver(VisibleStderr()),
            [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
        )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


async def run(
    reactor,
    config: PeerOptions,
    console: Optional[Console] = None,
    fetcher: Optional[Fetcher] = None,
    runInThread=deferToThread,
    signals: Optional[DeferredQueue] = None,
) -> int:
    """
    Start the node, run the menu until it is quit, stop the node.

    ``console`` and ``fetcher`` default to the terminal and to a real
    fetcher asking the relay; tests pass fakes.  Each signal number put
    in ``signals`` (main puts SIGINT and SIGTERM there) interrupts the menu.
    """
    node: NodeService = makeNodeService(
        config, reactor, relayTimeout=config["timeout"], runInThread=runInThread
    )
    if console is None:
        console = Console(reactor, interactive=True)
    node.startService()
    # Ctrl-C or SIGTERM stop the reactor; unregister on the way out.
    reactor.addSystemEventTrigger("before", "shutdown", node.stopService)
    try:
        await node.ready
    except Exception as e:
        why = str(e) if isinstance(e, ListenFailed) else f"cannot start: {e}"
        console.err(f"p2p-peer: {why}")
        await node.stopService()
        await console.close()
        return EXIT_CANNOT_START
    if fetcher is None:
        secret = config.get("secret")
        fetcher = Fetcher(
            reactor,
            # The node's own (over TLS with --relay-ca): with several relays,
            # downloads start at the one the node last reached.
            getattr(node, "relay", None) or relayEndpoint(reactor, config, config["timeout"]),
            timeout=config["timeout"],
            exclude=[node.node],
            prover=secretProver(secret) if secret else None,
            listen=not config.get("no-listen"),
        )
    ui = PeerConsole(reactor, node, console, fetcher)
    watching = Deferred.fromCoroutine(_deliver(signals, ui)) if signals is not None else None
    ui.out(
        f"p2p-peer: sharing {plural(len(node.share.entries), 'file')} from {node.share.root} "
        f"on {describeAddress(node.listener.port)}, "
        + (f"relays {', '.join(splitRelays(config['relay']))}" if "," in config["relay"] else f"relay {config['relay']}")
    )
    try:
        await ui.loop()
        await ui.finish()
    finally:
        if watching is not None:
            watching.cancel()
        await node.stopService()
        ui.out("bye")
        await console.close()
    return ui.exitCode()


async def _deliver(signals: DeferredQueue, ui: PeerConsole) -> None:
    try:
        while True:
            ui.interrupt(await signals.get())
    except CancelledError:
        pass


def catchSignals(reactor, signals: DeferredQueue) -> None:
    """
    SIGINT and SIGTERM go into ``signals`` (in place of the reactor's own
    handlers, which would stop it with every download in flight); once the
    downloads have been cancelled, one more ends the process at once.
    """

    def handler(signum: int, frame: object) -> None:
        reactor.callFromThread(signals.put, signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


def main(argv: Optional[Sequence[str]] = None) -> None:
    config = parseOptions(sys.argv[1:] if argv is None else argv)
    startLogging(config["log"])

    async def start(reactor) -> None:
        signals: DeferredQueue = DeferredQueue()
        # After the reactor's own handlers are installed, to replace them.
        reactor.callWhenRunning(catchSignals, reactor, signals)
        code = await run(reactor, config, signals=signals)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: Deferred.fromCoroutine(start(reactor)))
