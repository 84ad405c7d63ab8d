"""
Multi-source downloads, resume and streaming, against fake holders in
memory that speak the node's MANIFEST and range GET (and misbehave on
request), on a task.Clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import pieces, wire
from p2prelay.cli.fetch import parseArgs, run, catchSignals
from p2prelay.cli.options import EXIT_NOT_FETCHED, EXIT_OK
from p2prelay.client.fetcher import Fetcher, NotFetched
from p2prelay.client.journal import journalPath, partPath
from p2prelay.client.manifest import ManifestProtocol, groupByRoot
from p2prelay.client.outputs import Serial
from p2prelay.client.swarm import Interrupted
from p2prelay.client.fetcher import PeerAddress
from p2prelay.wire import FileEntry

from .support import FakeTerminal, MemoryNetwork
from .test_fetch import FakeRelay, FakeRelayProtocol

PIECE = pieces.MIN_PIECE_SIZE  # 16 KiB pieces keep the files small
COUNT = 12
DATA = bytes((i * 7 + i // 251) % 256 for i in range(PIECE * (COUNT - 1) + 5000))  # last piece short
OTHER = DATA[:-1] + b"!"  # another version of the same size
TICK = 0.05
RELAY = "127.0.0.1:8000"


def layout(data: bytes):
    digests = [pieces.pieceDigest(data[i : i + PIECE]) for i in range(0, len(data), PIECE)]
    return digests, pieces.rootOf(len(data), PIECE, digests)


class RootRelayProtocol(FakeRelayProtocol):
    """The fake relay, also answering ``WHOHAS root=`` (or 400, as an older relay does, when ``old``)."""

    def answer(self, message: wire.Message) -> None:
        relay = self.relay
        if message.word != wire.WHOHAS or "root" not in message.fields:
            return super().answer(message)
        relay.asked.append("WHOHAS root")
        if relay.old:
            self.finish(wire.status(400, "WHOHAS needs name="))
            return
        root = message.sha256("root")
        items = []
        for p in relay.peers:
            for name, (held, piece) in p.roots.items():
                if held == root:
                    size, digest = p.files[name]
                    items.append(wire.item(wire.PEER, node=p.node, host=p.host, port=p.port, name=name,
                                           size=size, sha256=digest, root=root, piece=piece))
                    break
        self.finish(wire.status(wire.OK, count=len(items)) + b"".join(items) + wire.end(len(items)))


class RootRelay(FakeRelay):
    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.old = False

    def buildProtocol(self, addr):
        return RootRelayProtocol(self)


class HolderProtocol(LineReceiver):
    """One connection to a fake holder: MANIFEST or one GET (range), as the node answers them."""

    delimiter = b"\n"

    def __init__(self, holder: "Holder") -> None:
        self.holder = holder
        self.call = None

    def lineReceived(self, line: bytes) -> None:
        h = self.holder
        message = wire.parseLine(line)
        if message.word == wire.MANIFEST:
            h.manifests += 1
            digests = h.badDigests or h.digests
            self.transport.write(
                wire.status(200, size=len(h.data), sha256=hashlib.sha256(h.data).hexdigest(),
                            root=h.root, piece=PIECE, count=len(digests))
                + b"".join(digests)
            )
            self.transport.loseConnection()
            return
        assert message.word == wire.GET, message.word
        h.names.append(message.get("name"))
        if h.name is not None and message.get("name") != h.name:
            self.transport.write(wire.status(404, "no such file"))
            self.transport.loseConnection()
            return
        offset = message.integer("offset", 0)
        length = message.integer("length", len(h.data) - offset)
        h.requests.append((offset, length))
        if h.busy:
            h.busy -= 1
            self.transport.write(wire.status(503, "busy", retry=5))
            self.transport.loseConnection()
            return
        body = h.data[offset : offset + length]
        index = offset // PIECE
        if index in h.corrupt:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.transport.write(
            wire.status(200, size=len(h.data), sha256=hashlib.sha256(h.data).hexdigest(),
                        offset=offset, length=length)
        )
        if index in h.stall:
            self.transport.write(body[:100])  # then nothing, connection open
            return
        self.remaining = body
        self.send()

    def send(self) -> None:
        h = self.holder
        self.call = None
        if h.vanishAt is not None and h.sent + len(self.remaining) > h.vanishAt:
            cut = max(0, h.vanishAt - h.sent)
            self.transport.write(self.remaining[:cut])
            h.sent += cut
            h.gone = True
            self.transport.loseConnection()
            return
        step = len(self.remaining) if h.rate is None else max(1, int(h.rate * TICK))
        chunk, self.remaining = self.remaining[:step], self.remaining[step:]
        self.transport.write(chunk)
        h.sent += len(chunk)
        if self.remaining:
            self.call = h.clock.callLater(TICK, self.send)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.holder.lost += 1
        if self.call is not None and self.call.active():
            self.call.cancel()


class Holder(Factory):
    """A fake node holding ``data``: its speed (bytes/s, None: at once) and misdeeds."""

    noisy = False

    def __init__(self, clock: Clock, data: bytes, rate: Optional[float] = None, *, corrupt: Set[int] = frozenset(),
                 stall: Set[int] = frozenset(), vanishAt: Optional[int] = None, busy: int = 0,
                 badManifest: bool = False) -> None:
        self.clock = clock
        self.data = data
        self.rate = rate
        self.corrupt = set(corrupt)
        self.stall = set(stall)
        self.vanishAt = vanishAt
        self.busy = busy
        self.digests, self.root = layout(data)
        self.badDigests = [b"\0" * 32] * len(self.digests) if badManifest else None
        self.requests: List[tuple] = []
        self.manifests = 0
        self.name: Optional[str] = None  # the only name it serves (None: any), set by SwarmTestCase.holder
        self.names: List[Optional[str]] = []  # the name= of every GET
        self.sent = 0
        self.lost = 0
        self.gone = False

    @property
    def pieces(self) -> List[int]:
        return [offset // PIECE for offset, _ in self.requests]

    def buildProtocol(self, addr):
        return HolderProtocol(self)


class HolderEndpoint:
    def __init__(self, network: MemoryNetwork, label: str, holder: Holder) -> None:
        self.inner = network.endpoint(label, holder)
        self.holder = holder
        # As p2prelay.client.paths.PathEndpoint says which path it took.
        self.path = "direct"

    def connect(self, factory):
        if self.holder.gone:
            from twisted.internet.defer import fail

            return fail(ConnectionRefusedError("gone"))
        return self.inner.connect(factory)


class SwarmTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
        self.relayFactory = RootRelay()
        self.relay = self.network.endpoint("relay", self.relayFactory)
        self.endpoints: Dict[tuple, object] = {}
        self.holders: Dict[str, Holder] = {}
        self.reports: List[str] = []
        self.nextPort = 5001
        self.out = Path(self.mktemp()).absolute()
        self.out.mkdir()
        self.final = self.out / "big.bin"

    def holder(self, data: bytes = DATA, name: str = "big.bin", root: Optional[str] = "", **kw) -> Holder:
        """A holder registered at the relay (with the root of ``data`` unless ``root`` is None)."""
        port = self.nextPort
        self.nextPort += 1
        h = Holder(self.clock, data, **kw)
        h.name = name
        entry = FileEntry(name, len(data), hashlib.sha256(data).hexdigest(),
                          root=h.root if root == "" else root, pieceSize=PIECE)
        self.relayFactory.add(f"node{port}", "127.0.0.1", port, [entry])
        label = f"127.0.0.1:{port}"
        self.endpoints[("127.0.0.1", port)] = HolderEndpoint(self.network, label, h)
        self.holders[label] = h
        return h

    def fetcher(self, sources: int = 4, **kw) -> Fetcher:
        return Fetcher(
            self.clock, self.relay, timeout=10.0, report=self.reports.append,
            peerEndpoint=lambda peer: self.endpoints[(peer.host, peer.port)], sources=sources, **kw,
        )

    def drive(self, d: Deferred, rounds: int = 5000, until=None) -> Deferred:
        for _ in range(rounds):
            self.network.flush()
            if d.called or (until is not None and until()):
                break
            self.clock.advance(TICK)
        return d

    def save(self, sources: int = 4, resume: bool = True, until=None, **kw) -> Deferred:
        f = self.fetcher(sources, **kw)
        return self.drive(ensureDeferred(f.save("big.bin", self.final, resume=resume)), until=until)

    def served(self) -> int:
        """Bytes of piece bodies the holders were asked for."""
        return sum(length for h in self.holders.values() for _, length in h.requests)


class MultiSourcePathTests(SwarmTestCase):
    def test_eachSourcesPath(self) -> None:
        """-v: each source's first connection says its path ('via relay' for a relayed one)."""
        self.holder(rate=200_000)
        self.holder(rate=200_000)
        self.endpoints[("127.0.0.1", 5002)].path = "relay"
        verbose: List[str] = []
        self.successResultOf(self.save(verbose=verbose.append))
        fetching = [line for line in verbose if line.startswith("fetching ")]
        self.assertEqual(
            sorted(fetching), ["fetching big.bin from 127.0.0.1:5001", "fetching big.bin from 127.0.0.1:5002 via relay"]
        )

    def test_pieceLengthToThePath(self) -> None:
        """A path through the relay is told each request's piece length (RELAY size=), not the file's size."""
        self.holder()
        told: List[int] = []

        class Recording(HolderEndpoint):
            length = property(lambda self: None, lambda self, value: told.append(value))

        endpoint = self.endpoints[("127.0.0.1", 5001)]
        endpoint.__class__ = Recording
        self.successResultOf(self.save())
        self.assertEqual(sorted(set(told)), sorted({min(PIECE, len(DATA) - i * PIECE) for i in range(COUNT)}))

    def test_mainPath(self) -> None:
        """Fetched.path is the path of the holder that delivered the most pieces."""
        slow = self.holder(rate=50_000)
        fast = self.holder(rate=400_000)
        self.endpoints[("127.0.0.1", 5002)].path = "reverse"
        fetched = self.successResultOf(self.save())
        self.assertGreater(len(fast.pieces), len(slow.pieces))
        self.assertEqual(fetched.path, "reverse")


