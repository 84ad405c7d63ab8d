"""
Properties of the line protocols, driven on StringTransport with a
task.Clock by byte streams that hypothesis makes up.

Clients (the relay query, the GET) end every negotiation with their
Deferred fired once: a value, or one of the documented errors, never
another exception and never left unfired once the connection is lost.
Servers (the relay, the node's file server) answer anything with status
lines or a close, never raise and never log an error.  Valid answers
arrive intact however TCP splits them.

``P2PRELAY_PROPERTY_SCALE=20`` (say) searches harder.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import wire
from p2prelay.client import relay as relayClient
from p2prelay.client import get as getModule
from p2prelay.client.download import DestinationError, Download, VerificationError
from p2prelay.client.get import GetProtocol, IncompleteBody
from p2prelay.client.relay import IncompleteReply, QueryProtocol, Reply
from p2prelay.node.server import FileServerFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.relay.protocol import RelayFactory
from p2prelay.relay.registry import Registry

from .test_node import syncThread

SCALE = max(1, int(os.environ.get("P2PRELAY_PROPERTY_SCALE", "1")))
CLIENT = IPv4Address("TCP", "10.9.8.7", 40000)
TIMEOUT = 15.0
FOREVER = 24 * 3600.0  # longer than any deadline or timeout


def fast(examples: int) -> settings:
    """A bounded number of examples, no deadline (the machine is shared)."""
    # Half of ``examples`` in the suite (fresh random ones every run, so
    # coverage adds up over runs); P2PRELAY_PROPERTY_SCALE=2 and up go deeper.
    return settings(max_examples=max(10, examples * SCALE // 2), deadline=None, database=None)


# Strategies: streams are lists of steps, bytes to receive or seconds to wait.

SHA = "5" * 64
tokens = st.sampled_from(
    [b"P2P/1 ", b"P2P/2 ", b"200", b"404", b"503", b"100", b"END", b"FILE", b"PEER", b"GET", b"PROOF",
     b" count=", b" size=", b" sha256=" + SHA.encode(), b" offset=", b" length=", b" name=", b" nonce=",
     b" retry=", b" :", b"=", b"%", b"%ff", b"0", b"1", b"3", b"99999999999999999999", b"-1",
     b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b" "]
)
lineish = st.lists(st.one_of(tokens, st.binary(max_size=8)), max_size=14).map(b"".join)
streams = st.one_of(
    st.binary(max_size=300),
    st.lists(lineish, max_size=8).map(b"\n".join),
)


@st.composite
def steps(draw, data: bytes, ticks: bool = True):
    """``data`` split at arbitrary points, with waits between some pieces."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    out: list = []
    for piece in pieces:
        if ticks and draw(st.booleans()):
            out.append(draw(st.sampled_from([0.0, 0.5, 4.0, TIMEOUT - 0.1, TIMEOUT, 31.0])))
        out.append(piece)
    return out


def arbitrarySteps():
    return streams.flatmap(steps)


def drive(proto, clock: Clock, plan) -> None:
    for step in plan:
        if isinstance(step, bytes):
            if proto.transport.disconnecting:
                continue  # a real transport reads nothing after loseConnection
            proto.dataReceived(step)
        else:
            clock.advance(step)


