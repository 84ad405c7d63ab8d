"""
The relay against a hostile network: proofs over its challenge, replays,
stolen ids, verified addresses, DEAD reports as hints, registration caps
and closed (secret) networks.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.test import iosim

from p2prelay import identity, wire
from p2prelay.client.relay import ProofNeeded, QueryProtocol, secretProver
from p2prelay.relay.dialback import DIALBACK_BURST, DIALBACK_RATE, DIALBACK_TIMEOUT, RECHECK_INTERVAL, REPORT_BURST

from .test_relay import (
    CLIENT,
    KEY,
    OTHER,
    SILENT,
    RelayTestCase,
    fileLine,
    parse,
    proofFor,
    registration,
)

SECRET = b"correct horse battery staple"
ELSEWHERE = IPv4Address("TCP", "10.7.7.7", 40000)


class ProofTests(RelayTestCase):
    def test_rightKey(self):
        """A REGISTER proved with the key it names is registered under that key's id."""
        [reply] = self.answer(registration(files=["a"]))
        self.assertEqual((reply.status, reply.get("node")), (200, KEY.node))
        self.assertEqual(self.registry.get(KEY.node).key, KEY.public)

    def test_wrongKey(self):
        """A REGISTER whose PROOF is signed by another key is 401 and registers nothing."""
        message = self.assertRefused(registration(files=["a"]), wire.UNAUTHORIZED, key=OTHER)
        self.assertEqual(message.text, "bad proof")
        self.assertEqual(self.registry.all(), [])

    def test_proofOverOtherBytes(self):
        """A signature over other request bytes than those received is refused."""
        proto, transport = self.connect()
        data = registration(files=["a"])
        proto.dataReceived(data)
        [challenge] = parse(transport.value())
        transport.clear()
        proto.dataReceived(proofFor(registration(files=["b"]), challenge))
        [reply] = parse(transport.value())
        self.assertEqual(reply.status, wire.UNAUTHORIZED)
        self.assertEqual(self.registry.all(), [])

    def test_replayedRequestFails(self):
        """
        Every byte of an honest exchange, captured and sent again on a new
        connection, meets a new nonce and registers nothing.
        """
        data = registration(files=["a"])
        proto, transport = self.connect()
        proto.dataReceived(data)
        [challenge] = parse(transport.value())
        proof = proofFor(data, challenge)
        proto.dataReceived(proof)
        self.assertEqual(parse(transport.value())[-1].status, wire.OK)
        self.registry.unregister(KEY.node)

        replay, replayed = self.connect(ELSEWHERE)
        replay.dataReceived(data)
        [second] = parse(replayed.value())
        self.assertNotEqual(second.nonce(), challenge.nonce())
        replay.dataReceived(proof)
        self.assertEqual(parse(replayed.value())[-1].status, wire.UNAUTHORIZED)
        self.assertEqual(self.registry.all(), [])

    def test_replayedHeartbeatFails(self):
        """A captured HEARTBEAT and its PROOF, replayed, is 401: it keeps no killed node listed."""
        self.answer(registration())
        proto, transport = self.connect()
        beat = wire.request(wire.HEARTBEAT, node=KEY.node)
        proto.dataReceived(beat)
        [challenge] = parse(transport.value())
        proof = proofFor(beat, challenge)
        proto.dataReceived(proof)
        again, againT = self.connect(ELSEWHERE)
        again.dataReceived(beat + proof)
        self.assertEqual(parse(againT.value())[-1].status, wire.UNAUTHORIZED)

    def test_proofAfterBareLF(self):
        """The proof covers the bytes as received: bare LF endings are signed as LF."""
        data = registration(files=["a"]).replace(b"\r\n", b"\n")
        [reply] = self.answer(data)
        self.assertEqual(reply.status, wire.OK)

    def test_proofOverCRLFRefusedForLF(self):
        """A proof over the CRLF spelling of a request sent with bare LFs does not match."""
        data = registration(files=["a"])
        proto, transport = self.connect()
        proto.dataReceived(data.replace(b"\r\n", b"\n"))
        [challenge] = parse(transport.value())
        transport.clear()
        proto.dataReceived(proofFor(data, challenge))
        self.assertEqual(parse(transport.value())[0].status, wire.UNAUTHORIZED)

    def test_stolenIdWithOtherKey(self):
        """REGISTER naming a victim's node id with another key is refused; the victim stays."""
        self.answer(registration(files=["a"]))
        self.assertRefused(registration(OTHER, node=KEY.node), wire.BAD_REQUEST, key=OTHER)
        self.assertEqual(self.registry.get(KEY.node).key, KEY.public)

    def test_notProofLine(self):
        """Anything but PROOF after the challenge is 400 and closes."""
        proto, transport = self.connect()
        proto.dataReceived(registration())
        transport.clear()
        self.assertRefused(wire.request(wire.PEERS), wire.BAD_REQUEST, connected=(proto, transport))
        self.assertEqual(self.registry.all(), [])


