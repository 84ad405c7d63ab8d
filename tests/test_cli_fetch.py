"""
``p2p-fetch`` in process: its options, exit statuses, what goes to stdout
and what to stderr, ``-o``/``--force``, the listings and the interactive
prompt -- ``run()`` driven with a fake terminal and a fake fetcher, or a
real Fetcher talking in memory to a real relay and real file servers.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import attrs

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, Cooperator
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import udp, wire
from p2prelay.cli import fetch, options, session
from p2prelay.cli import progress as fetch_progress
from p2prelay.cli.fetch import parseArgs, run
from p2prelay.cli.options import EXIT_NOT_FETCHED, EXIT_OK, EXIT_RELAY, EXIT_USAGE, buildFetcher
from p2prelay.client.fetcher import (
    PEER_TIMEOUT,
    Attempt,
    Fetched,
    Fetcher,
    NotFetched,
    PeerAddress,
    RelayUnreachable,
)
from p2prelay.node.server import FileServerFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.wire import FileEntry

from .support import FakeTerminal, MemoryNetwork, drive, sha, syncThread
from .test_fetch import FakeRelay

RELAY = "127.0.0.1:8000"
PEER = "127.0.0.1:5001"
A = b"alpha\n"
B = b"bravo bravo\n"


def fileItem(name: str, size: int, holders: int = 1) -> wire.Message:
    return wire.Message(
        wire.FILE, {"name": name, "size": str(size), "holders": str(holders), "sha256": "a" * 64}
    )


@attrs.define
class FakeTransfer:
    """A download as the progress bars see it; a test moves ``received``."""

    name: str
    total: Optional[int]
    received: int = 0
    peers: List[str] = attrs.field(factory=lambda: [PEER])


class FakeFetcher:
    """
    The network side of p2p-fetch, scripted: the files it delivers, the
    peers and files it lists, the exceptions it raises (by file name, or
    ``"peers"`` / ``"search"``), and, with ``gate(name)``, when it delivers.
    Its ``save`` is the real one, over this fetch.
    """

    reactor = None  # so the real save() writes its Download in this thread
    save = Fetcher.save
    stream = Fetcher.stream
    transfer = None
    sources = 4

    def __init__(
        self,
        files: Optional[Dict[str, bytes]] = None,
        peers: Sequence[PeerAddress] = (),
        listing: Sequence[wire.Message] = (),
        truncated: bool = False,
        errors: Optional[Dict[str, Exception]] = None,
        index: Optional[Dict[str, bytes]] = None,
    ) -> None:
        self.files = dict(files or {})
        # What the relay's index lists (one holder each), by name.
        self.index = dict(index or {})
        self.peerList = list(peers)
        self.listing = list(listing)
        self.truncated = truncated
        self.errors = dict(errors or {})
        self.gates: Dict[str, Deferred] = {}
        self.asked: List[tuple] = []
        self.inFlight = 0
        self.mostInFlight = 0
        self.transfers: Dict[str, FakeTransfer] = {}
        self.path = wire.DIRECT  # the path every file comes by

    @staticmethod
    def onTransfer(transfer) -> None:
        """Replaced by p2p-fetch when it shows progress."""

    def gate(self, name: str) -> Deferred:
        """Hold back ``name`` until the returned Deferred fires."""
        self.gates[name] = Deferred()
        return self.gates[name]

    async def peers(self) -> List[PeerAddress]:
        self.asked.append(("peers",))
        if "peers" in self.errors:
            raise self.errors["peers"]
        return self.peerList

    async def search(self, pattern: str, limit=None):
        self.asked.append(("search", pattern))
        if "search" in self.errors:
            raise self.errors["search"]
        return self.listing, self.truncated

    async def holders(self, name: str) -> List[PeerAddress]:
        """
        The holder ``index`` lists, without a root (save() and stream() go
        the single-source way, to fetch()); nobody for other names.
        """
        self.asked.append(("whohas", name))
        if name not in self.index:
            return []
        data = self.index[name]
        return [PeerAddress("127.0.0.1", 5001, "n1", size=len(data), sha256=sha(data))]

    async def fetch(self, name: str, sink, holders=None) -> Fetched:
        self.asked.append(("fetch", name))
        self.inFlight += 1
        self.mostInFlight = max(self.mostInFlight, self.inFlight)
        try:
            known = self.files.get(name)
            self.transfers[name] = FakeTransfer(name, len(known) if known is not None else None)
            self.onTransfer(self.transfers[name])
            if name in self.gates:
                await self.gates[name]
            if name in self.errors:
                raise self.errors[name]
            if name not in self.files:
                raise NotFetched(name, [Attempt(PEER, "404 no such file in this share")])
            data = self.files[name]
            sink.expect(len(data), sha(data))
            sink.write(data)
            sink.verify()
            return Fetched(name, len(data), sha(data), PEER, [], 0.25, path=self.path)
        finally:
            self.inFlight -= 1


class CommandTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.terminal = FakeTerminal()
        self.scratch = Path(self.mktemp()).absolute()
        self.scratch.mkdir()
        # Contents printed to stdout wait in temporary files: keep them here.
        self.temp = self.scratch / "tmp"
        self.temp.mkdir()
        self.patch(tempfile, "tempdir", str(self.temp))

    def start(self, argv: Sequence[str], fetcher, reactor=None) -> Deferred:
        args = parseArgs(["--relay", RELAY, *argv])
        return Deferred.fromCoroutine(run(reactor or Clock(), args, self.terminal.console, fetcher))

    def p2pFetch(self, argv: Sequence[str], fetcher) -> int:
        """Run p2p-fetch ARGV to its end; its exit status."""
        return self.successResultOf(self.start(argv, fetcher))

    def assertQuiet(self) -> None:
        self.assertEqual(self.terminal.stderr, "")

    def leftovers(self) -> List[str]:
        return [p.name for p in self.temp.iterdir()]


class ParseArgsTests(SynchronousTestCase):
    """
    Options: what is accepted, and every usage error exits 2 with a message
    naming the problem.
    """

    def usageError(self, argv: Sequence[str]) -> str:
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            e = self.assertRaises(SystemExit, parseArgs, argv)
        self.assertEqual(e.code, EXIT_USAGE)
        return stderr.getvalue()

    def test_defaults(self) -> None:
        """With no options: no names, four at a time, TCP, the default timeout and block."""
        self.patch(os, "environ", {})
        args = parseArgs([])
        self.assertEqual(
            (args.names, args.relay, args.parallel, args.timeout, args.udp, args.udp_block, args.output),
            ([], options.DEFAULT_RELAY, 4, PEER_TIMEOUT, False, None, None),  # block: fetchUDP's
        )

    def test_relayFromEnvironment(self) -> None:
        """$P2PRELAY_RELAY is the default relay; --relay overrides it."""
        self.patch(os, "environ", {options.RELAY_ENV: "relay.example:9000"})
        self.assertEqual(parseArgs([]).relay, "relay.example:9000")
        self.assertEqual(parseArgs(["--relay", "other:1"]).relay, "other:1")

    def test_namesSplit(self) -> None:
        """Names may be separate words and comma lists; duplicates go."""
        args = parseArgs(["a.txt, b.txt", "c.txt", "a.txt"])
        self.assertEqual(args.names, ["a.txt", "b.txt", "c.txt"])

    def test_listPatternOptional(self) -> None:
        """--list alone lists everything; --list PATTERN narrows it."""
        self.assertEqual(parseArgs(["--list"]).list, "")
        self.assertEqual(parseArgs(["--list", "*.txt"]).list, "*.txt")
        self.assertIsNone(parseArgs([]).list)

    def test_jsonWithOutput(self) -> None:
        """--json with names is fine once -o takes the files off stdout."""
        args = parseArgs(["--json", "-o", "out", "a.txt"])
        self.assertEqual((args.json, args.output, args.names), (True, "out", ["a.txt"]))

    def test_version(self) -> None:
        """--version prints the version on stdout and exits 0."""
        stdout = io.StringIO()
        with redirect_stdout(stdout):
            e = self.assertRaises(SystemExit, parseArgs, ["--version"])
        self.assertEqual(e.code, 0)
        self.assertRegex(stdout.getvalue(), r"^p2p-fetch \d+\.\d+")

    def test_unknownOption(self) -> None:
        """An unknown option is a usage error."""
        self.assertIn("unrecognized arguments: --frobnicate", self.usageError(["--frobnicate"]))

    def test_parallelAtLeastOne(self) -> None:
        """--parallel 0 is a usage error."""
        self.assertIn("--parallel must be at least 1", self.usageError(["--parallel", "0", "x"]))

    def test_parallelNumber(self) -> None:
        """--parallel takes a whole number."""
        self.assertIn("--parallel", self.usageError(["--parallel", "many", "x"]))

    def test_timeoutPositive(self) -> None:
        """A zero or negative --timeout is a usage error."""
        self.assertIn("--timeout must be positive", self.usageError(["--timeout", "0", "x"]))
        self.assertIn("--timeout must be positive", self.usageError(["--timeout", "-5", "x"]))

    def test_udpBlockRange(self) -> None:
        """--udp-block outside the supported sizes is a usage error."""
        for size in (udp.MIN_BLOCK - 1, udp.MAX_BLOCK + 1):
            self.assertIn(
                f"--udp-block must be {udp.MIN_BLOCK}..{udp.MAX_BLOCK}",
                self.usageError(["--udp-block", str(size), "x"]),
            )

    def test_sourcesDefault(self) -> None:
        """--sources is 4 unless given, reaches the fetcher, and must be at least 1."""
        self.assertEqual(parseArgs(["x"]).sources, 4)
        args = parseArgs(["--relay", RELAY, "--sources", "1", "x"])
        self.assertEqual(buildFetcher(Clock(), args, lambda line: None).sources, 1)
        self.assertIn("--sources must be at least 1", self.usageError(["--sources", "0", "x"]))

    def test_noResumeNeedsOutput(self) -> None:
        """--no-resume without -o is a usage error."""
        self.assertIn("--no-resume only makes sense with -o DIR", self.usageError(["--no-resume", "x"]))
        self.assertTrue(parseArgs(["--no-resume", "-o", "out", "x"]).no_resume)

    def test_forceNeedsOutput(self) -> None:
        """--force without -o is a usage error."""
        self.assertIn("--force only makes sense with -o DIR", self.usageError(["--force", "x"]))

    def test_jsonNamesNeedOutput(self) -> None:
        """--json with file names and no -o is a usage error: stdout carries the JSON."""
        self.assertIn("--json with file names needs -o DIR", self.usageError(["--json", "x"]))

    def test_listingsTakeNoNames(self) -> None:
        """--peers and --list refuse file names."""
        self.assertIn("--peers and --list take no file names", self.usageError(["--peers", "x"]))
        self.assertIn("--peers and --list take no file names", self.usageError(["--list", "*", "x"]))

    def test_peersAndList(self) -> None:
        """--peers and --list together are a usage error, not one of them silently."""
        self.assertIn("--peers and --list exclude each other", self.usageError(["--peers", "--list"]))

    def test_relayBarePortNoTLS(self) -> None:
        """--relay 8001 (localhost:8001) is plain TCP: the run does not load the TLS stack."""
        self.assertFalse(fetch.needsTLS(parseArgs(["--relay", "8001", "x"])))
        self.assertFalse(fetch.needsTLS(parseArgs(["--relay", "relay.example", "x"])))
        self.assertTrue(fetch.needsTLS(parseArgs(["--relay", "tcp:host=h:port=1", "x"])))

    def test_relayBarePortWithCA(self) -> None:
        """--relay 8001 --relay-ca FILE is accepted and reaches localhost:8001 over TLS."""
        from p2prelay import tls

        made = []
        self.patch(tls, "loadCAFile", lambda path: None)
        self.patch(tls, "relayClientEndpoint", lambda reactor, host, port, ca, timeout: made.append((host, port, ca)))
        args = parseArgs(["--relay", "8001", "--relay-ca", "ca.pem", "x"])
        self.assertTrue(fetch.needsTLS(args))
        buildFetcher(Clock(), args, lambda line: None)
        self.assertEqual(made, [("localhost", 8001, "ca.pem")])

    def test_badRelay(self) -> None:
        """A --relay that is no address is a usage error naming --relay."""
        self.assertIn("--relay:", self.usageError(["--relay", "no port here", "x"]))

    def test_badName(self) -> None:
        """A name that could escape the share is refused before anything runs."""
        self.assertIn("'../x'", self.usageError(["../x"]))

    def test_mainExitsTwo(self) -> None:
        """main() with a usage error exits 2 before starting a reactor."""
        with redirect_stderr(io.StringIO()):
            e = self.assertRaises(SystemExit, fetch.main, ["--parallel", "0", "x"])
        self.assertEqual(e.code, EXIT_USAGE)


class FetchToStdoutTests(CommandTestCase):
    """
    With names and no -o, verified bytes go to stdout and nothing else does.
    """

    def test_onePrinted(self) -> None:
        """One name: its bytes exactly on stdout, nothing on stderr, exit 0."""
        code = self.p2pFetch(["a.txt"], FakeFetcher({"a.txt": A}))
        self.assertEqual((code, self.terminal.stdout), (EXIT_OK, A))
        self.assertQuiet()

    def test_binaryExact(self) -> None:
        """Every byte value, over several stdout chunks, arrives unchanged."""
        data = bytes(range(256)) * 3000
        code = self.p2pFetch(["blob.bin"], FakeFetcher({"blob.bin": data}))
        self.assertEqual((code, self.terminal.stdout), (EXIT_OK, data))

    def test_severalInOrderAsked(self) -> None:
        """Several names print in the order asked, whichever arrives first; a header each on stderr."""
        fetcher = FakeFetcher({"a.txt": A, "b.txt": B})
        gate = fetcher.gate("a.txt")
        d = self.start(["a.txt", "b.txt"], fetcher)
        self.assertEqual(self.terminal.stdout, b"")
        gate.callback(None)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stdout, A + B)
        self.assertEqual(self.terminal.stderr, "==> a.txt <==\n==> b.txt <==\n")

    def test_parallelLimit(self) -> None:
        """--parallel N keeps at most N fetches in flight."""
        fetcher = FakeFetcher({n: A for n in "abcde"})
        gates = [fetcher.gate(n) for n in "abcde"]
        d = self.start(["--parallel", "2", *"abcde"], fetcher)
        self.assertEqual(fetcher.asked, [("fetch", "a"), ("fetch", "b")])
        for gate in gates:
            gate.callback(None)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(fetcher.mostInFlight, 2)
        self.assertEqual(self.terminal.stdout, A * 5)

    def test_notFetched(self) -> None:
        """A file nobody delivers: exit 1, one line saying why, nothing on stdout."""
        code = self.p2pFetch(["nope.txt"], FakeFetcher())
        self.assertEqual((code, self.terminal.stdout), (EXIT_NOT_FETCHED, b""))
        self.assertEqual(
            self.terminal.stderr, "p2p-fetch: nope.txt: not fetched: not found on any of the 1 active peers\n"
        )

    def test_othersStillPrinted(self) -> None:
        """One missing file among others: the others print, exit 1."""
        code = self.p2pFetch(["a.txt", "nope.txt", "b.txt"], FakeFetcher({"a.txt": A, "b.txt": B}))
        self.assertEqual((code, self.terminal.stdout), (EXIT_NOT_FETCHED, A + B))
        self.assertIn("p2p-fetch: nope.txt: not fetched", self.terminal.stderr)

    def test_relayUnreachable(self) -> None:
        """A relay that cannot be reached: exit 3, one line naming the relay."""
        code = self.p2pFetch(["a.txt"], FakeFetcher(errors={"a.txt": RelayUnreachable("connection refused")}))
        self.assertEqual((code, self.terminal.stdout), (EXIT_RELAY, b""))
        self.assertEqual(
            self.terminal.stderr,
            f"p2p-fetch: a.txt: not fetched: relay {RELAY} unreachable: connection refused\n",
        )

    def test_relayNoSuchHost(self) -> None:
        """A relay host that does not exist: exit 3, 'relay NAME:PORT: no such host', said once."""
        import socket

        from twisted.internet.defer import fail

        from p2prelay.addresses import TCPClient

        clock = Clock()

        def resolve(host, port):
            return fail(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

        args = parseArgs(["--relay", "nowhere.example:8001", "a.txt", "b.txt"])
        relay = TCPClient(clock, "nowhere.example", 8001, resolve=resolve)
        fetcher = buildFetcher(clock, args, self.terminal.console.err, relay=relay)
        code = self.successResultOf(Deferred.fromCoroutine(run(clock, args, self.terminal.console, fetcher)))
        self.assertEqual((code, self.terminal.stdout), (EXIT_RELAY, b""))
        self.assertEqual(self.terminal.stderr, "p2p-fetch: relay nowhere.example:8001: no such host\n")

    def test_relayError(self) -> None:
        """A relay answering an error status: exit 1, its status on the line."""
        error = wire.ProtocolError(500, "internal error")
        code = self.p2pFetch(["a.txt"], FakeFetcher(errors={"a.txt": error}))
        self.assertEqual(code, EXIT_NOT_FETCHED)
        self.assertEqual(self.terminal.stderr, "p2p-fetch: a.txt: not fetched: relay answered 500 internal error\n")

    def test_noTemporaryLeft(self) -> None:
        """The temporary copies behind printed files are gone afterwards, failed ones too."""
        self.p2pFetch(["a.txt", "nope.txt"], FakeFetcher({"a.txt": A}))
        self.assertEqual(self.leftovers(), [])

    def test_readerGoesAway(self) -> None:
        """A stdout closed early ('| head -c 10'): the reader gets its bytes, exit 0, no message."""
        self.terminal = FakeTerminal(closeAfter=10)
        code = self.p2pFetch(["a.bin", "b.bin"], FakeFetcher({"a.bin": b"x" * 100_000, "b.bin": B}))
        self.assertEqual((code, self.terminal.stdout), (EXIT_OK, b"x" * 10))
        self.assertEqual(self.terminal.stderr, "==> a.bin <==\n==> b.bin <==\n")
        self.assertEqual(self.leftovers(), [])


BINARY_LINE = "binary output can mess up your terminal; use -o DIR, redirect, or -o - to force"


class BinaryToTerminalTests(CommandTestCase):
    """
    stdout a terminal: a file whose first bytes are not text is refused as
    curl does, before any of it is written; -o - (or a pipe) prints it.
    """

    def setUp(self) -> None:
        super().setUp()
        self.terminal.console.stdoutTTY = True

    def test_binaryRefused(self) -> None:
        """NUL bytes to a terminal: refused in one line, exit 1, nothing on stdout, no temporary left."""
        code = self.p2pFetch(["blob.bin"], FakeFetcher({"blob.bin": b"\x7fELF\0\0\1"}))
        self.assertEqual((code, self.terminal.stdout), (EXIT_NOT_FETCHED, b""))
        self.assertEqual(self.terminal.stderr, f"p2p-fetch: blob.bin: {BINARY_LINE}\n")
        self.assertEqual(self.leftovers(), [])

    def test_invalidUTF8Refused(self) -> None:
        """Bytes that are not UTF-8 count as binary."""
        code = self.p2pFetch(["latin.bin"], FakeFetcher({"latin.bin": b"caf\xe9 \xff\xfe"}))
        self.assertEqual((code, self.terminal.stdout), (EXIT_NOT_FETCHED, b""))

    def test_textPrinted(self) -> None:
        """UTF-8 text to a terminal is printed as always."""
        text = "caf\u00e9 \u2603\n".encode()
        self.assertEqual(self.p2pFetch(["a.txt"], FakeFetcher({"a.txt": text})), EXIT_OK)
        self.assertEqual(self.terminal.stdout, text)

    def test_dashForces(self) -> None:
        """-o - means stdout explicitly: binary contents go to the terminal."""
        data = bytes(range(256))
        self.assertEqual(self.p2pFetch(["-o", "-", "blob.bin"], FakeFetcher({"blob.bin": data})), EXIT_OK)
        self.assertEqual(self.terminal.stdout, data)
        self.assertQuiet()

    def test_pipeUnchanged(self) -> None:
        """stdout a pipe: binary contents are printed, no question asked."""
        self.terminal.console.stdoutTTY = False
        data = bytes(range(256))
        self.assertEqual(self.p2pFetch(["blob.bin"], FakeFetcher({"blob.bin": data})), EXIT_OK)
        self.assertEqual(self.terminal.stdout, data)

    def test_othersStillPrinted(self) -> None:
        """Among several names, only the binary one is refused; its header is not written either."""
        fetcher = FakeFetcher({"a.txt": A, "blob.bin": b"\0\0", "b.txt": B})
        code = self.p2pFetch(["a.txt", "blob.bin", "b.txt"], fetcher)
        self.assertEqual((code, self.terminal.stdout), (EXIT_NOT_FETCHED, A + B))
        self.assertEqual(
            self.terminal.stderr, f"==> a.txt <==\np2p-fetch: blob.bin: {BINARY_LINE}\n==> b.txt <==\n"
        )

    def test_streamRefusesFirstWrite(self) -> None:
        """The piece-by-piece stdout stream decides on its first write: binary is dropped, the stream closed."""
        stream = self.terminal.console.stream(refuseBinary=True)
        resumed = []
        stream.onResume = lambda: resumed.append(True)
        stream.write(b"\0binary")
        stream.write(b"more")
        self.assertEqual((stream.refused, stream.closed, resumed, self.terminal.stdout), (True, True, [True], b""))
        self.assertIsNone(self.terminal.stdio.producer)

    def test_streamPassesText(self) -> None:
        """Text on the first write goes through, and so does everything after it."""
        stream = self.terminal.console.stream(refuseBinary=True)
        stream.write(b"text\n")
        stream.write(b"\0later")
        stream.close()
        self.assertEqual((stream.refused, self.terminal.stdout), (False, b"text\n\0later"))


class ProgressTests(CommandTestCase):
    """
    Progress bars on stderr: on a terminal, driven ten times a second from
    the downloads' byte counts; never on a pipe, with --quiet, or on stdout;
    --progress forces them.
    """

    SIZE = 2 * 1024 * 1024

    def setUp(self) -> None:
        super().setUp()
        self.out = self.scratch / "out"
        self.clock = Clock()
        self.terminal.console.stderrTTY = True
        self.patch(fetch_progress, "shutil", _FixedWidth(100))

    def startGated(self, argv: Sequence[str], names: Sequence[str] = ("big.bin",)):
        fetcher = FakeFetcher({name: b"x" * self.SIZE for name in names})
        gates = [fetcher.gate(name) for name in names]
        d = self.start(argv, fetcher, reactor=self.clock)
        return fetcher, gates, d

    def test_barShown(self) -> None:
        """A bar: the name, bytes and percent, rate, ETA, and the peer in use."""
        fetcher, (gate,), d = self.startGated(["-o", str(self.out), "big.bin"])
        self.clock.advance(0.1)
        fetcher.transfers["big.bin"].received = self.SIZE // 2
        self.clock.advance(1.0)
        self.assertNoResult(d)
        line = self.terminal.stderr.split("\r")[-2]
        for part in ("big.bin", "50%", "1.0 MiB/2.0 MiB", f"from {PEER}"):
            self.assertIn(part, line)
        # elapsed<ETA, then the rate in the human sizes every message uses
        self.assertRegex(line, r"\[00:01<00:\d\d, \d+(\.\d+)? (B|KiB|MiB)/s")
        gate.callback(None)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertTrue(self.terminal.stderr.endswith(f"{fetch_progress.CLEAR}saved big.bin (2.0 MiB from {PEER}) to {self.out / 'big.bin'}\n"))
        self.assertEqual(self.terminal.stdout, b"")

    def test_notPerChunk(self) -> None:
        """Nothing is drawn before the first tick: the bars follow the clock, not the bytes."""
        fetcher, (gate,), d = self.startGated(["-o", str(self.out), "big.bin"])
        fetcher.transfers["big.bin"].received = 1000
        self.assertEqual(self.terminal.stderr, "")
        self.clock.advance(0.1)
        self.assertIn("big.bin", self.terminal.stderr)
        gate.callback(None)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_overallLine(self) -> None:
        """Several files at once: a line each and one overall line."""
        fetcher, gates, d = self.startGated(["-o", str(self.out), "a.bin", "b.bin"], names=("a.bin", "b.bin"))
        fetcher.transfers["a.bin"].received = self.SIZE
        self.clock.advance(0.1)
        drawn = self.terminal.stderr.split(fetch_progress.CLEAR)[-1]
        lines = drawn.split("\n")
        self.assertEqual(len(lines), 3, drawn)
        self.assertIn("a.bin", lines[0])
        self.assertIn("b.bin", lines[1])
        self.assertIn("2 files", lines[2])
        self.assertIn("50%", lines[2])
        for gate in gates:
            gate.callback(None)
        self.assertEqual(self.successResultOf(d), EXIT_OK)

    def test_notOnPipe(self) -> None:
        """stderr not a terminal: no bars."""
        self.terminal.console.stderrTTY = False
        fetcher, (gate,), d = self.startGated(["-o", str(self.out), "big.bin"])
        self.clock.advance(1.0)
        gate.callback(None)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertNotIn("\r", self.terminal.stderr)

    def test_quiet(self) -> None:
        """--quiet: no bars on a terminal either."""
        fetcher, (gate,), d = self.startGated(["--quiet", "-o", str(self.out), "big.bin"])
        self.clock.advance(1.0)
        gate.callback(None)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertNotIn("\r", self.terminal.stderr)

    def test_progressForces(self) -> None:
        """--progress draws bars on a pipe too; stdout stays the file's bytes alone."""
        self.terminal.console.stderrTTY = False
        fetcher, (gate,), d = self.startGated(["--progress", "big.bin"])
        self.clock.advance(0.1)
        self.assertIn("big.bin", self.terminal.stderr)
        gate.callback(None)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stdout, b"x" * self.SIZE)

    def test_notOverContentsOnTerminal(self) -> None:
        """Contents printed to the terminal: no bars in their way (unless --progress)."""
        self.terminal.console.stdoutTTY = True
        fetcher, (gate,), d = self.startGated(["big.txt"], names=("big.txt",))
        self.clock.advance(1.0)
        gate.callback(None)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stderr, "")

    def test_messagesClearTheBars(self) -> None:
        """A message while bars run goes on a cleared line; the bars still running are redrawn below it."""
        fetcher, gates, d = self.startGated(["-o", str(self.out), "big.bin", "nope.bin"], names=("big.bin",))
        nope = fetcher.gate("nope.bin")
        self.clock.advance(0.1)
        nope.callback(None)
        texts = [data.decode() for stream, data in self.terminal.transcript if stream == "stderr"]
        failure = next(i for i, t in enumerate(texts) if "nope.bin: not fetched" in t)
        self.assertEqual(texts[failure - 1], fetch_progress.CLEAR)
        self.assertIn("big.bin", texts[failure + 1])
        self.assertNotIn("nope.bin", texts[failure + 1])
        gates[0].callback(None)
        self.assertEqual(self.successResultOf(d), EXIT_NOT_FETCHED)

    def test_barsCloseBeforePrompt(self) -> None:
        """At the interactive prompt, the bars are cleared before the next prompt is written."""
        self.patch(os, "isatty", lambda fd: False)
        fetcher = FakeFetcher({"big.bin": b"x" * 10})
        gate = fetcher.gate("big.bin")
        d = self.start(["--progress", "-o", str(self.out)], fetcher, reactor=self.clock)
        self.terminal.type("big.bin\n")
        self.clock.advance(0.1)
        gate.callback(None)
        texts = [data.decode() for stream, data in self.terminal.transcript if stream == "stderr"]
        self.assertTrue(texts[-1].endswith(session.PROMPT), texts[-3:])
        prior = [t for t in texts[:-1] if "\r" in t]
        self.assertEqual(prior[-1], fetch_progress.CLEAR)
        self.terminal.eof()
        self.assertEqual(self.successResultOf(d), EXIT_OK)


