"""
``p2p-peer`` in process: its options (one definition with ``twistd
peernode``'s), its usage errors (exit 2), a node that cannot start (exit 1,
one line), and the menu, driven through a fake terminal with a fake fetcher
while the node registers with a real relay over in-memory connections.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path
from typing import Dict, List, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.internet.error import CannotListenError
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import __version__, wire
from p2prelay.cli.peer import EXIT_CANNOT_START, EXIT_OK, EXIT_USAGE, PeerOptions, parseOptions, run
from p2prelay.client.fetcher import PEER_TIMEOUT, Fetched, NotFetched, PeerAddress, RelayUnreachable
from p2prelay.node.upkeep import DEFAULT_RESCAN
from p2prelay.relay.protocol import RelayFactory
from p2prelay.relay.registry import Registry
from p2prelay.tap import NodeOptions

from .support import FakeTerminal, flushPumps, sha, syncThread
from .test_service import TAKEN, UDPReactor

RELAY = "127.0.0.1:8000"
LOOPBACK = "tcp:0:interface=127.0.0.1"
NODE_TCP = 41000  # what PeerReactor binds for tcp:0
NODE_UDP = 40000  # and UDPReactor for udp:0


class FakeTCPPort:
    def __init__(self, address: IPv4Address) -> None:
        self.address = address
        self.listening = True

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        self.listening = False


class FakeConnector:
    def __init__(self, address: IPv4Address) -> None:
        self.address = address

    def getDestination(self) -> IPv4Address:
        return self.address

    def stopConnecting(self) -> None:
        pass

    def disconnect(self) -> None:
        pass


class PeerReactor(UDPReactor):
    """
    A memory reactor in which the peer's ports bind (tcp:0 is 41000) and
    its outgoing TCP connections reach a real relay, in memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.registry = Registry(self.seconds, 90.0)
        self.relay = RelayFactory(self.registry, self)
        self.pumps: List[iosim.IOPump] = []
        self.tcpPorts: List[FakeTCPPort] = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        self.tcpServers.append((port, factory, backlog, interface))
        bound = FakeTCPPort(IPv4Address("TCP", interface or "0.0.0.0", port or NODE_TCP))
        self.tcpPorts.append(bound)
        return bound

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        self.tcpClients.append((host, port, factory, timeout, bindAddress))
        peer = IPv4Address("TCP", "127.0.0.1", 50000 + len(self.pumps))
        server = self.relay.buildProtocol(peer)
        client = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, True, peerAddress=peer),
                client,
                iosim.FakeTransport(client, False),
                greet=False,
                clock=self,
            )
        )
        return FakeConnector(IPv4Address("TCP", host, port))


class BusyTCPReactor(PeerReactor):
    def listenTCP(self, port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, TAKEN)


class BusyUDPReactor(PeerReactor):
    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        raise CannotListenError(interface, port, TAKEN)


class FakeSink:
    """What the menu sees of a download in progress."""

    def __init__(self, size: int) -> None:
        self.expectedSize = size
        self.received = size // 2


class FakeFetcher:
    """
    A fetcher over a fixed set of network files: searches list them,
    lookups name a holder for each, saves write them; a name in ``held``
    saves only once its Deferred fires, one in ``lost`` is listed but no
    peer delivers it.
    """

    def __init__(self, files: Dict[str, bytes]) -> None:
        self.files = files
        self.held: Dict[str, Deferred] = {}
        self.lost: set = set()
        self.searches: List[str] = []
        self.lookups: List[str] = []
        self.saves: List[str] = []
        self.unreachable = False

    async def holders(self, name: str) -> List[PeerAddress]:
        self.lookups.append(name)
        if self.unreachable:
            raise RelayUnreachable("connection refused")
        return [PeerAddress("10.9.8.7", 7000)] if name in self.files or name in self.lost else []

    async def search(self, pattern: str, limit: Optional[int] = None):
        self.searches.append(pattern)
        if self.unreachable:
            raise RelayUnreachable("connection refused")
        items = [
            wire.parseLine(wire.item(wire.FILE, name=name, size=len(data), holders=2).rstrip(b"\n"))
            for name, data in sorted(self.files.items())
            if pattern.strip("*") in name
        ]
        return items, False

    path = wire.DIRECT  # the path every download comes by

    async def save(self, name: str, final: Path, *, force: bool = False, onStart=lambda sink: None):
        self.saves.append(name)
        if name not in self.files:
            raise NotFetched(name, [], "all 1 peers that might have it failed")
        data = self.files[name]
        onStart(FakeSink(len(data)))
        if name in self.held:
            await self.held[name]
        final.write_bytes(data)
        return Fetched(name, len(data), sha(data), "10.9.8.7:7000", [], 0.0, path=self.path)


class OptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()
        self.stderr = io.StringIO()
        self.stdout = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.patch(sys, "stdout", self.stdout)
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "P2PRELAY_RELAY"})

    def parse(self, *argv: str) -> PeerOptions:
        return parseOptions(["--dir", str(self.folder), *argv])

    def usageError(self, *argv: str) -> str:
        """Parse argv, expecting exit 2; the stderr it wrote."""
        with self.assertRaises(SystemExit) as caught:
            parseOptions(list(argv))
        self.assertEqual(caught.exception.code, EXIT_USAGE)
        self.assertEqual(self.stdout.getvalue(), "")
        return self.stderr.getvalue()

    def test_nodeOptionsAndMore(self) -> None:
        """p2p-peer accepts every option of twistd peernode, plus --timeout, --log and --no-listen."""
        node, peer = NodeOptions(), PeerOptions()
        self.assertLessEqual(set(node.longOpt), set(peer.longOpt))
        self.assertEqual(set(peer.longOpt) - set(node.longOpt), {"timeout=", "log=", "no-listen"})
        self.assertEqual(node.shortOpt, peer.shortOpt.replace("h", ""))

    def test_defaults(self) -> None:
        """Defaults: relay localhost:8000, an OS-chosen port, UDP on, the standard timings."""
        options = self.parse()
        self.assertEqual(
            {k: options[k] for k in ("relay", "port", "heartbeat", "rescan", "timeout", "log", "udp")},
            {"relay": "localhost:8000", "port": "tcp6:0:interface=\\:\\:", "heartbeat": None, "rescan": DEFAULT_RESCAN,
             "timeout": PEER_TIMEOUT, "log": None, "udp": (0, "::")},
        )

    def test_relayFromEnvironment(self) -> None:
        """$P2PRELAY_RELAY is the default relay."""
        os.environ["P2PRELAY_RELAY"] = "relay.example:9000"
        self.assertEqual(self.parse()["relay"], "relay.example:9000")

    def test_relayOption(self) -> None:
        """--relay wins over $P2PRELAY_RELAY."""
        os.environ["P2PRELAY_RELAY"] = "relay.example:9000"
        self.assertEqual(self.parse("--relay", "other:1")["relay"], "other:1")

    def test_dirResolved(self) -> None:
        """--dir is made absolute."""
        os.chdir(self.folder.parent)
        self.assertEqual(parseOptions(["--dir", self.folder.name])["dir"], str(self.folder.resolve()))

    def test_udpOnPortInterface(self) -> None:
        """UDP is served on the --port interface, not on every interface."""
        self.assertEqual(self.parse("--port", LOOPBACK)["udp"], (0, "127.0.0.1"))

    def test_udpPort(self) -> None:
        """--udp-port picks the UDP port."""
        self.assertEqual(self.parse("--port", LOOPBACK, "--udp-port", "5555")["udp"], (5555, "127.0.0.1"))

    def test_noUdp(self) -> None:
        """--no-udp serves TCP only."""
        self.assertIsNone(self.parse("--no-udp")["udp"])

    def test_timeout(self) -> None:
        """--timeout takes fractional seconds."""
        self.assertEqual(self.parse("--timeout", "2.5")["timeout"], 2.5)

    def test_dirRequired(self) -> None:
        """Without --dir: exit 2, saying so, and how to get help."""
        self.assertEqual(
            self.usageError(), "p2p-peer: --dir is required\nTry 'p2p-peer --help' for usage.\n"
        )

    def test_dirNotADirectory(self) -> None:
        """A --dir that is no folder: exit 2."""
        self.assertIn("does not exist", self.usageError("--dir", str(self.folder / "nothing")))

    def test_negativeHeartbeat(self) -> None:
        """--heartbeat -1: exit 2 (it used to be accepted and break callLater)."""
        self.assertIn("--heartbeat -1: not a positive number of seconds",
                      self.usageError("--dir", str(self.folder), "--heartbeat", "-1"))

    def test_zeroHeartbeat(self) -> None:
        """--heartbeat 0: exit 2."""
        self.assertIn("--heartbeat 0", self.usageError("--dir", str(self.folder), "--heartbeat", "0"))

    def test_negativeTimeout(self) -> None:
        """--timeout -5: exit 2."""
        self.assertIn("--timeout -5", self.usageError("--dir", str(self.folder), "--timeout", "-5"))

    def test_zeroRescan(self) -> None:
        """--rescan 0: exit 2."""
        self.assertIn("--rescan 0", self.usageError("--dir", str(self.folder), "--rescan", "0"))

    def test_badRelay(self) -> None:
        """A --relay that names no endpoint: exit 2."""
        self.assertIn("--relay", self.usageError("--dir", str(self.folder), "--relay", "no where"))

    def test_badPort(self) -> None:
        """A --port that is no endpoint description: exit 2."""
        self.assertIn("nosuch:1", self.usageError("--dir", str(self.folder), "--port", "nosuch:1"))

    def test_badUdpPort(self) -> None:
        """A --udp-port that is no port: exit 2."""
        self.assertIn("--udp-port", self.usageError("--dir", str(self.folder), "--udp-port", "x"))

    def test_unknownOption(self) -> None:
        """An option p2p-peer does not have: exit 2."""
        self.assertIn("--frobnicate", self.usageError("--dir", str(self.folder), "--frobnicate"))

    def test_extraArgument(self) -> None:
        """p2p-peer takes no arguments besides options: exit 2."""
        self.assertIn("p2p-peer:", self.usageError("--dir", str(self.folder), "stray"))

    def help(self, flag: str) -> str:
        with self.assertRaises(SystemExit) as caught:
            parseOptions([flag])
        self.assertEqual(caught.exception.code, EXIT_OK)
        return self.stdout.getvalue()

    def test_help(self) -> None:
        """--help lists the options with their defaults, and the exit statuses."""
        text = self.help("--help")
        self.assertTrue(text.startswith("Usage: p2p-peer --dir DIR"), text)
        for expected in ("--no-udp", "--udp-port", "--timeout", "--log", "tcp6:0:interface=\\:\\:]",
                         f"[default: {PEER_TIMEOUT}]", "$P2PRELAY_RELAY",
                         "0    the menu was quit", "1    the node cannot start", "2    usage error",
                         "130  interrupted (Ctrl-C; 143 after SIGTERM"):
            self.assertIn(expected, text)

    def test_helpShowsEveryDefault(self) -> None:
        """Every option that takes a value says its default (or that it is required) in --help."""
        text = self.help("--help")
        paragraphs = {}
        for line in text.split("\n\n")[0].splitlines()[2:]:
            if line.lstrip().startswith("-"):
                option = [w for w in line.split() if w.startswith("--")][0].rstrip("=")
                paragraphs[option] = line
            elif paragraphs:
                paragraphs[option] += " " + line.strip()
        valued = {"--" + name.rstrip("=") for name in PeerOptions().longOpt if name.endswith("=")}
        self.assertEqual(valued - set(paragraphs), set())
        missing = [o for o in valued if "default" not in paragraphs[o] and "required" not in paragraphs[o]]
        self.assertEqual(missing, [])

    def test_helpRelayForms(self) -> None:
        """--help names the forms --relay takes."""
        self.assertIn("PORT (on localhost), HOST (port 8000),", self.help("--help"))

    def test_shortHelp(self) -> None:
        """-h is --help, as it always was."""
        self.assertIn("Exit status", self.help("-h"))

    def test_version(self) -> None:
        """--version prints the program's version, not Twisted's."""
        self.assertEqual(self.help("--version"), f"p2p-peer {__version__}\n")


