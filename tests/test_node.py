"""
The peer node's file server and the shared folder behind it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2prelay.node import share as share_module
from p2prelay import wire
from p2prelay.negotiation import IDLE_TIMEOUT
from p2prelay.node.ratelimit import UploadLimiter
from p2prelay.node.producers import CHUNK, FileBodyProducer, SendfileProducer
from p2prelay.node.server import UPLOAD_RETRY, FileServerFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.pieces import MIN_PIECE_SIZE, decodeDigests, rootOf
from p2prelay.wire import FileEntry
from tests import test_sendfile

SECRET = b"TOP SECRET: the outside file"
CLIENT = IPv4Address("TCP", "10.1.2.3", 40000)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def syncThread(f, *args):
    """Run 'in a thread' synchronously, as a Deferred."""
    return maybeDeferred(f, *args)


class SlowThreads:
    """A runInThread whose work waits until the test releases it."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def __call__(self, f, *args) -> Deferred:
        d = Deferred()
        self.pending.append(d)
        d.addCallback(lambda _: f(*args))
        return d


def growWhileHashing(case: SynchronousTestCase, path: Path) -> None:
    """Make the next hashes see the file grow as they read it."""
    real = share_module.hashFile

    def growing(p, pieceSize):
        hashes = real(p, pieceSize)
        with open(path, "ab") as f:
            f.write(b" more")
        return hashes

    case.patch(share_module, "hashFile", growing)


class SlowClientTransport(StringTransport):
    """
    A transport whose send buffer fills with every body write, like one to a
    slow client: it pauses its streaming producer, as a TCP transport does.
    """

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming:
            self.producer.pauseProducing()


def splitResponse(data: bytes) -> tuple[wire.Message, bytes]:
    head, sep, body = data.partition(b"\n")
    assert sep, data
    return wire.parseLine(head), body


class ServerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()
        self.share = SharedDirectory(self.root, runInThread=syncThread)
        # One body chunk per clock tick, so pausing between chunks is observable.
        self.cooperator = Cooperator(
            scheduler=lambda f: self.clock.callLater(0, f),
            terminationPredicateFactory=lambda: (lambda: True),
        )
        self.addCleanup(self.cooperator.stop)
        self.factory = FileServerFactory(self.share, self.clock, self.cooperator)

    def write(self, name: str, data: bytes, root: Path | None = None) -> Path:
        path = (root or self.root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def outside(self) -> Path:
        """A folder next to the share holding a file nobody may fetch."""
        outside = Path(self.mktemp()).absolute()
        outside.mkdir()
        self.write("secret.txt", SECRET, outside)
        return outside

    def connect(self, transport: StringTransport | None = None):
        transport = transport or StringTransport()
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(transport)
        return proto, transport

    def get(self, data: bytes, transport: StringTransport | None = None) -> StringTransport:
        proto, transport = self.connect(transport)
        proto.dataReceived(data)
        self.clock.advance(0)
        return transport

    def assertRefused(self, data: bytes, code: int) -> wire.Message:
        transport = self.get(data)
        message, rest = splitResponse(transport.value())
        self.assertEqual(message.status, code, message)
        self.assertEqual(rest, b"")
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(SECRET, transport.value())
        return message


class GetTests(ServerTestCase):
    def test_whole(self):
        """GET sends a status line with size, digest and range, then exactly the bytes, then closes."""
        data = b"hello, world\n" * 10
        self.write("a.txt", data)
        transport = self.get(wire.request(wire.GET, name="a.txt"))
        message, body = splitResponse(transport.value())
        self.assertEqual(message.status, wire.OK)
        self.assertEqual(message.integer("size"), len(data))
        self.assertEqual(message.sha256(), sha(data))
        self.assertEqual((message.integer("offset"), message.integer("length")), (0, len(data)))
        self.assertEqual(body, data)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)

    def test_nestedNameWithSpaces(self):
        """Nested and non-ASCII names with spaces are served."""
        name = "dir/sub dir/\u00e9t\u00e9 1.txt"
        self.write(name, b"summer")
        message, body = splitResponse(self.get(wire.request(wire.GET, name=name)).value())
        self.assertEqual((message.status, body), (200, b"summer"))

    def test_multiChunk(self):
        """A file larger than one chunk arrives whole and in order."""
        data = os.urandom(CHUNK * 2 + 123)
        self.write("big.bin", data)
        message, body = splitResponse(self.get(wire.request(wire.GET, name="big.bin")).value())
        self.assertEqual(body, data)

    def test_empty(self):
        """An empty file is a 200 with length 0 and no body."""
        self.write("empty", b"")
        transport = self.get(wire.request(wire.GET, name="empty"))
        message, body = splitResponse(transport.value())
        self.assertEqual((message.status, message.get("length"), body), (200, "0", b""))
        self.assertTrue(transport.disconnecting)

    def test_bareLF(self):
        """A request ending in a bare LF is served."""
        self.write("a", b"x")
        message, body = splitResponse(self.get(b"P2P/1 GET name=a\n").value())
        self.assertEqual(body, b"x")

    def test_splitRequest(self):
        """A request arriving a byte at a time is served once it is complete."""
        self.write("a", b"abc")
        proto, transport = self.connect()
        for byte in wire.request(wire.GET, name="a"):
            proto.dataReceived(bytes([byte]))
        self.clock.advance(0)
        self.assertEqual(splitResponse(transport.value())[1], b"abc")

    def test_onlyOneRequest(self):
        """Lines after the GET are ignored: one request per connection."""
        self.write("a", b"A")
        self.write("b", b"B")
        transport = self.get(wire.request(wire.GET, name="a") + wire.request(wire.GET, name="b"))
        self.assertEqual(splitResponse(transport.value())[1], b"A")

    def test_digestOfChangedFile(self):
        """A file changed since the last scan is announced with its new digest."""
        self.write("a", b"old")
        self.successResultOf(self.share.scan())
        self.write("a", b"new and longer")
        message, body = splitResponse(self.get(wire.request(wire.GET, name="a")).value())
        self.assertEqual((message.sha256(), body), (sha(b"new and longer"), b"new and longer"))

    def test_changingFileIsBusy(self):
        """A file that changes while it is hashed for serving is answered 503."""
        growWhileHashing(self, self.write("a", b"growing"))
        self.assertRefused(wire.request(wire.GET, name="a"), wire.BUSY)