class OtherNameTests(SwarmTestCase):
    """Holders of the same bytes under other names (WHOHAS root=) are more sources."""

    def test_otherNameServesPieces(self) -> None:
        """A holder of the same root under another name serves pieces, asked for under its own name; the file verifies."""
        mine = self.holder(rate=100_000)
        other = self.holder(rate=100_000, name="mirror/copy.bin")
        fetched = self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertTrue(other.requests, "the holder under another name was asked for pieces")
        self.assertEqual(set(other.names), {"mirror/copy.bin"})
        self.assertEqual(set(mine.names), {"big.bin"})
        self.assertEqual(set(mine.pieces) | set(other.pieces), set(range(COUNT)))
        self.assertEqual((mine.manifests, other.manifests), (1, 0))
        self.assertIn("127.0.0.1:5002", fetched.peers)

    def test_verboseCountsThem(self) -> None:
        """-v says how many more holders of the same content there are under other names, and names each one's name."""
        self.holder(rate=100_000)
        self.holder(rate=100_000, name="a.bin")
        self.holder(rate=100_000, name="b.bin")
        verbose: List[str] = []
        self.successResultOf(self.save(verbose=verbose.append))
        self.assertIn("relay: 2 more holder(s) of the same content under other names", verbose)
        self.assertIn("fetching big.bin from 127.0.0.1:5002 (as a.bin)", verbose)

    def test_otherNameBadPieceDropped(self) -> None:
        """A bad piece from a holder under another name fails the same manifest's check: fetched again elsewhere."""
        mine = self.holder(rate=100_000)
        bad = self.holder(rate=400_000, name="copy.bin", corrupt=set(range(COUNT)))
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertTrue(bad.requests)
        self.assertEqual(set(mine.pieces), set(range(COUNT)))
        self.assertTrue(any("bad copy of piece" in r for r in self.reports), self.reports)

    def test_otherVersionNotUsed(self) -> None:
        """Only holders of the chosen root are added: another root under another name is another file."""
        self.holder(rate=100_000)
        stranger = self.holder(OTHER, rate=100_000, name="copy.bin")
        self.successResultOf(self.save())
        self.assertEqual(stranger.requests, [])

    def test_oldRelayNoMoreSources(self) -> None:
        """An older relay's 400 to WHOHAS root= means no more sources: no error, nothing reported, the file comes."""
        self.relayFactory.old = True
        self.holder(rate=100_000)
        other = self.holder(rate=100_000, name="copy.bin")
        verbose: List[str] = []
        self.successResultOf(self.save(verbose=verbose.append))
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertIn("WHOHAS root", self.relayFactory.asked)
        self.assertEqual(other.requests, [])
        self.assertEqual(self.reports, [])
        self.assertFalse([line for line in verbose if "other names" in line], verbose)

    def test_sameHolderOnce(self) -> None:
        """A holder listed under the name is not added again by the root, nor is the name asked for twice."""
        mine = self.holder(rate=100_000)
        self.relayFactory.peers[0].roots["alias.bin"] = self.relayFactory.peers[0].roots["big.bin"]
        self.relayFactory.peers[0].files["alias.bin"] = self.relayFactory.peers[0].files["big.bin"]
        verbose: List[str] = []
        self.successResultOf(self.save(verbose=verbose.append))
        self.assertEqual(set(mine.names), {"big.bin"})
        self.assertFalse([line for line in verbose if "other names" in line], verbose)

    def test_onePieceFileAsksNothing(self) -> None:
        """A file of one piece goes in one request as before: the relay is not asked for its root."""
        self.holder(DATA[:PIECE], rate=100_000)
        self.successResultOf(self.save())
        self.assertNotIn("WHOHAS root", self.relayFactory.asked)



