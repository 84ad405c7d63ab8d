"""
Fetching files: one GET into a Download, and the Fetcher's failover across
peers, against in-memory peers and relay.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import stat
from pathlib import Path

import attrs

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import identity, wire
from p2prelay.client import download
from p2prelay.client.download import (
    DestinationError,
    Download,
    NoSpace,
    VerificationError,
    destination,
    human,
)
from p2prelay.client.fetcher import (
    Attempt,
    Fetcher,
    NotFetched,
    PeerAddress,
    RelayUnreachable,
)
from p2prelay.client.get import GetProtocol, IncompleteBody, TooSlow
from p2prelay.negotiation import negotiate
from p2prelay.node.server import FileServerFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.wire import FileEntry

from .support import MemoryEndpoint, MemoryNetwork

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


class FetchTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
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
        endpoint = MemoryEndpoint(self.network, "peer", factory)
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


class GetDefenceTests(FetchTestCase):
    """
    What a hostile peer can do to one GET: every wrong answer fails the
    attempt with an error, on the clock, and stores nothing it should not.
    """

    def connect(self, timeout=TIMEOUT, **kw):
        sink = self.sink()
        proto = GetProtocol(self.clock, "a.txt", sink, timeout, **kw)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, sink, transport

    def answer(self, body: bytes = DATA, **fields) -> bytes:
        fields = {"size": len(body), "sha256": sha(body), "offset": 0, "length": len(body), **fields}
        return wire.status(wire.OK, **fields)

    def test_wholeFileAnsweredWithARange(self):
        """A whole-file GET answered with length=5 is a refused answer, not a 5-byte success."""
        proto, sink, _ = self.connect()
        proto.dataReceived(self.answer(length=5) + DATA[:5])
        e = self.failureResultOf(proto.deferred, wire.ProtocolError).value
        self.assertIn("another range", e.message)
        self.assertEqual(sink.received, 0)

    def test_statusDisagreesWithIndex(self):
        """A status line announcing another file than the index lists fails before any byte is stored."""
        other = DATA.upper()
        proto, sink, transport = self.connect(accept={(len(DATA), sha(DATA))})
        proto.dataReceived(self.answer(other) + other)
        e = self.failureResultOf(proto.deferred, VerificationError).value
        self.assertIn("another file", str(e))
        self.assertEqual(sink.received, 0)
        self.assertTrue(transport.disconnecting)

    def test_statusAgreesWithIndex(self):
        """A status line matching one of the accepted (size, sha256) pairs proceeds."""
        proto, sink, _ = self.connect(accept={(1, "0" * 64), (len(DATA), sha(DATA))})
        proto.dataReceived(self.answer() + DATA)
        self.successResultOf(proto.deferred)
        self.assertEqual(sink.verify(), sha(DATA))

    def test_noRoom(self):
        """An announced size beyond the free space fails the attempt with NoSpace."""
        self.patch(download, "freeSpace", lambda directory: 10)
        proto, sink, _ = self.connect()
        proto.dataReceived(self.answer())
        self.failureResultOf(proto.deferred, NoSpace)

    def test_waitsForBegin(self):
        """With start=False nothing is sent, nor the sink taken, until begin()."""
        proto, sink, transport = self.connect(start=False)
        self.assertEqual((transport.value(), sink.producer), (b"", None))
        proto.begin()
        self.assertTrue(transport.value().startswith(b"P2P/1 GET "))
        self.assertIs(sink.producer, proto)

    def test_speaksFirst(self):
        """A peer that sends a status before it was asked fails the attempt."""
        proto, sink, transport = self.connect(start=False)
        proto.dataReceived(self.answer())
        self.failureResultOf(proto.deferred, wire.ProtocolError)

    def test_answerTimeout(self):
        """A peer that accepts and stays silent fails once answerTimeout passes, not the idle timeout."""
        proto, _, transport = self.connect(answerTimeout=3)
        self.clock.advance(2.9)
        self.assertNoResult(proto.deferred)
        self.clock.advance(0.1)
        self.failureResultOf(proto.deferred, TimeoutError)
        self.assertTrue(transport.disconnected)

    def drip(self, proto, seconds: int, perSecond: int) -> None:
        for _ in range(seconds):
            if proto.deferred.called:
                return
            proto.dataReceived(b"x" * perSecond)
            self.clock.advance(1)

    def test_dripAbandoned(self):
        """A body trickling at 1 byte/s is abandoned after speedTime seconds below speedLimit."""
        body = b"x" * 10_000
        proto, _, transport = self.connect(speedLimit=1024, speedTime=20)
        proto.dataReceived(self.answer(body))
        self.drip(proto, 19, 1)
        self.assertNoResult(proto.deferred)
        self.drip(proto, 2, 1)
        e = self.failureResultOf(proto.deferred, TooSlow).value
        self.assertIn("slower than 1024 bytes/s for 20 seconds", str(e))
        self.assertTrue(transport.disconnected)

    def test_burstsEvery19SecondsAbandoned(self):
        """One burst of 1 KiB every 19 s averages below the limit and is abandoned all the same."""
        body = b"x" * 100_000
        proto, _, _ = self.connect(speedLimit=1024, speedTime=20, timeout=60)
        proto.dataReceived(self.answer(body))
        for second in range(60):
            if proto.deferred.called:
                break
            if second % 19 == 18:
                proto.dataReceived(b"x" * 1024)
            self.clock.advance(1)
        self.failureResultOf(proto.deferred, TooSlow)
        self.assertLessEqual(self.clock.seconds(), 21)

    def test_steadyRateKept(self):
        """A body at twice the limit runs as long as it needs."""
        body = b"x" * (2048 * 60)
        proto, sink, _ = self.connect(speedLimit=1024, speedTime=20)
        proto.dataReceived(self.answer(body))
        self.drip(proto, 60, 2048)
        self.successResultOf(proto.deferred)
        self.assertEqual(sink.received, len(body))

    def test_pausedIsNotSlow(self):
        """While the sink has paused the transfer, the rate is not held against the peer."""
        body = b"x" * 10_000
        proto, sink, _ = self.connect(speedLimit=1024, speedTime=20)
        proto.dataReceived(self.answer(body))
        proto.pauseProducing()
        self.clock.advance(100)
        self.assertNoResult(proto.deferred)
        proto.resumeProducing()
        self.drip(proto, 19, 0)
        self.assertNoResult(proto.deferred)
        self.drip(proto, 2, 0)
        self.failureResultOf(proto.deferred, TooSlow)


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


@attrs.define
class Listed:
    """One peer in the fake relay: where it is and what the index says it holds."""

    node: str
    host: str
    port: int
    files: dict  # name -> (size, sha256)
    udp: int | None = None
    roots: dict = attrs.Factory(dict)  # name -> (root, piece size), for files listed with pieces


class FakeRelayProtocol(LineReceiver):
    """
    The relay as a client sees it, scripted: WHOHAS, PEERS, SEARCH and DEAD
    answered from :class:`FakeRelay`'s list; with a secret, every query is
    first challenged (``100 nonce= secret=1``) and needs ``PROOF mac=``.
    """

    delimiter = b"\n"

    def __init__(self, relay: "FakeRelay") -> None:
        self.relay = relay
        self.sent = b""
        self.nonce = None

    def lineReceived(self, line: bytes) -> None:
        message = wire.parseLine(line)
        if self.nonce is not None:
            text = identity.transcript(identity.CLIENT_PROOF, self.nonce, self.sent)
            if message.word != wire.PROOF or not identity.checkSecretProof(
                self.relay.secret, text, message.get("mac", "") or ""
            ):
                self.relay.refused += 1
                self.finish(wire.status(401, "bad proof"))
                return
            self.answer(wire.parseLine(self.sent.rstrip(b"\n")))
            return
        self.sent += line + b"\n"
        if self.relay.secret is not None:
            self.nonce = identity.newNonce()
            self.transport.write(wire.status(wire.CONTINUE, "prove it", nonce=self.nonce, secret=1))
            return
        self.answer(message)

    def finish(self, data: bytes) -> None:
        self.transport.write(data)
        self.transport.loseConnection()

    def answer(self, message: wire.Message) -> None:
        relay = self.relay
        relay.asked.append(message.word)
        if message.word == wire.DEAD:
            relay.dead.append(f"{message.require('host')}:{message.port()}")
            self.finish(wire.status(wire.OK, "will check"))
            return
        if message.word == wire.WHOHAS:
            name = message.require("name")
            items = [
                wire.item(wire.PEER, node=p.node, host=p.host, port=p.port, udp=p.udp,
                          size=p.files[name][0], sha256=p.files[name][1],
                          root=p.roots.get(name, (None, None))[0], piece=p.roots.get(name, (None, None))[1])
                for p in relay.peers if name in p.files
            ]
        elif message.word == wire.PEERS:
            items = [
                wire.item(wire.PEER, node=p.node, host=p.host, port=p.port, udp=p.udp, files=len(p.files))
                for p in relay.peers
            ]
        elif message.word == wire.SEARCH:
            pattern = message.get("pattern", "") or ""
            limit = message.integer("limit", 1000)
            glob = any(c in pattern for c in "*?[")
            found: dict = {}
            for p in relay.peers:
                for name, (size, digest) in p.files.items():
                    if (fnmatch.fnmatchcase(name, pattern) if glob else pattern in name):
                        found.setdefault(name, [size, digest, 0])[2] += 1
            names = sorted(found)
            items = [
                wire.item(wire.FILE, name=n, size=found[n][0], sha256=found[n][1], holders=found[n][2])
                for n in names[:limit]
            ]
            self.finish(
                wire.status(wire.OK, count=len(items)) + b"".join(items)
                + wire.end(len(items), truncated=1 if len(names) > limit else None)
            )
            return
        else:
            self.finish(wire.status(400, "unexpected"))
            return
        self.finish(wire.status(wire.OK, count=len(items)) + b"".join(items) + wire.end(len(items)))


class FakeRelay(Factory):
    """A relay's client-facing answers, from a plain list of peers."""

    noisy = False

    def __init__(self, secret: bytes | None = None) -> None:
        self.peers: list[Listed] = []
        self.dead: list[str] = []
        self.asked: list[str] = []
        self.secret = secret
        self.refused = 0

    def add(self, node: str, host: str, port: int, files, udp=None) -> Listed:
        listed = Listed(
            node,
            host,
            port,
            {e.name: (e.size, e.sha256) for e in files},
            udp,
            {e.name: (e.root, e.pieceSize) for e in files if e.root is not None},
        )
        self.peers.append(listed)
        return listed

    def buildProtocol(self, addr):
        return FakeRelayProtocol(self)


