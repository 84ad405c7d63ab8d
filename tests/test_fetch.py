"""
Fetching files: one GET into a Download, and the Fetcher's failover across
peers, against in-memory peers and relay.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import wire
from p2prelay.client.download import DestinationError, Download, VerificationError, destination
from p2prelay.client.fetcher import (
    Attempt,
    Fetcher,
    NotFetched,
    PeerAddress,
    RelayUnreachable,
)
from p2prelay.client.get import GetProtocol, IncompleteBody
from p2prelay.negotiation import negotiate
from p2prelay.node.server import FileServerFactory
from p2prelay.relay.registry import Registry
from p2prelay.relay.protocol import RelayFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.wire import FileEntry

from .support import flushPumps

TIMEOUT = 10.0
DATA = b"the quick brown fox jumps over the lazy dog\n" * 20
CLIENT = IPv4Address("TCP", "127.0.0.1", 45678)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def syncThread(f, *args):
    return maybeDeferred(f, *args)


class CutShortServer(Protocol):
    """A peer that announces the whole file, sends part of it and hangs up."""

    def __init__(self, data: bytes, send: int) -> None:
        self.data = data
        self.send = send

    def dataReceived(self, _: bytes) -> None:
        self.transport.write(
            wire.status(200, size=len(self.data), sha256=sha(self.data), offset=0, length=len(self.data))
            + self.data[: self.send]
        )
        self.transport.loseConnection()


class LyingServer(Protocol):
    """A peer that announces one file and sends other bytes of the same size."""

    def __init__(self, announced: bytes, sent: bytes, length: int | None = None) -> None:
        self.announced = announced
        self.sent = sent
        self.length = length

    def dataReceived(self, _: bytes) -> None:
        length = len(self.announced) if self.length is None else self.length
        self.transport.write(
            wire.status(200, size=len(self.announced), sha256=sha(self.announced), offset=0, length=length)
            + self.sent
        )
        self.transport.loseConnection()


class HangUpServer(Protocol):
    """A peer that closes as soon as it hears the request."""

    def dataReceived(self, _: bytes) -> None:
        self.transport.loseConnection()


class FakeEndpoint:
    """A client endpoint connecting, in memory, to a server factory (or failing)."""

    def __init__(self, network: "FakeNetwork", label: str, factory=None, error=None) -> None:
        self.network = network
        self.label = label
        self.factory = factory
        self.error = error

    def connect(self, clientFactory):
        self.network.connections.append(self.label)
        if self.error is not None:
            return fail(self.error)
        server = self.factory.buildProtocol(CLIENT)
        client = clientFactory.buildProtocol(None)
        serverIO = iosim.FakeTransport(server, True, peerAddress=CLIENT)
        clientIO = iosim.FakeTransport(client, False)
        self.network.pumps.append(
            iosim.connect(server, serverIO, client, clientIO, greet=False, clock=self.network.clock)
        )
        return succeed(client)


class FakeNetwork:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []
        self.connections: list[str] = []

    def flush(self) -> None:
        flushPumps(self.pumps)


class FetchTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.network = FakeNetwork(self.clock)
        self.cooperator = Cooperator(
            scheduler=lambda f: self.clock.callLater(0, f),
            terminationPredicateFactory=lambda: (lambda: True),
        )
        self.addCleanup(self.cooperator.stop)
        self.out = Path(self.mktemp()).absolute()

    def fileServer(self, files: dict[str, bytes]) -> FileServerFactory:
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return FileServerFactory(SharedDirectory(root, runInThread=syncThread), self.clock, self.cooperator)

    def sink(self) -> Download:
        download = Download(self.out)
        self.addCleanup(download.discard)
        return download


class GetProtocolTests(FetchTestCase):
    """
    One GET against the real file server, through an in-memory connection.
    """

    def get(self, factory, name="a.txt", **kw):
        sink = self.sink()
        endpoint = FakeEndpoint(self.network, "peer", factory)
        d = ensureDeferred(negotiate(endpoint, GetProtocol(self.clock, name, sink, TIMEOUT, **kw)))
        self.network.flush()
        return d, sink

    def test_whole(self):
        """A whole file arrives into the download and verifies against the announced digest."""
        d, sink = self.get(self.fileServer({"a.txt": DATA}))
        self.successResultOf(d)
        self.assertEqual((sink.expectedSize, sink.expectedHash), (len(DATA), sha(DATA)))
        self.assertEqual(sink.verify(), sha(DATA))
        with sink.open() as f:
            self.assertEqual(f.read(), DATA)

    def test_producerReleased(self):
        """The transport is the download's producer only while the transfer runs."""
        d, sink = self.get(self.fileServer({"a.txt": DATA}))
        self.successResultOf(d)
        self.assertIsNone(sink.producer)

    def test_range(self):
        """A range request delivers exactly the slice, checked by length only."""
        d, sink = self.get(self.fileServer({"a.txt": DATA}), offset=4, length=5)
        self.successResultOf(d)
        self.assertEqual((sink.expectedSize, sink.expectedHash), (5, None))
        sink.verify()
        with sink.open() as f:
            self.assertEqual(f.read(), DATA[4:9])

    def test_notFound(self):
        """A 404 from the peer is a ProtocolError with status 404."""
        d, sink = self.get(self.fileServer({}))
        self.assertEqual(self.failureResultOf(d, wire.ProtocolError).value.status, 404)
        self.assertEqual(sink.received, 0)

    def test_cutShort(self):
        """A body that ends before its announced length is IncompleteBody."""
        d, sink = self.get(Factory.forProtocol(lambda: CutShortServer(DATA, 100)))
        failure = self.failureResultOf(d, IncompleteBody)
        self.assertIn("100 bytes", str(failure.value))

    def test_closedWithoutAnswer(self):
        """A peer that hangs up without a status line is IncompleteBody."""
        d, _ = self.get(Factory.forProtocol(HangUpServer))
        self.failureResultOf(d, IncompleteBody)

    def test_wrongBytes(self):
        """Bytes that do not match the announced digest fail verification."""
        wrong = DATA.replace(b"fox", b"cat")
        d, sink = self.get(Factory.forProtocol(lambda: LyingServer(DATA, wrong)))
        self.successResultOf(d)
        self.assertRaises(VerificationError, sink.verify)

    def test_surplusIgnored(self):
        """Bytes beyond the announced length are not written to the download."""
        d, sink = self.get(Factory.forProtocol(lambda: LyingServer(DATA, DATA + b"extra")))
        self.successResultOf(d)
        self.assertEqual(sink.verify(), sha(DATA))

    def test_impossibleRange(self):
        """A status whose range runs past the file's size is refused."""
        d, _ = self.get(Factory.forProtocol(lambda: LyingServer(DATA, b"", length=len(DATA) + 1)))
        self.failureResultOf(d, wire.ProtocolError)

    def test_otherRange(self):
        """A peer that answers another range than asked is refused."""
        d, _ = self.get(Factory.forProtocol(lambda: LyingServer(DATA, DATA)), offset=0, length=5)
        self.failureResultOf(d, wire.ProtocolError)

    def test_timeout(self):
        """A peer that accepts and never answers times out on the clock."""
        d, _ = self.get(Factory.forProtocol(Protocol))
        self.clock.advance(TIMEOUT - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, TimeoutError)


