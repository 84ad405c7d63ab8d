"""
``p2p-peer``: one process that shares a folder and downloads into it.

The seeds' third design: a peer with a menu that is a server for other
peers while it is a client of others.  The node service, the menu and
every download share one reactor; nothing blocks it, so serving, several
downloads and typing at the menu all proceed at once.  A finished download
is announced to the relay immediately, making this peer a source for it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from .. import __version__, wire
from ..addresses import AddressError, checkClientAddress, clientEndpoint, serverDescription
from ..client.download import DestinationError, Download, destination
from ..client.fetcher import PEER_TIMEOUT, Fetcher, NotFetched, RelayUnreachable
from ..listening import ListenFailed, describeAddress
from ..node.service import NodeService
from ..node.upkeep import DEFAULT_RESCAN
from ..wire import FileEntry
from .console import EOF, Console, splitNames
from .fetch import DEFAULT_RELAY, RELAY_ENV

MENU = """\
  1) list the network's files     4) list my files
  2) search                       5) transfers in progress
  3) download file(s)             6) quit"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2p-peer",
        description="Share a folder with a p2prelay network and download into it, "
        "from a menu, while serving other peers.",
    )
    p.add_argument(
        "--relay",
        default=os.environ.get(RELAY_ENV, DEFAULT_RELAY),
        help=f"relay as HOST:PORT (default: ${RELAY_ENV}, else {DEFAULT_RELAY})",
    )
    p.add_argument("--dir", required=True, help="the folder to share and download into")
    p.add_argument("--port", default="tcp:0", help="where to serve (default: an OS-chosen port)")
    p.add_argument("--advertise", help="host to register (default: as the relay sees us)")
    p.add_argument("--heartbeat", type=float, help="seconds between heartbeats")
    p.add_argument("--rescan", type=float, default=DEFAULT_RESCAN, help="seconds between rescans")
    p.add_argument("--timeout", type=float, default=PEER_TIMEOUT, help="per-connection timeout")
    p.add_argument("--log", metavar="FILE", help="write the node's log to FILE (default: warnings on stderr)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


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
        self.console.stdio.write((text + "\n").encode("utf-8"))

    async def ask(self, question: str) -> Optional[str]:
        self.console.stdio.write(question.encode("utf-8"))
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
            if name in self.transfers:
                self.out(f"{name}: already downloading")
                continue
            d = Deferred.fromCoroutine(self._download(name))
            if not d.called:
                self.pending[name] = d
                d.addBoth(lambda _, n=name: self.pending.pop(n, None))

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


def startLogging(path: Optional[str]) -> None:
    if path:
        observer = textFileLogObserver(open(path, "a", encoding="utf-8"))
    else:
        observer = FilteringLogObserver(
            textFileLogObserver(sys.stderr),
            [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
        )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


async def run(reactor, args: argparse.Namespace) -> int:
    node = NodeService(
        reactor,
        relay=clientEndpoint(reactor, args.relay, timeout=args.timeout),
        directory=args.dir,
        description=args.port,
        advertise=args.advertise,
        heartbeat=args.heartbeat,
        rescan=args.rescan,
    )
    console = Console(reactor, interactive=True)
    node.startService()
    # Ctrl-C or SIGTERM stop the reactor; unregister on the way out.
    reactor.addSystemEventTrigger("before", "shutdown", node.stopService)
    try:
        await node.ready
    except ListenFailed as e:
        sys.stderr.write(f"p2p-peer: {e}\n")
        await node.stopService()
        await console.close()
        return 1
    port = node.listener.port
    ui = PeerConsole(
        reactor,
        node,
        console,
        Fetcher(
            reactor,
            clientEndpoint(reactor, args.relay, timeout=args.timeout),
            timeout=args.timeout,
            exclude=[node.node],
        ),
    )
    ui.out(
        f"p2p-peer: sharing {len(node.share.entries)} file(s) from {node.share.root} "
        f"on {describeAddress(port)}, relay {args.relay}"
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
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isdir(args.dir):
        p.error(f"--dir {args.dir}: not a directory")
    try:
        checkClientAddress(args.relay)
        args.port = serverDescription(args.port)
    except AddressError as e:
        p.error(str(e))
    args.dir = str(Path(args.dir).resolve())
    startLogging(args.log)

    async def start(reactor) -> None:
        code = await run(reactor, args)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: Deferred.fromCoroutine(start(reactor)))