class RunTestCase(SynchronousTestCase):
    passFetcher = True  # False: run() makes its own Fetcher

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()
        (self.folder / "a.txt").write_bytes(b"alpha")
        self.fetcher = FakeFetcher({"b.txt": b"beta", "c.txt": b"gamma", "a.txt": b"alpha"})
        self.terminal = FakeTerminal()

    def start(self, *argv: str, reactor: Optional[PeerReactor] = None) -> Deferred:
        self.reactor = reactor or PeerReactor()
        self.signals: DeferredQueue = DeferredQueue()
        config = parseOptions(["--dir", str(self.folder), "--relay", RELAY, "--port", LOOPBACK, *argv])
        self.done = done = Deferred.fromCoroutine(
            run(
                self.reactor, config, self.terminal.console,
                self.fetcher if self.passFetcher else None, runInThread=syncThread,
                signals=self.signals,
            )
        )
        terminal = self.terminal

        def quitIfRunning() -> None:
            for held in self.fetcher.held.values():
                if not held.called:
                    held.callback(None)
            if not done.called:
                terminal.eof()
                self.settle()
            self.successResultOf(done)

        self.addCleanup(quitIfRunning)
        self.settle()
        return done

    def settle(self) -> None:
        """Deliver every byte and every call due now."""
        for _ in range(10):
            flushPumps(self.reactor.pumps)
            self.reactor.advance(0)

    def type(self, text: str) -> None:
        self.terminal.type(text)
        self.settle()

    def quit(self) -> int:
        self.type("6\n")
        return self.successResultOf(self.done)

    def signal(self, signum: int = signal.SIGINT) -> None:
        """Ctrl-C (or another signal) at the terminal."""
        self.signals.put(signum)
        self.settle()

    @property
    def stdout(self) -> str:
        return self.terminal.stdout.decode("utf-8")

    def registered(self) -> Optional[List[str]]:
        """The files the relay lists for this peer, or None if it lists no such peer."""
        peers = self.reactor.registry.all()
        if not peers:
            return None
        [peer] = peers
        return sorted(peer.files)