class NeverConnects:
    """An endpoint whose connection attempt never completes (a silent, filtered port)."""

    def __init__(self, network: MemoryNetwork, label: str) -> None:
        self.network = network
        self.label = label
        self.cancelled = 0

    def connect(self, clientFactory):
        self.network.connections.append(self.label)

        def cancel(d):
            # As HostnameEndpoint does: not a CancelledError.
            self.cancelled += 1
            d.errback(ConnectingCancelledError(self.label))

        return Deferred(cancel)


class FetcherTests(FetchTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.relayFactory = FakeRelay()
        self.relay = MemoryEndpoint(self.network, "relay", self.relayFactory)
        self.endpoints: dict[tuple[str, int], object] = {}
        self.reports: list[str] = []
        self.verbose: list[str] = []
        self.nextPort = 5001

    def fetcher(self, relay=None, **kw) -> Fetcher:
        return Fetcher(
            self.clock,
            relay or self.relay,
            timeout=TIMEOUT,
            report=self.reports.append,
            verbose=self.verbose.append,
            peerEndpoint=lambda peer: self.endpoints[(peer.host, peer.port)],
            **kw,
        )

    def peer(self, holds: bool = True, factory=None, error=None, name="a.txt", listed: bytes = DATA,
             endpoint=None) -> str:
        """
        Register a peer at the relay; holds says whether the relay thinks it
        has the file, listed what the index says that file is.
        """
        port = self.nextPort
        self.nextPort += 1
        label = f"127.0.0.1:{port}"
        files = [FileEntry(name, len(listed), sha(listed))] if holds else []
        self.relayFactory.add(f"node{port}", "127.0.0.1", port, files)
        self.endpoints[("127.0.0.1", port)] = endpoint or MemoryEndpoint(self.network, label, factory, error)
        return label

    def active(self) -> list[str]:
        """The peers not reported dead."""
        dead = set(self.relayFactory.dead)
        return [f"{p.host}:{p.port}" for p in self.relayFactory.peers if f"{p.host}:{p.port}" not in dead]

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
        self.assertEqual(self.active(), [second])

    def test_failoverTimeout(self):
        """A holder that never answers times out, is reported DEAD, and the next is tried."""
        first = self.silent()
        second = self.good()
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, second)
        self.assertEqual(self.reports, [f"peer {first}: timed out, trying next"])
        self.assertNotIn(first, self.active())

    def test_failoverDrop(self):
        """A holder that drops mid-stream is left for the next, and is not reported dead."""
        first = self.dropping()
        second = self.good()
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, second)
        [line] = self.reports
        self.assertTrue(line.startswith(f"peer {first}: connection lost after 10 bytes"), line)
        self.assertEqual(len(self.active()), 2)

    def test_failoverWrongBytes(self):
        """A holder sending bytes that fail verification is left for the next."""
        first = self.lying()
        second = self.good()
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, second)
        [line] = self.reports
        self.assertIn(f"peer {first}: SHA-256 mismatch", line)
        self.assertEqual(len(self.active()), 2)

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

        class GoneAfterFirst(MemoryEndpoint):
            def connect(inner, clientFactory):
                if inner.network.connections.count("relay") >= 1:
                    inner.error = ConnectionRefusedError("relay went away")
                return MemoryEndpoint.connect(inner, clientFactory)

        flaky = GoneAfterFirst(self.network, "relay", relay.factory)
        d = self.drive(self.fetcher(flaky).fetch("a.txt", self.sink()))
        e = self.failureResultOf(d, NotFetched).value
        self.assertEqual(e.attempts, [Attempt(holder, "404 no such file in this share")])
        self.assertIn("relay", e.why)

    def test_relayRefuses(self):
        """A relay refusing connections is RelayUnreachable."""
        relay = MemoryEndpoint(self.network, "relay", error=ConnectionRefusedError())
        d = self.drive(self.fetcher(relay).fetch("a.txt", self.sink()))
        self.failureResultOf(d, RelayUnreachable)

    def test_relaySilent(self):
        """A relay that never answers is RelayUnreachable after the timeout."""
        relay = MemoryEndpoint(self.network, "relay", Factory.forProtocol(Protocol))
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
        self.assertEqual(len(self.active()), 1)

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