class PropertyTestCase(SynchronousTestCase):
    @contextmanager
    def noErrorsLogged(self):
        """Nothing inside logs a failure or an error, as trial would report it."""
        with capturedLogs() as events:
            yield
        bad = [e for e in events if "log_failure" in e or e.get("isError")]
        self.assertEqual(bad, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def outcome(self, d) -> list:
        results: list = []
        d.addBoth(results.append)
        return results

    def assertFiredOnce(self, results: list, allowed: tuple):
        self.assertEqual(len(results), 1, "the Deferred must have fired once")
        result = results[0]
        if isinstance(result, Failure):
            self.assertTrue(
                result.check(*allowed), f"unexpected failure {result.type.__name__}: {result.value}"
            )
        return result


# The relay query client.

QUERY_ERRORS = (wire.ProtocolError, IncompleteReply, TimeoutError) + tuple(
    # A challenge the query cannot answer (nodes' identities).
    e for e in [getattr(relayClient, "ProofNeeded", None)] if e is not None
)


def replyBytes(items: list[dict], **extra) -> bytes:
    return b"".join(
        [
            wire.status(wire.OK, f"{len(items)} things", count=len(items), boot="b00t"),
            *(wire.item(wire.PEER, **i) for i in items),
            wire.end(len(items), **extra),
        ]
    )


itemFields = st.dictionaries(
    st.sampled_from(["node", "host", "port", "name", "size", "x_y"]),
    st.one_of(st.text(max_size=10), st.integers(0, 10**6)),
    max_size=4,
)


class QueryProtocolTests(PropertyTestCase):
    """
    QueryProtocol fed any byte stream.
    """

    def run_(self, plan):
        clock = Clock()
        proto = QueryProtocol(clock, wire.request(wire.PEERS), TIMEOUT)
        transport = StringTransport(peerAddress=CLIENT)
        results = self.outcome(proto.deferred)
        proto.makeConnection(transport)
        drive(proto, clock, plan)
        proto.connectionLost(Failure(ConnectionDone()))
        clock.advance(FOREVER)
        return results

    @fast(300)
    @given(arbitrarySteps())
    @example([b"P2P/1 200 count=1\n", b"P2P/1 END count=1\n"])
    @example([b"P2P/1 200 count=99999999999999999999\n"])
    @example([b"P2P/1 100 nonce=\n"])
    def test_anyBytes(self, plan):
        """Any bytes, split and delayed anyhow, end in a Reply or a documented error, nothing logged."""
        with self.noErrorsLogged():
            result = self.assertFiredOnce(self.run_(plan), QUERY_ERRORS)
        if not isinstance(result, Failure):
            self.assertIsInstance(result, Reply)
            self.assertEqual(len(result.items), result.status.integer("count", 0))

    @fast(200)
    @given(st.lists(itemFields, max_size=5).flatmap(lambda items: st.tuples(st.just(items), steps(replyBytes(items), ticks=False))))
    def test_validReplySplitAnyhow(self, case):
        """A valid list answer arrives as the same Reply however it is split."""
        items, plan = case
        with self.noErrorsLogged():
            reply = self.assertFiredOnce(self.run_(plan + [b"P2P/1 GARBAGE after the end\n"]), ())
        self.assertEqual(
            [dict(m.fields) for m in reply.items],
            [{k: str(v) for k, v in i.items()} for i in items],
        )
        self.assertEqual(reply.end.integer("count"), len(items))

    @fast(200)
    @given(st.lists(itemFields, max_size=4).map(replyBytes).flatmap(
        lambda data: st.integers(0, len(data) - 1).map(lambda n: data[:n])
    ))
    def test_truncatedReply(self, prefix):
        """A valid answer cut off anywhere before its last byte is an IncompleteReply."""
        with self.noErrorsLogged():
            result = self.assertFiredOnce(self.run_([prefix]), (IncompleteReply,))
        self.assertIsInstance(result, Failure)


# The GET client.

class GetProtocolTests(PropertyTestCase):
    """
    GetProtocol fed any byte stream, writing into a real Download.
    """

    # Refusals of the peer's file, and its slowness (nodes' identities, bounded waiting).
    GET_ERRORS = (wire.ProtocolError, IncompleteBody, TimeoutError, VerificationError, DestinationError) + tuple(
        e for e in [getattr(getModule, "TooSlow", None)] if e is not None
    )

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())

    def run_(self, plan, offset=0, length=None):
        clock = Clock()
        sink = Download(self.folder)
        self.addCleanup(sink.discard)
        proto = GetProtocol(clock, "a.txt", sink, TIMEOUT, offset=offset, length=length)
        transport = StringTransport(peerAddress=CLIENT)
        results = self.outcome(proto.deferred)
        proto.makeConnection(transport)
        drive(proto, clock, plan)
        proto.connectionLost(Failure(ConnectionDone()))
        clock.advance(FOREVER)
        return results, sink

    def assertSaneSink(self, sink: Download) -> None:
        """Whatever the peer said, no more bytes are taken than a range it may announce."""
        if sink.expectedSize is None:
            self.assertEqual(sink.received, 0)
        else:
            self.assertGreaterEqual(sink.expectedSize, 0)
            self.assertLessEqual(sink.received, sink.expectedSize)

    @fast(300)
    @given(arbitrarySteps())
    @example([b"P2P/1 200 size=3 sha256=" + SHA.encode() + b"\nabcdef"])
    def test_anyBytes(self, plan):
        """Any bytes end in success or a documented error, and never overfill the download."""
        with self.noErrorsLogged():
            results, sink = self.run_(plan)
            result = self.assertFiredOnce(results, self.GET_ERRORS)
        self.assertSaneSink(sink)
        if not isinstance(result, Failure):
            self.assertEqual(sink.received, sink.expectedSize)

    statusFields = st.fixed_dictionaries(
        {},
        optional={
            "size": st.one_of(st.integers(0, 20), st.sampled_from(["-1", "x", "1" * 20])),
            "offset": st.integers(0, 25),
            "length": st.integers(0, 25),
            "sha256": st.sampled_from([SHA, "abc", SHA.upper()]),
        },
    )

    @fast(300)
    @given(
        st.integers(0, 20),
        st.one_of(st.none(), st.integers(0, 20)),
        statusFields,
        st.binary(max_size=30),
    )
    @example(5, None, {"size": 3, "offset": 5, "sha256": SHA}, b"abcdef")
    def test_anyRange(self, offset, length, fields, body):
        """Whatever range a peer announces, the client takes at most an honest one of it."""
        with self.noErrorsLogged():
            results, sink = self.run_([wire.status(wire.OK, **fields) + body], offset, length)
            result = self.assertFiredOnce(results, self.GET_ERRORS)
        self.assertSaneSink(sink)
        if not isinstance(result, Failure):
            size = int(fields["size"])
            got = int(fields.get("offset", 0))
            announced = int(fields.get("length", size - got))
            self.assertEqual(got, offset)
            self.assertLessEqual(got + announced, size)
            self.assertEqual(sink.received, announced)
            if length is not None:
                self.assertEqual(announced, length)

    @fast(200)
    @given(st.binary(max_size=200).flatmap(lambda body: st.tuples(st.just(body), steps(
        wire.status(wire.OK, size=len(body), sha256=hashlib.sha256(body).hexdigest(), offset=0, length=len(body)) + body,
        ticks=False,
    ))))
    def test_validAnswerSplitAnyhow(self, case):
        """A whole file arrives verified however its status line and body are split."""
        body, plan = case
        with self.noErrorsLogged():
            results, sink = self.run_(plan + [b"surplus bytes are ignored"])
            self.assertFiredOnce(results, ())
        self.assertEqual(sink.verify(), hashlib.sha256(body).hexdigest())

    @fast(200)
    @given(st.binary(min_size=1, max_size=100).flatmap(lambda body: st.integers(
        0, len(body) + 60
    ).map(lambda n: (body, n))))
    def test_truncatedAnswer(self, case):
        """A whole-file answer cut off before its last byte is an IncompleteBody."""
        body, n = case
        data = wire.status(wire.OK, size=len(body), sha256=hashlib.sha256(body).hexdigest()) + body
        prefix = data[: min(n, len(data) - 1)]
        with self.noErrorsLogged():
            results, sink = self.run_([prefix])
            result = self.assertFiredOnce(results, (IncompleteBody,))
        self.assertIsInstance(result, Failure)


