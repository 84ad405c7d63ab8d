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
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from twisted.internet import task
from twisted.internet.defer import Deferred
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
from ..client.fetcher import PEER_TIMEOUT, Fetcher, NotFetched, RelayUnreachable
from ..client.relay import secretProver
from ..listening import ListenFailed, describeAddress
from ..node.service import NodeService
from ..tap import NodeOptions, makeNodeService, relayEndpoint, seconds
from ..wire import FileEntry
from .console import EOF, Console, splitNames, visibleLines
from .fetch import DEFAULT_RELAY, RELAY_ENV

EXIT_OK = 0
EXIT_CANNOT_START = 1
EXIT_USAGE = 2

MENU = """\
  1) list the network's files     4) list my files
  2) search                       5) transfers in progress
  3) download file(s)             6) quit"""

EPILOG = """
Exit status:
  0  the menu was quit (6, or end of input)
  1  the node cannot start (its TCP or UDP port cannot be had)
  2  usage error
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

    def __init__(self) -> None:
        super().__init__()
        self["relay"] = self.defaults["relay"] = os.environ.get(RELAY_ENV, DEFAULT_RELAY)
        self.docs["relay"] = (
            f"The relay: HOST:PORT or a client endpoint description; "
            f"${RELAY_ENV} sets the default, else {DEFAULT_RELAY}."
        )

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
    """The menu, and the downloads it started."""

    def __init__(self, reactor, node: NodeService, console: Console, fetcher: Fetcher) -> None:
        self.reactor = reactor
        self.node = node
        self.console = console
        self.fetcher = fetcher
        self.transfers: Dict[str, Download] = {}
        self.pending: Dict[str, Deferred] = {}

    def out(self, text: str = "") -> None:
        """A line of the menu or of a listing; what came from the network is made visible."""
        self.console.line(text)

    async def ask(self, question: str) -> Optional[str]:
        self.console.stdio.write(visibleLines(question).encode("utf-8"))
        line = await self.console.readLine()
        return None if line is EOF else str(line).strip()

    async def loop(self) -> None:
        while True:
            self.out(MENU)
            choice = await self.ask("choice> ")
            if choice is None or choice.lower() in ("6", "q", "quit", "exit"):
                return
            try:
                await self.dispatch(choice)
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
                self.download(splitNames([line], allowVerb=True))
        elif choice == "4":
            self.listMine()
        elif choice == "5":
            self.listTransfers()
        elif choice:
            self.out(f"no such choice: {choice}")

    async def listNetwork(self, pattern: str) -> None:
        files, truncated = await self.fetcher.search(pattern)
        if not files:
            self.out("no files match")
        for m in files:
            self.out(f"  {m.require('name')}  {m.integer('size')} bytes  {m.integer('holders')} holder(s)")
        if truncated:
            self.out("  (truncated; narrow the pattern)")

    def listMine(self) -> None:
        entries = sorted(self.node.share.entries.values(), key=lambda e: e.name)
        for entry in entries:
            self.out(f"  {entry.name}  {entry.size} bytes")
        self.out(f"  {len(entries)} file(s) in {self.node.share.root}")

    def listTransfers(self) -> None:
        if not self.transfers:
            self.out("  no transfers in progress")
        for name, sink in self.transfers.items():
            total = sink.expectedSize
            progress = f"{sink.received}/{total} bytes" if total else "connecting"
            self.out(f"  {name}: {progress}")

    def download(self, names: Sequence[str]) -> None:
        """Start downloads and return to the menu at once."""
        for name in names:
            if name in self.pending or name in self.transfers:
                self.out(f"{name}: already downloading")
                continue
            d = Deferred.fromCoroutine(self._download(name))
            if not d.called:
                self.pending[name] = d
                d.addBoth(self._finished, name)

    def _finished(self, result: object, name: str) -> object:
        # Pass the result on: returning the popped Deferred itself would
        # make it wait on itself, and quitting would hang.
        self.pending.pop(name, None)
        return result

    async def _download(self, name: str) -> None:
        try:
            wire.checkName(name)
            final = destination(self.node.share.root, name)
            if final.exists():
                raise DestinationError(f"{name} is already in {self.node.share.root}")
        except (wire.ProtocolError, DestinationError) as e:
            self.out(f"{name}: {getattr(e, 'message', e)}")
            return
        self.out(f"{name}: downloading in the background")
        try:
            result = await self.fetcher.save(
                name, final, onStart=lambda sink: self.transfers.__setitem__(name, sink)
            )
        except (NotFetched, RelayUnreachable, DestinationError, OSError) as e:
            why = e.why if isinstance(e, NotFetched) else str(e)
            self.out(f"{name}: not fetched: {why}")
            return
        finally:
            self.transfers.pop(name, None)
        st = final.stat()
        self.node.share.add(FileEntry(name, result.size, result.sha256, st.st_mtime_ns))
        if self.node.registrar is not None:
            self.node.registrar.registerSoon()
        self.out(f"{name}: done, {result.size} bytes from {result.peer}; now shared")


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
) -> int:
    """
    Start the node, run the menu until it is quit, stop the node.

    ``console`` and ``fetcher`` default to the terminal and to a real
    fetcher asking the relay; tests pass fakes.
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
            relayEndpoint(reactor, config, config["timeout"]),  # over TLS with --relay-ca
            timeout=config["timeout"],
            exclude=[node.node],
            prover=secretProver(secret) if secret else None,
        )
    ui = PeerConsole(reactor, node, console, fetcher)
    ui.out(
        f"p2p-peer: sharing {len(node.share.entries)} file(s) from {node.share.root} "
        f"on {describeAddress(node.listener.port)}, relay {config['relay']}"
    )
    try:
        await ui.loop()
        if ui.pending:
            ui.out(f"waiting for {len(ui.pending)} download(s) to finish...")
            for d in list(ui.pending.values()):
                await d
    finally:
        await node.stopService()
        ui.out("bye")
        await console.close()
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> None:
    config = parseOptions(sys.argv[1:] if argv is None else argv)
    startLogging(config["log"])

    async def start(reactor) -> None:
        code = await run(reactor, config)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: Deferred.fromCoroutine(start(reactor)))