class DialBackTests(RelayTestCase):
    def test_reachableListed(self):
        """A node proving its key on its port is answered reachable=1 and listed."""
        [reply] = self.answer(registration(files=["a"]))
        self.assertEqual(reply.get("reachable"), "1")
        self.assertEqual([p.node for p in self.registry.active()], [KEY.node])
        self.assertEqual(self.nodes.dialled, [("10.1.2.3", 5000)])

    def test_refusedNotListed(self):
        """Nobody at the address: registered, reachable=0, the reason said, never listed."""
        del self.nodes.at[("10.1.2.3", 5000)]
        [reply] = self.answer(registration(files=["a"]))
        self.assertEqual((reply.status, reply.get("reachable")), (200, "0"))
        self.assertIn("could not reach 10.1.2.3:5000 (connection refused)", reply.text)
        self.assertEqual(self.registry.active(), [])
        self.assertIsNotNone(self.registry.get(KEY.node))

    def test_wrongKeyThere(self):
        """Another key answering at the address leaves the registration unlisted."""
        self.nodes.at[("10.1.2.3", 5000)] = OTHER
        [reply] = self.answer(registration())
        self.assertEqual(reply.get("reachable"), "0")
        self.assertIn("another node", reply.text)
        self.assertEqual(self.registry.active(), [])

    def test_advertisedHostDialled(self):
        """host= is what the relay dials: pointing the registry elsewhere needs a node there."""
        [reply] = self.answer(registration(host="victim.example"))
        self.assertEqual(reply.get("reachable"), "0")
        self.assertEqual(self.nodes.dialled, [("victim.example", 5000)])
        self.assertEqual(self.registry.active(), [])

    def test_timeout(self):
        """A silent address: the answer comes after DIALBACK_TIMEOUT, reachable=0, unlisted."""
        self.nodes.at[("10.1.2.3", 5000)] = SILENT
        proto, transport = self.connect()
        data = registration()
        proto.dataReceived(data)
        self.prove(proto, transport, data)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(DIALBACK_TIMEOUT)
        [reply] = parse(transport.value())
        self.assertEqual(reply.get("reachable"), "0")
        self.assertIn("no answer within 5 s", reply.text)

    def test_sameAddressReused(self):
        """Re-registering the same key at the same address within its lifetime dials no second time."""
        self.answer(registration(files=["a"]))
        [reply] = self.answer(registration(files=["a", "b"]))
        self.assertEqual(reply.get("reachable"), "1")
        self.assertEqual(len(self.nodes.dialled), 1)
        self.assertEqual(sorted(self.registry.get(KEY.node).files), ["a", "b"])

    def test_takeoverRefusedWithoutProof(self):
        """Another key cannot take a live verified node's address without answering there: 409."""
        self.answer(registration(files=["a"]))
        message = self.assertRefused(registration(OTHER), wire.CONFLICT, key=OTHER)
        self.assertIn("held by another node", message.text)
        self.assertEqual([p.node for p in self.registry.active()], [KEY.node])

    def test_takeoverWithProof(self):
        """A new key the dial-back finds answering at the address replaces the old entry (a lost key file)."""
        self.answer(registration(files=["a"]))
        self.nodes.at[("10.1.2.3", 5000)] = OTHER
        [reply] = self.answer(registration(OTHER), key=OTHER)
        self.assertEqual(reply.get("reachable"), "1")
        self.assertEqual([p.node for p in self.registry.all()], [OTHER.node])

    def test_dialBacksRateLimited(self):
        """One source makes the relay dial at most DIALBACK_BURST times at once; then 503 retry=."""
        del self.nodes.at[("10.1.2.3", 5000)]
        for port in range(DIALBACK_BURST):
            key = identity.NodeKey.generate()
            self.answer(registration(key, port=6000 + port), key=key)
        message = self.assertRefused(registration(port=7000), wire.BUSY)
        self.assertIn("dial-backs", message.text)
        self.assertGreater(int(message.get("retry")), 0)
        self.assertEqual(len(self.nodes.dialled), DIALBACK_BURST)

    def test_rateLimitPerSource(self):
        """Another address is not held back by one that used its dial-backs up."""
        del self.nodes.at[("10.1.2.3", 5000)]
        for port in range(DIALBACK_BURST):
            key = identity.NodeKey.generate()
            self.answer(registration(key, port=6000 + port), key=key)
        self.nodes.at[("10.7.7.7", 5000)] = KEY
        [reply] = self.answer(registration(), peer=ELSEWHERE)
        self.assertEqual(reply.get("reachable"), "1")


