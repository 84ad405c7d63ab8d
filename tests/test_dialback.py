"""
The dial-back (relay/dialback.py) against a real node file server in
memory, its token buckets, and the node's side of it: PROVE answered by
the file server with the node's key.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import identity, wire
from p2prelay.identity import NodeKey
from p2prelay.node.server import FileServerFactory
from p2prelay.node.share import SharedDirectory
from p2prelay.relay.dialback import DIALBACK_TIMEOUT, DialBack, Outcome, TokenBucket

KEY = NodeKey.generate()
OTHER = NodeKey.generate()
RELAY = IPv4Address("TCP", "10.9.9.9", 8000)


def syncThread(f, *args):
    return maybeDeferred(f, *args)


class ScriptedNode(Protocol):
    """Something at the dialled address that answers with fixed bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.data)
        self.transport.loseConnection()


class Endpoint:
    """Connects, in memory, to a server protocol made by ``make`` (or fails with an error)."""

    def __init__(self, clock: Clock, make=None, error=None) -> None:
        self.clock = clock
        self.make = make
        self.error = error
        self.pumps: list = []

    def connect(self, factory):
        if self.error is not None:
            return fail(self.error)
        server = self.make()
        client = factory.buildProtocol(None)
        self.pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, True, peerAddress=RELAY),
                client,
                iosim.FakeTransport(client, False),
                greet=False,
                clock=self.clock,
            )
        )
        return succeed(client)


class DialBackTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        root = Path(self.mktemp())
        root.mkdir()
        self.share = SharedDirectory(root, runInThread=syncThread)

    def check(self, endpoint: Endpoint, key=KEY) -> Outcome:
        dialled = []

        def connector(host, port):
            dialled.append((host, port))
            return endpoint

        d = DialBack(self.clock, connector).check("node.example", 4000, key.public)
        for pump in endpoint.pumps:
            pump.flush()
        self.assertEqual(dialled, [("node.example", 4000)])
        return self.successResultOf(d)

    def nodeServer(self, key: NodeKey) -> Endpoint:
        factory = FileServerFactory(self.share, self.clock, key=key)
        return Endpoint(self.clock, lambda: factory.buildProtocol(RELAY))

    def test_success(self):
        """The node's own file server, holding the key, proves it: ok."""
        self.assertEqual(self.check(self.nodeServer(KEY)), Outcome(True))

    def test_wrongKey(self):
        """A node holding another key answers: not ok, naming the other node."""
        outcome = self.check(self.nodeServer(OTHER))
        self.assertFalse(outcome.ok)
        self.assertIn(OTHER.node, outcome.reason)

    def test_refused(self):
        """Nothing listening: not ok, connection refused."""
        outcome = self.check(Endpoint(self.clock, error=ConnectionRefusedError()))
        self.assertEqual(outcome, Outcome(False, "connection refused"))

    def test_unknownHost(self):
        """A host name that does not resolve: not ok, unknown host."""
        outcome = self.check(Endpoint(self.clock, error=DNSLookupError("x")))
        self.assertEqual(outcome, Outcome(False, "unknown host"))

    def test_timeout(self):
        """A peer that accepts and stays silent: not ok after DIALBACK_TIMEOUT, connection aborted."""
        endpoint = Endpoint(self.clock, Protocol)
        d = DialBack(self.clock, lambda h, p: endpoint).check("h", 1, KEY.public)
        endpoint.pumps[0].flush()
        self.assertNoResult(d)
        self.clock.advance(DIALBACK_TIMEOUT)
        outcome = self.successResultOf(d)
        self.assertEqual(outcome, Outcome(False, "no answer within 5 s"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_replayedAnswer(self):
        """A signature made for another nonce (a recorded answer) is not a proof."""
        sig = KEY.prove(identity.DIALBACK_PROOF, identity.newNonce(), b"")
        endpoint = Endpoint(self.clock, lambda: ScriptedNode(wire.status(200, key=KEY.public, sig=sig)))
        outcome = self.check(endpoint)
        self.assertEqual(outcome, Outcome(False, "the answer there is not a valid proof"))

    def test_notANode(self):
        """Something else answering there (an error status, garbage) is not ok, never an exception."""
        for data in [wire.status(400, "what"), b"SSH-2.0-OpenSSH\r\n", wire.status(200)]:
            endpoint = Endpoint(self.clock, lambda: ScriptedNode(data))
            self.assertFalse(self.check(endpoint).ok, data)

    def test_noKey(self):
        """An entry without a key cannot be proved, and nothing is dialled."""
        dialled = []
        d = DialBack(self.clock, lambda h, p: dialled.append(h)).check("h", 1, None)
        self.assertFalse(self.successResultOf(d).ok)
        self.assertEqual(dialled, [])


class NodeProveTests(SynchronousTestCase):
    """The node's file server answering PROVE."""

    def setUp(self) -> None:
        self.clock = Clock()
        root = Path(self.mktemp())
        root.mkdir()
        self.share = SharedDirectory(root, runInThread=syncThread)

    def ask(self, line: bytes, key=KEY) -> tuple[list, StringTransport]:
        proto = FileServerFactory(self.share, self.clock, key=key).buildProtocol(RELAY)
        transport = StringTransport(peerAddress=RELAY)
        proto.makeConnection(transport)
        proto.dataReceived(line)
        return [wire.parseLine(x) for x in transport.value().split(b"\n") if x], transport

    def test_proves(self):
        """PROVE nonce= is answered 200 with the key and its signature over the nonce, then closed."""
        nonce = identity.newNonce()
        [answer], transport = self.ask(wire.request(wire.PROVE, nonce=nonce))
        self.assertEqual((answer.status, answer.publicKey()), (200, KEY.public))
        transcript = identity.transcript(identity.DIALBACK_PROOF, nonce, b"")
        self.assertTrue(identity.verify(KEY.public, answer.signature(), transcript))
        self.assertTrue(transport.disconnecting)

    def test_badNonce(self):
        """A PROVE without a well-formed nonce is 400."""
        [answer], _ = self.ask(wire.request(wire.PROVE, nonce="short"))
        self.assertEqual(answer.status, 400)

    def test_noKeyNoProof(self):
        """A file server without a key answers PROVE like any other non-GET: 400."""
        [answer], _ = self.ask(wire.request(wire.PROVE, nonce=identity.newNonce()), key=None)
        self.assertEqual(answer.status, 400)


class TokenBucketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bucket = TokenBucket(self.clock.seconds, rate=1 / 6.0, burst=3)

    def test_burst(self):
        """A fresh key has burst tokens, then is told how long to wait."""
        self.assertEqual([self.bucket.take("a") for _ in range(3)], [0, 0, 0])
        self.assertAlmostEqual(self.bucket.take("a"), 6.0)

    def test_refills(self):
        """Tokens come back at the rate, up to the burst."""
        for _ in range(3):
            self.bucket.take("a")
        self.clock.advance(6)
        self.assertEqual(self.bucket.take("a"), 0)
        self.assertGreater(self.bucket.take("a"), 0)
        self.clock.advance(600)
        self.assertEqual([self.bucket.take("a") for _ in range(3)], [0, 0, 0])

    def test_keysIndependent(self):
        """One key's spending does not touch another's."""
        for _ in range(3):
            self.bucket.take("a")
        self.assertEqual(self.bucket.take("b"), 0)

    def test_refusalSpendsNothing(self):
        """Being refused does not push the wait further out."""
        for _ in range(3):
            self.bucket.take("a")
        self.bucket.take("a")
        self.bucket.take("a")
        self.clock.advance(6)
        self.assertEqual(self.bucket.take("a"), 0)

    def test_boundedMemory(self):
        """Many addresses cost bounded memory: full buckets are forgotten."""
        from p2prelay.relay import dialback

        self.patch(dialback, "MAX_BUCKETS", 10)
        for i in range(100):
            self.bucket.take(str(i))
            self.clock.advance(60)
        self.assertLessEqual(len(self.bucket._buckets), 10)
