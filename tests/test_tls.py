"""
TLS: a node's self-signed certificate for its own key, clients pinned to
the key the relay listed, and a relay on an ``ssl:`` port verified against
a CA file.  The certificates are made here; the sockets are real, on
loopback, port 0, and always closed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2prelay import identity, tls, wire
from p2prelay.cli.fetch import parseArgs
from p2prelay.cli.options import buildFetcher
from p2prelay.client.fetcher import NotFetched
from p2prelay.client.relay import query
from p2prelay.node.server import FileServerFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.relay.registry import Peer
from p2prelay.relay.service import RelayService
from p2prelay.relay.store import StateStore
from p2prelay.tap import NodeOptions, makeNodeService
from tests.test_relay import KEY, RelayTestCase, registration

LOOPBACK = "tcp:0:interface=127.0.0.1"
TIMEOUT = 10.0
CLOSE_SOON = 2.0  # seconds; the node's close deadline is 10
DAY = datetime.timedelta(days=1)


def makeCA(name: str):
    """A CA key and its self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def makeServerCertificate(caKey, caCert, names=("localhost",), ips=("127.0.0.1",)):
    """A server key and a certificate for ``names`` and ``ips``, signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    alternatives = [x509.DNSName(n) for n in names] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in ips
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay")]))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + DAY)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .sign(caKey, hashes.SHA256())
    )
    return key, cert


def writePEM(path: Path, *objects) -> str:
    data = b""
    for o in objects:
        if isinstance(o, x509.Certificate):
            data += o.public_bytes(Encoding.PEM)
        else:
            data += o.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.write_bytes(data)
    return str(path)


class Hello(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello\n")
        self.transport.loseConnection()


class Collect(Protocol):
    """Everything the server sends, in ``done`` once it closes."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.data)


class Request(Collect):
    def __init__(self, line: bytes) -> None:
        super().__init__()
        self.line = line

    def connectionMade(self) -> None:
        self.transport.write(self.line)


class OneProtocol(Factory):
    noisy = False

    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


class ListeningTestCase(TestCase):
    def listen(self, factory, description: str = LOOPBACK) -> int:
        d = serverFromString(reactor, description).listen(factory)
        ports = []
        d.addCallback(ports.append)
        self.assertTrue(ports, "listen() should bind at once")
        self.addCleanup(ports[0].stopListening)
        return ports[0].getHost().port

    async def fetch(self, endpoint, proto: Collect) -> bytes:
        connected = await endpoint.connect(OneProtocol(proto))
        self.assertIs(connected, proto)
        return await proto.done


class NodeCertificateTests(SynchronousTestCase):
    def test_certifiesTheNodeKey(self) -> None:
        """A node's certificate carries the node's own Ed25519 key."""
        key = identity.NodeKey.generate()
        self.assertEqual(tls.publicKeyOf(tls.nodeCertificate(key)), key.public)

    def test_selfSigned(self) -> None:
        """The certificate is signed by the key it certifies."""
        cert = tls.nodeCertificate(identity.NodeKey.generate())
        cert.verify_directly_issued_by(cert)  # raises if not

    def test_cachedPerKey(self) -> None:
        """A key's certificate is made once; another key gets another one."""
        key = identity.NodeKey.generate()
        self.assertIs(tls.nodeCertificate(key), tls.nodeCertificate(key))
        self.assertIsNot(tls.nodeCertificate(key), tls.nodeCertificate(identity.NodeKey.generate()))

    def test_notEd25519(self) -> None:
        """A certificate for any other kind of key has no node key."""
        caKey, caCert = makeCA("ca")
        self.assertIsNone(tls.publicKeyOf(caCert))