class LogTests(ServerTestCase):
    """The node's log names peers as host:port and says nothing per connection it need not."""

    def test_factoryQuiet(self):
        """Starting and stopping the file server factory logs no 'Starting factory <...>' pair."""
        with capturedLogs() as events:
            self.factory.doStart()
            self.factory.doStop()
        self.assertEqual([formatEvent(e) for e in events], [])

    def test_sendingNamesHostPort(self):
        """A transfer is logged with the client as host:port, not an IPv4Address repr."""
        self.write("a.txt", b"alpha")
        self.successResultOf(self.share.scan())
        with capturedLogs() as events:
            self.get(wire.request(wire.GET, name="a.txt"), StringTransport(peerAddress=CLIENT))
        [line] = [formatEvent(e) for e in events if "sending" in formatEvent(e)]
        self.assertIn("to 10.1.2.3:40000", line)
        self.assertNotIn("IPv4Address", line)

    def test_refusalNamesHostPort(self):
        """A refusal is logged with the client as host:port."""
        with capturedLogs() as events:
            self.get(wire.request(wire.GET, name="missing.txt"), StringTransport(peerAddress=CLIENT))
        lines = [formatEvent(e) for e in events]
        self.assertTrue(any("refused 10.1.2.3:40000" in line for line in lines), lines)
        self.assertFalse(any("IPv4Address" in line for line in lines), lines)


class RangeTests(ServerTestCase):
    data = bytes(range(256)) * 4

    def setUp(self) -> None:
        super().setUp()
        self.write("r.bin", self.data)

    def test_offsetAndLength(self):
        """offset= and length= select a slice; size and digest still describe the whole file."""
        message, body = splitResponse(
            self.get(wire.request(wire.GET, name="r.bin", offset=100, length=50)).value()
        )
        self.assertEqual(body, self.data[100:150])
        self.assertEqual((message.integer("offset"), message.integer("length")), (100, 50))
        self.assertEqual((message.integer("size"), message.sha256()), (len(self.data), sha(self.data)))

    def test_offsetOnly(self):
        """offset= alone sends the rest of the file."""
        message, body = splitResponse(self.get(wire.request(wire.GET, name="r.bin", offset=1000)).value())
        self.assertEqual((body, message.integer("length")), (self.data[1000:], 24))

    def test_rangeToEnd(self):
        """A range ending exactly at the end of the file is served."""
        _, body = splitResponse(
            self.get(wire.request(wire.GET, name="r.bin", offset=1020, length=4)).value()
        )
        self.assertEqual(body, self.data[1020:])

    def test_offsetAtEnd(self):
        """offset= equal to the size is an empty 200."""
        message, body = splitResponse(self.get(wire.request(wire.GET, name="r.bin", offset=1024)).value())
        self.assertEqual((message.status, body), (200, b""))

    def test_offsetPastEnd(self):
        """offset= past the end is answered 416."""
        self.assertRefused(wire.request(wire.GET, name="r.bin", offset=1025), wire.BAD_RANGE)

    def test_lengthPastEnd(self):
        """A range running past the end is answered 416, not a short body."""
        self.assertRefused(wire.request(wire.GET, name="r.bin", offset=1000, length=25), wire.BAD_RANGE)

    def test_malformedOffset(self):
        """A non-numeric offset is answered 400."""
        self.assertRefused(b"P2P/1 GET name=r.bin offset=-5\r\n", wire.BAD_REQUEST)