class MultiSourceTests(SwarmTestCase):
    def test_severalHolders(self) -> None:
        """A file of many pieces comes from every holder, verified, renamed into place; no .part or journal stays."""
        hs = [self.holder(rate=200_000) for _ in range(3)]
        fetched = self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertEqual((fetched.size, fetched.sha256), (len(DATA), hashlib.sha256(DATA).hexdigest()))
        self.assertTrue(all(h.requests for h in hs), [h.requests for h in hs])
        self.assertEqual(set(p for h in hs for p in h.pieces), set(range(COUNT)))
        self.assertEqual(sum(h.manifests for h in hs), 1)
        self.assertFalse(partPath(self.final).exists() or journalPath(self.final).exists())

    def test_sourcesCap(self) -> None:
        """--sources 2 uses two holders of the four."""
        hs = [self.holder(rate=200_000) for _ in range(4)]
        self.successResultOf(self.save(sources=2))
        self.assertEqual(sum(1 for h in hs if h.requests), 2)

    def test_fasterHolderMorePieces(self) -> None:
        """A holder four times as fast serves more pieces than the slow one."""
        slow = self.holder(rate=50_000)
        fast = self.holder(rate=200_000)
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertGreater(len(fast.pieces), 2 * len(slow.pieces))

    def test_corruptPiece(self) -> None:
        """A bad piece is fetched again from another holder, and its sender is not asked again."""
        bad = self.holder(rate=200_000, corrupt={0})
        good = self.holder(rate=100_000)
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertEqual(bad.pieces, [0])
        self.assertIn(0, good.pieces)
        self.assertTrue(any("bad copy of piece 0" in r for r in self.reports), self.reports)

    def test_stalledHolder(self) -> None:
        """A holder that stops sending mid-piece does not stop the download: another holder gets that piece."""
        self.holder(rate=200_000, stall={0, 1})
        self.holder(rate=100_000)
        d = self.save()
        self.successResultOf(d)
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertLess(self.clock.seconds(), 60)

    def test_vanishesMidPiece(self) -> None:
        """A holder that disappears mid-piece (then refuses connections) is dropped and reported; the others finish."""
        self.holder(rate=200_000, vanishAt=PIECE + 100)
        self.holder(rate=100_000)
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertEqual(self.relayFactory.dead, ["127.0.0.1:5001"])

    def test_endgameDuplicateCancelled(self) -> None:
        """Near the end a slow holder's piece is asked of an idle fast one too; the slow copy is cancelled."""
        slow = self.holder(rate=2_000)
        fast = self.holder(rate=400_000)
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        duplicated = set(slow.pieces) & set(fast.pieces)
        self.assertTrue(duplicated, (slow.pieces, fast.pieces))
        self.assertLess(slow.sent, sum(length for _, length in slow.requests))  # cut short
        self.assertLess(self.clock.seconds(), 30)  # not 8 s a piece at the slow holder's pace

    def test_busyHolder(self) -> None:
        """A holder answering 503 retry= is passed over for the others, not dropped."""
        busy = self.holder(rate=100_000, busy=1)
        self.holder(rate=100_000)
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertFalse(any("not using it again" in r for r in self.reports), self.reports)
        self.assertGreaterEqual(len(busy.requests), 1)

    def test_badManifest(self) -> None:
        """A manifest that does not hash to the listed root fails its holder; the next holder's is used."""
        liar = self.holder(badManifest=True)
        honest = self.holder()
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertEqual((liar.manifests, liar.requests, honest.manifests), (1, [], 1))
        self.assertTrue(any("does not match the root" in r for r in self.reports), self.reports)

    def test_majorityRoot(self) -> None:
        """Holders of another version (another root) are not used: the version most holders list wins."""
        other = self.holder(OTHER)
        a = self.holder()
        b = self.holder()
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertEqual((other.manifests, other.requests), (0, []))
        self.assertTrue(a.requests and b.requests)

    def test_smallFileOneRequest(self) -> None:
        """A file under two pieces is fetched whole in one GET, no manifest asked for."""
        small = DATA[: PIECE + 10]
        h = self.holder(small)
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), small)
        self.assertEqual((h.manifests, h.requests), (0, [(0, len(small))]))

    def test_noRootOneRequest(self) -> None:
        """Holders listed without a root (older nodes) are fetched from as before, one whole GET."""
        h = self.holder(root=None)
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertEqual((h.manifests, h.requests), (0, [(0, len(DATA))]))

    def test_everyHolderGone(self) -> None:
        """When no holder is left, the fetch fails saying what is kept; .part and journal stay, no final name."""
        self.holder(vanishAt=3 * PIECE + 10)
        failure = self.failureResultOf(self.save(sources=1), NotFetched)
        self.assertIn("0.0 of 0.2 MiB kept for resume", failure.value.why)
        self.assertTrue(partPath(self.final).exists() and journalPath(self.final).exists())
        self.assertFalse(self.final.exists())
        record = json.loads(journalPath(self.final).read_text())
        self.assertEqual(record["root"], layout(DATA)[1])


