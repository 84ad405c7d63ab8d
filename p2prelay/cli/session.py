"""
One run of ``p2p-fetch`` as the :class:`Client`: the listings (``--peers``,
``--list``, ``--stats``), the fetches and where their contents go, the
interactive prompt, and the run's outcome as an exit status.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IReactorThreads

from .. import wire
from ..client.download import DestinationError, Download, VerificationError, destination
from ..client.fetcher import Fetched, Fetcher, NotFetched, RelayNotFound, RelayUnreachable
from ..client.outcomes import NoRelayReachable
from ..human import humanSize
from ..client.paths import via
from ..client.swarm import Interrupted, keptMessage
from .console import SNIFF, EOF, Console, looksBinary, splitNames, visible
from .options import EXIT_NOT_FETCHED, EXIT_OK, EXIT_RELAY, EXIT_SIGNAL, buildFetcher

BINARY = "binary output can mess up your terminal; use -o DIR, redirect, or -o - to force"
PROMPT = "file name (or quit)> "

HASH_CHUNK = 4 * 1024 * 1024


def _sha256File(path: Path) -> str:
    """A file's SHA-256 (run in a thread: hashlib lets go of the GIL on large reads)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _wholeCandidates(word: str, allowVerb: bool) -> List[str]:
    """The names a typed ``word`` holding a comma may be meant as whole (its verb dropped, or not)."""
    whole = word.strip()
    if "," not in whole:
        return []
    candidates = [whole]
    if allowVerb:
        verb, _, rest = whole.partition(" ")
        if verb.lower() in ("send", "get") and rest.strip():
            candidates.append(rest.strip())
    good = []
    for candidate in candidates:
        try:
            good.append(wire.checkName(candidate))
        except wire.ProtocolError:
            pass
    return good


class BinaryRefused(Exception):
    """A file's first bytes are not text, and stdout is a terminal."""