class StartTests(RunTestCase):
    def test_udpTaken(self) -> None:
        """A taken UDP port: exit 1 with one line naming it, no menu, both ports closed again."""
        d = self.start("--udp-port", "5555", reactor=BusyUDPReactor())
        self.assertEqual(self.successResultOf(d), EXIT_CANNOT_START)
        self.assertEqual(
            self.terminal.stderr,
            "p2p-peer: cannot listen on udp:5555:interface=127.0.0.1: "
            "Couldn't listen on 127.0.0.1:5555: [Errno 98] Address already in use.\n",
        )
        self.assertEqual(self.stdout, "")
        self.assertFalse(self.reactor.tcpPorts[0].listening)
        self.assertIsNone(self.registered())

    def test_tcpTaken(self) -> None:
        """A taken TCP port: exit 1 with one line naming it."""
        d = self.start(reactor=BusyTCPReactor())
        self.assertEqual(self.successResultOf(d), EXIT_CANNOT_START)
        [line] = self.terminal.stderr.splitlines()
        self.assertTrue(line.startswith(f"p2p-peer: cannot listen on {LOOPBACK}: "), line)

    def test_banner(self) -> None:
        """Once up, p2p-peer says what it shares, where it listens and which relay it uses."""
        self.start()
        self.assertTrue(
            self.stdout.startswith(
                f"p2p-peer: sharing 1 file from {self.folder} on 127.0.0.1:{NODE_TCP}, relay {RELAY}\n"
            ),
            self.stdout,
        )

    def test_registers(self) -> None:
        """The peer registers its files, TCP port and UDP port with the relay."""
        self.start()
        [peer] = self.reactor.registry.all()
        self.assertEqual((sorted(peer.files), peer.port, peer.udp), (["a.txt"], NODE_TCP, NODE_UDP))

    def test_udpOnPortInterface(self) -> None:
        """UDP is bound on the --port interface (it used to be every interface)."""
        self.start()
        [udp] = self.reactor.udpPorts
        self.assertEqual(udp.interface, "127.0.0.1")

    def test_noUdp(self) -> None:
        """--no-udp: no UDP port, none registered."""
        self.start("--no-udp")
        self.assertEqual(self.reactor.udpPorts, [])
        self.assertIsNone(self.reactor.registry.all()[0].udp)

    def test_quit(self) -> None:
        """6 quits: exit 0, the peer unregistered, both ports closed, 'bye'."""
        self.start()
        self.assertEqual(self.quit(), EXIT_OK)
        self.assertIsNone(self.registered())
        self.assertFalse(self.reactor.tcpPorts[0].listening)
        self.assertFalse(self.reactor.udpPorts[0].listening)
        self.assertTrue(self.stdout.endswith("bye\n"), self.stdout)

    def test_quitWords(self) -> None:
        """q, quit and exit quit too."""
        for word in ("q", "quit", "exit"):
            with self.subTest(word=word):
                self.terminal = FakeTerminal()
                self.start()
                self.type(f"{word}\n")
                self.assertEqual(self.successResultOf(self.done), EXIT_OK)

    def test_endOfInput(self) -> None:
        """End of input quits like 6."""
        self.start()
        self.terminal.eof()
        self.settle()
        self.assertEqual(self.successResultOf(self.done), EXIT_OK)
        self.assertIsNone(self.registered())