class ResumeTests(SwarmTestCase):
    def interruptedRun(self, pieces: int = 5) -> Interrupted:
        """A download cancelled once ``pieces`` pieces are on disk."""
        self.holder(rate=100_000)
        d = self.save(sources=1, until=lambda: self.journalPieces() >= pieces)
        d.cancel()
        self.network.flush()
        return self.failureResultOf(d, Interrupted).value

    def journalPieces(self) -> int:
        from p2prelay.client.journal import parseJournal

        path = journalPath(self.final)
        if not path.exists():
            return 0
        record = parseJournal(path.read_bytes())
        return len(record["pieces"]) if record else 0

    def fresh(self, data: bytes = DATA, **kw) -> Holder:
        """Forget the first run's holders; register a new one."""
        self.relayFactory.peers.clear()
        self.holders.clear()
        return self.holder(data, **kw)

    def test_interruptedKeepsPart(self) -> None:
        """Cancelled mid-way: .part and journal stay, nothing at the final name, and it says what is kept."""
        e = self.interruptedRun()
        self.assertTrue(partPath(self.final).exists() and journalPath(self.final).exists())
        self.assertFalse(self.final.exists())
        self.assertGreaterEqual(e.kept, 5 * PIECE)
        self.assertEqual(e.total, len(DATA))

    def test_resumeFetchesOnlyMissing(self) -> None:
        """The next run of the same name and root asks only for the pieces not yet verified."""
        e = self.interruptedRun()
        h = self.fresh()
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertEqual(sum(length for _, length in h.requests), len(DATA) - e.kept)
        self.assertTrue(any(r.startswith("resuming big.bin") for r in self.reports), self.reports)
        self.assertFalse(partPath(self.final).exists() or journalPath(self.final).exists())

    def test_changedRootStartsOver(self) -> None:
        """A .part of another version (the root changed) is started over."""
        self.interruptedRun()
        h = self.fresh(OTHER)
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), OTHER)
        self.assertEqual(sum(length for _, length in h.requests), len(OTHER))
        self.assertTrue(any("another version" in r for r in self.reports), self.reports)

    def test_noResume(self) -> None:
        """--no-resume fetches every piece again."""
        self.interruptedRun()
        h = self.fresh()
        self.successResultOf(self.save(resume=False))
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertEqual(sum(length for _, length in h.requests), len(DATA))

    def test_editedPartRechecked(self) -> None:
        """A .part changed behind the journal's back gets its claimed pieces re-hashed; a damaged one is fetched again."""
        self.interruptedRun()
        part = partPath(self.final)
        with open(part, "r+b") as f:
            f.write(b"XX")  # piece 0 damaged, and the mtime moves
        h = self.fresh()
        self.successResultOf(self.save())
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertIn(0, h.pieces)

    def test_failoverContinuesMidFile(self) -> None:
        """One source at a time: the next holder after a failure is asked only for the pieces not yet verified."""
        first = self.holder(rate=100_000, vanishAt=5 * PIECE + 100)
        second = self.holder(rate=100_000)
        self.successResultOf(self.save(sources=1))
        self.assertEqual(self.final.read_bytes(), DATA)
        self.assertEqual(first.pieces[:5], [0, 1, 2, 3, 4])
        self.assertNotIn(0, second.pieces)
        self.assertLessEqual(sum(length for _, length in second.requests), len(DATA) - 4 * PIECE)