class _FixedWidth:
    """shutil, as far as the bars ask it: a terminal of ``columns``."""

    def __init__(self, columns: int) -> None:
        self.columns = columns

    def get_terminal_size(self, fallback=(80, 24)):
        return os.terminal_size((self.columns, 24))


class OutputDirectoryTests(CommandTestCase):
    """
    -o DIR: files saved verified, never over an existing one unless --force.
    """

    def setUp(self) -> None:
        super().setUp()
        self.out = self.scratch / "out"

    def test_saved(self) -> None:
        """Each file lands in DIR; stdout stays empty; stderr says where each went."""
        code = self.p2pFetch(["-o", str(self.out), "a.txt", "b.txt"], FakeFetcher({"a.txt": A, "b.txt": B}))
        self.assertEqual((code, self.terminal.stdout), (EXIT_OK, b""))
        self.assertEqual(((self.out / "a.txt").read_bytes(), (self.out / "b.txt").read_bytes()), (A, B))
        self.assertIn(f"saved a.txt ({len(A)} B from {PEER}) to {self.out / 'a.txt'}\n", self.terminal.stderr)
        self.assertIn(f"saved b.txt ({len(B)} B from {PEER}) to {self.out / 'b.txt'}\n", self.terminal.stderr)

    def test_savedHumanSize(self) -> None:
        """The "saved" line gives the size as people read it; --json keeps the exact bytes."""
        data = b"x" * (3 * 1024 * 1024 // 2)
        code = self.p2pFetch(["--json", "-o", str(self.out), "big.bin"], FakeFetcher({"big.bin": data}))
        self.assertEqual(code, EXIT_OK)
        self.assertIn(f"saved big.bin (1.5 MiB from {PEER})", self.terminal.stderr)
        self.assertEqual(json.loads(self.terminal.stdout)["size"], len(data))

    def test_savedViaRelay(self) -> None:
        """A file that came via the relay says so on its "saved" line."""
        fetcher = FakeFetcher({"a.txt": A})
        fetcher.path = "relay"
        self.assertEqual(self.p2pFetch(["-o", str(self.out), "a.txt"], fetcher), EXIT_OK)
        self.assertIn(f"saved a.txt ({len(A)} B from {PEER} via relay) to {self.out / 'a.txt'}\n", self.terminal.stderr)

    def test_savedViaReverse(self) -> None:
        """A file that came over a reverse connection says so on its "saved" line."""
        fetcher = FakeFetcher({"a.txt": A})
        fetcher.path = "reverse"
        self.assertEqual(self.p2pFetch(["-o", str(self.out), "a.txt"], fetcher), EXIT_OK)
        self.assertIn(f"({len(A)} B from {PEER} via reverse connection) to", self.terminal.stderr)

    def test_savedDirectSaysNothingMore(self) -> None:
        """A direct fetch's "saved" line is as it always was."""
        self.assertEqual(self.p2pFetch(["-o", str(self.out), "a.txt"], FakeFetcher({"a.txt": A})), EXIT_OK)
        self.assertNotIn(" via ", self.terminal.stderr)

    def test_jsonPath(self) -> None:
        """--json: the record's "path" is the path the file came by; "saved" is where it was saved."""
        fetcher = FakeFetcher({"a.txt": A})
        fetcher.path = "relay"
        self.assertEqual(self.p2pFetch(["--json", "-o", str(self.out), "a.txt"], fetcher), EXIT_OK)
        record = json.loads(self.terminal.stdout)
        self.assertEqual((record["path"], record["saved"]), ("relay", str(self.out / "a.txt")))

    def test_outputIsAFile(self) -> None:
        """-o naming an existing file is a usage error: '-o: FILE is not a folder'."""
        self.out.write_bytes(b"a file")
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            e = self.assertRaises(SystemExit, parseArgs, ["-o", str(self.out), "a.txt"])
        self.assertEqual(e.code, EXIT_USAGE)
        self.assertIn(f"-o: {self.out} is not a folder", stderr.getvalue())

    def test_nestedUnusualName(self) -> None:
        """A nested name with spaces, '=', ':' and non-ASCII is saved under its folders."""
        name = "notes/my report = draft: \u00e9t\u00e9 \u2603.txt"
        code = self.p2pFetch(["-o", str(self.out), name], FakeFetcher({name: b"snow"}))
        self.assertEqual(code, EXIT_OK)
        self.assertEqual((self.out / name).read_bytes(), b"snow")

    def test_existingKept(self) -> None:
        """An existing file is not replaced: exit 1, it is untouched, and nobody is asked for it."""
        self.out.mkdir()
        (self.out / "a.txt").write_bytes(b"mine")
        fetcher = FakeFetcher({"a.txt": A})
        code = self.p2pFetch(["-o", str(self.out), "a.txt"], fetcher)
        self.assertEqual(code, EXIT_NOT_FETCHED)
        self.assertEqual((self.out / "a.txt").read_bytes(), b"mine")
        self.assertEqual(
            self.terminal.stderr,
            f"p2p-fetch: a.txt: not fetched: {self.out / 'a.txt'} exists (use --force to replace it)\n",
        )
        self.assertEqual(fetcher.asked, [("whohas", "a.txt")])

    def test_alreadyHave(self) -> None:
        """DIR/NAME with the size and SHA-256 the relay lists: 'already have NAME, verified', exit 0, not fetched."""
        self.out.mkdir()
        (self.out / "a.txt").write_bytes(A)
        fetcher = FakeFetcher({"a.txt": A}, index={"a.txt": A})
        code = self.p2pFetch(["-o", str(self.out), "a.txt"], fetcher)
        self.assertEqual((code, self.terminal.stderr), (EXIT_OK, "already have a.txt, verified\n"))
        self.assertNotIn(("fetch", "a.txt"), fetcher.asked)
        self.assertEqual((self.out / "a.txt").read_bytes(), A)

    def test_alreadyHaveJson(self) -> None:
        """--json: the file already there is an ok record with its exact size and hash."""
        self.out.mkdir()
        (self.out / "a.txt").write_bytes(A)
        code = self.p2pFetch(["--json", "-o", str(self.out), "a.txt"], FakeFetcher(index={"a.txt": A}))
        self.assertEqual(code, EXIT_OK)
        record = json.loads(self.terminal.stdout)
        self.assertEqual((record["ok"], record["size"], record["sha256"], record["already"]), (True, len(A), sha(A), True))

    def test_differentContentRefused(self) -> None:
        """DIR/NAME of the listed size but other bytes is still refused without --force: exit 1, untouched."""
        self.out.mkdir()
        other = b"x" * len(A)
        (self.out / "a.txt").write_bytes(other)
        fetcher = FakeFetcher({"a.txt": A}, index={"a.txt": A})
        code = self.p2pFetch(["-o", str(self.out), "a.txt"], fetcher)
        self.assertEqual(code, EXIT_NOT_FETCHED)
        self.assertIn("exists (use --force to replace it)", self.terminal.stderr)
        self.assertEqual((self.out / "a.txt").read_bytes(), other)

    def test_existingCreatedDuringFetch(self) -> None:
        """A file that appears while the fetch runs is not replaced either."""
        fetcher = FakeFetcher({"a.txt": A})
        gate = fetcher.gate("a.txt")
        d = self.start(["-o", str(self.out), "a.txt"], fetcher)
        self.out.mkdir(exist_ok=True)
        (self.out / "a.txt").write_bytes(b"mine")
        gate.callback(None)
        self.assertEqual(self.successResultOf(d), EXIT_NOT_FETCHED)
        self.assertEqual((self.out / "a.txt").read_bytes(), b"mine")
        self.assertEqual([p.name for p in self.out.iterdir()], ["a.txt"])

    def test_forceReplaces(self) -> None:
        """With --force an existing file is replaced by the verified one."""
        self.out.mkdir()
        (self.out / "a.txt").write_bytes(b"mine")
        code = self.p2pFetch(["-o", str(self.out), "--force", "a.txt"], FakeFetcher({"a.txt": A}))
        self.assertEqual(code, EXIT_OK)
        self.assertEqual((self.out / "a.txt").read_bytes(), A)

    def test_failedLeavesNothing(self) -> None:
        """A file not fetched leaves nothing in DIR."""
        code = self.p2pFetch(["-o", str(self.out), "nope.txt"], FakeFetcher())
        self.assertEqual(code, EXIT_NOT_FETCHED)
        self.assertEqual(list(self.out.iterdir()) if self.out.exists() else [], [])

    def test_escapeRefused(self) -> None:
        """A name leading out of DIR through a symlink is refused: exit 1."""
        outside = self.scratch / "outside"
        outside.mkdir()
        self.out.mkdir()
        os.symlink(outside, self.out / "link")
        code = self.p2pFetch(["-o", str(self.out), "link/x.txt"], FakeFetcher({"link/x.txt": A}))
        self.assertEqual(code, EXIT_NOT_FETCHED)
        self.assertIn("would be saved outside", self.terminal.stderr)
        self.assertEqual(list(outside.iterdir()), [])

    def test_jsonRecords(self) -> None:
        """--json -o: one JSON record per file on stdout, successes and failures alike."""
        fetcher = FakeFetcher({"a.txt": A})
        code = self.p2pFetch(["--json", "-o", str(self.out), "a.txt", "nope.txt"], fetcher)
        self.assertEqual(code, EXIT_NOT_FETCHED)
        records = sorted((json.loads(line) for line in self.terminal.stdout.splitlines()), key=lambda r: r["name"])
        self.assertEqual(
            records,
            [
                {
                    "name": "a.txt", "ok": True, "size": len(A), "sha256": sha(A), "peer": PEER,
                    "attempts": [], "seconds": 0.25, "saved": str(self.out / "a.txt"), "path": "direct",
                },
                {
                    "name": "nope.txt", "ok": False, "error": "not found on any of the 1 active peers",
                    "attempts": [{"peer": PEER, "error": "404 no such file in this share"}],
                },
            ],
        )


class CommaNameTests(CommandTestCase):
    """
    A comma may be part of a name: an argument that is exactly a name the
    relay knows is fetched whole; otherwise a comma list is split.
    """

    def test_knownNameWhole(self) -> None:
        """p2p-fetch "a,b.txt" fetches a,b.txt when the relay knows that name."""
        fetcher = FakeFetcher({"a,b.txt": A, "a": B, "b.txt": B}, index={"a,b.txt": A})
        self.assertEqual(self.p2pFetch(["a,b.txt"], fetcher), EXIT_OK)
        self.assertEqual(self.terminal.stdout, A)
        self.assertEqual(fetcher.asked[0], ("whohas", "a,b.txt"))

    def test_unknownSplit(self) -> None:
        """A comma list the relay knows no whole name for is split: 'a.txt, b.txt' fetches both."""
        fetcher = FakeFetcher({"a.txt": A, "b.txt": B})
        self.assertEqual(self.p2pFetch(["a.txt, b.txt"], fetcher), EXIT_OK)
        self.assertEqual(self.terminal.stdout, A + B)
        self.assertEqual(fetcher.asked[0], ("whohas", "a.txt, b.txt"))

    def test_noCommaNoQuestion(self) -> None:
        """Arguments without a comma cost no extra question to the relay."""
        fetcher = FakeFetcher({"a.txt": A, "b.txt": B})
        self.assertEqual(self.p2pFetch(["a.txt", "b.txt"], fetcher), EXIT_OK)
        self.assertNotIn(("whohas", "a.txt"), fetcher.asked)

    def test_typedSendForm(self) -> None:
        """At the prompt, 'Send a.txt, b.txt' still asks for both."""
        fetcher = FakeFetcher({"a.txt": A, "b.txt": B})
        d = self.start([], fetcher)
        self.terminal.type("Send a.txt, b.txt\nquit\n")
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stdout, A + B)

    def test_typedKnownName(self) -> None:
        """At the prompt, a typed name the relay knows is fetched whole, comma and all."""
        fetcher = FakeFetcher({"x, y.txt": A}, index={"x, y.txt": A})
        d = self.start([], fetcher)
        self.terminal.type("get x, y.txt\nquit\n")
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stdout, A)