class RefusalTests(ServerTestCase):
    def test_missing(self):
        """A file that does not exist is answered 404."""
        self.assertRefused(wire.request(wire.GET, name="nope.txt"), wire.NOT_FOUND)

    def test_parent(self):
        """A name with '..' is refused before touching the disk."""
        self.outside()
        self.assertRefused(wire.request(wire.GET, name="../secret.txt"), wire.BAD_REQUEST)

    def test_absolute(self):
        """An absolute path is refused."""
        outside = self.outside()
        absolute = str(outside / "secret.txt")
        self.assertTrue(absolute.startswith("/"))
        self.assertRefused(wire.request(wire.GET, name=absolute), wire.BAD_REQUEST)

    def test_backslash(self):
        """A backslashed escape is refused."""
        self.assertRefused(wire.request(wire.GET, name="..\\secret.txt"), wire.BAD_REQUEST)

    def test_symlinkOutside(self):
        """A symlink pointing at a file outside the folder is not served."""
        outside = self.outside()
        os.symlink(outside / "secret.txt", self.root / "link.txt")
        self.assertEqual((self.root / "link.txt").read_bytes(), SECRET, "the link works")
        self.assertRefused(wire.request(wire.GET, name="link.txt"), wire.NOT_FOUND)

    def test_symlinkedDirectoryOutside(self):
        """A symlinked directory pointing outside the folder is not a way out."""
        outside = self.outside()
        os.symlink(outside, self.root / "linkdir")
        self.assertEqual((self.root / "linkdir" / "secret.txt").read_bytes(), SECRET, "the link works")
        self.assertRefused(wire.request(wire.GET, name="linkdir/secret.txt"), wire.NOT_FOUND)

    def test_symlinkInside(self):
        """A symlink to another file inside the folder is served."""
        self.write("real.txt", b"inside")
        os.symlink(self.root / "real.txt", self.root / "alias.txt")
        _, body = splitResponse(self.get(wire.request(wire.GET, name="alias.txt")).value())
        self.assertEqual(body, b"inside")

    def test_directory(self):
        """A directory's name is answered 404."""
        (self.root / "dir").mkdir()
        self.assertRefused(wire.request(wire.GET, name="dir"), wire.NOT_FOUND)

    def test_malformedLine(self):
        """A line that is not the protocol is answered 400."""
        self.assertRefused(b"GET /a.txt HTTP/1.0\r\n", wire.BAD_REQUEST)

    def test_missingName(self):
        """GET without name= is answered 400."""
        self.assertRefused(b"P2P/1 GET\r\n", wire.BAD_REQUEST)

    def test_otherVerb(self):
        """A verb other than GET is answered 400."""
        message = self.assertRefused(wire.request(wire.PEERS), wire.BAD_REQUEST)
        self.assertIn("PEERS", message.text)

    def test_overLongLine(self):
        """A line over MAX_LINE is answered 414."""
        self.assertRefused(b"P2P/1 GET name=" + b"a" * wire.MAX_LINE, wire.LINE_TOO_LONG)

    def test_idle(self):
        """A connection that never sends a request is answered 408 and closed."""
        proto, transport = self.connect()
        self.clock.advance(IDLE_TIMEOUT)
        message, _ = splitResponse(transport.value())
        self.assertEqual(message.status, wire.TIMEOUT)
        self.assertTrue(transport.disconnecting)

    def test_hashingIsNotIdleness(self):
        """
        A request whose file takes longer than the idle timeout to hash is
        not answered 408 (the wait is the server's, not the client's); the
        body follows once the hash is known.
        """
        self.write("a", b"data")
        threads = SlowThreads()
        self.factory.share = SharedDirectory(self.root, runInThread=threads)
        transport = self.get(wire.request(wire.GET, name="a"))
        self.clock.advance(IDLE_TIMEOUT * 3)
        self.assertEqual(transport.value(), b"")
        threads.pending[0].callback(None)
        for _ in range(5):
            self.clock.advance(0)
        message, body = splitResponse(transport.value())
        self.assertEqual((message.status, body), (wire.OK, b"data"))

    def test_closedWhileHashing(self):
        """A client gone while its file was hashed gets no body, and the file is closed."""
        self.write("a", b"data")
        threads = SlowThreads()
        self.factory.share = SharedDirectory(self.root, runInThread=threads)
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.GET, name="a"))
        proto.connectionLost(Failure(ConnectionLost()))
        threads.pending[0].callback(None)
        self.clock.advance(0)
        self.assertEqual(transport.value(), b"")
        self.assertIsNone(transport.producer)

    def test_unreadableFile(self):
        """A shared file that cannot be opened is answered 500, not dropped as a bug."""
        self.write("locked", b"data")

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        self.patch(share_module, "_open", denied)
        transport = self.get(wire.request(wire.GET, name="locked"))
        message, body = splitResponse(transport.value())
        self.assertEqual(message.status, wire.SERVER_ERROR)
        self.assertIn("cannot read", message.text)
        self.assertTrue(transport.disconnecting)