class Client:
    """
    One run of p2p-fetch: a fetcher, the terminal, and the outcomes.

    Without a ``fetcher``, the one :func:`buildFetcher` makes from the
    options is used.
    """

    def __init__(
        self, reactor, args: argparse.Namespace, console: Console, fetcher: Optional[Fetcher] = None
    ) -> None:
        self.args = args
        self.reactor = reactor
        self.console = console
        self.bars = self._bars()
        self.relayUnreachable = False
        self.relayNotFound = False
        self.failed = 0
        self.fetcher = fetcher if fetcher is not None else buildFetcher(reactor, args, self.err)
        if self.bars is not None:
            self.fetcher.onTransfer = self.bars.watch
        self.semaphore = DeferredSemaphore(args.parallel)
        # Ctrl-C: the signal's number, the work to cancel, what stays for a resume.
        self.interrupted: Optional[int] = None
        self.running: set[Deferred] = set()
        self.kept = 0
        self.total = 0

    def _bars(self):
        """
        Progress bars, when stderr is a terminal (and the contents are not
        printed to it, nor --quiet given), or with --progress.
        """
        args, console = self.args, self.console
        if getattr(args, "progress", False):
            wanted = True
        elif getattr(args, "quiet", False) or not console.stderrTTY:
            wanted = False
        else:
            wanted = bool(args.output) or not console.stdoutTTY
        if not wanted or args.peers or args.list is not None:
            return None
        from .progress import Bars

        return Bars(self.reactor, console.stderr)

    def err(self, text: str) -> None:
        """A line for the person at the terminal (on stderr), clear of the progress bars."""
        if self.bars is None:
            self.console.err(text)
        else:
            self.bars.message(lambda: self.console.err(text))

    def _barDone(self, name: str) -> None:
        if self.bars is not None:
            self.bars.done(name)

    def relayMessage(self, e: RelayUnreachable) -> str:
        """Why the relay could not be asked, as one phrase naming it."""
        if isinstance(e, RelayNotFound):
            return f"relay {e}"  # relay NAME:PORT: no such host
        if isinstance(e, NoRelayReachable):
            return str(e)  # no relay could be reached (a:8000: connection refused; ...)
        return f"relay {self.args.relay} unreachable: {e}"

    async def resolveNames(self, words: Sequence[str], allowVerb: bool = False) -> List[str]:
        """
        File names from what was typed: an argument that is exactly a name
        the relay knows (asked with WHOHAS, only for one holding a comma)
        is that name, never split; anything else is split on commas as
        :func:`splitNames` does (``Send a.txt, b.txt``).
        """
        names: List[str] = []
        for word in words:
            pieces = None
            for whole in _wholeCandidates(word, allowVerb):
                try:
                    known = await self.fetcher.holders(whole)
                except (RelayUnreachable, wire.ProtocolError):
                    break  # split it; fetching the pieces reports the relay's trouble
                if known:
                    pieces = [whole]
                    break
            for name in pieces if pieces is not None else splitNames([word], allowVerb=allowVerb):
                if name not in names:
                    names.append(name)
        return names

    def out(self, line: str) -> None:
        """A line of a listing on stdout, made visible."""
        self.console.line(line)

    def outJSON(self, record: dict) -> None:
        """A JSON record on stdout (json.dumps has escaped it already)."""
        self.console.rawLine(json.dumps(record))

    # Listings.

    async def listPeers(self) -> None:
        peers = await self.fetcher.peers()
        for p in peers:
            if self.args.json:
                self.outJSON(
                    {"host": p.host, "port": p.port, "udp": p.udp, "node": p.node, "reach": p.reach}
                )
            else:
                udp = f"  udp={p.udp}" if p.udp else ""
                # A firewalled peer's address takes no connections: say how it is reached.
                reach = f"  reach={p.reach}" if p.reach != wire.DIRECT else ""
                self.out(f"{visible(str(p))}  node={visible(p.node)}{udp}{reach}")
        if not self.args.json:
            self.err(f"{len(peers)} active peer(s)")

    async def showStats(self) -> None:
        """--stats: the relay's STATS figures, for people (sizes and uptime readable) or as JSON."""
        status = (await self.fetcher.ask(wire.request(wire.STATS))).status
        figures = {}
        for key in wire.STATS_FIELDS:
            try:
                figures[key] = int(status.get(key) or 0)
            except ValueError:
                raise wire.ProtocolError(wire.BAD_REQUEST, f"STATS {key}= is not a number") from None
        if self.args.json:
            self.outJSON(figures)
            return
        from ..human import plural

        days, rest = divmod(figures["uptime"], 86400)
        uptime = (f"{days} d " if days else "") + "{:d}:{:02d}:{:02d}".format(
            rest // 3600, rest // 60 % 60, rest % 60
        )
        self.out(f"peers    {figures['peers']}")
        self.out(f"files    {figures['files']} ({plural(figures['entries'], 'copy', 'copies')}, "
                 f"{humanSize(figures['bytes'])})")
        self.out(f"lookups  {figures['lookups']}")
        self.out(f"uptime   {uptime}")

    async def listFiles(self, pattern: str) -> None:
        files, truncated = await self.fetcher.search(pattern)
        rows = [(m.require("name"), m.integer("size"), m.integer("holders"), m.require("sha256")) for m in files]
        if self.args.json:
            for name, size, holders, sha in rows:
                self.outJSON({"name": name, "size": size, "holders": holders, "sha256": sha})
        else:
            # Escaped before the columns are measured, so they stay aligned.
            rows = [(visible(name), humanSize(size), holders, visible(sha)) for name, size, holders, sha in rows]
            width = max([len("NAME")] + [len(r[0]) for r in rows])
            swidth = max([len("SIZE")] + [len(str(r[1])) for r in rows])
            self.out(f"{'NAME':<{width}}  {'SIZE':>{swidth}}  HOLDERS  SHA256")
            for name, size, holders, sha in rows:
                self.out(f"{name:<{width}}  {size:>{swidth}}  {holders:>7}  {sha}")
        if truncated:
            self.err("(the list was truncated by the relay; narrow the pattern)")

    # Fetching.

    async def fetchOne(self, name: str, stream: bool = False) -> Optional[tuple[Fetched, Optional[Download]]]:
        """Fetch one file; report and count a failure instead of raising."""
        try:
            async with self.semaphore:
                try:
                    return await self._fetchOne(name, stream)
                finally:
                    self._barDone(name)
        except Interrupted as e:
            self.kept += e.kept
            self.total += e.total
        except CancelledError:
            pass  # interrupted before it began
        except RelayNotFound as e:
            # Said once for the run, not once per name.
            self.failed += 1
            self.relayUnreachable = True
            if not self.relayNotFound:
                self.relayNotFound = True
                self.err(f"p2p-fetch: {self.relayMessage(e)}")
            if self.args.json:
                self.outJSON({"name": name, "ok": False, "error": self.relayMessage(e), "attempts": []})
        except RelayUnreachable as e:
            self.relayUnreachable = True
            self._failure(name, self.relayMessage(e))
        except NotFetched as e:
            self._failure(name, e.why, e.attempts, prefix="" if getattr(e, "notIndexed", False) else "not fetched: ")
        except BinaryRefused as e:
            self._failure(name, str(e), prefix="")
        except (DestinationError, OSError, VerificationError) as e:
            self._failure(name, str(e))
        except wire.ProtocolError as e:
            self._failure(name, f"relay answered {e}")
        return None

    def _tempSink(self) -> Download:
        # Written on a thread of its own when the reactor can take calls from one.
        threads = self.reactor if IReactorThreads.providedBy(self.reactor) else None
        return Download(Path(tempfile.gettempdir()), threads)

    async def _fetchOne(self, name: str, stream: bool = False) -> tuple[Fetched, Optional[Download]]:
        """
        Save into -o DIR; or print, piece by piece as they verify when
        ``stream`` and the file has pieces; or fetch into a temporary file
        kept for printing.
        """
        if not self.args.output:
            if not stream:
                sink = self._tempSink()
                try:
                    return await self.fetcher.fetch(name, sink), sink
                except BaseException:
                    sink.discard()
                    raise
            writer = self.console.stream(refuseBinary=self.refusesBinary)
            try:
                outcome = await self.fetcher.stream(name, writer, self._tempSink)
            finally:
                writer.close()
            if writer.refused:
                raise BinaryRefused(BINARY)
            return outcome
        final = destination(Path(self.args.output), name)
        if final.exists() and not self.args.force:
            have = await self._alreadyHave(name, final)
            if have is None:
                raise DestinationError(f"{final} exists (use --force to replace it)")
            self.err(f"already have {name}, verified")
            if self.args.json:
                self.outJSON(self._record(have, saved=str(final), already=True))
            return have, None
        result = await self.fetcher.save(
            name, final, force=self.args.force, resume=not self.args.no_resume
        )
        self._barDone(name)
        source = result.peer if len(result.peers) < 2 else f"{len(result.peers)} peers"
        self.err(f"saved {name} ({humanSize(result.size)} from {source}{via(result.path)}) to {final}")
        if self.args.json:
            self.outJSON(self._record(result, saved=str(final)))
        return result, None

    async def _alreadyHave(self, name: str, final: Path) -> Optional[Fetched]:
        """
        ``final`` as a verified result when it has the size and SHA-256 the
        relay lists for ``name`` (hashed in a thread), else None.
        """
        holders = await self.fetcher.holders(name)
        try:
            size = final.stat().st_size
        except OSError:
            return None
        wanted = {p.sha256 for p in holders if p.listed is not None and p.size == size}
        if not final.is_file() or not wanted:
            return None
        started = self.reactor.seconds() if self.reactor is not None else 0.0
        if IReactorThreads.providedBy(self.reactor):
            from twisted.internet.threads import deferToThreadPool

            digest = await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), _sha256File, final)
        else:
            digest = _sha256File(final)
        if digest not in wanted:
            return None
        seconds = (self.reactor.seconds() - started) if self.reactor is not None else 0.0
        return Fetched(name, size, digest, "", [], seconds, path=None)

    def _record(self, result: Fetched, **extra: object) -> dict:
        return {
            "name": result.name,
            "ok": True,
            "size": result.size,
            "sha256": result.sha256,
            "peer": result.peer,
            # How the bytes came (issue 12's "path"): "direct", "reverse" or
            # "relay" (null: already there).  Where they went is "saved".
            "path": result.path,
            "attempts": [{"peer": a.peer, "error": a.error} for a in result.attempts],
            "seconds": round(result.seconds, 3),
            **extra,
        }

    @property
    def refusesBinary(self) -> bool:
        """Binary contents are refused: stdout is a terminal, and not named with -o -."""
        return self.console.stdoutTTY and not getattr(self.args, "stdout", False)

    def _failure(self, name: str, why: str, attempts: Sequence = (), prefix: str = "not fetched: ") -> None:
        self.failed += 1
        self.err(f"p2p-fetch: {name}: {prefix}{why}")
        if self.args.json:
            self.outJSON(
                {
                    "name": name,
                    "ok": False,
                    "error": why,
                    "attempts": [{"peer": a.peer, "error": a.error} for a in attempts],
                }
            )

    def _start(self, coroutine) -> Deferred:
        """Run ``coroutine``, cancelled should the run be interrupted."""
        d = Deferred.fromCoroutine(coroutine)
        if not d.called:
            self.running.add(d)
            d.addBoth(lambda result: (self.running.discard(d), result)[1])
        return d

    @staticmethod
    def _binary(sink: Download) -> bool:
        with sink.open() as f:
            return looksBinary(f.read(SNIFF))

    def interrupt(self, signum: int) -> None:
        """Ctrl-C (or SIGTERM): cancel what runs; what can be resumed is kept."""
        if self.interrupted is not None:
            return
        self.interrupted = signum
        for d in list(self.running):
            d.cancel()

    async def fetchAll(self, names: List[str]) -> None:
        """
        Fetch in parallel; print to stdout in the order asked.  One name
        alone is streamed (a file of pieces is printed as they verify);
        several are each fetched whole into a temporary file first.
        """
        stream = len(names) == 1 and not self.args.output
        try:
            results = await gatherResults([self._start(self.fetchOne(n, stream)) for n in names])
        finally:
            if self.bars is not None:
                self.bars.close()  # before the contents, and before the next prompt
        outcomes = [o for o in results if o is not None and o[1] is not None]
        try:
            for result, sink in outcomes:
                if self.interrupted is not None:
                    break
                if self.refusesBinary and self._binary(sink):
                    self._failure(result.name, BINARY, prefix="")
                    continue
                if len(names) > 1:
                    self.err(f"==> {result.name} <==")
                await self._start(self.console.send(sink.open()))
        except CancelledError:
            pass
        finally:
            for _, sink in outcomes:
                sink.discard()

    async def interact(self) -> None:
        from .prompt import lineReader  # readline on a terminal, else the console's lines

        reader = lineReader(self.reactor, self.console, self.fetcher)
        try:
            await self._interact(reader)
        finally:
            reader.close()

    async def _interact(self, reader) -> None:
        from .prompt import HELP, isHelp

        while self.interrupted is None:
            try:
                line = await self._start(reader.readLine(PROMPT))
            except CancelledError:
                self.err("")
                return
            if line is EOF:
                self.err("")
                return
            assert isinstance(line, str)
            if line.strip().lower() in ("quit", "exit", "q"):
                return
            if isHelp(line):
                self.err(HELP)
                continue
            try:
                names = await self._start(self.resolveNames([line], allowVerb=True))
            except CancelledError:
                return
            good = []
            for name in names:
                try:
                    good.append(wire.checkName(name))
                except wire.ProtocolError as e:
                    self._failure(name, e.message)
            if good:
                await self.fetchAll(good)

    def interruptedMessage(self) -> str:
        if not self.args.output:
            return "interrupted"
        return f"interrupted; {keptMessage(self.kept, self.total)}"

    def exitCode(self) -> int:
        if self.interrupted is not None:
            return EXIT_SIGNAL + self.interrupted
        if self.relayUnreachable:
            return EXIT_RELAY
        return EXIT_NOT_FETCHED if self.failed else EXIT_OK