class CommandTestCase(SwarmTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.terminal = FakeTerminal()

    def start(self, argv: Sequence[str], interrupt: Optional[Deferred] = None) -> Deferred:
        args = parseArgs(["--relay", RELAY, *argv])
        return Deferred.fromCoroutine(
            run(self.clock, args, self.terminal.console, self.fetcher(args.sources), interrupt=interrupt)
        )


class OtherNameStreamTests(CommandTestCase):
    def test_streamUsesThem(self) -> None:
        """Streaming to stdout piece by piece also takes the holders under other names."""
        self.holder(rate=100_000)
        other = self.holder(rate=100_000, name="copy.bin")
        d = self.drive(self.start(["big.bin"]))
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stdout, DATA)
        self.assertTrue(other.requests)
        self.assertEqual(set(other.names), {"copy.bin"})


class StreamTests(CommandTestCase):
    def test_streamed(self) -> None:
        """One name without -o: the pieces from several holders reach stdout in order; exit 0."""
        self.holder(rate=50_000)
        self.holder(rate=200_000)
        d = self.drive(self.start(["big.bin"]))
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stdout, DATA)

    def test_firstPieceAtOnce(self) -> None:
        """The first piece is on stdout as soon as it verified, long before the file is complete."""
        self.holder(rate=PIECE)  # one piece a second
        d = self.drive(self.start(["big.bin"]), until=lambda: len(self.terminal.stdout) > 0)
        self.assertFalse(d.called)
        self.assertEqual(self.terminal.stdout, DATA[:PIECE])
        self.assertLess(self.clock.seconds(), 2)
        self.drive(d)
        self.assertEqual(self.terminal.stdout, DATA)

    def test_window(self) -> None:
        """While piece 0 does not come, no piece more than the window beyond it is asked for."""
        from p2prelay.client.swarm import STREAM_WINDOW

        a = self.holder(rate=10 * PIECE, stall={0})
        b = self.holder(rate=10 * PIECE, stall={0})
        d = self.start(["big.bin"])
        self.drive(d, until=lambda: self.clock.seconds() > 5)
        self.assertEqual(max(a.pieces + b.pieces), STREAM_WINDOW - 1)
        self.assertEqual(self.terminal.stdout, b"")
        self.assertEqual(self.successResultOf(self.drive(d)), EXIT_NOT_FETCHED)

    def test_laterPieceUnobtainable(self) -> None:
        """A piece no holder can deliver: exit 1 with a clear message; stdout has the pieces before it."""
        self.holder(corrupt={4})
        d = self.drive(self.start(["big.bin"]))
        self.assertEqual(self.successResultOf(d), EXIT_NOT_FETCHED)
        self.assertEqual(self.terminal.stdout, DATA[: 4 * PIECE])
        self.assertIn("big.bin: not fetched: every holder of this version failed", self.terminal.stderr)
        self.assertIn(f"the output stops after {4 * PIECE} of {len(DATA)} bytes", self.terminal.stderr)

    def test_sourcesOneAsBefore(self) -> None:
        """--sources 1 to stdout is today's single-source path: one whole GET, no manifest."""
        h = self.holder()
        d = self.drive(self.start(["--sources", "1", "big.bin"]))
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stdout, DATA)
        self.assertEqual((h.manifests, h.requests), (0, [(0, len(DATA))]))

    def test_readerGoesAway(self) -> None:
        """stdout closed early ('| head'): exit 0, no more pieces asked for."""
        self.terminal = FakeTerminal(closeAfter=10)
        h = self.holder(rate=PIECE)
        d = self.drive(self.start(["big.bin"]))
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.terminal.stdout, DATA[:10])
        self.assertLess(len(h.requests), COUNT)