class PinnedTests(ListeningTestCase):
    def setUp(self) -> None:
        self.key = identity.NodeKey.generate()
        self.port = self.listen(tls.nodeTLSFactory(self.key, Factory.forProtocol(Hello), reactor))

    async def test_rightKey(self) -> None:
        """A client pinned to the node's key talks to it over TLS."""
        endpoint = tls.pinnedTLSEndpoint(reactor, "127.0.0.1", self.port, self.key.public, TIMEOUT)
        self.assertEqual(await self.fetch(endpoint, Collect()), b"hello\n")

    async def test_otherKey(self) -> None:
        """A node whose TLS key is not the listed one is refused, and says so."""
        other = identity.NodeKey.generate()
        endpoint = tls.pinnedTLSEndpoint(reactor, "127.0.0.1", self.port, other.public, TIMEOUT)
        proto = Collect()
        with self.assertRaises(tls.TLSKeyMismatch) as caught:
            await endpoint.connect(OneProtocol(proto))
        self.assertEqual(
            str(caught.exception), f"TLS key of 127.0.0.1:{self.port} does not match the relay's index"
        )
        self.assertFalse(proto.done.called, "the application never saw the connection")

    async def test_certificateAuthorityIsNoSubstitute(self) -> None:
        """A CA-signed certificate for another key is refused as well."""
        caKey, caCert = makeCA("ca")
        serverKey, serverCert = makeServerCertificate(caKey, caCert)
        folder = Path(self.mktemp())
        folder.mkdir()
        keyFile = writePEM(folder / "key.pem", serverKey)
        certFile = writePEM(folder / "cert.pem", serverCert, caCert)
        port = self.listen(
            Factory.forProtocol(Hello), f"ssl:0:interface=127.0.0.1:privateKey={keyFile}:certKey={certFile}"
        )
        endpoint = tls.pinnedTLSEndpoint(reactor, "127.0.0.1", port, self.key.public, TIMEOUT)
        with self.assertRaises(tls.TLSKeyMismatch):
            await endpoint.connect(OneProtocol(Collect()))

    async def test_plainServer(self) -> None:
        """A port that does not speak TLS fails the connection with a TLS reason."""
        port = self.listen(Factory.forProtocol(Hello))
        endpoint = tls.pinnedTLSEndpoint(reactor, "127.0.0.1", port, self.key.public, TIMEOUT)
        with self.assertRaises(tls.TLSFailed) as caught:
            await endpoint.connect(OneProtocol(Collect()))
        self.assertIn(f"127.0.0.1:{port}", str(caught.exception))

    async def test_refusedStaysRefused(self) -> None:
        """Nothing listening is Twisted's ConnectionRefusedError, as for TCP."""
        port = self.listen(Factory.forProtocol(Hello))
        # Find a closed port: bind one, then close it.
        closed = serverFromString(reactor, LOOPBACK).listen(Factory.forProtocol(Hello))
        ports = []
        closed.addCallback(ports.append)
        number = ports[0].getHost().port
        await ports[0].stopListening()
        self.assertNotEqual(number, port)
        endpoint = tls.pinnedTLSEndpoint(reactor, "127.0.0.1", number, self.key.public, TIMEOUT)
        with self.assertRaises(error.ConnectionRefusedError):
            await endpoint.connect(OneProtocol(Collect()))


class ServedFactory(FileServerFactory):
    """A node's file server whose ``closed`` fires when its one connection has closed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.closed: Deferred[None] = Deferred()

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        lost = proto.connectionLost

        def connectionLost(reason=None):
            lost(reason)
            self.closed.callback(None)

        proto.connectionLost = connectionLost
        return proto


class FileServerTests(ListeningTestCase):
    async def test_getOverTLS(self) -> None:
        """The node's file server answers a GET through its TLS port, body and all."""
        key = identity.NodeKey.generate()
        folder = Path(self.mktemp())
        folder.mkdir()
        body = os.urandom(300_000)  # over one 256 KiB chunk, many TLS records
        (folder / "a.bin").write_bytes(body)
        share = SharedDirectory(folder)
        await share.scan()
        served = ServedFactory(share, reactor, key=key)
        port = self.listen(tls.nodeTLSFactory(key, served, reactor))
        endpoint = tls.pinnedTLSEndpoint(reactor, "127.0.0.1", port, key.public, TIMEOUT)
        data = await self.fetch(endpoint, Request(wire.request(wire.GET, name="a.bin")))
        # A TLS close waits for the client's close_notify: the server must read
        # it, not hold the connection (and its slot) until the close deadline.
        await served.closed.addTimeout(CLOSE_SOON, reactor)
        head, _, rest = data.partition(b"\r\n")
        status = wire.parseLine(head)
        self.assertEqual(status.status, wire.OK)
        self.assertEqual(status.integer("length"), len(body))
        self.assertEqual(rest, body)


