"""
``p2p-fetch``: the command-line client.

stdout carries only file contents (or the listing or JSON asked for);
everything meant for the person at the terminal goes to stderr.  Every
failure ends as a one-line message and an exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail, gatherResults
from twisted.internet.interfaces import IReactorThreads, IStreamClientEndpoint
from zope.interface import implementer

from .. import __version__, wire
from ..addresses import AddressError, NoSuchHost, checkClientAddress, clientEndpoint, relayAddress
from ..client.download import DestinationError, Download, VerificationError, destination
from ..client.relay import secretProver
from ..client.fetcher import (
    CONNECT_TIMEOUT,
    MAX_HOLDERS,
    PEER_TIMEOUT,
    SOURCES,
    SPEED_LIMIT,
    SPEED_TIME,
    Fetched,
    Fetcher,
    NotFetched,
    WALK,
    PeerAddress,
    RelayNotFound,
    RelayUnreachable,
)
from ..human import humanSize
from ..client.swarm import Interrupted, keptMessage
from .console import EOF, SNIFF, Console, looksBinary, splitNames, visible

EXIT_OK = 0
EXIT_NOT_FETCHED = 1
EXIT_USAGE = 2  # argparse exits with this status on usage errors
EXIT_RELAY = 3
EXIT_SIGNAL = 128  # + the signal's number: 130 after Ctrl-C (SIGINT), 143 after SIGTERM

# The UDP block sizes, as p2prelay.udp has them (test_cli_fetch checks): the
# UDP code is imported only by a fetch that uses it.
UDP_DEFAULT_BLOCK = 1400
UDP_MIN_BLOCK = 64
UDP_MAX_BLOCK = 60 * 1024

DEFAULT_RELAY = "localhost:8000"
RELAY_ENV = "P2PRELAY_RELAY"
BINARY = "binary output can mess up your terminal; use -o DIR, redirect, or -o - to force"
PROMPT = "file name (or quit)> "

EPILOG = """\
exit status:
  0  every file was fetched (or the listing was printed)
  1  some file could not be fetched (not found, every peer failed, exists)
  2  usage error
  3  the relay could not be reached
  130  interrupted (Ctrl-C; 143 after SIGTERM)

With one NAME and no -o, the verified file's bytes are written to stdout and
nothing else is; a file of several pieces is written piece by piece, each as
soon as it is verified (several NAMEs are each fetched whole first, and
printed in the order given). With no NAME, an interactive prompt (on stderr)
asks for names until EOF or 'quit'.