class ProducerTests(ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.data = os.urandom(CHUNK * 2 + CHUNK // 2)
        self.write("big.bin", self.data)
        self.transport = SlowClientTransport()
        self.proto, _ = self.connect(self.transport)
        self.proto.dataReceived(wire.request(wire.GET, name="big.bin"))

    def body(self) -> bytes:
        return splitResponse(self.transport.value())[1]

    def test_pauseStopsTheFlow(self):
        """While the transport has paused the producer, no more body bytes are written."""
        self.clock.advance(0)
        self.assertEqual(len(self.body()), CHUNK)
        self.clock.advance(0)
        self.clock.advance(IDLE_TIMEOUT / 2)
        self.assertEqual(len(self.body()), CHUNK)

    def test_resumeContinues(self):
        """Resuming the producer sends the next chunk, and the rest in turn."""
        self.clock.advance(0)
        for expected in [CHUNK * 2, len(self.data)]:
            self.transport.producer.resumeProducing()
            self.clock.advance(0)
            self.assertEqual(len(self.body()), expected)
        self.assertEqual(self.body(), self.data)
        # The last write ends the body: the server closes without waiting for another resume.
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)

    def test_activityResetsIdleTimer(self):
        """A transfer that keeps moving is never cut by the idle timeout."""
        self.clock.advance(0)
        for _ in range(2):  # the second resume writes the last chunk
            self.clock.advance(IDLE_TIMEOUT - 1)
            self.transport.producer.resumeProducing()
            self.clock.advance(0)
        self.assertEqual(self.body(), self.data)
        self.assertFalse(self.transport.disconnected)

    def test_stalledClientTimesOut(self):
        """A client that stops reading is dropped after the idle timeout, with no status line inside the body."""
        self.clock.advance(0)
        self.clock.advance(IDLE_TIMEOUT)
        self.assertEqual(self.body(), self.data[:CHUNK])
        self.assertTrue(self.transport.disconnected, "aborted, not waiting on a full buffer")

    def test_connectionLostStopsProducer(self):
        """Losing the connection mid-body stops the producer and unregisters it."""
        self.clock.advance(0)
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.assertIsNone(self.transport.producer)
        self.transport.producerState = "producing"
        self.clock.advance(0)
        self.assertEqual(len(self.body()), CHUNK)

    def test_connectionLostAfterTransportStoppedProducer(self):
        """
        A TCP transport stops its producer before telling the protocol the
        connection is lost; the protocol's own stop must then be harmless.
        """
        self.clock.advance(0)
        self.transport.producer.stopProducing()
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.assertIsNone(self.transport.producer)


class ScanTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()
        self.calls: list = []

        def countingThread(f, *args):
            self.calls.append(f)
            return maybeDeferred(f, *args)

        self.share = SharedDirectory(self.root, runInThread=countingThread)

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def scan(self) -> bool:
        return self.successResultOf(self.share.scan())

    def hashes(self) -> int:
        return self.calls.count(share_module._hashAndRecord)

    def test_touchedFileIsNoChange(self):
        """A file whose modification time moved but whose bytes did not is no change to announce."""
        path = self.write("a.txt", b"same")
        self.assertTrue(self.scan())
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        self.assertFalse(self.scan())
        self.assertEqual(self.share.entries["a.txt"].mtime_ns, st.st_mtime_ns + 5_000_000_000)

    def test_findsNestedFiles(self):
        """A scan finds files in nested folders, named as POSIX paths with size and digest."""
        self.write("a.txt", b"a")
        self.write("sub/deeper/b c.txt", b"bee")
        self.scan()
        self.assertEqual(sorted(self.share.entries), ["a.txt", "sub/deeper/b c.txt"])
        entry = self.share.entries["sub/deeper/b c.txt"]
        self.assertEqual((entry.name, entry.size, entry.sha256), ("sub/deeper/b c.txt", 3, sha(b"bee")))

    def test_skipsTemporaries(self):
        """Partial downloads (.p2prelay-*) are never announced."""
        self.write(".p2prelay-abc.part", b"half")
        self.write("sub/.p2prelay-x.part", b"half")
        self.write("done.txt", b"whole")
        self.scan()
        self.assertEqual(list(self.share.entries), ["done.txt"])

    def test_skipsSymlinksOutside(self):
        """Symlinks to files or folders outside the share are not announced."""
        outside = Path(self.mktemp()).absolute()
        outside.mkdir()
        (outside / "secret.txt").write_bytes(SECRET)
        os.symlink(outside / "secret.txt", self.root / "link.txt")
        os.symlink(outside, self.root / "linkdir")
        self.assertEqual((self.root / "linkdir" / "secret.txt").read_bytes(), SECRET, "the link works")
        self.scan()
        self.assertEqual(self.share.entries, {})

    def test_changedFirstScan(self):
        """The first scan of a non-empty folder reports a change."""
        self.write("a", b"a")
        self.assertTrue(self.scan())

    def test_unchanged(self):
        """A rescan of an untouched folder reports no change and hashes nothing."""
        self.write("a", b"a")
        self.write("b/c", b"c")
        self.scan()
        before = self.hashes()
        self.assertFalse(self.scan())
        self.assertEqual(self.hashes(), before)

    def test_emptyFolder(self):
        """Scanning an empty folder reports no change."""
        self.assertFalse(self.scan())

    def test_newFile(self):
        """A new file is a change, and only it is hashed."""
        self.write("a", b"a")
        self.scan()
        before = self.hashes()
        self.write("b", b"b")
        self.assertTrue(self.scan())
        self.assertEqual(self.hashes() - before, 1)
        self.assertEqual(sorted(self.share.entries), ["a", "b"])

    def test_changedFile(self):
        """A file whose size changed is hashed again and reported."""
        self.write("a", b"a")
        self.write("b", b"b")
        self.scan()
        before = self.hashes()
        self.write("a", b"longer")
        self.assertTrue(self.scan())
        self.assertEqual(self.hashes() - before, 1)
        self.assertEqual(self.share.entries["a"].sha256, sha(b"longer"))

    def test_touchedSameSize(self):
        """A same-size file with a new modification time is hashed again."""
        path = self.write("a", b"one")
        self.scan()
        st = path.stat()
        path.write_bytes(b"two")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        before = self.hashes()
        self.assertTrue(self.scan())
        self.assertEqual(self.hashes() - before, 1)
        self.assertEqual(self.share.entries["a"].sha256, sha(b"two"))

    def test_removedFile(self):
        """A deleted file is a change and leaves the list."""
        self.write("a", b"a")
        path = self.write("b", b"b")
        self.scan()
        path.unlink()
        self.assertTrue(self.scan())
        self.assertEqual(list(self.share.entries), ["a"])

    def test_changingFileNotAnnounced(self):
        """A file that changes while it is hashed is left out until it is stable."""
        real = share_module.hashFile
        growWhileHashing(self, self.write("growing.log", b"first"))
        self.scan()
        self.assertNotIn("growing.log", self.share.entries)
        self.patch(share_module, "hashFile", real)
        self.assertTrue(self.scan())
        self.assertEqual(self.share.entries["growing.log"].sha256, sha(b"first more"))

    def test_unreadableFileSkipped(self):
        """A file that cannot be read is skipped; the others are announced."""
        self.write("a", b"a")
        self.write("b", b"b")
        real = share_module.hashFile

        def failing(p, pieceSize):
            if p.name == "a":
                raise PermissionError(13, "Permission denied")
            return real(p, pieceSize)

        self.patch(share_module, "hashFile", failing)
        self.scan()
        self.assertEqual(list(self.share.entries), ["b"])

    def test_add(self):
        """add() records a verified download without hashing it."""
        self.share.add(FileEntry("x", 1, "a" * 64))
        self.assertEqual(self.share.entries["x"].sha256, "a" * 64)
        self.assertEqual(self.hashes(), 0)

    def test_resolveRefusesEscapes(self):
        """resolve() refuses names that leave the folder, whatever route they take."""
        outside = Path(self.mktemp()).absolute()
        outside.mkdir()
        (outside / "secret.txt").write_bytes(SECRET)
        os.symlink(outside, self.root / "linkdir")
        self.assertEqual((self.root / "linkdir" / "secret.txt").read_bytes(), SECRET, "the link works")
        for name in ["../x", "/etc/passwd", "linkdir/secret.txt", "a//b"]:
            self.assertRaises(wire.ProtocolError, self.share.resolve, name)


class RegistrationLineTests(SynchronousTestCase):
    """The FILE lines a node registers carry each file's root (and a piece size that is not the default)."""

    def registration(self, pieceSize: int) -> list[wire.Message]:
        from p2prelay.identity import NodeKey
        from p2prelay.node.upkeep import Registrar

        root = Path(self.mktemp()).absolute()
        root.mkdir()
        (root / "a.txt").write_bytes(b"alpha" * 10_000)
        share = SharedDirectory(root, runInThread=syncThread, pieceSize=pieceSize)
        self.successResultOf(share.scan())
        registrar = Registrar(Clock(), None, share, NodeKey.generate(), 7000)
        payload, count = registrar._registration()
        return [wire.parseLine(line) for line in payload.splitlines()], share.entries["a.txt"]

    def test_rootOnFileLine(self):
        """With the default piece size a FILE line has root= and no piece=."""
        from p2prelay.pieces import PIECE_SIZE

        lines, entry = self.registration(PIECE_SIZE)
        [line] = [m for m in lines if m.word == wire.FILE]
        self.assertEqual(line.get("root"), entry.root)
        self.assertIsNone(line.get("piece"))
        self.assertEqual(wire.fileEntry(line), FileEntry("a.txt", entry.size, entry.sha256, root=entry.root))

    def test_pieceSizeOnFileLine(self):
        """Another piece size is named on the FILE line as piece=."""
        lines, entry = self.registration(16384)
        [line] = [m for m in lines if m.word == wire.FILE]
        self.assertEqual((line.get("root"), line.get("piece")), (entry.root, "16384"))
        self.assertEqual(wire.fileEntry(line).pieceSize, 16384)


class ManifestTests(ServerTestCase):
    """MANIFEST name=: a file's piece digests, under the same caps and deadlines as GET."""

    PIECE = MIN_PIECE_SIZE

    def setUp(self) -> None:
        super().setUp()
        self.share.pieceSize = self.PIECE
        self.data = os.urandom(3 * self.PIECE + 7)
        self.write("big.bin", self.data)

    def digests(self, data: bytes) -> list[bytes]:
        return [hashlib.sha256(data[i : i + self.PIECE]).digest() for i in range(0, len(data), self.PIECE)]

    def manifest(self, name: str = "big.bin", transport=None) -> tuple[wire.Message, bytes, StringTransport]:
        transport = self.get(wire.request(wire.MANIFEST, name=name), transport)
        message, body = splitResponse(transport.value())
        return message, body, transport

    def test_answer(self):
        """The status line gives size, sha256, root, piece and count; exactly count*32 digest bytes follow; then a close."""
        self.successResultOf(self.share.scan())
        message, body, transport = self.manifest()
        self.assertEqual(message.status, wire.OK)
        count = message.integer("count")
        self.assertEqual(count, 4)
        self.assertEqual(message.integer("size"), len(self.data))
        self.assertEqual(message.sha256(), sha(self.data))
        self.assertEqual(message.integer("piece"), self.PIECE)
        digests = decodeDigests(body, count)
        self.assertEqual(digests, self.digests(self.data))
        self.assertEqual(message.sha256("root"), rootOf(len(self.data), self.PIECE, digests))
        self.assertEqual(message.sha256("root"), self.share.entries["big.bin"].root)
        self.assertTrue(transport.disconnecting)

    def test_emptyFile(self):
        """An empty file has a manifest of no pieces: count=0 and no body."""
        self.write("empty", b"")
        message, body, _ = self.manifest("empty")
        self.assertEqual((message.status, message.integer("count"), body), (wire.OK, 0, b""))
        self.assertEqual(message.sha256("root"), rootOf(0, self.PIECE, []))

    def test_unknownName(self):
        """MANIFEST of a name the share does not hold is 404."""
        self.assertRefused(wire.request(wire.MANIFEST, name="nope"), wire.NOT_FOUND)

    def test_escapingName(self):
        """MANIFEST refuses an escaping name as GET does."""
        self.assertRefused(wire.request(wire.MANIFEST, name="../x"), wire.BAD_REQUEST)

    def test_missingName(self):
        """MANIFEST without name= is 400."""
        self.assertRefused(wire.request(wire.MANIFEST), wire.BAD_REQUEST)

    def test_changedFileHashedAgain(self):
        """A file changed since the scan is hashed again: the manifest describes what is there now."""
        self.successResultOf(self.share.scan())
        new = os.urandom(self.PIECE + 1)
        self.write("big.bin", new)
        message, body, _ = self.manifest()
        self.assertEqual(message.sha256(), sha(new))
        self.assertEqual(decodeDigests(body, message.integer("count")), self.digests(new))

    def test_changingFileIsBusy(self):
        """A file that changes while it is hashed for the manifest is answered 503."""
        growWhileHashing(self, self.write("big.bin", b"growing"))
        self.assertRefused(wire.request(wire.MANIFEST, name="big.bin"), wire.BUSY)

    def test_countsAsARequest(self):
        """A MANIFEST holds one of its address's --max-gets-per-address slots while it runs."""
        self.factory = FileServerFactory(self.share, self.clock, self.cooperator, maxGetsPerAddress=1)
        threads = SlowThreads()
        self.factory.share = SharedDirectory(self.root, runInThread=threads, pieceSize=self.PIECE)
        first = self.get(wire.request(wire.MANIFEST, name="big.bin"), StringTransport(peerAddress=CLIENT))
        self.assertEqual(first.value(), b"")
        second = self.get(wire.request(wire.GET, name="big.bin"), StringTransport(peerAddress=CLIENT))
        message, _ = splitResponse(second.value())
        self.assertEqual(message.status, wire.BUSY)

    def test_hashingIsNotIdleness(self):
        """Hashing for a MANIFEST longer than the idle timeout is not the client's idleness."""
        threads = SlowThreads()
        self.factory.share = SharedDirectory(self.root, runInThread=threads, pieceSize=self.PIECE)
        transport = self.get(wire.request(wire.MANIFEST, name="big.bin"))
        self.clock.advance(IDLE_TIMEOUT * 3)
        self.assertEqual(transport.value(), b"")
        threads.pending[0].callback(None)
        for _ in range(5):
            self.clock.advance(0)
        message, body = splitResponse(transport.value())
        self.assertEqual((message.status, len(body)), (wire.OK, 4 * 32))

    def test_stalledClientDropped(self):
        """A client that stops reading a large manifest is dropped after the idle timeout."""
        self.write("huge", b"")
        self.patch(
            self.share, "manifest",
            lambda name: _succeeded((FileEntry("huge", 0, sha(b""), root="a" * 64), _FakeHashes(4 * CHUNK))),
        )
        transport = SlowClientTransport()
        self.get(wire.request(wire.MANIFEST, name="huge"), transport)
        self.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(transport.disconnected)
        self.assertLess(len(transport.value()), 2 * CHUNK)


async def _succeeded(value):
    return value


class _FakeHashes:
    """Hashes with many digests, without hashing a big file."""

    def __init__(self, count: int) -> None:
        self.digests = [bytes(32)] * count


class UploadCapTests(ServerTestCase):
    """--max-uploads: GETs sending at once, all addresses together."""

    def setUp(self) -> None:
        super().setUp()
        self.factory = FileServerFactory(self.share, self.clock, self.cooperator, maxUploads=1)
        self.data = os.urandom(CHUNK * 3)
        self.write("big.bin", self.data)

    def test_overCapBusy(self):
        """A GET while N uploads are sending is answered 503 with a retry= hint, and closed."""
        first = SlowClientTransport(peerAddress=CLIENT)
        self.get(wire.request(wire.GET, name="big.bin"), first)
        other = StringTransport(peerAddress=IPv4Address("TCP", "10.9.9.9", 1))
        self.get(wire.request(wire.GET, name="big.bin"), other)
        message, rest = splitResponse(other.value())
        self.assertEqual((message.status, message.retry(), rest), (wire.BUSY, UPLOAD_RETRY, b""))
        self.assertTrue(other.disconnecting)
        self.assertEqual(splitResponse(first.value())[0].status, wire.OK)

    def test_slotFreedOnClose(self):
        """Once an upload's connection closes, the next GET is served."""
        proto, first = self.connect(SlowClientTransport(peerAddress=CLIENT))
        proto.dataReceived(wire.request(wire.GET, name="big.bin"))
        self.clock.advance(0)
        proto.connectionLost(Failure(ConnectionLost()))
        second = self.get(wire.request(wire.GET, name="big.bin"), StringTransport(peerAddress=CLIENT))
        message, body = splitResponse(second.value())
        self.assertEqual((message.status, body), (wire.OK, self.data))

    def test_manifestNotAnUpload(self):
        """A MANIFEST is not counted as an upload: it is answered while the cap is full."""
        self.get(wire.request(wire.GET, name="big.bin"), SlowClientTransport(peerAddress=CLIENT))
        transport = self.get(wire.request(wire.MANIFEST, name="big.bin"), StringTransport(peerAddress=CLIENT))
        self.assertEqual(splitResponse(transport.value())[0].status, wire.OK)

    def test_noCapByDefault(self):
        """Without --max-uploads any number of GETs send at once (within the other caps)."""
        self.factory = FileServerFactory(self.share, self.clock, self.cooperator)
        transports = [SlowClientTransport(peerAddress=IPv4Address("TCP", f"10.0.0.{i}", 1)) for i in range(5)]
        for transport in transports:
            self.get(wire.request(wire.GET, name="big.bin"), transport)
        self.assertEqual([splitResponse(t.value())[0].status for t in transports], [wire.OK] * 5)


class RateCapTests(ServerTestCase):
    """--max-rate: one token bucket paces every body the node sends."""

    RATE = 256 * 1024  # bytes per second

    def setUp(self) -> None:
        super().setUp()
        self.limiter = UploadLimiter(self.clock, self.RATE)
        self.factory = FileServerFactory(self.share, self.clock, self.cooperator, limiter=self.limiter)
        self.data = os.urandom(4 * self.RATE)
        self.write("big.bin", self.data)

    def start(self, peer=CLIENT) -> StringTransport:
        transport = StringTransport(peerAddress=peer)
        self.get(wire.request(wire.GET, name="big.bin"), transport)
        return transport

    def assertWithin(self, value: float, expected: float, margin: float) -> None:
        # trial's assertAlmostEqual ignores delta=
        self.assertLessEqual(abs(value - expected), margin, f"{value} is not {expected} +- {margin}")

    def elapse(self, seconds: float, step: float = 0.05) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def body(self, transport) -> bytes:
        return splitResponse(transport.value())[1]

    def test_rateHolds(self):
        """A body goes out at the capped rate, within 10 %, and arrives whole."""
        transport = self.start()
        self.elapse(3)
        self.assertWithin(len(self.body(transport)) / 3, self.RATE, self.RATE * 0.1)
        self.elapse(2)
        self.assertEqual(self.body(transport), self.data)
        self.assertTrue(transport.disconnecting)

    def test_sharedFairly(self):
        """Two clients share the cap: together at the rate, each about half."""
        one = self.start(IPv4Address("TCP", "10.0.0.1", 1))
        two = self.start(IPv4Address("TCP", "10.0.0.2", 1))
        self.elapse(3)
        a, b = len(self.body(one)), len(self.body(two))
        self.assertWithin((a + b) / 3, self.RATE, self.RATE * 0.1)
        # The first to start has the burst to itself: a chunk or two ahead.
        self.assertWithin(a, b, (a + b) / 2 * 0.15)

    def test_manifestPaced(self):
        """A MANIFEST's body is paced by the same bucket."""
        self.start()
        self.elapse(1)
        sent = self.limiter.sent
        self.share.pieceSize = MIN_PIECE_SIZE
        waiting = self.limiter.waiting
        manifest = self.get(wire.request(wire.MANIFEST, name="big.bin"), StringTransport(peerAddress=CLIENT))
        self.assertEqual(self.limiter.waiting, waiting + 1)  # it waits its turn in the bucket
        self.elapse(1)
        self.assertTrue(manifest.disconnecting)
        self.assertGreater(self.limiter.sent, sent)

    def test_pausedIsNotIdle(self):
        """Waiting on the bucket is not a stalled client: a body paced slower than the idle timeout is never cut."""
        self.factory = FileServerFactory(
            self.share, self.clock, self.cooperator, idleTimeout=0.5,
            limiter=UploadLimiter(self.clock, 16 * 1024),  # a 16 KiB chunk per second
        )
        self.data = os.urandom(16 * 1024 * 4)
        self.write("big.bin", self.data)
        transport = self.start()
        self.elapse(6)
        self.assertEqual(self.body(transport), self.data)

    def test_stalledClientStillDropped(self):
        """A client that stops reading is dropped after the idle timeout even under a rate cap."""
        transport = SlowClientTransport(peerAddress=CLIENT)
        self.get(wire.request(wire.GET, name="big.bin"), transport)
        self.elapse(IDLE_TIMEOUT + 1, step=0.5)
        self.assertTrue(transport.disconnected)
        self.assertLess(len(self.body(transport)), len(self.data))


class RealConnectionTests(test_sendfile.ProducerTestCase):
    """On a real TCP connection: piece-sized ranges by sendfile, and the read path under a rate cap."""

    def setUp(self) -> None:
        super().setUp()
        root = self.path.parent / "share"
        root.mkdir()
        (root / "big.bin").write_bytes(self.data)
        self.share = SharedDirectory(root, runInThread=syncThread, pieceSize=MIN_PIECE_SIZE * 64)
        cooperator = Cooperator(scheduler=lambda f: self.reactor.callLater(0, f))
        self.addCleanup(cooperator.stop)
        self.factory = FileServerFactory(self.share, self.reactor, cooperator)

    def get(self, request: bytes) -> None:
        self.connect()
        self.proto = self.factory.buildProtocol(CLIENT)
        self.connection.protocol = self.proto
        self.proto.makeConnection(self.connection)
        self.proto.dataReceived(request)
        self.reactor.advance(0)

    def test_pieceRangeBySendfile(self):
        """A GET of one piece (offset= and length= of a piece) goes out by sendfile, exactly its bytes."""
        piece = self.share.pieceSize
        self.get(wire.request(wire.GET, name="big.bin", offset=piece, length=piece))
        self.assertIsInstance(self.proto._producer, SendfileProducer)
        self.pump()
        head, _, body = bytes(self.peer.received).partition(b"\n")
        self.assertEqual(wire.parseLine(head).integer("length"), piece)
        self.assertEqual(body, self.data[piece : 2 * piece])
        self.assertGreater(self.calls, 0)

    def test_rateCapReads(self):
        """Under a rate cap a plain TCP body is read and written (sendfile's bytes could not be paced)."""
        self.factory.limiter = UploadLimiter(self.reactor, 1024 * 1024)
        self.get(wire.request(wire.GET, name="big.bin"))
        self.assertIsInstance(self.proto._producer, FileBodyProducer)
        self.assertEqual(self.calls, 0)

    def test_manifestOnTCP(self):
        """A MANIFEST on plain TCP arrives whole (its body is in memory, never by sendfile)."""
        self.get(wire.request(wire.MANIFEST, name="big.bin"))
        for _ in range(10):
            self.reactor.advance(0)
            self.pump()
        head, _, body = bytes(self.peer.received).partition(b"\n")
        message = wire.parseLine(head)
        self.assertEqual(len(body), 32 * message.integer("count"))
        self.assertEqual(message.integer("count"), 4)  # 3 MiB and a bit, in 1 MiB pieces


class TransferLogTests(ServerTestCase):
    """One line per finished transfer: name, size, seconds, rate, client as host:port."""

    def serveSlowly(self, data: bytes, lose: bool = False):
        """
        GET big.bin (two chunks) from a slow client: the first chunk, a
        second later the second; with ``lose``, the client goes instead.
        """
        self.write("big.bin", data)
        self.successResultOf(self.share.scan())
        with capturedLogs() as events:
            proto, transport = self.connect(SlowClientTransport(peerAddress=CLIENT))
            proto.dataReceived(wire.request(wire.GET, name="big.bin"))
            self.clock.advance(0)  # the status line and the first chunk; paused
            self.clock.advance(1)
            if lose:
                proto.connectionLost(Failure(ConnectionLost("reset by peer")))
            else:
                transport.producer.resumeProducing()
                self.clock.advance(0)
        return [formatEvent(e) for e in events], transport

    def test_finished(self):
        """A complete transfer is one line with its human size, seconds, rate and the client."""
        lines, transport = self.serveSlowly(b"x" * (CHUNK * 2))
        self.assertTrue(transport.disconnecting)
        self.assertIn("sent big.bin: 512.0 KiB in 1.0 s (512.0 KiB/s) to 10.1.2.3:40000", lines)

    def test_failed(self):
        """A transfer cut off says how far it got and why."""
        lines, transport = self.serveSlowly(b"x" * (CHUNK * 2), lose=True)
        [line] = [line for line in lines if "failed" in line]
        self.assertTrue(
            line.startswith(
                "sending big.bin to 10.1.2.3:40000 failed after 256.0 KiB of 512.0 KiB (1.0 s): "
                "the connection was lost ("
            ),
            line,
        )
        self.assertIn("reset by peer", line)


class NodeMetricsTests(ServerTestCase):
    """What the file server tells its NodeMetrics."""

    def setUp(self) -> None:
        super().setUp()
        from p2prelay.metrics import NodeMetrics, newRegistry

        self.metrics = NodeMetrics(newRegistry(process=False))
        self.factory.metrics = self.metrics

    def sample(self, name: str, **labels) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def test_complete(self):
        """A whole GET counts as complete, with its body bytes sent and no upload left running."""
        self.write("a.txt", b"alpha")
        self.get(wire.request(wire.GET, name="a.txt"))
        self.assertEqual(self.sample("p2prelay_node_transfers_total", result="complete"), 1)
        self.assertEqual(self.sample("p2prelay_node_sent_bytes_total"), 5)
        self.assertEqual(self.sample("p2prelay_node_uploads_running"), 0)

    def test_running(self):
        """An upload is counted running while its body is sent, and its bytes as they go."""
        self.write("big.bin", b"x" * (CHUNK * 2))
        proto, transport = self.connect(SlowClientTransport())
        proto.dataReceived(wire.request(wire.GET, name="big.bin"))
        self.assertEqual(self.sample("p2prelay_node_uploads_running"), 1)
        self.clock.advance(0)
        self.assertEqual(self.sample("p2prelay_node_sent_bytes_total"), CHUNK)

    def test_failed(self):
        """A GET whose client goes mid-body counts as failed."""
        self.write("big.bin", b"x" * (CHUNK * 2))
        proto, transport = self.connect(SlowClientTransport())
        proto.dataReceived(wire.request(wire.GET, name="big.bin"))
        self.clock.advance(0)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.sample("p2prelay_node_transfers_total", result="failed"), 1)
        self.assertEqual(self.sample("p2prelay_node_uploads_running"), 0)

    def test_notFound(self):
        """A GET of a name the folder lacks counts as not-found."""
        self.assertRefused(wire.request(wire.GET, name="missing.txt"), wire.NOT_FOUND)
        self.assertEqual(self.sample("p2prelay_node_transfers_total", result="not-found"), 1)

    def test_refusedBusy(self):
        """A GET over the per-address cap counts as refused."""
        self.factory.gets.perAddress = 1
        self.write("big.bin", b"x" * (CHUNK * 2))
        self.connect(SlowClientTransport())[0].dataReceived(wire.request(wire.GET, name="big.bin"))
        self.assertRefused(wire.request(wire.GET, name="big.bin"), wire.BUSY)
        self.assertEqual(self.sample("p2prelay_node_transfers_total", result="refused"), 1)

    def test_badRequestUncounted(self):
        """A line that is not a GET is no transfer."""
        self.assertRefused(b"P2P/1 FROB\r\n", wire.BAD_REQUEST)
        self.assertEqual(
            sum(self.sample("p2prelay_node_transfers_total", result=r) for r in ("complete", "failed", "refused", "not-found")),
            0,
        )