class FetcherDefenceTests(FetcherTests):
    """
    The fetcher against holders of every hostile kind: each is a failed
    attempt (reported, next holder), never a success or a traceback, and
    the waiting and the number of peers contacted stay bounded.
    """

    OTHER = b"not the file you asked for\n" * 10

    def serving(self, data: bytes, **kw) -> str:
        """A peer that serves ``data`` as a.txt, with its own correct hash."""
        return self.peer(factory=self.fileServer({"a.txt": data}), **kw)

    def drip(self, **kw) -> str:
        class Drip(Protocol):
            def dataReceived(inner, _):
                inner.transport.write(
                    wire.status(200, size=len(DATA), sha256=sha(DATA), offset=0, length=len(DATA)) + b"x"
                )
                inner.tick = self.clock.callLater(1, inner.more)

            def more(inner):
                inner.transport.write(b"x")
                inner.tick = self.clock.callLater(1, inner.more)

            def connectionLost(inner, reason):
                if inner.tick.active():
                    inner.tick.cancel()

        return self.peer(factory=Factory.forProtocol(Drip), **kw)

    def neverConnects(self, **kw) -> str:
        port = self.nextPort
        return self.peer(endpoint=NeverConnects(self.network, f"127.0.0.1:{port}"), **kw)

    def test_substitutedContent(self):
        """A holder serving other bytes under its own correct hash fails; the honest one delivers."""
        fake = self.serving(self.OTHER)
        honest = self.good()
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, honest)
        [line] = self.reports
        self.assertTrue(line.startswith(f"peer {fake}: the peer offers another file"), line)
        self.assertEqual(self.active(), [fake, honest], "a bad answer is no dead peer")

    def test_substitutedContentOnly(self):
        """With only a substituting holder, nothing is fetched (and nothing saved)."""
        self.serving(self.OTHER)
        d, sink = self.fetch()
        self.failureResultOf(d, NotFetched)

    def test_lengthFiveThenHonest(self):
        """A whole-file GET answered with length=5 is a failed attempt, and the honest holder is tried."""
        liar = self.peer(factory=Factory.forProtocol(lambda: LyingServer(DATA, DATA[:5], length=5)))
        honest = self.good()
        d, sink = self.fetch()
        fetched = self.assertFetchedFrom(d, sink, honest)
        self.assertEqual([a.peer for a in fetched.attempts], [liar])
        self.assertIn("another range", fetched.attempts[0].error)

    def test_eachHolderItsOwnHash(self):
        """Holders listed with different hashes are each checked against their own listing."""
        wrong = self.serving(DATA, listed=self.OTHER)
        right = self.serving(self.OTHER, listed=self.OTHER)
        d, sink = self.fetch()
        fetched = self.successResultOf(d)
        self.assertEqual((fetched.peer, fetched.sha256), (right, sha(self.OTHER)))
        self.assertEqual([a.peer for a in fetched.attempts], [wrong])

    def test_unlistedPeerWarned(self):
        """A copy from a peer the index does not list says it was verified only by the sender's hash."""
        other = self.good(holds=False)
        d, sink = self.fetch()
        self.assertFetchedFrom(d, sink, other)
        self.assertEqual(
            self.reports,
            ["a.txt is not in the relay's index; verified only against the sending peer's own hash"],
        )

    def test_unlistedPeerCheckedAgainstIndex(self):
        """When the index lists the name, an unlisted peer's copy must be the indexed file."""
        holder = self.missing()
        self.serving(self.OTHER, holds=False)
        d, sink = self.fetch()
        e = self.failureResultOf(d, NotFetched).value
        self.assertEqual(len(e.attempts), 2)
        self.assertIn("another file", e.attempts[1].error)
        self.assertEqual(e.attempts[0].peer, holder)

    def test_connectTimeout(self):
        """A holder whose port never answers costs connectTimeout, is reported dead, then the next is tried."""
        dark = self.neverConnects()
        d, sink = self.fetch()
        self.failureResultOf(d, NotFetched)
        self.assertEqual(self.reports, [f"peer {dark}: timed out, trying next"])
        self.assertEqual(self.relayFactory.dead, [dark])

    def test_staggered(self):
        """Attempts start 250 ms apart, at most three at once, while none has connected."""
        for _ in range(5):
            self.neverConnects()
        started = []
        d = ensureDeferred(self.fetcher().fetch("a.txt", self.sink()))
        self.network.flush()
        for _ in range(8):
            started.append(len(self.peersTried()))
            self.clock.advance(0.25)
        self.assertEqual(started, [1, 2, 3, 3, 3, 3, 3, 3])
        self.clock.advance(1.0)  # 3.0 s: the first times out, making room at once
        self.network.flush()
        self.assertEqual(len(self.peersTried()), 4)
        self.drive(d)
        self.failureResultOf(d, NotFetched)

    def test_firstToConnectGetsTheGet(self):
        """The first holder to connect gets the GET; the slower attempt is cancelled, not reported."""
        slow = NeverConnects(self.network, "slow")
        self.peer(endpoint=slow)
        honest = self.good()
        d, sink = self.fetch()
        fetched = self.assertFetchedFrom(d, sink, honest)
        self.assertEqual((fetched.attempts, self.reports, self.relayFactory.dead), ([], [], []))
        self.assertEqual(slow.cancelled, 1)

    def test_fourSilentHolders(self):
        """Four holders that never connect delay the honest fifth by about 3 s, not 40 s."""
        silent = [self.neverConnects() for _ in range(4)]
        honest = self.good()
        sink = self.sink()
        d = ensureDeferred(self.fetcher().fetch("a.txt", sink))
        for _ in range(100):
            self.network.flush()
            if d.called:
                break
            self.clock.advance(0.05)
        self.assertFetchedFrom(d, sink, honest)
        self.assertLessEqual(self.clock.seconds(), 3.5)
        self.assertEqual(sorted(self.relayFactory.dead), sorted(silent[:2]), "only the attempts that timed out")

    def test_fourSilentHoldersAllAtOnce(self):
        """With five attempts at once, as RFC 8305, four silent holders cost one second."""
        for _ in range(4):
            self.neverConnects()
        honest = self.good()
        sink = self.sink()
        d = ensureDeferred(self.fetcher(attemptsAtOnce=5).fetch("a.txt", sink))
        for _ in range(100):
            self.network.flush()
            if d.called:
                break
            self.clock.advance(0.05)
        self.assertFetchedFrom(d, sink, honest)
        self.assertLessEqual(self.clock.seconds(), 1.1)
        self.assertEqual(self.relayFactory.dead, [])

    def test_silentAfterAccepting(self):
        """A holder that accepts and never answers costs connectTimeout, not the idle timeout."""
        silent = self.silent()
        honest = self.good()
        sink = self.sink()
        d = ensureDeferred(self.fetcher().fetch("a.txt", sink))
        for _ in range(200):
            self.network.flush()
            if d.called:
                break
            self.clock.advance(0.1)
        self.assertFetchedFrom(d, sink, honest)
        self.assertLessEqual(self.clock.seconds(), 3.1)
        self.assertEqual(self.reports, [f"peer {silent}: timed out, trying next"])

    def test_dripAbandoned(self):
        """A holder sending 1 byte/s is abandoned after --speed-time; the honest one delivers."""
        slow = self.drip()
        honest = self.good()
        d, sink = self.fetch()
        fetched = self.assertFetchedFrom(d, sink, honest)
        self.assertEqual([a.peer for a in fetched.attempts], [slow])
        self.assertIn("slower than 1024 bytes/s for 20 seconds", fetched.attempts[0].error)
        self.assertLessEqual(self.clock.seconds(), 25)

    def test_maxHolders(self):
        """Of 21 listed holders only --max-holders (16) are contacted, and only those reported dead."""
        listed = [self.refused() for _ in range(21)]
        d, sink = self.fetch()
        e = self.failureResultOf(d, NotFetched).value
        self.assertEqual(self.peersTried(), listed[:16])
        self.assertEqual(self.relayFactory.dead, listed[:16])
        self.assertEqual(len(e.attempts), 16)
        self.assertNotIn(wire.PEERS, self.relayFactory.asked, "no budget left for other peers")

    def test_maxHoldersIncludesOtherPeers(self):
        """The cap counts the other active peers too."""
        first = self.missing()
        self.missing(holds=False)
        self.good(holds=False)
        sink = self.sink()
        d = self.drive(self.fetcher(maxHolders=2).fetch("a.txt", sink))
        self.failureResultOf(d, NotFetched)
        self.assertEqual(len(self.peersTried()), 2)
        self.assertEqual(self.peersTried()[0], first)

    def test_noSpaceBeforeAnyone(self):
        """A listed size beyond the free space is refused before any peer is contacted."""
        self.patch(download, "freeSpace", lambda directory: 10)
        self.good()
        d, sink = self.fetch()
        e = self.failureResultOf(d, NoSpace).value
        self.assertIn(f"a.txt needs {len(DATA)} bytes, 10 bytes free", str(e))
        self.assertEqual(self.peersTried(), [])

    def test_diskErrorThenHonestCopy(self):
        """A disk error during the first attempt does not fail the honest copy that follows."""
        first = self.good()
        second = self.good()
        sink = self.sink()
        real = sink._file.write
        calls = []

        def fullOnce(data):
            calls.append(data)
            if len(calls) == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(data)

        self.patch(sink._file, "write", fullOnce)
        d = self.drive(self.fetcher().fetch("a.txt", sink))
        fetched = self.assertFetchedFrom(d, sink, second)
        self.assertEqual([a.peer for a in fetched.attempts], [first])
        self.assertIn("No space left", fetched.attempts[0].error)

    def test_malformedStatus(self):
        """Status lines that break the protocol are failed attempts, never a traceback."""
        answers = [
            b"garbage\n",
            b"P2P/1 200 size=x\n",
            b"P2P/1 200 size=5 sha256=nothex\n",
            b"P2P/1 999 :what\n",
            wire.status(200, size=3, sha256=sha(DATA), offset=2, length=5),
        ]
        bad = []
        for answer in answers:
            class Answer(Protocol):
                def dataReceived(inner, _, answer=answer):
                    inner.transport.write(answer)
                    inner.transport.loseConnection()

            bad.append(self.peer(factory=Factory.forProtocol(Answer)))
        honest = self.good()
        d, sink = self.fetch()
        fetched = self.assertFetchedFrom(d, sink, honest)
        self.assertEqual([a.peer for a in fetched.attempts], bad)

    def test_privateRelay(self):
        """A private relay's challenge is answered with the secret's proof."""
        from p2prelay.client.relay import secretProver

        secret = b"s" * 32
        self.relayFactory.secret = secret
        honest = self.good()
        sink = self.sink()
        d = self.drive(self.fetcher(prover=secretProver(secret)).fetch("a.txt", sink))
        self.assertFetchedFrom(d, sink, honest)
        self.assertEqual(self.relayFactory.refused, 0)

    def test_privateRelayWithoutSecret(self):
        """Without --secret-file a private relay's challenge is a clear 401, not a traceback."""
        self.relayFactory.secret = b"s" * 32
        d, sink = self.fetch()
        e = self.failureResultOf(d, wire.ProtocolError).value
        self.assertEqual(e.status, 401)
        self.assertIn("--secret-file", e.message)

    def test_privateRelayWrongSecret(self):
        """A wrong secret is refused by the relay: 401."""
        from p2prelay.client.relay import secretProver

        self.relayFactory.secret = b"s" * 32
        d = self.drive(self.fetcher(prover=secretProver(b"t" * 32)).fetch("a.txt", self.sink()))
        self.assertEqual(self.failureResultOf(d, wire.ProtocolError).value.status, 401)


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
        """discard() removes the temporary file and the folder it made; doing it twice is harmless."""
        self.download.write(b"partial")
        self.download.discard()
        self.assertFalse(self.download.path.exists())
        self.download.discard()
        self.assertFalse(self.directory.exists())

    def test_discardKeepsExistingFolder(self):
        """A folder that existed before the download stays when it is discarded."""
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        download = Download(folder)
        download.discard()
        self.assertEqual(list(folder.iterdir()), [])

    def test_discardRemovesNestedFoldersItMade(self):
        """A failed nested download (a/b/c.txt) leaves no empty folders behind."""
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        download = Download(root / "a" / "b")
        download.write(b"partial")
        download.discard()
        self.assertEqual(list(root.iterdir()), [])

    def test_discardKeepsFolderInUse(self):
        """A folder it made that has gained other files meanwhile is kept."""
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        download = Download(root / "a" / "b")
        (root / "a" / "other.txt").write_bytes(b"someone else's")
        download.discard()
        self.assertEqual(sorted(p.name for p in (root / "a").iterdir()), ["other.txt"])

    def test_commitKeepsFolders(self):
        """The folders made for a committed download stay, holding the file."""
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        download = Download(root / "a" / "b")
        download.expect(len(DATA), sha(DATA))
        download.write(DATA)
        download.verify()
        download.commit(root / "a" / "b" / "c.txt")
        download.discard()
        self.assertEqual((root / "a" / "b" / "c.txt").read_bytes(), DATA)

    def test_resetClearsWriteError(self):
        """A disk error in one attempt does not fail the next one: each attempt starts clean."""
        real = self.download._file.write
        calls = []

        def full(data):
            calls.append(data)
            if len(calls) == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(data)

        self.patch(self.download._file, "write", full)
        self.download.expect(3, sha(b"big"))
        self.download.write(b"big")
        self.assertRaises(OSError, self.download.verify)
        self.download.reset()
        self.assertEqual(self.filled().verify(), sha(DATA))

    def test_noSpace(self):
        """A size beyond the folder's free space is refused at once, in one clear sentence."""
        self.patch(download, "freeSpace", lambda directory: int(1.1 * 2**30))
        self.download.name = "big.iso"
        e = self.assertRaises(NoSpace, self.download.expect, 2 * 2**30, None)
        self.assertEqual(str(e), f"not enough space in {self.directory}: big.iso needs 2.0 GiB, 1.1 GiB free")
        self.assertIsInstance(e, DestinationError)
        self.assertIsNone(self.download.expectedSize)

    def test_spaceEnough(self):
        """A size that fits is expected as usual."""
        self.patch(download, "freeSpace", lambda directory: 100)
        self.download.expect(100, None)
        self.assertEqual(self.download.expectedSize, 100)

    def test_human(self):
        """Sizes in messages read as people write them."""
        self.assertEqual(
            [human(n) for n in (0, 1023, 1024, 1536, 2 * 2**30, 10**15)],
            ["0 bytes", "1023 bytes", "1.0 KiB", "1.5 KiB", "2.0 GiB", "909.5 TiB"],
        )


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