class HandshakeDeadlineTests(SynchronousTestCase):
    """The handshake is bounded by the connect timeout (on a fake clock)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = StringTransport()
        self.tlsProtocols = []
        test = self

        class Wrapped:
            def connect(self, factory):
                proto = factory.buildProtocol(None)
                proto.makeConnection(test.transport)
                test.tlsProtocols.append(proto)
                return Deferred()  # what it fires with is not used

        key = identity.NodeKey.generate()
        self.endpoint = tls._TLSClientEndpoint(
            self.clock, Wrapped(), tls._PinnedCreator(key.public, "peer"), "peer", 3.0
        )

    def test_silentPeer(self) -> None:
        """A peer that never finishes the handshake is dropped as a timeout."""
        d = self.endpoint.connect(OneProtocol(Collect()))
        self.assertTrue(self.transport.value(), "a ClientHello went out")
        self.clock.advance(2.9)
        self.assertFalse(d.called)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting or getattr(self.transport, "aborted", False))
        self.tlsProtocols[0].connectionLost(Failure(error.ConnectionAborted()))
        failure = self.failureResultOf(d, error.TimeoutError)
        self.assertIn("no TLS handshake with peer within 3 seconds", str(failure.value))

    def test_cancel(self) -> None:
        """Cancelling during the handshake aborts the connection."""
        d = self.endpoint.connect(OneProtocol(Collect()))
        d.cancel()
        self.failureResultOf(d)
        self.assertTrue(self.transport.disconnecting or getattr(self.transport, "aborted", False))
        self.tlsProtocols[0].connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TLSRelayCase(ListeningTestCase):
    """A relay on an ssl: port with a certificate from a test CA."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.caKey, caCert = makeCA("test CA")
        self.caCert = caCert
        self.caFile = writePEM(self.folder / "ca.pem", caCert)
        otherKey, otherCert = makeCA("another CA")
        self.otherCAFile = writePEM(self.folder / "other.pem", otherCert)
        self.serverKey, self.serverCert = makeServerCertificate(self.caKey, caCert)
        self.keyFile = writePEM(self.folder / "relay.key", self.serverKey)
        self.certFile = writePEM(self.folder / "relay.pem", self.serverCert)
        self.port = self.startRelay(self.serverKey, self.serverCert)

    def startRelay(self, serverKey, serverCert) -> int:
        """A relay on an ssl: port with this key and certificate; its port."""
        keyFile = writePEM(self.folder / f"relay{id(serverKey)}.key", serverKey)
        certFile = writePEM(self.folder / f"relay{id(serverKey)}.pem", serverCert)
        relay = RelayService(
            reactor,
            f"ssl:0:interface=127.0.0.1:privateKey={keyFile}:certKey={certFile}",
            ttl=60,
        )
        relay.startService()
        self.addCleanup(relay.stopService)
        ports = []
        relay.listener.whenListening.addCallback(ports.append)
        return ports[0].getHost().port

    def ask(self, endpoint):
        return ensureDeferred(query(endpoint, wire.request(wire.PEERS), reactor, TIMEOUT))