class DualStackSourceTests(ServerTestCase):
    """On the dual-stack default port an IPv4 client arrives as ::ffff:a.b.c.d; the caps count it as plain IPv4."""

    def test_mappedCountsAsIPv4(self):
        """A mapped IPv6 source and the same plain IPv4 source share one per-address cap."""
        from twisted.internet.address import IPv6Address

        from p2prelay.limits import Refusal

        factory = FileServerFactory(self.share, self.clock, self.cooperator, maxPerAddress=1)
        first = factory.buildProtocol(IPv6Address("TCP", "::ffff:10.77.4.1", 40001))
        self.assertNotIsInstance(first, Refusal)
        self.assertEqual(factory.connections.counter.holding("10.77.4.1"), 1)
        self.assertIsInstance(factory.buildProtocol(IPv4Address("TCP", "10.77.4.1", 40002)), Refusal)

    def test_mappedRequestsCountAsIPv4(self):
        """GETs in flight from a mapped source count under its plain IPv4 address."""
        from twisted.internet.address import IPv6Address

        self.write("a.txt", b"alpha")
        self.successResultOf(self.share.scan())
        transport = StringTransport(peerAddress=IPv6Address("TCP", "::ffff:10.77.4.1", 40001))
        proto, transport = self.connect(transport)
        proto.dataReceived(wire.request(wire.GET, name="a.txt"))
        self.assertEqual(self.factory.gets.holding("10.77.4.1"), 1)