With -o, a file of several pieces is downloaded into NAME.part beside its
final name, with a journal of the verified pieces (NAME.part.journal); an
interrupted or failed download keeps both, and the next p2p-fetch -o of the
same name resumes with only the missing pieces (--no-resume starts over).
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2p-fetch",
        description="Fetch files from a p2prelay network: ask the relay who holds "
        "them, then download directly from the peers, failing over from one to the next.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="file names to fetch; a comma list such as 'a.txt, b.txt' works too",
    )
    p.add_argument(
        "--relay",
        default=os.environ.get(RELAY_ENV, DEFAULT_RELAY),
        help=f"relay as HOST:PORT or a client endpoint description "
        f"(default: ${RELAY_ENV}, else {DEFAULT_RELAY})",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="save files into DIR instead of printing; '-o -' prints to stdout even binary "
        "files to a terminal",
    )
    p.add_argument("--force", action="store_true", help="with -o, replace files that exist")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="with -o, ignore (and remove) what an interrupted download of the same file kept",
    )
    p.add_argument(
        "--sources",
        type=int,
        default=SOURCES,
        metavar="N",
        help=f"holders a file of several pieces is fetched from at once (default {SOURCES}; "
        "1: one peer at a time)",
    )
    p.add_argument(
        "--parallel", type=int, default=4, metavar="N", help="files fetched at once (default 4)"
    )
    p.add_argument("--peers", action="store_true", help="list the active peers and exit")
    p.add_argument(
        "--stats", action="store_true", help="print the relay's headline figures (STATS) and exit"
    )
    p.add_argument(
        "--list",
        nargs="?",
        const="",
        metavar="PATTERN",
        help="list the network's files (substring or glob such as '*.txt') and exit",
    )
    p.add_argument(
        "--json", action="store_true", help="machine-readable output: JSON lines on stdout"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=PEER_TIMEOUT,
        metavar="SECONDS",
        help=f"idle timeout of every connection, and the relay's connect timeout "
        f"(default {PEER_TIMEOUT:g})",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds to connect to a peer, and again for its first answer (default {CONNECT_TIMEOUT:g})",
    )
    p.add_argument(
        "--speed-limit",
        type=float,
        default=SPEED_LIMIT,
        metavar="BYTES_PER_S",
        help=f"abandon a peer sending slower than this for --speed-time seconds, as curl "
        f"(default {SPEED_LIMIT}; 0 turns it off)",
    )
    p.add_argument(
        "--speed-time",
        type=float,
        default=SPEED_TIME,
        metavar="SECONDS",
        help=f"see --speed-limit (default {SPEED_TIME:g})",
    )
    p.add_argument(
        "--max-holders",
        type=int,
        default=MAX_HOLDERS,
        metavar="N",
        help=f"peers contacted per file at most (default {MAX_HOLDERS})",
    )
    p.add_argument(
        "--walk",
        type=int,
        default=WALK,
        metavar="N",
        help=f"for a name the relay's index lists no holder of, ask at most N other active "
        f"peers (default {WALK}; 0: none)",
    )
    p.add_argument(
        "--secret-file",
        metavar="PATH",
        help="the shared secret of a private relay (one that asks clients to prove it)",
    )
    p.add_argument(
        "--udp", action="store_true", help="fetch over UDP instead of TCP (the relay stays on TCP)"
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="fetch only over TLS, from peers that offer it, checking each peer's key "
        "against the one the relay lists",
    )
    p.add_argument(
        "--relay-ca",
        metavar="FILE",
        help="CA certificates (PEM) to verify the relay with: --relay (HOST:PORT) is then "
        "reached over TLS",
    )
    p.add_argument(
        "--udp-block",
        type=int,
        default=None,
        metavar="BYTES",
        help=f"UDP block size (default {UDP_DEFAULT_BLOCK}, fits a 1500-byte Ethernet MTU, "
        f"or {UDP_MAX_BLOCK} towards a loopback address; up to {UDP_MAX_BLOCK} on "
        "jumbo-frame links)",
    )
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress",
        action="store_true",
        help="progress bars on stderr even when it is not a terminal (default: on a terminal, "
        "unless the file's contents are printed to that terminal)",
    )
    shown.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="narrate each phase on stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parseArgs(argv: Sequence[str]) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    args.words = list(args.names)  # as typed: a comma may be part of a name (see resolveNames)
    args.names = splitNames(args.names)
    # -o -: stdout, explicitly (binary contents to a terminal too).
    args.stdout = args.output == "-"
    if args.stdout:
        args.output = None
    if args.parallel < 1:
        p.error("--parallel must be at least 1")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    if args.connect_timeout <= 0:
        p.error("--connect-timeout must be positive")
    if args.speed_limit < 0:
        p.error("--speed-limit must not be negative")
    if args.speed_time <= 0:
        p.error("--speed-time must be positive")
    if args.max_holders < 1:
        p.error("--max-holders must be at least 1")
    if args.sources < 1:
        p.error("--sources must be at least 1")
    if args.walk < 0:
        p.error("--walk must not be negative")
    args.secret = None
    if args.secret_file:
        from ..identity import IdentityError, loadSecret

        try:
            args.secret = loadSecret(args.secret_file)
        except IdentityError as e:
            p.error(f"--secret-file: {e}")
    if args.udp_block is not None and not UDP_MIN_BLOCK <= args.udp_block <= UDP_MAX_BLOCK:
        p.error(f"--udp-block must be {UDP_MIN_BLOCK}..{UDP_MAX_BLOCK}")
    if args.tls and args.udp:
        p.error("--tls and --udp exclude each other")
    if args.relay_ca:
        from ..tls import TLSConfigError, loadCAFile  # imports OpenSSL: only for a TLS relay

        try:
            loadCAFile(args.relay_ca)
        except TLSConfigError as e:
            p.error(f"--relay-ca: {e}")
        try:
            address = relayAddress(args.relay.strip().removeprefix("tls:"))
        except AddressError as e:
            p.error(f"--relay: {e}")
        if isinstance(address, str):
            p.error("--relay: with --relay-ca, give the relay as a port, a host or HOST:PORT")
    if args.force and not args.output:
        p.error("--force only makes sense with -o DIR")
    if args.no_resume and not args.output:
        p.error("--no-resume only makes sense with -o DIR")
    if args.json and args.names and not args.output:
        p.error("--json with file names needs -o DIR (stdout carries the JSON)")
    if args.stats and (args.peers or args.list is not None or args.names):
        p.error("--stats takes no file names, --peers or --list")
    if args.peers and args.list is not None:
        p.error("--peers and --list exclude each other; ask for one at a time")
    if args.output is not None and args.output != "-" and Path(args.output).exists() and not Path(args.output).is_dir():
        p.error(f"-o: {args.output} is not a folder")
    if (args.peers or args.list is not None) and args.names:
        p.error("--peers and --list take no file names")
    try:
        checkClientAddress(args.relay)
    except AddressError as e:
        p.error(f"--relay: {e}")
    for name in args.names:
        try:
            wire.checkName(name)
        except wire.ProtocolError as e:
            p.error(f"{name!r}: {e.message}")
    return args


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