class GetSplitTests(FetchTestCase):
    """
    A GET answer (status line, then raw body) parsed the same however TCP
    cuts it, as the servers are tested with their requests.
    """

    BODY = bytes(range(48)) + b"\r\n\nP2P/1 200 not a status line\r\n"

    def answer(self, body: bytes = BODY, **fields) -> bytes:
        fields = {"size": len(body), "sha256": sha(body), "offset": 0, "length": len(body), **fields}
        return wire.status(wire.OK, f"sending {len(body)} bytes", **fields) + body

    def outcome(self, chunks, surplus: bytes = b"", **kw):
        sink = self.sink()
        proto = GetProtocol(self.clock, "a.txt", sink, TIMEOUT, **kw)
        transport = StringTransport()
        proto.makeConnection(transport)
        results: list = []
        proto.deferred.addBoth(results.append)
        data = b"".join(chunks)
        seen = 0
        for chunk in chunks:
            if seen < len(data) - len(surplus):
                self.assertEqual(results, [], "no outcome before the body is complete")
            proto.dataReceived(chunk)
            seen += len(chunk)
        [result] = results
        digest = sink.verify()
        with sink.open() as f:
            return result, f.read(), digest, transport

    def assertDelivered(self, chunks, body: bytes = BODY, **kw) -> None:
        result, received, digest, transport = self.outcome(chunks, **kw)
        self.assertIsNone(result)
        self.assertEqual(received, body)
        self.assertEqual(digest, sha(body))
        self.assertTrue(transport.disconnecting)

    def test_everySplitPoint(self):
        """An answer cut in two at any byte delivers the same verified body."""
        data = self.answer()
        for cut in range(1, len(data)):
            self.assertDelivered([data[:cut], data[cut:]])

    def test_byteAtATime(self):
        """An answer arriving one byte at a time delivers the same body."""
        self.assertDelivered([bytes([b]) for b in self.answer()])

    def test_surplusAtEverySplitPoint(self):
        """Bytes after the body are never written, wherever the cut falls."""
        data = self.answer() + b"surplus"
        for cut in range(1, len(data)):
            self.assertDelivered([data[:cut], data[cut:]], surplus=b"surplus")

    def test_rangeAtEverySplitPoint(self):
        """A range answer cut at any byte delivers exactly that slice."""
        whole = self.BODY * 2
        piece = whole[10:40]
        data = (
            wire.status(wire.OK, size=len(whole), sha256=sha(whole), offset=10, length=30)
            + piece
        )
        for cut in range(1, len(data)):
            result, received, _, _ = self.outcome([data[:cut], data[cut:]], offset=10, length=30)
            self.assertEqual((result, received), (None, piece), cut)