class ListingTests(CommandTestCase):
    """
    --peers and --list: rows on stdout, counts and notes on stderr.
    """

    peers = [PeerAddress("127.0.0.1", 5001, "n1", 6001), PeerAddress("::1", 5002, "n2")]
    firewalled = PeerAddress("192.0.2.9", 5003, "n3", reach=wire.FIREWALLED)

    def test_peers(self) -> None:
        """--peers prints one line per peer (host:port, node, udp port if any) and a count on stderr."""
        fetcher = FakeFetcher(peers=self.peers)
        self.assertEqual(self.p2pFetch(["--peers"], fetcher), EXIT_OK)
        self.assertEqual(
            self.terminal.stdout.decode(), "127.0.0.1:5001  node=n1  udp=6001\n[::1]:5002  node=n2\n"
        )
        self.assertEqual(self.terminal.stderr, "2 active peer(s)\n")

    def test_noPeers(self) -> None:
        """No peers: nothing on stdout, a zero count on stderr, exit 0."""
        self.assertEqual(self.p2pFetch(["--peers"], FakeFetcher()), EXIT_OK)
        self.assertEqual((self.terminal.stdout, self.terminal.stderr), (b"", "0 active peer(s)\n"))

    def test_peersJson(self) -> None:
        """--peers --json prints one JSON object per peer and nothing on stderr."""
        self.assertEqual(self.p2pFetch(["--peers", "--json"], FakeFetcher(peers=self.peers)), EXIT_OK)
        self.assertEqual(
            [json.loads(line) for line in self.terminal.stdout.splitlines()],
            [
                {"host": "127.0.0.1", "port": 5001, "udp": 6001, "node": "n1", "reach": "direct"},
                {"host": "::1", "port": 5002, "udp": None, "node": "n2", "reach": "direct"},
            ],
        )
        self.assertQuiet()

    def test_peersFirewalled(self) -> None:
        """--peers marks a firewalled peer (its address takes no connections) with reach=firewalled."""
        fetcher = FakeFetcher(peers=[self.firewalled])
        self.assertEqual(self.p2pFetch(["--peers"], fetcher), EXIT_OK)
        self.assertEqual(self.terminal.stdout.decode(), "192.0.2.9:5003  node=n3  reach=firewalled\n")

    def test_peersJsonFirewalled(self) -> None:
        """--peers --json says each peer's reach."""
        self.assertEqual(self.p2pFetch(["--peers", "--json"], FakeFetcher(peers=[self.firewalled])), EXIT_OK)
        self.assertEqual(json.loads(self.terminal.stdout)["reach"], "firewalled")

    def test_table(self) -> None:
        """--list PATTERN asks the relay for PATTERN and prints an aligned table."""
        fetcher = FakeFetcher(listing=[fileItem("a.txt", 5, 2), fileItem("longer-name.bin", 12345)])
        self.assertEqual(self.p2pFetch(["--list", "*.txt"], fetcher), EXIT_OK)
        self.assertEqual(fetcher.asked, [("search", "*.txt")])
        sums = "a" * 64
        self.assertEqual(
            self.terminal.stdout.decode().splitlines(),
            [
                "NAME                 SIZE  HOLDERS  SHA256",
                f"a.txt                 5 B        2  {sums}",
                f"longer-name.bin  12.1 KiB        1  {sums}",
            ],
        )
        self.assertQuiet()

    def test_listJson(self) -> None:
        """--list --json prints one JSON record per file."""
        fetcher = FakeFetcher(listing=[fileItem("a.txt", 5, 2)])
        self.assertEqual(self.p2pFetch(["--list", "--json"], fetcher), EXIT_OK)
        self.assertEqual(fetcher.asked, [("search", "")])
        self.assertEqual(
            json.loads(self.terminal.stdout),
            {"name": "a.txt", "size": 5, "holders": 2, "sha256": "a" * 64},
        )

    def test_truncated(self) -> None:
        """A list the relay cut short says so on stderr."""
        fetcher = FakeFetcher(listing=[fileItem("a.txt", 5)], truncated=True)
        self.assertEqual(self.p2pFetch(["--list"], fetcher), EXIT_OK)
        self.assertEqual(self.terminal.stderr, "(the list was truncated by the relay; narrow the pattern)\n")

    def test_relayUnreachable(self) -> None:
        """A listing from an unreachable relay: exit 3, one line, nothing on stdout."""
        for argv, key in ((["--peers"], "peers"), (["--list"], "search")):
            self.terminal = FakeTerminal()
            code = self.p2pFetch(argv, FakeFetcher(errors={key: RelayUnreachable("timed out")}))
            self.assertEqual((code, self.terminal.stdout), (EXIT_RELAY, b""))
            self.assertEqual(self.terminal.stderr, f"p2p-fetch: relay {RELAY} unreachable: timed out\n")

    def test_relayError(self) -> None:
        """A listing the relay refuses: exit 1 with its status."""
        error = wire.ProtocolError(400, "bad pattern")
        code = self.p2pFetch(["--list", "["], FakeFetcher(errors={"search": error}))
        self.assertEqual(code, EXIT_NOT_FETCHED)
        self.assertEqual(self.terminal.stderr, "p2p-fetch: relay answered 400 bad pattern\n")