class InterruptTests(CommandTestCase):
    def test_ctrlC(self) -> None:
        """Ctrl-C during -o: 'interrupted; N of M MiB kept for resume', exit 130, .part and journal kept."""
        self.holder(rate=PIECE)
        interrupt: Deferred = Deferred()
        d = self.start(["-o", str(self.out), "big.bin"], interrupt)
        self.drive(d, until=lambda: self.clock.seconds() > 6.5)
        interrupt.callback(signal.SIGINT)
        self.network.flush()
        self.assertEqual(self.successResultOf(d), 130)
        self.assertRegex(self.terminal.stderr, r"p2p-fetch: interrupted; 0\.\d of 0\.2 MiB kept for resume\n$")
        self.assertNotIn("trying next", self.terminal.stderr)
        self.assertTrue(partPath(self.final).exists() and journalPath(self.final).exists())
        self.assertFalse(self.final.exists())

    def test_sigterm(self) -> None:
        """SIGTERM likewise, with exit status 143."""
        self.holder(rate=PIECE)
        interrupt: Deferred = Deferred()
        d = self.start(["-o", str(self.out), "big.bin"], interrupt)
        self.drive(d, until=lambda: self.clock.seconds() > 3)
        interrupt.callback(signal.SIGTERM)
        self.network.flush()
        self.assertEqual(self.successResultOf(d), 143)
        self.assertIn("p2p-fetch: interrupted; ", self.terminal.stderr)

    def test_ctrlCStdout(self) -> None:
        """Ctrl-C while printing: 'interrupted', exit 130."""
        self.holder(rate=PIECE)
        interrupt: Deferred = Deferred()
        d = self.start(["big.bin"], interrupt)
        self.drive(d, until=lambda: self.clock.seconds() > 3)
        interrupt.callback(signal.SIGINT)
        self.network.flush()
        self.assertEqual(self.successResultOf(d), 130)
        self.assertTrue(self.terminal.stderr.endswith("p2p-fetch: interrupted\n"), self.terminal.stderr)

    def test_ctrlCSingleSource(self) -> None:
        """Ctrl-C during a whole-file fetch (no pieces): exit 130, not a success blamed on the peer."""
        self.holder(root=None, rate=PIECE)
        interrupt: Deferred = Deferred()
        d = self.start(["-o", str(self.out), "big.bin"], interrupt)
        self.drive(d, until=lambda: self.clock.seconds() > 3)
        interrupt.callback(signal.SIGINT)
        self.network.flush()
        self.assertEqual(self.successResultOf(d), 130)
        self.assertNotIn("trying next", self.terminal.stderr)
        self.assertEqual(os.listdir(self.out), [])

    def test_catchSignals(self) -> None:
        """The signal handlers fire the interrupt with the signal's number, through the reactor."""

        class Reactor:
            def callFromThread(self, f, *args):
                f(*args)

        for s in (signal.SIGINT, signal.SIGTERM):
            self.addCleanup(signal.signal, s, signal.getsignal(s))
        interrupt: Deferred = Deferred()
        catchSignals(Reactor(), interrupt)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertEqual(self.successResultOf(interrupt), signal.SIGTERM)
        self.assertEqual(signal.getsignal(signal.SIGINT), signal.SIG_DFL)  # a second one ends it