class FetcherTests(FetchTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.registry = Registry(self.clock.seconds, 3600)
        self.relay = FakeEndpoint(self.network, "relay", RelayFactory(self.registry, self.clock))
        self.endpoints: dict[tuple[str, int], FakeEndpoint] = {}
        self.reports: list[str] = []
        self.verbose: list[str] = []
        self.nextPort = 5001

    def fetcher(self, relay=None) -> Fetcher:
        return Fetcher(
            self.clock,
            relay or self.relay,
            timeout=TIMEOUT,
            report=self.reports.append,
            verbose=self.verbose.append,
            peerEndpoint=lambda peer: self.endpoints[(peer.host, peer.port)],
        )

    def peer(self, holds: bool = True, factory=None, error=None, name="a.txt") -> str:
        """Register a peer at the relay; holds says whether the relay thinks it has the file."""
        port = self.nextPort
        self.nextPort += 1
        label = f"127.0.0.1:{port}"
        files = [FileEntry(name, len(DATA), sha(DATA))] if holds else []
        self.registry.register(f"node{port}", "127.0.0.1", port, files)
        self.endpoints[("127.0.0.1", port)] = FakeEndpoint(self.network, label, factory, error)
        return label

    def good(self, **kw) -> str:
        return self.peer(factory=self.fileServer({"a.txt": DATA}), **kw)

    def missing(self, **kw) -> str:
        return self.peer(factory=self.fileServer({}), **kw)

    def refused(self, **kw) -> str:
        return self.peer(error=ConnectionRefusedError("refused"), **kw)

    def silent(self, **kw) -> str:
        return self.peer(factory=Factory.forProtocol(Protocol), **kw)

    def dropping(self, **kw) -> str:
        return self.peer(factory=Factory.forProtocol(lambda: CutShortServer(DATA, 10)), **kw)

    def lying(self, **kw) -> str:
        wrong = DATA.replace(b"dog", b"cat")
        return self.peer(factory=Factory.forProtocol(lambda: LyingServer(DATA, wrong)), **kw)

    def drive(self, coroutine) -> Deferred:
        """Run a coroutine against the in-memory network, letting the clock run too."""
        d = ensureDeferred(coroutine)
        for _ in range(200):
            self.network.flush()
            if d.called:
                break
            self.clock.advance(1)
        return d

    def fetch(self, name="a.txt"):
        sink = self.sink()
        return self.drive(self.fetcher().fetch(name, sink)), sink

    def peersTried(self) -> list[str]:
        return [c for c in self.network.connections if c != "relay"]

    def assertFetchedFrom(self, d, sink, peer):
        fetched = self.successResultOf(d)
        self.assertEqual((fetched.peer, fetched.size, fetched.sha256), (peer, len(DATA), sha(DATA)))
        final = self.out / "a.txt"
        sink.commit(final)
        self.assertEqual(final.read_bytes(), DATA)
        return fetched

    def test_fromHolder(self):
        """A file a holder serves is fetched, verified, with no failed attempts."""
        peer = self.good()
        d, sink = self.fetch()
        fetched = self.assertFetchedFrom(d, sink, peer)
        self.assertEqual((fetched.attempts, self.reports), ([], []))
        self.assertEqual(self.peersTried(), [peer])

    def test_failover404(self):
        """A holder answering 404 is reported and the next holder tried."""
        first = self.missing()
        second = self.good()
        d, sink = self.fetch()
        fetched = self.assertFetchedFrom(d, sink, second)
        self.assertEqual(self.reports, [f"peer {first}: 404 no such file in this share, trying next"])
        self.assertEqual(fetched.attempts, [Attempt(first, "404 no such file in this share")])

    def test_failoverRefused(self):
        """A holder refusing connections is skipped and reported DEAD to the relay."""
        first = self.refused()
        second = self.good()
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, second)
        self.assertEqual(self.reports, [f"peer {first}: connection refused, trying next"])
        self.assertEqual([f"127.0.0.1:{p.port}" for p in self.registry.active()], [second])

    def test_failoverTimeout(self):
        """A holder that never answers times out, is reported DEAD, and the next is tried."""
        first = self.silent()
        second = self.good()
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, second)
        self.assertEqual(self.reports, [f"peer {first}: timed out, trying next"])
        self.assertNotIn(first, [f"127.0.0.1:{p.port}" for p in self.registry.active()])

    def test_failoverDrop(self):
        """A holder that drops mid-stream is left for the next, and is not reported dead."""
        first = self.dropping()
        second = self.good()
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, second)
        [line] = self.reports
        self.assertTrue(line.startswith(f"peer {first}: connection lost after 10 bytes"), line)
        self.assertEqual(len(self.registry.active()), 2)

    def test_failoverWrongBytes(self):
        """A holder sending bytes that fail verification is left for the next."""
        first = self.lying()
        second = self.good()
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, second)
        [line] = self.reports
        self.assertIn(f"peer {first}: SHA-256 mismatch", line)
        self.assertEqual(len(self.registry.active()), 2)

    def test_everyFailureMode(self):
        """Failover runs through every kind of failure in turn until one peer delivers."""
        bad = [self.missing(), self.refused(), self.silent(), self.dropping(), self.lying()]
        winner = self.good()
        d, sink = self.fetch()
        fetched = self.assertFetchedFrom(d, sink, winner)
        self.assertEqual([a.peer for a in fetched.attempts], bad)
        self.assertEqual(self.peersTried(), bad + [winner])

    def test_holdersFirstThenOthers(self):
        """Relay-named holders are tried first, then the remaining active peers in order."""
        other1 = self.missing(holds=False)
        holder1 = self.missing()
        other2 = self.good(holds=False)
        holder2 = self.refused()
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, other2)
        self.assertEqual(self.peersTried(), [holder1, holder2, other1, other2])

    def test_staleIndex(self):
        """When no peer is named as holder, every active peer is asked."""
        other = self.good(holds=False)
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, other)
        self.assertIn("relay: no registered peer holds a.txt; asking every active peer", self.verbose)

    def test_eachPeerOnce(self):
        """A peer already tried as a holder is not tried again from the peer list."""
        holder = self.missing()
        d, sink = self.fetch()
        self.failureResultOf(d, NotFetched)
        self.assertEqual(self.peersTried(), [holder])

    def test_allFail(self):
        """When every peer fails, NotFetched lists each attempt and why."""
        first = self.missing()
        second = self.refused(holds=False)
        d, sink = self.fetch()
        e = self.failureResultOf(d, NotFetched).value
        self.assertEqual(
            e.attempts,
            [Attempt(first, "404 no such file in this share"), Attempt(second, "connection refused")],
        )
        self.assertEqual(e.name, "a.txt")
        self.assertIn("2", e.why)

    def test_nobody(self):
        """With no peers at all, NotFetched says no peer holds it."""
        d, sink = self.fetch()
        e = self.failureResultOf(d, NotFetched).value
        self.assertEqual(e.attempts, [])
        self.assertIn("no", e.why)
        self.assertEqual(self.network.connections, ["relay", "relay"], "WHOHAS, then PEERS")

    def test_attemptsKeptWhenRelayGoesAway(self):
        """
        If every holder failed and the relay then cannot be asked for the
        other peers, the failed attempts are still reported.
        """
        holder = self.missing()
        relay = self.relay

        class GoneAfterFirst(FakeEndpoint):
            def connect(inner, clientFactory):
                if inner.network.connections.count("relay") >= 1:
                    inner.error = ConnectionRefusedError("relay went away")
                return FakeEndpoint.connect(inner, clientFactory)

        flaky = GoneAfterFirst(self.network, "relay", relay.factory)
        d = self.drive(self.fetcher(flaky).fetch("a.txt", self.sink()))
        e = self.failureResultOf(d, NotFetched).value
        self.assertEqual(e.attempts, [Attempt(holder, "404 no such file in this share")])
        self.assertIn("relay", e.why)

    def test_relayRefuses(self):
        """A relay refusing connections is RelayUnreachable."""
        relay = FakeEndpoint(self.network, "relay", error=ConnectionRefusedError())
        d = self.drive(self.fetcher(relay).fetch("a.txt", self.sink()))
        self.failureResultOf(d, RelayUnreachable)

    def test_relaySilent(self):
        """A relay that never answers is RelayUnreachable after the timeout."""
        relay = FakeEndpoint(self.network, "relay", Factory.forProtocol(Protocol))
        d = self.drive(self.fetcher(relay).fetch("a.txt", self.sink()))
        self.failureResultOf(d, RelayUnreachable)

    def test_badName(self):
        """An escaping name is refused before anyone is asked."""
        d = self.drive(self.fetcher().fetch("../a.txt", self.sink()))
        self.failureResultOf(d, wire.ProtocolError)
        self.assertEqual(self.network.connections, [])

    def test_unknownHostReportedDead(self):
        """A peer whose host name does not resolve counts as unreachable."""
        first = self.peer(error=DNSLookupError("nowhere"))
        second = self.good()
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, second)
        self.assertEqual(self.reports, [f"peer {first}: unknown host, trying next"])
        self.assertEqual(len(self.registry.active()), 1)

    def test_search(self):
        """search() returns the FILE items and the truncated flag."""
        self.peer(name="x1")
        self.peer(name="x2")
        d = self.drive(self.fetcher().search("x", limit=1))
        items, truncated = self.successResultOf(d)
        self.assertEqual(([m.get("name") for m in items], truncated), (["x1"], True))

    def test_peerAddressStr(self):
        """Peer addresses print as host:port, IPv6 hosts in brackets."""
        self.assertEqual(str(PeerAddress("::1", 80)), "[::1]:80")
        self.assertEqual(str(PeerAddress("127.0.0.1", 80)), "127.0.0.1:80")


class DownloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.download = Download(self.directory)
        self.addCleanup(self.download.discard)

    def filled(self, data: bytes = DATA, announced: bytes = DATA) -> Download:
        self.download.expect(len(announced), sha(announced))
        self.download.write(data[:7])
        self.download.write(data[7:])
        return self.download

    def test_temporaryHidden(self):
        """Bytes go to a .p2prelay- temporary inside the destination folder."""
        self.assertEqual(self.download.path.parent, self.directory)
        self.assertTrue(self.download.path.name.startswith(".p2prelay-"))

    def test_verify(self):
        """verify() returns the digest when size and digest match."""
        self.assertEqual(self.filled().verify(), sha(DATA))

    def test_verifyShort(self):
        """Fewer bytes than announced fail verification."""
        self.assertRaises(VerificationError, self.filled(DATA[:-1]).verify)

    def test_verifyLong(self):
        """More bytes than announced fail verification."""
        self.assertRaises(VerificationError, self.filled(DATA + b"x").verify)

    def test_verifyDigest(self):
        """The right size with the wrong bytes fails verification."""
        self.assertRaises(VerificationError, self.filled(DATA.upper()).verify)

    def test_verifyRangeBySize(self):
        """With no digest announced (a range), the size alone is checked."""
        self.download.expect(3, None)
        self.download.write(b"abc")
        self.assertEqual(self.download.verify(), sha(b"abc"))

    def test_verifyNothingExpected(self):
        """A download that never learnt what to expect does not verify."""
        self.download.write(b"abc")
        self.assertRaises(VerificationError, self.download.verify)

    def test_reset(self):
        """reset() forgets the bytes of a failed attempt."""
        self.download.write(b"garbage from a bad peer")
        self.download.reset()
        self.filled()
        final = self.directory / "a.txt"
        self.download.commit(final)
        self.assertEqual(final.read_bytes(), DATA)

    def test_commit(self):
        """commit() puts the verified bytes in place, readable, and removes the temporary."""
        self.filled().verify()
        final = self.directory / "sub" / "a.txt"
        self.download.commit(final)
        self.assertEqual(final.read_bytes(), DATA)
        self.assertFalse(self.download.path.exists())
        self.assertEqual(stat.S_IMODE(final.stat().st_mode), 0o644)
        self.assertEqual([p.name for p in self.directory.iterdir()], ["sub"])

    def test_commitNoClobber(self):
        """commit() refuses to replace an existing file, which keeps its content."""
        final = self.directory / "a.txt"
        final.write_bytes(b"precious")
        self.filled().verify()
        self.assertRaises(DestinationError, self.download.commit, final)
        self.assertEqual(final.read_bytes(), b"precious")

    def test_commitForce(self):
        """commit(force=True) replaces an existing file."""
        final = self.directory / "a.txt"
        final.write_bytes(b"old")
        self.filled().verify()
        self.download.commit(final, force=True)
        self.assertEqual(final.read_bytes(), DATA)
        self.assertFalse(self.download.path.exists())

    def test_commitWithoutHardLinks(self):
        """Where hard links fail, commit still refuses to clobber and still lands the file."""
        def noLinks(src, dst):
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "link", noLinks)
        existing = self.directory / "exists.txt"
        existing.write_bytes(b"precious")
        self.filled().verify()
        self.assertRaises(DestinationError, self.download.commit, existing)
        self.assertEqual(existing.read_bytes(), b"precious")
        final = self.directory / "a.txt"
        self.download.commit(final)
        self.assertEqual(final.read_bytes(), DATA)

    def test_discard(self):
        """discard() removes the temporary file; doing it twice is harmless."""
        self.download.write(b"partial")
        self.download.discard()
        self.assertFalse(self.download.path.exists())
        self.download.discard()
        self.assertEqual(list(self.directory.iterdir()), [])


class DestinationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir()

    def test_nested(self):
        """A nested name lands under the folder."""
        self.assertEqual(destination(self.directory, "a/b c.txt"), self.directory / "a" / "b c.txt")

    def test_parent(self):
        """'..' is refused."""
        self.assertRaises(wire.ProtocolError, destination, self.directory, "../x")

    def test_absolute(self):
        """An absolute name is refused."""
        self.assertRaises(wire.ProtocolError, destination, self.directory, "/etc/passwd")

    def test_symlinkedDirectory(self):
        """A symlinked folder inside the destination that points outside is refused."""
        outside = Path(self.mktemp()).absolute()
        outside.mkdir()
        os.symlink(outside, self.directory / "link")
        self.assertTrue((self.directory / "link").is_dir())
        self.assertRaises(DestinationError, destination, self.directory, "link/x.txt")

    def test_symlinkedFile(self):
        """A symlink at the destination name pointing outside is refused."""
        outside = Path(self.mktemp()).absolute()
        outside.mkdir()
        os.symlink(outside / "victim", self.directory / "x.txt")
        self.assertRaises(DestinationError, destination, self.directory, "x.txt")


class GetCancelTests(FetchTestCase):
    def test_cancelAbortsAndStaysQuiet(self):
        """A cancelled GET aborts its connection; a later timeout or close does nothing."""
        from twisted.internet.defer import CancelledError

        from p2prelay.client.get import GetProtocol

        proto = GetProtocol(self.clock, "a.txt", self.sink(), timeout=5)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.deferred.cancel()
        self.failureResultOf(proto.deferred, CancelledError)
        self.assertTrue(transport.disconnecting)
        self.clock.advance(10)
        proto.connectionLost(None)


class GetBackpressureTests(FetchTestCase):
    def test_pausedBySinkIsNotIdle(self):
        """
        While the sink has paused the download (a slow disk), the idle
        timeout does not run: the wait is ours, not the peer's.
        """
        from p2prelay.client.get import GetProtocol

        sink = self.sink()
        proto = GetProtocol(self.clock, "a.txt", sink, timeout=5)
        transport = StringTransport()
        proto.makeConnection(transport)
        sink.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(60)
        self.assertNoResult(proto.deferred)
        sink.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.clock.advance(5)
        self.failureResultOf(proto.deferred, TimeoutError)