class RelayTests(TLSRelayCase):

    async def test_rightCA(self) -> None:
        """A relay on an ssl: port answers a client that trusts its CA."""
        endpoint = tls.relayClientEndpoint(reactor, "127.0.0.1", self.port, self.caFile, TIMEOUT)
        reply = await self.ask(endpoint)
        self.assertEqual(reply.status.status, wire.OK)

    async def test_byName(self) -> None:
        """The relay may be named by a host name its certificate lists."""
        endpoint = tls.relayClientEndpoint(reactor, "localhost", self.port, self.caFile, TIMEOUT)
        reply = await self.ask(endpoint)
        self.assertEqual(reply.status.status, wire.OK)

    async def test_wrongCA(self) -> None:
        """A relay whose certificate no trusted CA signed is refused, and says so."""
        endpoint = tls.relayClientEndpoint(reactor, "127.0.0.1", self.port, self.otherCAFile, TIMEOUT)
        with self.assertRaises(tls.TLSFailed) as caught:
            await self.ask(endpoint)
        self.assertIn(
            f"the TLS certificate of relay 127.0.0.1:{self.port} is not signed by a CA in {self.otherCAFile}",
            str(caught.exception),
        )

    async def test_wrongName(self) -> None:
        """A certificate from the right CA for another host is refused too."""
        port = self.startRelay(
            *makeServerCertificate(self.caKey, self.caCert, names=("relay.example",), ips=())
        )
        endpoint = tls.relayClientEndpoint(reactor, "127.0.0.1", port, self.caFile, TIMEOUT)
        with self.assertRaises(tls.TLSFailed) as caught:
            await self.ask(endpoint)
        self.assertIn("is not for that host", str(caught.exception))

    async def test_plainClientGetsNothing(self) -> None:
        """A client speaking plain TCP to the TLS port gets no answer it can use."""
        with self.assertRaises(Exception) as caught:
            await self.ask(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=TIMEOUT))
        self.assertNotIsInstance(caught.exception, AssertionError)


class CAFileTests(SynchronousTestCase):
    def test_missing(self) -> None:
        """A CA file that does not exist is a clear error, before any connection."""
        with self.assertRaises(tls.TLSConfigError) as caught:
            tls.loadCAFile("/nonexistent/ca.pem")
        self.assertIn("cannot read CA file /nonexistent/ca.pem", str(caught.exception))

    def test_notPEM(self) -> None:
        """A file holding no PEM certificate is refused."""
        path = Path(self.mktemp())
        path.write_bytes(b"not a certificate\n")
        with self.assertRaises(tls.TLSConfigError) as caught:
            tls.loadCAFile(str(path))
        self.assertIn("holds no PEM certificate", str(caught.exception))

    def test_bundle(self) -> None:
        """A file with several CA certificates is accepted."""
        path = Path(self.mktemp())
        writePEM(path, makeCA("one")[1], makeCA("two")[1])
        self.assertIsNotNone(tls.loadCAFile(str(path)))


class ImportCostTests(SynchronousTestCase):
    def test_plainFetchSkipsOpenSSL(self) -> None:
        """Importing p2p-fetch does not import OpenSSL (about 230 ms): only TLS does."""
        out = subprocess.run(
            [sys.executable, "-c", "import p2prelay.cli.fetch, sys; print('OpenSSL' in sys.modules)"],
            capture_output=True,
            text=True,
            check=True,
        )
        self.assertEqual(out.stdout.strip(), "False")


class RelayListsTLSTests(RelayTestCase):
    """The registry says which nodes offer TLS, and the key to pin it to."""

    def test_tlsPortListed(self) -> None:
        """tls= on REGISTER is recorded; PEERS lists it with the node's key."""
        self.answer(registration(tls=5443))
        self.assertEqual(self.registry.get(KEY.node).tls, 5443)
        listed = self.answer(wire.request(wire.PEERS))[1]
        self.assertEqual((listed.get("tls"), listed.get("key")), ("5443", KEY.public))

    def test_whohasCarriesKey(self) -> None:
        """WHOHAS items of a TLS node carry tls= and key= too."""
        self.answer(registration(tls=5443, files=["a.txt"]))
        listed = self.answer(wire.request(wire.WHOHAS, name="a.txt"))[1]
        self.assertEqual((listed.get("tls"), listed.get("key")), ("5443", KEY.public))

    def test_noTLS(self) -> None:
        """A node without a TLS port is listed without tls= or key=."""
        self.answer(registration())
        listed = self.answer(wire.request(wire.PEERS))[1]
        self.assertIsNone(listed.get("tls"))
        self.assertIsNone(listed.get("key"))

    def test_badTLSPort(self) -> None:
        """A tls= that is no port is refused like a bad udp=."""
        self.assertRefused(registration(tls=70000), wire.BAD_REQUEST)


class StoredTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        self.path = directory / "state.sqlite"

    def test_roundTrip(self) -> None:
        """A node's TLS port survives a relay restart."""
        peer = Peer("n1", "10.0.0.1", 5000, {}, expires=1.0, key=KEY.public, tls=5443)
        StateStore(self.path).save([peer])
        self.assertEqual(StateStore(self.path).load(), [peer])

    def test_olderFileGainsColumn(self) -> None:
        """A state file from before tls= loads, its peers without a TLS port."""
        with closing(sqlite3.connect(self.path)) as db:
            db.execute(
                "CREATE TABLE peers (node TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL,"
                " udp INTEGER, expires REAL NOT NULL, files TEXT NOT NULL,"
                " key TEXT, reachable INTEGER NOT NULL, source TEXT)"
            )
            db.execute("INSERT INTO peers VALUES ('n1', '10.0.0.1', 5000, NULL, 1.0, '[]', 'K', 1, NULL)")
            db.execute("PRAGMA user_version = 2")
            db.commit()
        [peer] = StateStore(self.path).load()
        self.assertEqual((peer.node, peer.key, peer.tls), ("n1", "K", None))


def closedPort() -> int:
    """A loopback port nothing listens on (bound, then closed at once)."""
    import socket

    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayListTests(TLSRelayCase):
    """--relay a,b with --relay-ca: each relay reached over TLS and verified, in order with failover."""

    async def test_failsOverToTLSRelay(self) -> None:
        """A closed first relay is skipped; the second answers over verified TLS."""
        endpoint = tls.relayEndpoint(
            reactor, f"127.0.0.1:{closedPort()},127.0.0.1:{self.port}", self.caFile, TIMEOUT
        )
        reply = await self.ask(endpoint)
        self.assertEqual(reply.status.status, wire.OK)
        self.assertEqual(endpoint.preferred.name, f"127.0.0.1:{self.port}")

    async def test_eachVerified(self) -> None:
        """A first relay whose certificate the CA file does not vouch for is refused, and the next one asked."""
        otherKey, otherCert = makeCA("a stranger CA")
        untrusted = self.startRelay(*makeServerCertificate(otherKey, otherCert))
        endpoint = tls.relayEndpoint(
            reactor, f"127.0.0.1:{untrusted},127.0.0.1:{self.port}", self.caFile, TIMEOUT
        )
        reply = await self.ask(endpoint)
        self.assertEqual(reply.status.status, wire.OK)
        self.assertEqual(endpoint.preferred.name, f"127.0.0.1:{self.port}")

    def test_nodeListNeedsHostPorts(self) -> None:
        """A node's --relay-ca with a list: every relay must be HOST:PORT, the one that is not named."""
        share = self.folder / "share"
        share.mkdir()
        config = NodeOptions()
        with self.assertRaises(UsageError) as caught:
            config.parseOptions(
                ["--relay", f"127.0.0.1:{self.port},8001", "--relay-ca", self.caFile, "--dir", str(share),
                 "--key", str(self.folder / "node.key")]
            )
        self.assertIn("give the relay as HOST:PORT (not '8001')", str(caught.exception))

    def test_fetchListOverTLS(self) -> None:
        """p2p-fetch --relay-ca with a list: a FailoverEndpoint of TLS endpoints, one per relay."""
        args = parseArgs(["--relay", f"127.0.0.1:{self.port},localhost:{self.port + 1}", "--relay-ca", self.caFile, "x"])
        fetcher = buildFetcher(reactor, args, lambda line: None)
        self.assertEqual(
            [type(r.endpoint).__name__ for r in fetcher.relay.relays], ["_TLSClientEndpoint"] * 2
        )