# The servers.

class ServerTestCase(PropertyTestCase):
    def assertAnswered(self, transport: StringTransport) -> list[wire.Message]:
        """Everything written is whole status/item lines (before any body), each one parseable."""
        data = transport.value()
        if not data:
            return []
        head, sep, body = data.partition(b"\n")
        first = wire.parseLine(head)
        self.assertIsNotNone(first.status, first)
        messages = [first]
        if first.status == wire.OK and "sha256" in first.fields:
            return messages  # a body follows; the file server tests check it
        lines = data.split(b"\n")
        self.assertEqual(lines[-1], b"", "a partial line was written")
        messages += [wire.parseLine(line) for line in lines[1:-1]]
        return messages


class RelayProtocolTests(ServerTestCase):
    """
    The relay fed any byte stream.
    """

    def connect(self):
        clock = Clock()
        factory = RelayFactory(Registry(clock.seconds, 90.0), clock)
        proto = factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        return clock, proto, transport

    requests = st.one_of(
        streams,
        st.builds(
            lambda verb, fields: wire.formatLine(verb, fields),
            st.sampled_from(sorted(wire.VERBS) + ["PROOF", "FILE", "END"]),
            st.dictionaries(
                st.sampled_from(["node", "host", "port", "udp", "files", "name", "pattern", "limit", "key", "sig", "count", "size", "sha256"]),
                st.one_of(st.text(max_size=12), st.integers(0, 70000), st.sampled_from(["*", "[", "[!", "**/*", "a" * 70, SHA])),
                max_size=6,
            ),
        ),
    )

    @fast(300)
    @given(st.lists(requests, min_size=1, max_size=4).map(b"".join).flatmap(steps))
    @example([b"P2P/1 SEARCH pattern=%5B\n"])
    @example([b"P2P/1 REGISTER node=a port=1 files=1\nP2P/1 FILE name=a size=1 sha256=" + SHA.encode() + b"\n"])
    def test_anyBytes(self, plan):
        """Any bytes get status lines or nothing, never an exception or a logged error, and the connection always ends."""
        with self.noErrorsLogged():
            clock, proto, transport = self.connect()
            drive(proto, clock, plan)
            self.assertAnswered(transport)
            clock.advance(FOREVER)
            self.assertTrue(transport.disconnecting)
            self.assertAnswered(transport)
            proto.connectionLost(Failure(ConnectionDone()))
            clock.advance(FOREVER)

    @fast(30)
    @given(st.integers(wire.MAX_LINE - 1, wire.MAX_LINE + 40), st.booleans())
    def test_longLines(self, length, newline):
        """A line over MAX_LINE is answered 414 and closed: at its newline, or as soon as a CR could not save it."""
        with self.noErrorsLogged():
            clock, proto, transport = self.connect()
            line = b"P2P/1 PEERS pad=" + b"x" * (length - 16)
            proto.dataReceived(line + (b"\n" if newline else b""))
            messages = self.assertAnswered(transport)
            if length > wire.MAX_LINE + 1 or (newline and length > wire.MAX_LINE):
                self.assertEqual(messages[0].status, wire.LINE_TOO_LONG)
                self.assertTrue(transport.disconnecting)
            proto.connectionLost(Failure(ConnectionDone()))