class PartsTests(SynchronousTestCase):
    def test_groupByRoot(self) -> None:
        """Groups by root, the largest first; a tie goes to the one listed first; rootless holders left out."""
        def peer(port, root):
            return PeerAddress("h", port, size=1, sha256="a" * 64, root=root)

        groups = groupByRoot([peer(1, "b" * 64), peer(2, "c" * 64), peer(3, None), peer(4, "c" * 64), peer(5, "d" * 64)])
        self.assertEqual([(k[0][0], [p.port for p in g]) for k, g in groups], [("c", [2, 4]), ("b", [1]), ("d", [5])])

    def test_serialInOrder(self) -> None:
        """Serial runs jobs one after another, in order, and idle() fires after the last."""
        from twisted.internet.defer import Deferred as D

        started: List[int] = []
        gates: List[D] = []

        def run(f, *args):
            f(*args)
            gates.append(D())
            return gates[-1]

        serial = Serial(run)
        serial.submit(started.append, 1)
        serial.submit(started.append, 2)
        idle = serial.idle()
        self.assertEqual(started, [1])
        gates[0].callback(None)
        self.assertEqual(started, [1, 2])
        self.assertNoResult(idle)
        gates[1].callback(None)
        self.successResultOf(idle)

    def test_manifestWrongFile(self) -> None:
        """A manifest announcing another size or hash than the relay lists is refused before any digest is read."""
        from twisted.internet.testing import StringTransport
        from p2prelay.client.download import VerificationError

        digests, root = layout(DATA)
        proto = ManifestProtocol(Clock(), "big.bin", len(DATA), hashlib.sha256(DATA).hexdigest(), root, 10.0)
        proto.makeConnection(StringTransport())
        self.assertEqual(proto.transport.value(), b"P2P/1 MANIFEST name=big.bin\r\n")
        proto.dataReceived(
            wire.status(200, size=len(DATA) + 1, sha256=hashlib.sha256(DATA).hexdigest(), root=root,
                        piece=PIECE, count=len(digests))
        )
        self.failureResultOf(proto.deferred, VerificationError)