class DeadReportTests(RelayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.answer(registration(files=["a"]))
        self.nodes.dialled.clear()

    def dead(self, peer=CLIENT, host="10.1.2.3", port=5000) -> wire.Message:
        [reply] = self.answer(wire.request(wire.DEAD, host=host, port=port), peer=peer)
        return reply

    def test_livePeerNotHidden(self):
        """A DEAD report about a node that still proves its key hides nothing."""
        reply = self.dead()
        self.assertEqual((reply.status, reply.text), (200, "will check 1 peers"))
        self.assertEqual(self.nodes.dialled, [("10.1.2.3", 5000)])
        self.assertEqual([p.node for p in self.registry.active()], [KEY.node])

    def test_deadPeerHidden(self):
        """A DEAD report about a node the relay cannot reach either hides it."""
        del self.nodes.at[("10.1.2.3", 5000)]
        self.dead()
        self.assertEqual(self.registry.active(), [])
        self.assertFalse(self.registry.get(KEY.node).reachable)

    def test_perNodeInterval(self):
        """A node is re-checked at most once per RECHECK_INTERVAL, however many report it."""
        for i in range(5):
            self.dead(peer=IPv4Address("TCP", f"10.5.0.{i}", 1))
        self.assertEqual(len(self.nodes.dialled), 1)
        self.clock.advance(RECHECK_INTERVAL)
        self.dead(peer=ELSEWHERE)
        self.assertEqual(len(self.nodes.dialled), 2)

    def test_perReporterLimit(self):
        """One reporter gets REPORT_BURST reports through, then 503 retry=."""
        for _ in range(REPORT_BURST):
            self.assertEqual(self.dead().status, wire.OK)
        reply = self.dead()
        self.assertEqual(reply.status, wire.BUSY)
        self.assertIsNotNone(reply.get("retry"))

    def test_loopHidesNothing(self):
        """A loop of reports about live peers hides none of them (the 8-line blackout)."""
        for _ in range(50):
            self.dead()
            self.clock.advance(1)
        self.assertEqual([p.node for p in self.registry.active()], [KEY.node])

    def test_heartbeatRechecksHidden(self):
        """A hidden node's heartbeat makes the relay check again; reachable again, it is listed."""
        del self.nodes.at[("10.1.2.3", 5000)]
        self.dead()
        self.nodes.at[("10.1.2.3", 5000)] = KEY
        self.clock.advance(RECHECK_INTERVAL)
        [reply] = self.answer(wire.request(wire.HEARTBEAT, node=KEY.node))
        self.assertEqual(reply.status, wire.OK)
        self.assertEqual([p.node for p in self.registry.active()], [KEY.node])

    def test_heartbeatOverAllowanceIsNoCheck(self):
        """A hidden node's heartbeat over its source's dial-backs checks nothing, so the next one with a dial-back left checks at once."""
        del self.nodes.at[("10.1.2.3", 5000)]
        self.dead()
        self.clock.advance(RECHECK_INTERVAL)
        while not self.factory.dialbacks.take(CLIENT.host):
            pass  # the heartbeat's source has no dial-back left
        self.nodes.dialled.clear()
        [reply] = self.answer(wire.request(wire.HEARTBEAT, node=KEY.node))
        self.assertEqual((reply.status, self.nodes.dialled), (wire.OK, []))
        self.clock.advance(1 / DIALBACK_RATE)  # one dial-back again, well within the re-check interval
        self.answer(wire.request(wire.HEARTBEAT, node=KEY.node))
        self.assertEqual(self.nodes.dialled, [("10.1.2.3", 5000)])


class CapTests(RelayTestCase):
    def test_perSourceRegistrations(self):
        """Over the live registrations allowed per source, REGISTER is 503 with retry=, at once."""
        self.registry.maxPerSource = 2
        for port in (6000, 6001):
            self.nodes.at[("10.1.2.3", port)] = key = identity.NodeKey.generate()
            self.answer(registration(key, port=port), key=key)
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.REGISTER, key=KEY.public, port=5000, files=1))
        [reply] = parse(transport.value())
        self.assertEqual(reply.status, wire.BUSY)
        self.assertEqual(reply.get("retry"), "90")
        self.assertIn("2 registrations from 10.1.2.3", reply.text)

    def test_otherSourceStillServed(self):
        """One source at its cap does not keep another from registering."""
        self.registry.maxPerSource = 1
        self.nodes.at[("10.1.2.3", 6000)] = key = identity.NodeKey.generate()
        self.answer(registration(key, port=6000), key=key)
        self.nodes.at[("10.7.7.7", 5000)] = KEY
        [reply] = self.answer(registration(), peer=ELSEWHERE)
        self.assertEqual(reply.status, wire.OK)

    def test_totalRegistrations(self):
        """Over the total of live registrations, a new node gets 503; a known one re-registers."""
        self.registry.maxTotal = 1
        self.answer(registration())
        self.nodes.at[("10.7.7.7", 5000)] = OTHER
        self.assertEqual(
            self.answer(registration(OTHER), peer=ELSEWHERE, key=OTHER)[0].status, wire.BUSY
        )
        self.assertEqual(self.answer(registration(files=["x"]))[0].status, wire.OK)

    def test_inflightBytes(self):
        """While registrations in progress hold over maxInflight bytes, a new REGISTER is 503."""
        self.factory.maxInflight = 1000
        big, bigT = self.connect(ELSEWHERE)
        big.dataReceived(
            wire.request(wire.REGISTER, key=OTHER.public, port=5000, files=100)
            + b"".join(fileLine(f"file{i:03}") for i in range(20))
        )
        self.assertGreater(self.factory.inflight, 1000)
        reply = self.assertRefused(registration(), wire.BUSY)
        self.assertIn("registrations in progress", reply.text)
        self.assertEqual(reply.get("retry"), "5")

    def test_inflightReleased(self):
        """A registration that ends (here, cut off) gives its bytes back."""
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.REGISTER, key=KEY.public, port=5000, files=2) + fileLine("a"))
        self.assertGreater(self.factory.inflight, 0)
        proto.connectionLost(None)
        self.assertEqual(self.factory.inflight, 0)
        self.answer(registration())
        self.assertEqual(self.factory.inflight, 0)