class InteractiveTests(CommandTestCase):
    """
    With no names: a prompt on stderr, names read from stdin until quit or EOF.
    """

    PROMPT = session.PROMPT

    def test_promptFirst(self) -> None:
        """The prompt is on stderr before anything is typed, and nothing is fetched yet."""
        fetcher = FakeFetcher({"a.txt": A})
        d = self.start([], fetcher)
        self.assertNoResult(d)
        self.assertEqual((self.terminal.stderr, self.terminal.stdout), (self.PROMPT, b""))
        self.assertEqual(fetcher.asked, [])

    def test_typedNameFetched(self) -> None:
        """A typed name is printed, then the prompt comes back."""
        d = self.start([], FakeFetcher({"a.txt": A}))
        self.terminal.type("a.txt\n")
        self.assertEqual(self.terminal.stdout, A)
        self.assertEqual(self.terminal.stderr, self.PROMPT * 2)
        self.assertNoResult(d)

    def test_seedsSendForm(self) -> None:
        """The seeds' 'Send a.txt, b.txt' asks for both, printed in that order."""
        d = self.start([], FakeFetcher({"a.txt": A, "b.txt": B}))
        self.terminal.type("Send a.txt, b.txt\nquit\n")
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stdout, A + B)
        self.assertIn("==> a.txt <==\n==> b.txt <==\n", self.terminal.stderr)

    def test_quit(self) -> None:
        """'quit' (any case, or exit, or q) ends the session at once: exit 0; later lines are not read."""
        for word in ("quit", "QUIT", "exit", "q", " Quit "):
            self.terminal = FakeTerminal()
            fetcher = FakeFetcher({"a.txt": A})
            d = self.start([], fetcher)
            self.terminal.type(f"{word}\na.txt\n")
            self.assertEqual(self.successResultOf(d), EXIT_OK, word)
            self.assertEqual((fetcher.asked, self.terminal.stdout), ([], b""))
            self.assertEqual(self.terminal.stderr, self.PROMPT)

    def test_eof(self) -> None:
        """EOF (Ctrl-D) ends the session: exit 0, the prompt's line ended on stderr."""
        d = self.start([], FakeFetcher())
        self.terminal.eof()
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stderr, self.PROMPT + "\n")

    def test_blankLine(self) -> None:
        """An empty line asks for nothing and prompts again."""
        fetcher = FakeFetcher()
        d = self.start([], fetcher)
        self.terminal.type("  \n")
        self.assertNoResult(d)
        self.assertEqual((fetcher.asked, self.terminal.stderr), ([], self.PROMPT * 2))

    def test_badNameTyped(self) -> None:
        """A typed name that is not a valid name is reported; the session goes on and ends in exit 1."""
        d = self.start([], FakeFetcher({"a.txt": A}))
        self.terminal.type("../x, a.txt\n")
        self.terminal.eof()
        self.assertEqual(self.successResultOf(d), EXIT_NOT_FETCHED)
        self.assertEqual(self.terminal.stdout, A)
        self.assertIn("p2p-fetch: ../x: not fetched:", self.terminal.stderr)

    def test_failureThenSuccess(self) -> None:
        """A name not fetched does not end the session; the exit status remembers it."""
        d = self.start([], FakeFetcher({"a.txt": A}))
        self.terminal.type("nope.txt\na.txt\nquit\n")
        self.assertEqual(self.successResultOf(d), EXIT_NOT_FETCHED)
        self.assertEqual(self.terminal.stdout, A)

    def test_relayUnreachableRemembered(self) -> None:
        """A relay unreachable for one name gives exit 3 at the end of the session."""
        d = self.start([], FakeFetcher({"a.txt": A}, errors={"b.txt": RelayUnreachable("refused")}))
        self.terminal.type("b.txt\na.txt\n")
        self.terminal.eof()
        self.assertEqual(self.successResultOf(d), EXIT_RELAY)
        self.assertEqual(self.terminal.stdout, A)

    def test_promptWaitsForContents(self) -> None:
        """The next prompt appears only once the file's bytes have all left stdout."""
        self.terminal = FakeTerminal(autoDrain=False)
        self.start([], FakeFetcher({"a.bin": b"x" * 600_000}))
        self.terminal.type("a.bin\n")
        self.assertEqual(self.terminal.stderr, self.PROMPT)
        while self.terminal.stdio.producer is not None:
            self.terminal.stdio.drain()
        self.assertEqual(self.terminal.stderr, self.PROMPT * 2)
        self.assertEqual(self.terminal.transcript[-1], ("stderr", self.PROMPT.encode()))
        self.assertEqual(self.terminal.stdout, b"x" * 600_000)