class NodeWiringTests(TLSRelayCase):
    """A node with --tls-port and --relay-ca, in process, against a TLS relay."""

    def nodeOptions(self, *extra: str) -> NodeOptions:
        share = self.folder / "share"
        share.mkdir(exist_ok=True)
        config = NodeOptions()
        config.parseOptions(
            ["--relay", f"127.0.0.1:{self.port}", "--dir", str(share), "--no-udp",
             "--port", LOOPBACK, "--key", str(self.folder / "node.key"), *extra]
        )
        return config

    async def test_tlsNodeBehindTLSRelay(self) -> None:
        """
        The node registers over TLS with the relay, the relay lists its TLS
        port and key, and a client fetches from it pinned to that key.
        """
        config = self.nodeOptions("--relay-ca", self.caFile, "--tls-port", LOOPBACK)
        (Path(config["dir"]) / "a.txt").write_bytes(b"over TLS\n")
        node = makeNodeService(config, reactor)
        node.startService()
        self.addCleanup(node.stopService)
        await node.ready
        await node.registrar.firstRegistration
        relay = tls.relayClientEndpoint(reactor, "127.0.0.1", self.port, self.caFile, TIMEOUT)
        reply = await ensureDeferred(query(relay, wire.request(wire.WHOHAS, name="a.txt"), reactor, TIMEOUT))
        [holder] = reply.items
        self.assertEqual(holder.get("key"), config["nodeKey"].public)
        self.assertEqual(holder.port("tls"), node.tlsListener.port.getHost().port)
        endpoint = tls.pinnedTLSEndpoint(reactor, "127.0.0.1", holder.port("tls"), holder.get("key"), TIMEOUT)
        data = await self.fetch(endpoint, Request(wire.request(wire.GET, name="a.txt")))
        head, _, body = data.partition(b"\n")
        self.assertEqual((wire.parseLine(head.rstrip(b"\r")).status, body), (wire.OK, b"over TLS\n"))

    def test_sslTLSPortRefused(self) -> None:
        """--tls-port takes a plain description: the node adds TLS itself."""
        with self.assertRaises(UsageError) as caught:
            self.nodeOptions("--tls-port", f"ssl:0:privateKey={self.keyFile}:certKey={self.certFile}")
        self.assertIn("TLS is added with the node's key", str(caught.exception))

    def test_missingRelayCA(self) -> None:
        """A --relay-ca that cannot be read is a usage error naming the file."""
        with self.assertRaises(UsageError) as caught:
            self.nodeOptions("--relay-ca", "/nonexistent/ca.pem")
        self.assertIn("--relay-ca: cannot read CA file /nonexistent/ca.pem", str(caught.exception))


class FetchOverTLSTests(TLSRelayCase):
    """p2p-fetch --tls --relay-ca, in process, against a TLS relay and nodes."""

    async def startNode(self, name: str, *extra: str):
        share = self.folder / f"share-{name}"
        share.mkdir()
        (share / "a.txt").write_bytes(b"over TLS\n")
        config = NodeOptions()
        config.parseOptions(
            ["--relay", f"127.0.0.1:{self.port}", "--relay-ca", self.caFile, "--dir", str(share),
             "--no-udp", "--port", LOOPBACK, "--key", str(self.folder / f"{name}.key"), *extra]
        )
        node = makeNodeService(config, reactor)
        node.startService()
        self.addCleanup(node.stopService)
        await node.ready
        await node.registrar.firstRegistration
        return node

    def fetcher(self, *extra: str):
        args = parseArgs(["--relay", f"127.0.0.1:{self.port}", "--relay-ca", self.caFile, *extra])
        self.reports: list[str] = []
        return buildFetcher(reactor, args, self.reports.append)

    async def test_fetchPinned(self) -> None:
        """--tls fetches from a node's TLS port, through a TLS relay."""
        await self.startNode("n1", "--tls-port", LOOPBACK)
        out = Path(self.mktemp())
        fetched = await ensureDeferred(self.fetcher("--tls").save("a.txt", out))
        self.assertEqual(out.read_bytes(), b"over TLS\n")
        self.assertEqual(fetched.size, 9)

    async def test_noTLSNode(self) -> None:
        """--tls never fetches in the clear from a node without TLS: a failed attempt, said so."""
        await self.startNode("n1")
        with self.assertRaises(NotFetched) as caught:
            await ensureDeferred(self.fetcher("--tls").save("a.txt", Path(self.mktemp())))
        [attempt] = caught.exception.attempts
        self.assertEqual(attempt.error, "offers no TLS")

    def test_tlsAndUDP(self) -> None:
        """--tls and --udp are refused together."""
        with self.assertRaises(SystemExit):
            parseArgs(["--tls", "--udp", "a.txt"])