class NoTLS(Exception):
    """With --tls: the relay lists no TLS port (and key) for this peer."""


@implementer(IStreamClientEndpoint)
class _Refused:
    def connect(self, factory):
        return fail(NoTLS("offers no TLS"))


def tlsPeerEndpoint(reactor, timeout: float) -> Callable[[PeerAddress], object]:
    """
    --tls: a peer's TLS port, pinned to the key the relay lists for it; a
    peer listed without one is a failed attempt (and not reported dead).
    """
    from ..tls import pinnedTLSEndpoint

    def endpoint(peer: PeerAddress):
        if peer.tls is None or peer.key is None:
            return _Refused()
        return pinnedTLSEndpoint(reactor, peer.host, peer.tls, peer.key, timeout)

    return endpoint


def buildFetcher(
    reactor,
    args: argparse.Namespace,
    report: Callable[[str], None],
    *,
    relay=None,
    peerEndpoint: Optional[Callable[[PeerAddress], object]] = None,
) -> Fetcher:
    """
    The Fetcher the options ask for; failed attempts (and, with ``-v``,
    every phase) are told to ``report``.  ``relay`` and ``peerEndpoint``
    replace the endpoints made from ``--relay`` and the peers' addresses.
    """
    if relay is None:
        if getattr(args, "relay_ca", None):
            from ..tls import relayClientEndpoint

            host, port = relayAddress(args.relay.strip().removeprefix("tls:"))  # parseArgs checked it
            relay = relayClientEndpoint(reactor, host, port, args.relay_ca, args.timeout)
        else:
            relay = clientEndpoint(reactor, args.relay, timeout=args.timeout)
    if peerEndpoint is None and getattr(args, "tls", False):
        peerEndpoint = tlsPeerEndpoint(reactor, args.connect_timeout)
    fetcher = Fetcher(
        reactor,
        relay,
        timeout=args.timeout,
        report=report,
        verbose=report if args.verbose else (lambda line: None),
        peerEndpoint=peerEndpoint,
        connectTimeout=args.connect_timeout,
        speedLimit=args.speed_limit,
        speedTime=args.speed_time,
        maxHolders=args.max_holders,
        prover=secretProver(args.secret) if getattr(args, "secret", None) else None,
        sources=getattr(args, "sources", SOURCES),
        walk=getattr(args, "walk", WALK),
    )
    if args.udp:
        fetcher.transfer = functools.partial(fetcher.transferUDP, blockSize=args.udp_block)
    return fetcher


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
                self.outJSON({"host": p.host, "port": p.port, "udp": p.udp, "node": p.node})
            else:
                udp = f"  udp={p.udp}" if p.udp else ""
                self.out(f"{visible(str(p))}  node={visible(p.node)}{udp}")
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
                self.outJSON(self._record(have, path=str(final), already=True))
            return have, None
        result = await self.fetcher.save(
            name, final, force=self.args.force, resume=not self.args.no_resume
        )
        self._barDone(name)
        source = result.peer if len(result.peers) < 2 else f"{len(result.peers)} peers"
        self.err(f"saved {name} ({humanSize(result.size)} from {source}) to {final}")
        if self.args.json:
            self.outJSON(self._record(result, path=str(final)))
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
        return Fetched(name, size, digest, "", [], seconds)

    def _record(self, result: Fetched, **extra: object) -> dict:
        return {
            "name": result.name,
            "ok": True,
            "size": result.size,
            "sha256": result.sha256,
            "peer": result.peer,
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


async def run(
    reactor,
    args: argparse.Namespace,
    console: Optional[Console] = None,
    fetcher: Optional[Fetcher] = None,
    interrupt: Optional[Deferred] = None,
) -> int:
    """
    One p2p-fetch run of parsed ``args``; returns the exit status.

    ``console`` (the terminal) and ``fetcher`` (the network) default to the
    real ones; tests pass fakes.  When ``interrupt`` fires (with a signal's
    number), the run stops: downloads in progress are cancelled, what they
    verified stays for a resume (with -o), ``interrupted; N of M MiB kept
    for resume`` goes to stderr and the status is 128 + the number.
    """
    if console is None:
        interactive = not (args.names or args.peers or args.stats or args.list is not None)
        console = Console(reactor, interactive)
    client = Client(reactor, args, console, fetcher)  # parseArgs has checked --relay
    err = client.err
    if interrupt is not None:
        interrupt.addCallback(client.interrupt)
    try:
        if args.stats:
            await client.showStats()
        elif args.peers:
            await client.listPeers()
        elif args.list is not None:
            await client.listFiles(args.list)
        elif args.names:
            words = getattr(args, "words", args.names)
            names = await client.resolveNames(words) if any("," in w for w in words) else args.names
            await client.fetchAll(names)
        else:
            await client.interact()
    except RelayUnreachable as e:
        err(f"p2p-fetch: {client.relayMessage(e)}")
        client.relayUnreachable = True
    except wire.ProtocolError as e:
        err(f"p2p-fetch: relay answered {e}")
        client.failed += 1
    except CancelledError:
        pass  # interrupted while asking the relay
    finally:
        if client.bars is not None:
            client.bars.close()
        if client.interrupted is not None:
            err(f"p2p-fetch: {client.interruptedMessage()}")
        await console.close()
    return client.exitCode()


def needsTLS(args: argparse.Namespace) -> bool:
    """Whether this run may speak TLS: --tls, --relay-ca, or --relay as a description."""
    if args.tls or args.relay_ca:
        return True
    try:
        return isinstance(relayAddress(args.relay), str)
    except AddressError:
        return True


class _NoOpenSSL:
    """A ``sys.meta_path`` finder under which OpenSSL cannot be imported."""

    def find_spec(self, name: str, path=None, target=None):
        if name == "OpenSSL" or name.startswith("OpenSSL."):
            raise ModuleNotFoundError(f"{name} is left out of a plain TCP p2p-fetch", name=name)
        return None


def installReactor(tls: bool) -> None:
    """
    Import (and so install) the default reactor; without ``tls``, as if
    pyOpenSSL were not installed.

    Twisted's TCP transport and reactor import the whole TLS stack
    (pyOpenSSL, cryptography, service_identity) when they can, which was a
    third of a small fetch's run time; they work without it (Twisted
    supports installs that lack it), and a run that speaks no TLS never
    needs it.  Later imports of OpenSSL are not refused.
    """
    if tls or "twisted.internet.reactor" in sys.modules or "OpenSSL" in sys.modules:
        from twisted.internet import reactor  # noqa: F401

        return
    finder = _NoOpenSSL()
    sys.meta_path.insert(0, finder)
    try:
        from twisted.internet import reactor  # noqa: F401, F811
    finally:
        sys.meta_path.remove(finder)


def catchSignals(reactor, interrupt: Deferred) -> None:
    """
    SIGINT and SIGTERM fire ``interrupt`` with their number (in place of
    the reactor's own handlers, which would just stop it and have every
    transfer in flight fail as if its peer had).  A second one ends the
    process at once.
    """

    def fire(signum: int) -> None:
        if not interrupt.called:
            interrupt.callback(signum)

    def handler(signum: int, frame: object) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        reactor.callFromThread(fire, signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parseArgs(sys.argv[1:] if argv is None else argv)
    installReactor(needsTLS(args))

    async def start(reactor) -> None:
        interrupt: Deferred = Deferred()
        reactor.callWhenRunning(catchSignals, reactor, interrupt)
        code = await run(reactor, args, interrupt=interrupt)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: Deferred.fromCoroutine(start(reactor)))