class MemoryNetworkTests(CommandTestCase):
    """
    p2p-fetch with the real Fetcher, talking in memory to a scripted relay
    (what a client sees of one) and real file servers on a task.Clock.
    """

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
        self.cooperator = Cooperator(
            scheduler=lambda f: self.clock.callLater(0, f),
            terminationPredicateFactory=lambda: (lambda: True),
        )
        self.addCleanup(self.cooperator.stop)
        self.relayFactory = FakeRelay()
        self.relay = self.network.endpoint("relay", self.relayFactory)
        self.endpoints: Dict[tuple, object] = {}
        self.nextPort = 5001

    def node(self, files: Dict[str, bytes], factory=None, error=None, udp=None) -> str:
        """A registered peer serving ``files`` (or answering with ``factory``, or failing with ``error``)."""
        port = self.nextPort
        self.nextPort += 1
        if factory is None and error is None:
            root = self.scratch / f"node{port}"
            for name, data in files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
            root.mkdir(exist_ok=True)
            factory = FileServerFactory(SharedDirectory(root, runInThread=syncThread), self.clock, self.cooperator)
        entries = [FileEntry(name, len(data), sha(data)) for name, data in files.items()]
        self.relayFactory.add(f"node{port}", "127.0.0.1", port, entries, udp=udp)
        label = f"127.0.0.1:{port}"
        self.endpoints[("127.0.0.1", port)] = self.network.endpoint(label, factory, error)
        return label

    def p2pFetch(self, argv: Sequence[str], relay=None) -> int:
        args = parseArgs(["--relay", RELAY, *argv])
        fetcher = buildFetcher(
            self.clock,
            args,
            self.terminal.console.err,
            relay=relay or self.relay,
            peerEndpoint=lambda peer: self.endpoints[(peer.host, peer.port)],
        )
        d = Deferred.fromCoroutine(run(self.clock, args, self.terminal.console, fetcher))
        return self.successResultOf(drive(d, self.clock, self.network))

    def test_fetched(self) -> None:
        """A file a node shares is found through the relay and printed, verified."""
        self.node({"a.txt": A})
        self.assertEqual(self.p2pFetch(["a.txt"]), EXIT_OK)
        self.assertEqual(self.terminal.stdout, A)
        self.assertQuiet()

    def test_transferCounts(self) -> None:
        """The real fetcher tells each download to the progress bars: name, bytes received, total, peer."""
        peer = self.node({"a.txt": A})
        args = parseArgs(["--relay", RELAY, "a.txt"])
        fetcher = buildFetcher(
            self.clock, args, self.terminal.console.err, relay=self.relay,
            peerEndpoint=lambda p: self.endpoints[(p.host, p.port)],
        )
        seen = []
        fetcher.onTransfer = seen.append
        d = Deferred.fromCoroutine(run(self.clock, args, self.terminal.console, fetcher))
        self.assertEqual(self.successResultOf(drive(d, self.clock, self.network)), EXIT_OK)
        (transfer,) = seen
        self.assertEqual((transfer.name, transfer.received, transfer.total, transfer.peers), ("a.txt", len(A), len(A), [peer]))

    def test_unusualName(self) -> None:
        """A name with spaces, '=', ':' and non-ASCII travels intact through relay and node."""
        name = "notes/my report = draft: \u00e9t\u00e9 \u2603.txt"
        self.node({name: b"snow"})
        self.assertEqual(self.p2pFetch([name]), EXIT_OK)
        self.assertEqual(self.terminal.stdout, b"snow")

    def test_failover(self) -> None:
        """A holder refusing connections is reported on stderr; the next one delivers."""
        dead = self.node({"a.txt": A}, error=ConnectionRefusedError())
        self.node({"a.txt": A})
        self.assertEqual(self.p2pFetch(["a.txt"]), EXIT_OK)
        self.assertEqual(self.terminal.stdout, A)
        self.assertEqual(self.terminal.stderr, f"peer {dead}: connection refused, trying next\n")
        self.assertEqual(self.relayFactory.dead, [dead], "the dead peer was reported to the relay")

    def test_missing(self) -> None:
        """A file nobody has: exit 1 and one line."""
        self.node({"a.txt": A})
        self.assertEqual(self.p2pFetch(["nope.txt"]), EXIT_NOT_FETCHED)
        self.assertEqual(self.terminal.stderr, "p2p-fetch: nope.txt: not in the index; asked 1 other peer\n")

    def test_walkCapped(self) -> None:
        """A name the index lists no holder of: at most --walk other peers asked, one summary line, no 404 lines."""
        for _ in range(5):
            self.node({"a.txt": A})
        self.dialled = []
        endpoints = self.endpoints

        class Counting(dict):
            def __getitem__(inner, key):
                self.dialled.append(key)
                return endpoints[key]

        self.endpoints = Counting()
        self.assertEqual(self.p2pFetch(["--walk", "3", "nope.txt"]), EXIT_NOT_FETCHED)
        self.assertEqual(self.terminal.stderr, "p2p-fetch: nope.txt: not in the index; asked 3 other peers\n")
        self.assertEqual(len(self.dialled), 3)

    def test_walkDefault(self) -> None:
        """By default the walk stops at 8 peers of a larger network."""
        for _ in range(10):
            self.node({"a.txt": A})
        self.assertEqual(self.p2pFetch(["nope.txt"]), EXIT_NOT_FETCHED)
        self.assertIn("not in the index; asked 8 other peers\n", self.terminal.stderr)

    def test_walkVerbose(self) -> None:
        """-v still shows each walked peer's 404."""
        peer = self.node({"a.txt": A})
        self.assertEqual(self.p2pFetch(["-v", "nope.txt"]), EXIT_NOT_FETCHED)
        self.assertIn(f"peer {peer}: 404 ", self.terminal.stderr)

    def test_walkOff(self) -> None:
        """--walk 0 asks no other peer."""
        self.node({"a.txt": A})
        self.assertEqual(self.p2pFetch(["--walk", "0", "nope.txt"]), EXIT_NOT_FETCHED)
        self.assertEqual(
            self.terminal.stderr, "p2p-fetch: nope.txt: not in the index (--walk 0: no other peer asked)\n"
        )

    def test_relayRefused(self) -> None:
        """A relay refusing connections: exit 3, one line, nothing on stdout."""
        relay = self.network.endpoint("relay", error=ConnectionRefusedError())
        self.assertEqual(self.p2pFetch(["x.txt"], relay=relay), EXIT_RELAY)
        self.assertEqual(self.terminal.stdout, b"")
        self.assertEqual(
            self.terminal.stderr, f"p2p-fetch: x.txt: not fetched: relay {RELAY} unreachable: connection refused\n"
        )

    def test_relaySilent(self) -> None:
        """A relay that accepts and never answers times out after --timeout: exit 3."""
        relay = self.network.endpoint("relay", Factory.forProtocol(Protocol))
        d = Deferred.fromCoroutine(
            run(
                self.clock,
                args := parseArgs(["--relay", RELAY, "--timeout", "3", "--peers"]),
                self.terminal.console,
                buildFetcher(self.clock, args, self.terminal.console.err, relay=relay),
            )
        )
        self.network.flush()
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), EXIT_RELAY)
        self.assertIn("unreachable: timed out", self.terminal.stderr)

    def test_peerTimeout(self) -> None:
        """--timeout bounds the wait on a silent peer; it is reported and the next one tried."""
        silent = self.node({"a.txt": A}, factory=Factory.forProtocol(Protocol))
        self.node({"a.txt": A})
        d = Deferred.fromCoroutine(
            run(
                self.clock,
                args := parseArgs(["--relay", RELAY, "--timeout", "3", "a.txt"]),
                self.terminal.console,
                buildFetcher(
                    self.clock, args, self.terminal.console.err, relay=self.relay,
                    peerEndpoint=lambda peer: self.endpoints[(peer.host, peer.port)],
                ),
            )
        )
        self.network.flush()
        self.clock.advance(2.9)
        self.network.flush()
        self.assertNoResult(d)
        self.assertEqual(self.successResultOf(drive(d, self.clock, self.network, step=0.1)), EXIT_OK)
        self.assertEqual(self.terminal.stdout, A)
        self.assertIn(f"peer {silent}: timed out, trying next", self.terminal.stderr)

    def test_verbose(self) -> None:
        """-v narrates each phase on stderr; stdout still carries only the file."""
        peer = self.node({"a.txt": A})
        self.assertEqual(self.p2pFetch(["-v", "a.txt"]), EXIT_OK)
        self.assertEqual(self.terminal.stdout, A)
        self.assertEqual(
            self.terminal.stderr, f"relay: 1 peer(s) hold a.txt: {peer}\nfetching a.txt from {peer}\n"
        )

    def test_peersListed(self) -> None:
        """--peers lists the relay's active peers with their node ids."""
        self.node({"a.txt": A})
        self.node({}, udp=6002)
        self.assertEqual(self.p2pFetch(["--peers"]), EXIT_OK)
        self.assertEqual(
            self.terminal.stdout.decode(),
            "127.0.0.1:5001  node=node5001\n127.0.0.1:5002  node=node5002  udp=6002\n",
        )

    def test_listFiltered(self) -> None:
        """--list with a glob shows the matching files only; --json the same records."""
        self.node({"x.txt": b"x", "y.bin": b"yy"})
        self.assertEqual(self.p2pFetch(["--list", "*.txt"]), EXIT_OK)
        table = self.terminal.stdout.decode()
        self.assertIn("x.txt", table)
        self.assertNotIn("y.bin", table)

    def test_listJson(self) -> None:
        """--list --json prints every file as a JSON record."""
        self.node({"x.txt": b"x", "y.bin": b"yy"})
        self.assertEqual(self.p2pFetch(["--list", "--json"]), EXIT_OK)
        records = [json.loads(line) for line in self.terminal.stdout.splitlines()]
        self.assertEqual(
            sorted((r["name"], r["size"], r["holders"]) for r in records), [("x.txt", 1, 1), ("y.bin", 2, 1)]
        )

    def test_udpNeedsUDPPeer(self) -> None:
        """--udp fetches over UDP: a peer registered without a UDP port is a failed attempt."""
        peer = self.node({"a.txt": A})
        self.assertEqual(self.p2pFetch(["--udp", "a.txt"]), EXIT_NOT_FETCHED)
        self.assertIn(f"peer {peer}: peer serves no UDP, trying next", self.terminal.stderr)

    def test_udpBlockSize(self) -> None:
        """--udp-block sets the block size of every UDP attempt."""
        args = parseArgs(["--udp", "--udp-block", "16384", "a.txt"])
        fetcher = buildFetcher(self.clock, args, self.terminal.console.err, relay=self.relay)
        self.assertEqual(fetcher.transfer.func, fetcher.transferUDP)
        self.assertEqual(fetcher.transfer.keywords, {"blockSize": 16384})

    def test_tcpByDefault(self) -> None:
        """Without --udp, attempts go over TCP (the raced connections, no transfer swapped in)."""
        fetcher = buildFetcher(self.clock, parseArgs(["a.txt"]), self.terminal.console.err, relay=self.relay)
        self.assertIsNone(fetcher.transfer)
        self.assertEqual(fetcher.timeout, PEER_TIMEOUT)