class FileServerProtocolTests(ServerTestCase):
    """
    The node's file server fed any byte stream.
    """

    FILES = {"a.txt": b"hello, world\n", "dir/b c.txt": b"\x00\x01" * 40, "empty": b""}

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        for name, data in self.FILES.items():
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            (self.root / name).write_bytes(data)
        self.share = SharedDirectory(self.root, runInThread=syncThread)

    def connect(self):
        clock = Clock()
        cooperator = Cooperator(
            scheduler=lambda f: clock.callLater(0, f),
            terminationPredicateFactory=lambda: (lambda: True),
        )
        self.addCleanup(cooperator.stop)
        factory = FileServerFactory(self.share, clock, cooperator)
        proto = factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        return clock, proto, transport

    names = st.one_of(
        st.sampled_from(sorted(FILES) + ["missing", "../etc/passwd", "/etc/passwd", "dir", "a.txt/", "dir//b c.txt", "x" * 300]),
        st.text(max_size=20),
    )
    gets = st.builds(
        lambda name, fields: wire.formatLine(wire.GET, {"name": name, **fields}),
        names,
        st.dictionaries(
            st.sampled_from(["offset", "length", "nonce"]),
            st.one_of(st.integers(0, 200), st.sampled_from(["-1", "", "1e3", "9" * 20, "\u0661"])),
            max_size=2,
        ),
    )

    def check(self, transport: StringTransport, plan) -> None:
        messages = self.assertAnswered(transport)
        if messages and messages[0].status == wire.OK and "sha256" in messages[0].fields:
            first = messages[0]
            body = transport.value().partition(b"\n")[2]
            request = wire.parseLine(b"".join(s for s in plan if isinstance(s, bytes)).split(b"\n")[0])
            data = self.FILES[request.name()]
            offset, length = first.integer("offset"), first.integer("length")
            self.assertEqual(first.sha256(), hashlib.sha256(data).hexdigest())
            self.assertEqual(body, data[offset : offset + length])
            self.assertEqual(len(body), length)

    @fast(300)
    @given(st.one_of(streams, gets, st.builds(bytes.__add__, gets, streams)).flatmap(steps))
    @example([b"P2P/1 GET name=a.txt offset=13\n"])
    @example([b"P2P/1 GET name=a.txt offset=14\n"])
    @example([b"P2P/1 GET name=dir/b%20c.txt length=0\n"])
    @example([b"P2P/1 PROVE nonce=00\n"])
    def test_anyBytes(self, plan):
        """Any bytes get a status line (and, for a GET that fits, exactly its range), never an error logged."""
        with self.noErrorsLogged():
            clock, proto, transport = self.connect()
            drive(proto, clock, [s if isinstance(s, bytes) else s for s in plan])
            clock.advance(0)
            clock.advance(0)
            self.check(transport, plan)
            for _ in range(10):
                clock.advance(1)  # the body, a chunk a tick, then the deadlines
            clock.advance(FOREVER)
            self.assertTrue(transport.disconnecting)
            self.check(transport, plan)
            proto.connectionLost(Failure(ConnectionDone()))
            clock.advance(FOREVER)