class MenuTests(RunTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.start()

    def after(self, text: str) -> str:
        """Type text; what was printed because of it."""
        before = len(self.stdout)
        self.type(text)
        return self.stdout[before:]

    def test_menuAndPrompt(self) -> None:
        """The menu is shown, then the prompt."""
        self.assertIn("1) list the network's files", self.stdout)
        self.assertTrue(self.stdout.endswith("choice> "), self.stdout)

    def test_listNetwork(self) -> None:
        """1 lists every file on the network in aligned columns: human size, holders; mine marked."""
        self.fetcher.files["long name.bin"] = b"x" * 1536
        out = self.after("1\n")
        self.assertEqual(self.fetcher.searches, [""])
        self.assertIn(
            "  * a.txt              5 B  2 holders\n"
            "    b.txt              4 B  2 holders\n"
            "    c.txt              5 B  2 holders\n"
            "    long name.bin  1.5 KiB  2 holders\n"
            "  (* mine)\n",
            out,
        )

    def test_listNetworkNoneMine(self) -> None:
        """Without any of my files in the listing, no mark and no key."""
        out = self.after("2\nb.t\n")
        self.assertIn("    b.txt  4 B  2 holders\n", out)
        self.assertNotIn("mine", out)

    def test_search(self) -> None:
        """2 asks for a pattern and lists the matches."""
        self.assertIn("pattern (substring or glob)> ", self.after("2\n"))
        out = self.after("c.t\n")
        self.assertEqual(self.fetcher.searches, ["c.t"])
        self.assertIn("c.txt", out)
        self.assertNotIn("b.txt", out)

    def test_noMatches(self) -> None:
        """A search that matches nothing says so."""
        self.assertIn("no files match", self.after("2\nzzz\n"))

    def test_relayUnreachable(self) -> None:
        """An unreachable relay is one line, and the menu carries on."""
        self.fetcher.unreachable = True
        out = self.after("1\n")
        self.assertIn("relay unreachable: connection refused\n", out)
        self.assertTrue(out.endswith("choice> "))

    def test_listMine(self) -> None:
        """4 lists this peer's own files, aligned, with human sizes and a total."""
        self.after("3\nc.txt\n")
        out = self.after("4\n")
        self.assertIn("  a.txt  5 B\n  c.txt  5 B\n", out)
        self.assertIn(f"  2 files, 10 B, in {self.folder}\n", out)

    def test_download(self) -> None:
        """3 downloads into the folder, then shares the file and registers it at once."""
        out = self.after("3\nb.txt\n")
        self.assertIn("b.txt: downloading in the background\n", out)
        self.assertIn("b.txt: done, 4 B from 10.9.8.7:7000; now shared\n", out)
        self.assertEqual((self.folder / "b.txt").read_bytes(), b"beta")
        self.assertIn("b.txt", self.after("4\n"))
        self.assertEqual(self.registered(), ["a.txt", "b.txt"])

    def test_downloadViaRelay(self) -> None:
        """A download that came via the relay says so when it is done."""
        self.fetcher.path = "relay"
        self.assertIn("b.txt: done, 4 B from 10.9.8.7:7000 via relay; now shared\n", self.after("3\nb.txt\n"))

    def test_downloadSeveral(self) -> None:
        """Several names, comma separated, with or without the seeds' Send verb."""
        self.after("3\nSend b.txt, c.txt\n")
        self.assertEqual(self.fetcher.saves, ["b.txt", "c.txt"])
        self.assertEqual(self.registered(), ["a.txt", "b.txt", "c.txt"])

    def test_downloadExisting(self) -> None:
        """A file already in the folder is not fetched again."""
        out = self.after("3\na.txt\n")
        self.assertIn(f"a.txt: a.txt is already in {self.folder}\n", out)
        self.assertEqual(self.fetcher.saves, [])

    def test_downloadBadName(self) -> None:
        """A name that would escape the folder is refused before any fetch."""
        out = self.after("3\n../escape.txt\n")
        self.assertIn("../escape.txt: ", out)
        self.assertEqual(self.fetcher.saves, [])

    def test_unknownNameRefusedAtOnce(self) -> None:
        """A name the relay lists no holder for is refused at once, never 'downloading in the background'."""
        out = self.after("3\nmissing.txt\n")
        self.assertIn("missing.txt: no peer holds it\n", out)
        self.assertNotIn("background", out)
        self.assertEqual((self.fetcher.lookups, self.fetcher.saves), (["missing.txt"], []))

    def test_unknownAmongKnown(self) -> None:
        """Of several names, only the unknown one is refused."""
        out = self.after("3\nb.txt, missing.txt\n")
        self.assertIn("missing.txt: no peer holds it\n", out)
        self.assertEqual(self.fetcher.saves, ["b.txt"])

    def test_lookupRelayUnreachable(self) -> None:
        """A relay unreachable for the lookup is one line, and the menu carries on."""
        self.fetcher.unreachable = True
        out = self.after("3\nb.txt\n")
        self.assertIn("relay unreachable: connection refused\n", out)
        self.assertEqual(self.fetcher.saves, [])
        self.assertTrue(out.endswith("choice> "))

    def test_notFetched(self) -> None:
        """A listed file no peer delivers is one line saying why."""
        self.fetcher.lost.add("gone.txt")
        out = self.after("3\ngone.txt\n")
        self.assertIn("gone.txt: downloading in the background\n", out)
        self.assertIn("gone.txt: not fetched: all 1 peers that might have it failed\n", out)

    def test_promptRedrawnAfterBackgroundMessage(self) -> None:
        """A download finishing while the menu waits prints its line, then the prompt again."""
        self.fetcher.held["b.txt"] = Deferred()
        self.after("3\nb.txt\n")
        self.assertTrue(self.stdout.endswith("choice> "))
        before = len(self.stdout)
        self.fetcher.held["b.txt"].callback(None)
        self.settle()
        self.assertEqual(
            self.stdout[before:], "\nb.txt: done, 4 B from 10.9.8.7:7000; now shared\nchoice> "
        )

    def test_promptRedrawnAfterFailure(self) -> None:
        """A download failing while a question is open redraws that question."""
        self.fetcher.held["b.txt"] = Deferred()
        self.after("3\nb.txt\n")
        self.after("2\n")
        before = len(self.stdout)
        self.fetcher.held["b.txt"].errback(RelayUnreachable("gone"))
        self.settle()
        self.assertEqual(
            self.stdout[before:], "\nb.txt: not fetched: gone\npattern (substring or glob)> "
        )

    def test_transfers(self) -> None:
        """5 shows each download in progress, aligned, in human sizes; with none, says so."""
        self.assertIn("no transfers in progress", self.after("5\n"))
        self.fetcher.held["b.txt"] = Deferred()
        self.fetcher.held["big.bin"] = Deferred()
        self.fetcher.files["big.bin"] = b"x" * 4096
        self.after("3\nb.txt, big.bin\n")
        self.assertIn("  b.txt            2 B of 4 B  50%\n  big.bin  2.0 KiB of 4.0 KiB  50%\n", self.after("5\n"))
        self.fetcher.held["big.bin"].callback(None)
        self.fetcher.held["b.txt"].callback(None)
        self.settle()
        self.assertIn("no transfers in progress", self.after("5\n"))

    def test_alreadyDownloading(self) -> None:
        """Asking again for a file on its way is refused."""
        self.fetcher.held["b.txt"] = Deferred()
        self.after("3\nb.txt\n")
        self.assertIn("b.txt: already downloading", self.after("3\nb.txt\n"))
        self.fetcher.held["b.txt"].callback(None)

    def hold(self, *names: str) -> None:
        """Start downloads of names that finish only when their Deferreds fire."""
        for name in names:
            self.fetcher.held[name] = Deferred()
        self.after(f"3\n{', '.join(names)}\n")

    def test_quitAsksAboutDownloads(self) -> None:
        """Quitting with downloads running asks whether to wait or cancel them."""
        self.hold("b.txt", "c.txt")
        self.assertTrue(self.after("6\n").endswith("2 downloads running; wait (w) or cancel (c)? "))
        self.assertNoResult(self.done)

    def test_quitWaitsForDownloads(self) -> None:
        """w waits for the downloads, then stops."""
        self.hold("b.txt")
        self.after("6\n")
        self.assertIn("waiting for 1 download to finish (Ctrl-C cancels)...", self.after("w\n"))
        self.assertNoResult(self.done)
        self.fetcher.held["b.txt"].callback(None)
        self.settle()
        self.assertEqual(self.successResultOf(self.done), EXIT_OK)
        self.assertEqual((self.folder / "b.txt").read_bytes(), b"beta")

    def test_quitCancelsDownloads(self) -> None:
        """c cancels every download (each says so, nothing is saved), then stops with exit 0."""
        self.hold("b.txt", "c.txt")
        self.after("6\n")
        out = self.after("c\n")
        self.assertIn("b.txt: cancelled\n", out)
        self.assertIn("c.txt: cancelled\n", out)
        self.assertEqual(self.successResultOf(self.done), EXIT_OK)
        self.assertEqual(sorted(p.name for p in self.folder.iterdir()), ["a.txt"])
        self.assertTrue(self.stdout.endswith("bye\n"))

    def test_quitOtherAnswer(self) -> None:
        """Another answer asks again."""
        self.hold("b.txt")
        self.after("6\n")
        out = self.after("maybe\n")
        self.assertIn("maybe: answer w or c\n", out)
        self.assertTrue(out.endswith("1 download running; wait (w) or cancel (c)? "))

    def test_downloadsEndWhileAsked(self) -> None:
        """When the last download ends while the question is open, quitting goes on."""
        self.hold("b.txt")
        self.after("6\n")
        self.fetcher.held["b.txt"].callback(None)
        self.settle()
        self.assertEqual(self.successResultOf(self.done), EXIT_OK)
        self.assertEqual((self.folder / "b.txt").read_bytes(), b"beta")

    def test_endOfInputWaits(self) -> None:
        """End of input while asked waits for the downloads (input may be a script)."""
        self.hold("b.txt")
        self.after("6\n")
        self.terminal.eof()
        self.settle()
        self.assertNoResult(self.done)
        self.fetcher.held["b.txt"].callback(None)
        self.settle()
        self.assertEqual(self.successResultOf(self.done), EXIT_OK)

    def test_ctrlCQuits(self) -> None:
        """Ctrl-C at the menu with nothing running quits: the node stopped, exit 130."""
        self.signal(signal.SIGINT)
        self.assertEqual(self.successResultOf(self.done), 130)
        self.assertIsNone(self.registered())
        self.assertTrue(self.stdout.endswith("choice> \nbye\n"), self.stdout)

    def test_ctrlCAsks(self) -> None:
        """Ctrl-C with downloads running asks as quitting does; Ctrl-C again cancels them: exit 130."""
        self.hold("b.txt")
        self.signal(signal.SIGINT)
        self.assertTrue(self.stdout.endswith("1 download running; wait (w) or cancel (c)? "))
        self.assertNoResult(self.done)
        self.signal(signal.SIGINT)
        self.assertIn("b.txt: cancelled\n", self.stdout)
        self.assertEqual(self.successResultOf(self.done), 130)
        self.assertFalse((self.folder / "b.txt").exists())

    def test_cancelReportedAsFailure(self) -> None:
        """A download whose cancellation comes back as a failure still says 'cancelled'."""
        real = self.fetcher.save

        async def save(name, final, *, force=False, onStart=lambda sink: None):
            try:
                return await real(name, final, force=force, onStart=onStart)
            except CancelledError:
                raise NotFetched(name, [], "all 1 peers that might have it failed") from None

        self.fetcher.save = save
        self.hold("b.txt")
        self.after("6\nc\n")
        self.assertIn("b.txt: cancelled\n", self.stdout)
        self.assertNotIn("not fetched", self.stdout)

    def test_ctrlCWhileWaiting(self) -> None:
        """Ctrl-C while waiting for downloads cancels them."""
        self.hold("b.txt")
        self.after("6\nw\n")
        self.signal(signal.SIGINT)
        self.assertIn("b.txt: cancelled\n", self.stdout)
        self.assertEqual(self.successResultOf(self.done), 130)

    def test_sigtermCancels(self) -> None:
        """SIGTERM cancels the downloads and quits without asking: exit 143."""
        self.hold("b.txt")
        self.signal(signal.SIGTERM)
        self.assertNotIn("wait (w)", self.stdout)
        self.assertIn("b.txt: cancelled\n", self.stdout)
        self.assertEqual(self.successResultOf(self.done), 143)

    def test_unknownChoice(self) -> None:
        """Anything else is 'no such choice', and the menu again."""
        out = self.after("9\n")
        self.assertIn("no such choice: 9\n", out)
        self.assertIn("6) quit", out)

    def test_endOfInputAtSubPrompt(self) -> None:
        """End of input at a question other than the menu's quits too, instead of waiting forever."""
        self.type("2\n")
        self.terminal.eof()
        self.settle()
        self.assertEqual(self.successResultOf(self.done), EXIT_OK)
        self.assertEqual(self.fetcher.searches, [])

    def test_emptyChoice(self) -> None:
        """An empty line just shows the menu again."""
        out = self.after("\n")
        self.assertNotIn("no such choice", out)
        self.assertIn("6) quit", out)


ESC = "\x1b"


class VisibleMenuTests(RunTestCase):
    """
    What the network says reaches p2p-peer's menu with its control, escape
    and bidi characters made visible.
    """

    def setUp(self) -> None:
        super().setUp()
        self.fetcher.files[f"{ESC}]0;pwned\x07\u202eevil.txt"] = b"x"
        self.start()

    def after(self, text: str) -> str:
        before = len(self.stdout)
        self.type(text)
        return self.stdout[before:]

    def assertNoControls(self, text: str) -> None:
        for ch in (ESC, "\x07", "\u202e"):
            self.assertNotIn(ch, text)

    def test_listing(self) -> None:
        """A hostile name in the network's listing is shown escaped."""
        out = self.after("1\n")
        self.assertIn("    \\x1b]0;pwned\\x07\\u202eevil.txt  1 B  2 holders\n", out)
        self.assertNoControls(self.stdout)

    def test_relayError(self) -> None:
        """A relay's error text is shown escaped, and the menu carries on."""

        async def refuse(pattern, limit=None):
            raise wire.ProtocolError(400, f"no {ESC}[2J")

        self.fetcher.search = refuse
        out = self.after("1\n")
        self.assertIn("relay answered 400 no \\x1b[2J\n", out)
        self.assertNoControls(self.stdout)

    def test_downloadError(self) -> None:
        """A failed download's reason, from the network, is shown escaped."""

        async def save(name, final, *, force=False, onStart=lambda sink: None):
            raise NotFetched(name, [], f"peer said {ESC}]0;x\x07")

        self.fetcher.save = save
        out = self.after("3\nb.txt\n")
        self.assertIn("b.txt: not fetched: peer said \\x1b]0;x\\x07\n", out)
        self.assertNoControls(self.stdout)

    def test_doneFrom(self) -> None:
        """The peer a download came from is shown escaped."""
        real = self.fetcher.save

        async def save(name, final, *, force=False, onStart=lambda sink: None):
            fetched = await real(name, final, force=force, onStart=onStart)
            return Fetched(fetched.name, fetched.size, fetched.sha256, f"h{ESC}[2J:1", [], 0.0)

        self.fetcher.save = save
        self.assertIn("from h\\x1b[2J:1; now shared", self.after("3\nb.txt\n"))
        self.assertNoControls(self.stdout)


class SecretTests(RunTestCase):
    passFetcher = False
    def test_secretFileProves(self) -> None:
        """p2p-peer --secret-file: the node's secret also answers a private relay's challenge to its queries."""
        from p2prelay.cli import peer

        secret = Path(self.mktemp())
        secret.write_bytes(b"a shared secret, long enough\n")
        made = []

        def fetcher(*args, **kw):
            made.append(kw)
            return self.fetcher

        self.patch(peer, "Fetcher", fetcher)
        self.start("--secret-file", str(secret))
        [kw] = made
        self.assertTrue(kw["prover"]("nonce", True, b"P2P/1 PEERS\r\n").startswith(b"P2P/1 PROOF mac="))

    def fetcherMade(self, *argv: str) -> dict:
        from p2prelay.cli import peer

        made = []

        def fetcher(*args, **kw):
            made.append(kw)
            return self.fetcher

        self.patch(peer, "Fetcher", fetcher)
        self.start(*argv)
        return made[0]

    def test_listens(self) -> None:
        """By default p2p-peer's downloads may ask a firewalled peer to connect back."""
        self.assertTrue(self.fetcherMade()["listen"])

    def test_noListen(self) -> None:
        """--no-listen: p2p-peer's downloads reach firewalled peers via the relay only."""
        self.assertFalse(self.fetcherMade("--no-listen")["listen"])

    def test_noSecretNoProver(self) -> None:
        """Without --secret-file the fetcher has no prover."""
        from p2prelay.cli import peer

        made = []

        def fetcher(*args, **kw):
            made.append(kw)
            return self.fetcher

        self.patch(peer, "Fetcher", fetcher)
        self.start()
        self.assertIsNone(made[0]["prover"])


class VisibleLogTests(SynchronousTestCase):
    def test_logLinesVisible(self) -> None:
        """The node's log on stderr shows network text escaped, line by line."""
        from p2prelay.cli.peer import VisibleStderr

        captured = io.StringIO()
        self.patch(sys, "stderr", captured)
        VisibleStderr().write(f"GET {ESC}[2J from peer\nnext\n")
        self.assertEqual(captured.getvalue(), "GET \\x1b[2J from peer\nnext\n")


class RelayListTests(RunTestCase):
    """p2p-peer --relay a,b: the node and its downloads share one relay list, with failover."""

    passFetcher = False
    RELAYS = "127.0.0.1:8000,127.0.0.1:8001"

    def fetcherArgs(self) -> tuple:
        from p2prelay.cli import peer

        made = []

        def fetcher(*args, **kw):
            made.append(args)
            return self.fetcher

        self.patch(peer, "Fetcher", fetcher)
        self.start("--relay", self.RELAYS)
        return made[0]

    def test_downloadsShareNodeRelays(self) -> None:
        """The downloads ask a FailoverEndpoint over the relays listed, in their order."""
        from p2prelay.addresses import FailoverEndpoint

        reactor, relay = self.fetcherArgs()[:2]
        self.assertIsInstance(relay, FailoverEndpoint)
        self.assertEqual([r.name for r in relay.relays], self.RELAYS.split(","))

    def test_registersAtFirst(self) -> None:
        """The node registers with the first relay of the list."""
        self.fetcherArgs()
        self.assertEqual(self.registered(), ["a.txt"])
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 8000))

    def test_bannerNamesRelays(self) -> None:
        """The banner lists the relays."""
        self.fetcherArgs()
        self.assertIn(", relays 127.0.0.1:8000, 127.0.0.1:8001\n", self.stdout)