ESC = "\x1b"
EVIL = f"{ESC}]0;pwned\x07{ESC}[2J\u202etxt.exe"
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\u202etxt.exe"


class DefenceOptionTests(SynchronousTestCase):
    """
    The options that bound what a hostile network can cost: their defaults,
    their checks, and that they reach the Fetcher.
    """

    def usageError(self, argv: Sequence[str]) -> str:
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            e = self.assertRaises(SystemExit, parseArgs, argv)
        self.assertEqual(e.code, EXIT_USAGE)
        return stderr.getvalue()

    def test_defaults(self) -> None:
        """3 s to connect, 1024 bytes/s over 20 s, 16 holders, no secret."""
        args = parseArgs(["x"])
        self.assertEqual(
            (args.connect_timeout, args.speed_limit, args.speed_time, args.max_holders, args.secret),
            (3.0, 1024, 20.0, 16, None),
        )

    def test_reachTheFetcher(self) -> None:
        """Each option is the Fetcher's setting."""
        args = parseArgs(
            ["--connect-timeout", "1.5", "--speed-limit", "2048", "--speed-time", "5", "--max-holders", "4", "x"]
        )
        fetcher = buildFetcher(Clock(), args, lambda line: None, relay=object())
        self.assertEqual(
            (fetcher.connectTimeout, fetcher.speedLimit, fetcher.speedTime, fetcher.maxHolders, fetcher.prover),
            (1.5, 2048, 5, 4, None),
        )

    def test_checks(self) -> None:
        """Values that make no sense are usage errors naming the option."""
        self.assertIn("--connect-timeout must be positive", self.usageError(["--connect-timeout", "0", "x"]))
        self.assertIn("--speed-limit must not be negative", self.usageError(["--speed-limit", "-1", "x"]))
        self.assertIn("--speed-time must be positive", self.usageError(["--speed-time", "0", "x"]))
        self.assertIn("--max-holders must be at least 1", self.usageError(["--max-holders", "0", "x"]))

    def test_speedLimitOff(self) -> None:
        """--speed-limit 0 turns the rate check off."""
        self.assertEqual(parseArgs(["--speed-limit", "0", "x"]).speed_limit, 0)

    def test_secretFile(self) -> None:
        """--secret-file loads the secret and gives the Fetcher a prover for the relay's challenge."""
        path = Path(self.mktemp())
        path.write_bytes(b"a shared secret, long enough\n")
        args = parseArgs(["--secret-file", str(path), "x"])
        self.assertEqual(args.secret, b"a shared secret, long enough")
        fetcher = buildFetcher(Clock(), args, lambda line: None, relay=object())
        line = fetcher.prover("nonce", True, b"P2P/1 PEERS\r\n")
        self.assertTrue(line.startswith(b"P2P/1 PROOF mac="), line)

    def test_listenByDefault(self) -> None:
        """By default the Fetcher may ask a firewalled peer to connect back."""
        fetcher = buildFetcher(Clock(), parseArgs(["x"]), lambda line: None, relay=object())
        self.assertTrue(fetcher.listen)

    def test_noListen(self) -> None:
        """--no-listen: the Fetcher never listens (firewalled peers via the relay)."""
        fetcher = buildFetcher(Clock(), parseArgs(["--no-listen", "x"]), lambda line: None, relay=object())
        self.assertFalse(fetcher.listen)

    def test_noListenDocumented(self) -> None:
        """--help explains --no-listen."""
        stdout = io.StringIO()
        with redirect_stdout(stdout):
            self.assertRaises(SystemExit, parseArgs, ["--help"])
        self.assertIn("firewalled peers via the relay", " ".join(stdout.getvalue().split()))

    def test_tlsRefusesFirewalled(self) -> None:
        """--tls: a firewalled peer is a failed attempt saying TLS needs a direct connection."""
        endpoint = options.tlsPeerEndpoint(Clock(), 3.0)(PeerAddress("h", 1, "n", reach=wire.FIREWALLED))
        failure = self.failureResultOf(endpoint.connect(Factory()))
        self.assertIn("firewalled", str(failure.value))

    def test_secretFileMissing(self) -> None:
        """An unreadable --secret-file is a usage error naming it."""
        self.assertIn("--secret-file:", self.usageError(["--secret-file", "/nonexistent/secret", "x"]))