class SecretTests(RelayTestCase):
    secret = SECRET

    def test_rightSecret(self):
        """With the secret, the challenge says secret=1 and a right mac registers."""
        proto, transport = self.connect()
        proto.dataReceived(registration())
        [challenge] = parse(transport.value())
        self.assertEqual(challenge.get("secret"), "1")
        [reply] = self.answer(registration())
        self.assertEqual(reply.status, wire.OK)

    def test_wrongSecret(self):
        """A mac under another secret is 401."""
        self.assertRefused(registration(), wire.UNAUTHORIZED, secret=b"not the secret at all")
        self.assertEqual(self.registry.all(), [])

    def test_missingSecret(self):
        """A PROOF without mac= on a closed relay is 401, saying the secret is needed."""
        proto, transport = self.connect()
        data = registration()
        proto.dataReceived(data)
        [challenge] = parse(transport.value())
        transport.clear()
        proto.dataReceived(proofFor(data, challenge, secret=None).replace(b" mac=", b" x="))
        [reply] = parse(transport.value())
        self.assertEqual((reply.status, reply.text), (401, "this relay needs the shared secret"))

    def test_queriesOpen(self):
        """A closed (not private) relay answers clients' queries without a proof."""
        status, end = self.answer(wire.request(wire.PEERS), key=None)
        self.assertEqual(status.status, wire.OK)


class PrivateTests(RelayTestCase):
    secret = SECRET
    private = True

    def test_queryChallenged(self):
        """A private relay answers a query with a challenge asking for the secret."""
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.PEERS))
        [challenge] = parse(transport.value())
        self.assertEqual((challenge.status, challenge.get("secret")), (100, "1"))

    def test_provedQueryAnswered(self):
        """A client proving the secret (mac= only) gets its answer."""
        status, end = self.answer(wire.request(wire.PEERS), key=None)
        self.assertEqual((status.status, end.word), (200, "END"))

    def test_unprovedClientRefused(self):
        """A client that cannot prove the secret is 401 and learns nothing."""
        self.register("n1", "10.0.0.1", 5000, ["a"])
        messages = self.answer(wire.request(wire.WHOHAS, name="a"), key=None, secret=b"guess guess guess")
        self.assertEqual([m.status for m in messages], [wire.UNAUTHORIZED])

    def test_queryProtocolWithoutProver(self):
        """QueryProtocol without a prover fails a challenge with ProofNeeded naming the secret."""
        d = self.query(wire.request(wire.PEERS), None)
        failure = self.failureResultOf(d, ProofNeeded)
        self.assertIn("--secret-file", str(failure.value))

    def test_queryProtocolWithSecretProver(self):
        """QueryProtocol with secretProver answers the challenge and gets the list."""
        d = self.query(wire.request(wire.PEERS), secretProver(SECRET))
        self.assertEqual(self.successResultOf(d).status.status, wire.OK)

    def query(self, payload: bytes, prover):
        client, _, pump = iosim.connectedServerAndClient(
            lambda: self.factory.buildProtocol(CLIENT),
            lambda: QueryProtocol(self.clock, payload, 15.0, prover),
            serverTransportFactory=lambda p: iosim.FakeTransport(p, True, peerAddress=CLIENT),
            clock=self.clock,
        )
        pump.flush()
        return client.deferred