class VisibleOutputTests(CommandTestCase):
    """
    Whatever came from the network reaches the terminal with its control,
    escape and bidi characters made visible -- in tables, listings, errors,
    progress and the prompt -- while --json and file contents stay exact.
    """

    def assertNoControls(self) -> None:
        for stream, data in self.terminal.transcript:
            text = data.decode("utf-8")
            if stream == "stdout" and text.startswith("{"):
                continue
            self.assertNotIn(ESC, text)
            self.assertNotIn("\u202e", text)
            self.assertNotIn("\x07", text)

    def test_peers(self) -> None:
        """--peers shows a hostile node id and host escaped."""
        fetcher = FakeFetcher(peers=[PeerAddress(f"h{ESC}[2J", 5001, EVIL)])
        self.assertEqual(self.p2pFetch(["--peers"], fetcher), EXIT_OK)
        self.assertEqual(self.terminal.stdout.decode(), f"h\\x1b[2J:5001  node={SHOWN}\n")
        self.assertNoControls()

    def test_peersJsonExact(self) -> None:
        """--peers --json keeps the exact text, escaped by JSON itself."""
        fetcher = FakeFetcher(peers=[PeerAddress("h", 5001, EVIL)])
        self.assertEqual(self.p2pFetch(["--peers", "--json"], fetcher), EXIT_OK)
        self.assertEqual(json.loads(self.terminal.stdout)["node"], EVIL)
        self.assertNoControls()

    def test_table(self) -> None:
        """--list shows hostile names escaped, and the columns are measured on what is shown."""
        fetcher = FakeFetcher(listing=[fileItem(EVIL, 5), fileItem("a.txt", 7)])
        self.assertEqual(self.p2pFetch(["--list"], fetcher), EXIT_OK)
        lines = self.terminal.stdout.decode().splitlines()
        self.assertEqual(lines[1].split("  ")[0], SHOWN)
        self.assertEqual(lines[2].index(" 7 "), lines[1].index(" 5 "))
        self.assertNoControls()

    def test_listJsonExact(self) -> None:
        """--list --json keeps the exact name."""
        fetcher = FakeFetcher(listing=[fileItem(EVIL, 5)])
        self.assertEqual(self.p2pFetch(["--list", "--json"], fetcher), EXIT_OK)
        self.assertEqual(json.loads(self.terminal.stdout)["name"], EVIL)

    def test_attemptErrors(self) -> None:
        """A node's error text in a failed attempt is shown escaped."""
        why = NotFetched("a.txt", [Attempt(PEER, f"500 {ESC}[2Jboom")])
        self.assertEqual(self.p2pFetch(["a.txt"], FakeFetcher(errors={"a.txt": why})), EXIT_NOT_FETCHED)
        self.assertNoControls()

    def test_relayError(self) -> None:
        """A relay's error text is shown escaped."""
        error = wire.ProtocolError(400, f"bad {ESC}]0;x\x07")
        self.assertEqual(self.p2pFetch(["--list"], FakeFetcher(errors={"search": error})), EXIT_NOT_FETCHED)
        self.assertEqual(self.terminal.stderr, "p2p-fetch: relay answered 400 bad \\x1b]0;x\\x07\n")

    def test_savedFrom(self) -> None:
        """The "saved" line shows the peer's address escaped."""

        class HostileHost(FakeFetcher):
            async def fetch(inner, name, sink, holders=None):
                fetched = await FakeFetcher.fetch(inner, name, sink)
                return attrs.evolve(fetched, peer=f"h{ESC}[2J:5001")

        out = self.scratch / "out"
        self.assertEqual(self.p2pFetch(["-o", str(out), "a.txt"], HostileHost({"a.txt": A})), EXIT_OK)
        self.assertIn("B from h\\x1b[2J:5001)", self.terminal.stderr)
        self.assertNoControls()

    def test_contentsExact(self) -> None:
        """File contents on stdout are the user's bytes: never escaped."""
        data = f"{ESC}[1mbold{ESC}[0m\n".encode()
        self.assertEqual(self.p2pFetch(["a.txt"], FakeFetcher({"a.txt": data})), EXIT_OK)
        self.assertEqual(self.terminal.stdout, data)

    def test_prompt(self) -> None:
        """At the prompt, a typed hostile name is echoed escaped in the failure line."""
        d = self.start([], FakeFetcher())
        self.terminal.type(f"{EVIL}.txt\n")
        self.terminal.eof()
        self.assertEqual(self.successResultOf(d), EXIT_NOT_FETCHED)
        self.assertIn(SHOWN, self.terminal.stderr)
        self.assertNoControls()


class NoSpaceTests(CommandTestCase):
    """Not enough room for a file: one clear line, exit 1, nothing left behind."""

    def test_oneLine(self) -> None:
        """-o DIR without room for the file says so in one line and exits 1."""
        from p2prelay.client import download

        self.patch(download, "freeSpace", lambda directory: int(1.1 * 2**30))
        out = self.scratch / "out"
        error = download.NoSpace(f"not enough space in {out}: a.txt needs 2.0 GiB, 1.1 GiB free")
        code = self.p2pFetch(["-o", str(out), "a.txt"], FakeFetcher(errors={"a.txt": error}))
        self.assertEqual(code, EXIT_NOT_FETCHED)
        self.assertEqual(
            self.terminal.stderr,
            f"p2p-fetch: a.txt: not fetched: not enough space in {out}: a.txt needs 2.0 GiB, 1.1 GiB free\n",
        )
        self.assertFalse(out.exists())

    def test_stdoutUsesTempFolder(self) -> None:
        """Printing to stdout checks the temporary folder's free space."""
        from p2prelay.client import download

        seen = []

        def free(directory):
            seen.append(Path(directory))
            return 3

        self.patch(download, "freeSpace", free)
        self.assertEqual(self.p2pFetch(["a.txt"], FakeFetcher({"a.txt": A})), EXIT_NOT_FETCHED)
        self.assertEqual(seen, [self.temp])
        self.assertIn(f"not enough space in {self.temp}", self.terminal.stderr)
        self.assertEqual(self.leftovers(), [])

    def test_nestedFailureLeavesNoFolders(self) -> None:
        """A failed nested fetch (-o DIR a/b/c.txt) leaves no empty folders in DIR."""
        out = self.scratch / "out"
        out.mkdir()
        self.assertEqual(self.p2pFetch(["-o", str(out), "a/b/c.txt"], FakeFetcher()), EXIT_NOT_FETCHED)
        self.assertEqual(list(out.iterdir()), [])
