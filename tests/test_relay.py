"""
The relay protocol, one request per connection, and the query client
that talks to it.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import ensureDeferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import identity, wire
from p2prelay.client.relay import IncompleteReply, QueryProtocol, Reply, keyProver, query
from p2prelay.identity import NodeKey
from p2prelay.negotiation import IDLE_TIMEOUT, NEGOTIATION_DEADLINE
from p2prelay.relay.dialback import DialBack
from p2prelay.relay.entries import checkHost
from p2prelay.relay.protocol import RelayFactory
from p2prelay.relay.queries import SEARCH_SLICE
from p2prelay.relay.registry import MAX_HOLDERS, SEARCH_STEP, Registry
from p2prelay.pieces import MAX_PIECE_SIZE, MAX_PIECES, MIN_PIECE_SIZE, PIECE_SIZE
from p2prelay.wire import FileEntry

TTL = 90.0
SHA_A = "a" * 64
SHA_B = "b" * 64
CLIENT = IPv4Address("TCP", "10.1.2.3", 40000)
RELAY = IPv4Address("TCP", "10.9.9.9", 8000)
KEY = NodeKey.generate()  # the honest node's key
OTHER = NodeKey.generate()  # somebody else's
SILENT = object()  # a node that accepts the dial-back and never answers


def fileLine(name: str, size: int = 1, sha: str = SHA_A) -> bytes:
    return wire.item(wire.FILE, name=name, size=size, sha256=sha)


def registration(key: NodeKey = KEY, port=5000, files=(), **extra) -> bytes:
    files = list(files)
    return b"".join(
        [
            wire.request(wire.REGISTER, key=key.public, port=port, files=len(files), **extra),
            *(fileLine(*f) if isinstance(f, tuple) else fileLine(f) for f in files),
            wire.end(len(files)),
        ]
    )


def parse(data: bytes) -> List[wire.Message]:
    return [wire.parseLine(line) for line in data.split(b"\n") if line]


PURPOSES = {
    wire.REGISTER: identity.REGISTER_PROOF,
    wire.HEARTBEAT: identity.HEARTBEAT_PROOF,
    wire.UNREGISTER: identity.UNREGISTER_PROOF,
    wire.CONTROL: identity.CONTROL_PROOF,
}


def proofFor(data: bytes, challenge: wire.Message, key: NodeKey | None = KEY, secret: bytes | None = None) -> bytes:
    """The PROOF line answering ``challenge`` for ``data``, as a node (or client) makes it."""
    verb = data.split(b" ", 2)[1].split(b"\r")[0].split(b"\n")[0].decode()
    purpose = PURPOSES.get(verb, identity.CLIENT_PROOF)
    nonce = challenge.nonce()
    text = identity.transcript(purpose, nonce, data)
    return wire.request(
        wire.PROOF,
        sig=key.prove(purpose, nonce, data) if key is not None else None,
        mac=identity.secretProof(secret, text) if secret is not None else None,
    )


class _Dial:
    """One dial-back connection, played synchronously against a scripted node."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def connect(self, factory):
        if isinstance(self.answer, Exception):
            return fail(self.answer)
        proto = factory.buildProtocol(RELAY)
        transport = StringTransport(peerAddress=RELAY)
        proto.makeConnection(transport)
        if self.answer is SILENT:
            return succeed(proto)
        [prove] = parse(transport.value())
        assert prove.word == wire.PROVE, prove
        key = self.answer
        proto.dataReceived(
            wire.status(200, key=key.public, sig=key.prove(identity.DIALBACK_PROOF, prove.nonce(), b""))
        )
        return succeed(proto)


class Nodes:
    """
    The relay's dial-back connector: what answers at each address (a key,
    SILENT, or an exception to connect with); nobody answers elsewhere.
    """

    def __init__(self) -> None:
        self.at: Dict[Tuple[str, int], object] = {}
        self.dialled: List[Tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> _Dial:
        self.dialled.append((host, port))
        return _Dial(self.at.get((host, port), ConnectionRefusedError()))


class RelayTestCase(SynchronousTestCase):
    secret: bytes | None = None
    private = False
    options: dict = {}  # more RelayFactory keyword arguments

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock.seconds, TTL)
        self.changes = 0
        self.nodes = Nodes()
        self.nodes.at[("10.1.2.3", 5000)] = KEY
        self.factory = RelayFactory(
            self.registry,
            self.clock,
            onChange=self.changed,
            dialback=DialBack(self.clock, self.nodes),
            secret=self.secret,
            private=self.private,
            **self.options,
        )

    def changed(self) -> None:
        self.changes += 1

    def connect(self, peer=CLIENT):
        proto = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        return proto, transport

    def ask(self, data: bytes, peer=CLIENT, key: NodeKey | None = KEY, secret=None) -> StringTransport:
        """
        One connection: send data, answer a challenge the way the holder of
        ``key`` (and ``secret``) would, and return the transport; its value
        no longer holds the challenge.
        """
        proto, transport = self.connect(peer)
        proto.dataReceived(data)
        self.prove(proto, transport, data, key, secret)
        return transport

    def prove(self, proto, transport, data: bytes, key: NodeKey | None = KEY, secret=None) -> None:
        """If the relay challenged, answer with a PROOF over ``data``."""
        sent = parse(transport.value())
        if sent and sent[0].status == wire.CONTINUE:
            transport.clear()
            proto.dataReceived(proofFor(data, sent[0], key, secret if secret is not None else self.secret))

    def answer(self, data: bytes, peer=CLIENT, **kw) -> List[wire.Message]:
        transport = self.ask(data, peer, **kw)
        self.assertTrue(transport.disconnecting, "every answer ends the connection")
        return parse(transport.value())

    def assertRefused(self, data: bytes, code: int, *, connected=None, **kw) -> wire.Message:
        proto, transport = connected or self.connect()
        proto.dataReceived(data)
        self.prove(proto, transport, data, **kw)
        [message] = parse(transport.value())
        self.assertEqual(message.status, code, message)
        self.assertTrue(transport.disconnecting)
        return message

    def register(self, node, host, port, names, **kw) -> None:
        self.registry.register(node, host, port, [FileEntry(n, 1, SHA_A) for n in names], **kw)


class RegisterTests(RelayTestCase):
    def test_registerWithFiles(self):
        """REGISTER with its FILE lines and END records the peer and its files."""
        self.answer(registration(KEY, 5000, ["a.txt", ("dir/b c.txt", 7, SHA_B)]))
        peer = self.registry.get(KEY.node)
        self.assertEqual((peer.host, peer.port), ("10.1.2.3", 5000))
        self.assertEqual(peer.files["dir/b c.txt"], FileEntry("dir/b c.txt", 7, SHA_B))
        self.assertEqual(sorted(peer.files), ["a.txt", "dir/b c.txt"])

    def test_registerReply(self):
        """The 200 reply carries the ttl, the relay's boot id and the observed host."""
        [reply] = self.answer(registration(KEY, 5000, ["a.txt"]))
        self.assertEqual(reply.status, wire.OK)
        self.assertEqual(reply.get("ttl"), "90")
        self.assertEqual(reply.get("boot"), self.factory.boot)
        self.assertEqual(reply.get("host"), "10.1.2.3")

    def test_registerNotifies(self):
        """A registration tells the factory's onChange (for persistence)."""
        self.answer(registration())
        self.assertEqual(self.changes, 1)

    def test_registerNoFiles(self):
        """A node with nothing to share registers with files=0 and END."""
        [reply] = self.answer(registration(KEY, 5000, []))
        self.assertEqual(reply.status, wire.OK)
        self.assertEqual(self.registry.get(KEY.node).files, {})

    def test_advertisedHost(self):
        """host= on REGISTER is what the registry hands out, not the observed address."""
        self.nodes.at[("node.example", 5000)] = KEY
        [reply] = self.answer(registration(host="node.example"))
        self.assertEqual(reply.get("host"), "node.example")
        self.assertEqual(self.registry.get(KEY.node).host, "node.example")

    def test_udpPort(self):
        """udp= on REGISTER is recorded and listed by PEERS."""
        self.answer(registration(udp=5001))
        self.assertEqual(self.registry.get(KEY.node).udp, 5001)
        self.assertEqual(self.answer(wire.request(wire.PEERS))[1].get("udp"), "5001")

    def test_reregistrationReplaces(self):
        """A second REGISTER from the same node replaces its file list."""
        self.answer(registration(KEY, 5000, ["old.txt"]))
        self.answer(registration(KEY, 5000, ["new.txt"]))
        self.assertEqual(list(self.registry.get(KEY.node).files), ["new.txt"])
        self.assertEqual(len(self.registry.active()), 1)

    def test_reregistrationNewIdSameAddress(self):
        """
        A node restarted with a new key on the same address replaces its old
        entry once the relay reaches the new key there.
        """
        self.answer(registration(KEY, 5000, ["a.txt"]))
        self.nodes.at[("10.1.2.3", 5000)] = OTHER
        self.answer(registration(OTHER, 5000, ["a.txt"]), key=OTHER)
        self.assertEqual([p.node for p in self.registry.active()], [OTHER.node])

    def test_nodeIdMustBeTheKeys(self):
        """A node= that is not the id of key= is refused: ids are not chosen, they are derived."""
        self.assertRefused(registration(node=OTHER.node), wire.BAD_REQUEST)
        self.assertEqual(self.registry.all(), [])

    def test_nodeIdOfKeyAccepted(self):
        """A node= that matches key= is accepted, and the reply names the id."""
        [reply] = self.answer(registration(node=KEY.node))
        self.assertEqual((reply.status, reply.get("node")), (200, KEY.node))

    def test_keyRequired(self):
        """REGISTER without key= (or with a malformed one) is refused."""
        self.assertRefused(wire.request(wire.REGISTER, node=KEY.node, port=5000, files=0), wire.BAD_REQUEST)
        self.assertRefused(wire.request(wire.REGISTER, key="x" * 42, port=5000, files=0), wire.BAD_REQUEST)

    def test_badHost(self):
        """An advertised host with odd characters is refused."""
        self.assertRefused(registration(host="evil/host"), wire.BAD_REQUEST)

    def test_hostForms(self):
        """Host names, IPv4 and IPv6 addresses (with a zone) are accepted as host=."""
        for host in ["node.example", "my_node-2", "192.0.2.7", "2001:db8::1", "fe80::1%eth0"]:
            self.nodes.at[(host, 5000)] = KEY
            [reply] = self.answer(registration(host=host))
            self.assertEqual(reply.get("host"), host)

    def test_hostTooLong(self):
        """A host= over 255 characters is refused, as is an empty one."""
        self.assertRefused(registration(host="a" * 256), wire.BAD_REQUEST)
        self.assertRefused(registration(host=""), wire.BAD_REQUEST)

    def test_missingPort(self):
        """REGISTER without port= is refused."""
        self.assertRefused(wire.request(wire.REGISTER, key=KEY.public, files=0), wire.BAD_REQUEST)

    def test_badFileName(self):
        """A FILE line whose name escapes is refused and nothing is registered."""
        data = wire.request(wire.REGISTER, key=KEY.public, port=5000, files=1) + fileLine("../x")
        self.assertRefused(data, wire.BAD_REQUEST)
        self.assertIsNone(self.registry.get(KEY.node))

    def test_badFileDigest(self):
        """A FILE line with a malformed digest is refused."""
        data = wire.request(wire.REGISTER, key=KEY.public, port=5000, files=1) + fileLine("a", 1, "XYZ")
        self.assertRefused(data, wire.BAD_REQUEST)

    def test_moreFilesThanAnnounced(self):
        """More FILE lines than files= announced is refused with 413."""
        data = (
            wire.request(wire.REGISTER, key=KEY.public, port=5000, files=1)
            + fileLine("a")
            + fileLine("b")
        )
        self.assertRefused(data, wire.TOO_LARGE)
        self.assertIsNone(self.registry.get(KEY.node))

    def test_tooManyFilesAnnounced(self):
        """Announcing more than MAX_FILES files is refused with 413."""
        data = wire.request(wire.REGISTER, key=KEY.public, port=5000, files=wire.MAX_FILES + 1)
        self.assertRefused(data, wire.TOO_LARGE)

    def test_maxFilesAnnouncedAccepted(self):
        """Announcing exactly MAX_FILES files is accepted (the relay waits for them)."""
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.REGISTER, key=KEY.public, port=5000, files=wire.MAX_FILES))
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_endTooEarly(self):
        """END before every announced FILE line arrived is refused."""
        data = wire.request(wire.REGISTER, key=KEY.public, port=5000, files=2) + fileLine("a") + wire.end(1)
        self.assertRefused(data, wire.BAD_REQUEST)
        self.assertIsNone(self.registry.get(KEY.node))

    def test_endCountMismatch(self):
        """An END whose count differs from files= is refused."""
        data = wire.request(wire.REGISTER, key=KEY.public, port=5000, files=1) + fileLine("a") + wire.end(2)
        self.assertRefused(data, wire.BAD_REQUEST)
        self.assertIsNone(self.registry.get(KEY.node))

    def test_waitsForEnd(self):
        """Nothing is registered or answered until END arrives."""
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.REGISTER, key=KEY.public, port=5000, files=1) + fileLine("a"))
        self.assertEqual(transport.value(), b"")
        self.assertIsNone(self.registry.get(KEY.node))
        proto.dataReceived(wire.end(1))
        self.assertEqual(parse(transport.value())[0].status, wire.CONTINUE)


class DualStackTests(RelayTestCase):
    """A relay on a dual-stack socket sees IPv4 peers as ::ffff:a.b.c.d."""

    def test_mappedObservedHostStoredPlain(self):
        """A node seen from ::ffff:10.1.2.3 is recorded, answered and listed as 10.1.2.3."""
        mapped = IPv6Address("TCP", "::ffff:10.1.2.3", 40000)
        [reply] = self.answer(registration(KEY, 5000, ["a.txt"]), peer=mapped)
        self.assertEqual(reply.get("host"), "10.1.2.3")
        self.assertEqual(self.registry.get(KEY.node).host, "10.1.2.3")

    def test_mappedAdvertisedHostStoredPlain(self):
        """An advertised host= ::ffff:10.1.2.3 is the same address, written plainly."""
        [reply] = self.answer(registration(KEY, 5000, ["a.txt"], host="::ffff:10.1.2.3"))
        self.assertEqual(self.registry.get(KEY.node).host, "10.1.2.3")

    def test_realIPv6Kept(self):
        """A real IPv6 address is left as it is."""
        self.assertEqual(checkHost("fd77:4::1"), "fd77:4::1")


class RootRegisterTests(RelayTestCase):
    """FILE lines with a manifest root (root=, piece=), and the old ones without."""

    def registerLines(self, *lines: bytes) -> bytes:
        return b"".join(
            [
                wire.request(wire.REGISTER, key=KEY.public, port=5000, files=len(lines)),
                *lines,
                wire.end(len(lines)),
            ]
        )

    def test_rootRecorded(self):
        """A FILE line's root= is recorded with the default piece size when piece= is absent."""
        line = wire.item(wire.FILE, name="a", size=10, sha256=SHA_A, root=SHA_B)
        [reply] = self.answer(self.registerLines(line))
        self.assertEqual(reply.status, wire.OK)
        entry = self.registry.get(KEY.node).files["a"]
        self.assertEqual((entry.root, entry.pieceSize), (SHA_B, PIECE_SIZE))

    def test_pieceRecorded(self):
        """piece= beside root= is recorded."""
        line = wire.item(wire.FILE, name="a", size=10, sha256=SHA_A, root=SHA_B, piece=MIN_PIECE_SIZE)
        self.answer(self.registerLines(line))
        self.assertEqual(self.registry.get(KEY.node).files["a"].pieceSize, MIN_PIECE_SIZE)

    def test_withoutRootStillValid(self):
        """An older node's FILE line without root= registers, with no root recorded."""
        [reply] = self.answer(self.registerLines(fileLine("a")))
        self.assertEqual(reply.status, wire.OK)
        self.assertIsNone(self.registry.get(KEY.node).files["a"].root)

    def test_pieceWithoutRootIgnored(self):
        """piece= without root= describes nothing and is ignored."""
        line = wire.item(wire.FILE, name="a", size=10, sha256=SHA_A, piece=12345)
        self.answer(self.registerLines(line))
        self.assertEqual(self.registry.get(KEY.node).files["a"], FileEntry("a", 10, SHA_A))

    def test_malformedRoot(self):
        """A root= that is not 64 lower-case hex digits is refused and nothing is registered."""
        line = wire.item(wire.FILE, name="a", size=10, sha256=SHA_A, root="XYZ")
        self.assertRefused(self.registerLines(line), wire.BAD_REQUEST)
        self.assertIsNone(self.registry.get(KEY.node))

    def test_pieceSizeOutOfRange(self):
        """A piece size outside what clients work with is refused."""
        for piece in (MIN_PIECE_SIZE - 1, MAX_PIECE_SIZE + 1, 0):
            line = wire.item(wire.FILE, name="a", size=10, sha256=SHA_A, root=SHA_B, piece=piece)
            self.assertRefused(self.registerLines(line), wire.BAD_REQUEST)

    def test_tooManyPieces(self):
        """A layout of more than MAX_PIECES pieces is refused."""
        size = MIN_PIECE_SIZE * (MAX_PIECES + 1)
        line = wire.item(wire.FILE, name="a", size=size, sha256=SHA_A, root=SHA_B, piece=MIN_PIECE_SIZE)
        self.assertRefused(self.registerLines(line), wire.BAD_REQUEST)


class QueryTests(RelayTestCase):
    def test_whohasRoot(self):
        """WHOHAS items carry each holder's root= and piece=; a holder without a root has neither."""
        self.registry.register("n1", "10.0.0.1", 5000, [FileEntry("f", 5, SHA_A, root=SHA_B)])
        self.registry.register(
            "n2", "10.0.0.2", 5000, [FileEntry("f", 5, SHA_A, root=SHA_A, pieceSize=MIN_PIECE_SIZE)]
        )
        self.registry.register("n3", "10.0.0.3", 5000, [FileEntry("f", 5, SHA_A)])
        status, *items, end = self.answer(wire.request(wire.WHOHAS, name="f"))
        byNode = {m.get("node"): m for m in items}
        self.assertEqual(
            {n: (m.get("root"), m.get("piece")) for n, m in byNode.items()},
            {"n1": (SHA_B, str(PIECE_SIZE)), "n2": (SHA_A, str(MIN_PIECE_SIZE)), "n3": (None, None)},
        )
        self.assertEqual(wire.pieceLayout(byNode["n2"], 5), (SHA_A, MIN_PIECE_SIZE))
        self.assertEqual(wire.pieceLayout(byNode["n3"], 5), (None, PIECE_SIZE))


    def test_peers(self):
        """PEERS lists active peers between a counted status line and END."""
        self.register("n1", "10.0.0.1", 5000, ["a", "b"])
        self.register("n2", "10.0.0.2", 6000, [])
        status, first, second, end = self.answer(wire.request(wire.PEERS))
        self.assertEqual((status.status, status.get("count"), status.get("boot")), (200, "2", self.factory.boot))
        self.assertEqual(
            sorted((dict(m.fields) for m in (first, second)), key=lambda f: f["node"]),
            [
                {"node": "n1", "host": "10.0.0.1", "port": "5000", "reach": "direct", "files": "2"},
                {"node": "n2", "host": "10.0.0.2", "port": "6000", "reach": "direct", "files": "0"},
            ],
        )
        self.assertEqual((first.word, end.word, end.get("count")), ("PEER", "END", "2"))

    def test_peersEmpty(self):
        """PEERS with nobody registered is count=0 and END count=0."""
        status, end = self.answer(wire.request(wire.PEERS))
        self.assertEqual((status.get("count"), end.word, end.get("count")), ("0", "END", "0"))

    def test_peersLeavesOutExpired(self):
        """PEERS never names a peer whose ttl has passed."""
        self.register("n1", "10.0.0.1", 5000, [])
        self.clock.advance(TTL / 2)
        self.register("n2", "10.0.0.2", 5000, [])
        self.clock.advance(TTL / 2)
        messages = self.answer(wire.request(wire.PEERS))
        self.assertEqual([m.get("node") for m in messages[1:-1]], ["n2"])

    def test_whohas(self):
        """WHOHAS lists the holders of one name with the size and digest each holds."""
        self.register("n1", "10.0.0.1", 5000, ["a b.txt"])
        self.register("n2", "10.0.0.2", 5000, ["other"])
        self.register("n3", "10.0.0.3", 5000, ["a b.txt"])
        status, *items, end = self.answer(wire.request(wire.WHOHAS, name="a b.txt"))
        self.assertEqual(status.get("count"), "2")
        self.assertEqual(sorted(m.get("node") for m in items), ["n1", "n3"])
        self.assertEqual((items[0].get("size"), items[0].sha256(), items[0].get("reach")), ("1", SHA_A, "direct"))
        self.assertEqual(end.integer("count"), 2)

    def test_whohasCapped(self):
        """WHOHAS lists at most MAX_HOLDERS holders of a popular file."""
        for i in range(MAX_HOLDERS + 5):
            self.register(f"n{i}", f"10.0.{i // 250}.{i % 250}", 5000, ["popular"])
        status, *items, end = self.answer(wire.request(wire.WHOHAS, name="popular"))
        self.assertEqual((len(items), end.integer("count")), (MAX_HOLDERS, MAX_HOLDERS))
        self.assertEqual(len({m.get("node") for m in items}), MAX_HOLDERS)

    def test_whohasNobody(self):
        """WHOHAS for a file nobody holds is an empty list, not an error."""
        status, end = self.answer(wire.request(wire.WHOHAS, name="x"))
        self.assertEqual((status.status, status.get("count"), end.get("count")), (200, "0", "0"))

    def test_whohasBadName(self):
        """WHOHAS with an escaping name is refused."""
        self.assertRefused(wire.request(wire.WHOHAS, name="../etc/passwd"), wire.BAD_REQUEST)

    def test_whohasNeedsName(self):
        """WHOHAS without name= is refused."""
        self.assertRefused(wire.request(wire.WHOHAS), wire.BAD_REQUEST)

    def test_whohasByRoot(self):
        """WHOHAS root= lists the holders of those bytes under any name, each item with the name it holds them under."""
        self.registry.register("n1", "10.0.0.1", 5000, [FileEntry("a.iso", 5, SHA_A, root=SHA_B)])
        self.registry.register("n2", "10.0.0.2", 5000, [FileEntry("copies/b.iso", 5, SHA_A, root=SHA_B)])
        self.registry.register("n3", "10.0.0.3", 5000, [FileEntry("a.iso", 5, SHA_A)])  # no root
        status, *items, end = self.answer(wire.request(wire.WHOHAS, root=SHA_B))
        self.assertEqual((status.status, status.get("count"), end.integer("count")), (200, "2", 2))
        self.assertEqual(
            sorted((m.word, m.get("node"), m.get("name"), m.get("size"), m.sha256(), m.get("root"), m.get("piece"))
                   for m in items),
            [
                ("PEER", "n1", "a.iso", "5", SHA_A, SHA_B, str(PIECE_SIZE)),
                ("PEER", "n2", "copies/b.iso", "5", SHA_A, SHA_B, str(PIECE_SIZE)),
            ],
        )
        self.assertEqual({(m.get("host"), m.get("reach")) for m in items}, {("10.0.0.1", "direct"), ("10.0.0.2", "direct")})

    def test_whohasByRootNobody(self):
        """WHOHAS root= for bytes nobody holds is an empty list."""
        status, end = self.answer(wire.request(wire.WHOHAS, root=SHA_B))
        self.assertEqual((status.status, status.get("count"), end.get("count")), (200, "0", "0"))

    def test_whohasByRootHidesUnlisted(self):
        """WHOHAS root= leaves out holders clients cannot get to, as WHOHAS name= does."""
        self.registry.register("n1", "10.0.0.1", 5000, [FileEntry("a", 5, SHA_A, root=SHA_B)], reachable=False)
        status, end = self.answer(wire.request(wire.WHOHAS, root=SHA_B))
        self.assertEqual(status.get("count"), "0")

    def test_whohasByRootCapped(self):
        """WHOHAS root= lists at most MAX_HOLDERS holders."""
        for i in range(MAX_HOLDERS + 5):
            self.registry.register(f"n{i}", f"10.0.{i // 250}.{i % 250}", 5000, [FileEntry(f"f{i}", 5, SHA_A, root=SHA_B)])
        status, *items, end = self.answer(wire.request(wire.WHOHAS, root=SHA_B))
        self.assertEqual((len(items), len({m.get("node") for m in items})), (MAX_HOLDERS, MAX_HOLDERS))

    def test_whohasBadRoot(self):
        """WHOHAS with a root= that is not 64 lowercase hex digits is refused."""
        for root in ("abc", SHA_B.upper(), SHA_B + "0"):
            self.assertRefused(wire.request(wire.WHOHAS, root=root), wire.BAD_REQUEST)

    def test_whohasNameAndRoot(self):
        """WHOHAS with both name= and root= is refused: exactly one of them."""
        self.registry.register("n1", "10.0.0.1", 5000, [FileEntry("a", 5, SHA_A, root=SHA_B)])
        self.assertRefused(wire.request(wire.WHOHAS, name="a", root=SHA_B), wire.BAD_REQUEST)

    def test_search(self):
        """SEARCH answers FILE items with holders, and END says whether it was cut."""
        self.register("n1", "10.0.0.1", 5000, ["song.mp3", "notes.txt"])
        self.register("n2", "10.0.0.2", 5000, ["song.mp3"])
        status, item, end = self.answer(wire.request(wire.SEARCH, pattern="*.mp3"))
        self.assertEqual(status.get("count"), "1")
        self.assertEqual((item.word, item.get("name"), item.get("holders")), ("FILE", "song.mp3", "2"))
        self.assertEqual(end.get("truncated"), "0")

    def test_searchLimit(self):
        """SEARCH with limit= cuts the list and sets truncated=1."""
        self.register("n1", "10.0.0.1", 5000, ["a1", "a2", "a3"])
        status, *items, end = self.answer(wire.request(wire.SEARCH, pattern="a", limit=2))
        self.assertEqual([m.get("name") for m in items], ["a1", "a2"])
        self.assertEqual((end.get("count"), end.get("truncated")), ("2", "1"))

    def test_searchWithoutPattern(self):
        """SEARCH without pattern= lists every file, sorted by name."""
        self.register("n1", "10.0.0.1", 5000, ["b", "a"])
        status, *items, end = self.answer(wire.request(wire.SEARCH))
        self.assertEqual([m.get("name") for m in items], ["a", "b"])

    def test_searchInSteps(self):
        """
        A SEARCH over more names than one reactor turn's share is answered
        over several turns, and a WHOHAS arriving meanwhile is answered at once.
        """
        names = [f"f{i:06}" for i in range(SEARCH_STEP * SEARCH_SLICE * 2)]
        self.register("n1", "10.0.0.1", 5000, names)
        search = wire.request(wire.SEARCH, pattern="f", limit=3)
        proto, searching = self.connect()
        proto.dataReceived(search)
        self.assertEqual(searching.value(), b"")
        [status, item, end] = self.answer(wire.request(wire.WHOHAS, name="f000001"))
        self.assertEqual(item.get("node"), "n1")
        for _ in range(10):
            self.clock.advance(0)
        status, *items, end = parse(searching.value())
        self.assertEqual([m.get("name") for m in items], names[:3])
        self.assertEqual(end.get("truncated"), "1")
        self.assertTrue(searching.disconnecting)

    def test_searchAbandoned(self):
        """A client that leaves during a long SEARCH stops it: no step of it runs afterwards."""
        self.register("n1", "10.0.0.1", 5000, [f"f{i:06}" for i in range(SEARCH_STEP * SEARCH_SLICE * 10)])
        steps = []
        searchSteps = self.registry.searchSteps

        def counted(*args):
            inner = searchSteps(*args)
            while True:
                try:
                    step = next(inner)
                except StopIteration as done:
                    return done.value
                steps.append(step)
                yield step

        self.patch(self.registry, "searchSteps", counted)
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.SEARCH, pattern="f"))
        taken = len(steps)
        proto.connectionLost(None)
        self.clock.advance(0)
        self.assertEqual((len(steps), self.clock.getDelayedCalls()), (taken, []))

    def test_searchBadLimit(self):
        """SEARCH limit=0 is refused."""
        self.assertRefused(wire.request(wire.SEARCH, pattern="a", limit=0), wire.BAD_REQUEST)

    def test_searchPatternTooLong(self):
        """A SEARCH pattern longer than a file name may be is refused."""
        self.assertRefused(wire.request(wire.SEARCH, pattern="a" * (wire.MAX_NAME + 1)), wire.BAD_REQUEST)


class UpkeepTests(RelayTestCase):
    def registered(self, key: NodeKey = KEY) -> None:
        [reply] = self.answer(registration(key), key=key)
        self.assertEqual(reply.get("reachable"), "1")
        self.changes = 0

    def test_heartbeatKnown(self):
        """HEARTBEAT proved with the node's key is 200 with ttl and boot, and extends it."""
        self.registered()
        self.clock.advance(TTL - 1)
        [reply] = self.answer(wire.request(wire.HEARTBEAT, node=KEY.node))
        self.assertEqual((reply.status, reply.get("ttl"), reply.get("boot")), (200, "90", self.factory.boot))
        self.clock.advance(TTL - 1)
        self.assertIsNotNone(self.registry.get(KEY.node))

    def test_heartbeatChallenged(self):
        """HEARTBEAT of a known node is answered with a 100 challenge first, and nothing else yet."""
        self.registered()
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.HEARTBEAT, node=KEY.node))
        [challenge] = parse(transport.value())
        self.assertEqual(challenge.status, wire.CONTINUE)
        self.assertEqual(len(challenge.nonce()), 32)
        self.assertFalse(transport.disconnecting)

    def test_heartbeatUnknown(self):
        """HEARTBEAT from an unknown node is 404 at once (no challenge), telling it to register again."""
        [reply] = self.answer(wire.request(wire.HEARTBEAT, node="n1"), key=None)
        self.assertEqual((reply.status, reply.get("boot")), (404, self.factory.boot))

    def test_heartbeatExpired(self):
        """HEARTBEAT after the ttl passed is 404."""
        self.registered()
        self.clock.advance(TTL)
        [reply] = self.answer(wire.request(wire.HEARTBEAT, node=KEY.node))
        self.assertEqual(reply.status, 404)

    def test_strangersHeartbeatRefused(self):
        """A HEARTBEAT for a node proved with another key is 401 and extends nothing."""
        self.registered()
        self.clock.advance(TTL - 1)
        self.assertRefused(wire.request(wire.HEARTBEAT, node=KEY.node), wire.UNAUTHORIZED, key=OTHER)
        self.clock.advance(1)
        self.assertIsNone(self.registry.get(KEY.node))

    def test_unregister(self):
        """UNREGISTER proved with the node's key removes the node at once."""
        self.registered()
        [reply] = self.answer(wire.request(wire.UNREGISTER, node=KEY.node))
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.registry.active(), [])
        self.assertEqual(self.changes, 1)

    def test_strangersUnregisterRefused(self):
        """An UNREGISTER proved with another key is 401 and the node stays listed."""
        self.registered()
        self.assertRefused(wire.request(wire.UNREGISTER, node=KEY.node), wire.UNAUTHORIZED, key=OTHER)
        self.assertEqual([p.node for p in self.registry.active()], [KEY.node])

    def test_unprovedUnregisterRefused(self):
        """An UNREGISTER that answers the challenge with anything but PROOF is refused."""
        self.registered()
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.UNREGISTER, node=KEY.node))
        transport.clear()
        self.assertRefused(wire.request(wire.PEERS), wire.BAD_REQUEST, connected=(proto, transport))
        self.assertIsNotNone(self.registry.get(KEY.node))

    def test_unregisterUnknown(self):
        """UNREGISTER of an unknown node is 404."""
        [reply] = self.answer(wire.request(wire.UNREGISTER, node="n1"))
        self.assertEqual(reply.status, 404)

    def test_deadUnknown(self):
        """DEAD for an address nobody registered is harmless."""
        [reply] = self.answer(wire.request(wire.DEAD, host="10.0.0.9", port=5000))
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.changes, 0)

    def test_deadBadHost(self):
        """DEAD with a malformed host is refused."""
        self.assertRefused(wire.request(wire.DEAD, host="a b", port=1), wire.BAD_REQUEST)


class FramingTests(RelayTestCase):
    def test_malformedLine(self):
        """A line that is not P2P/1 is answered 400 and the connection closed."""
        self.assertRefused(b"hello relay\r\n", wire.BAD_REQUEST)

    def test_otherVersion(self):
        """A line of another protocol version is answered 426."""
        self.assertRefused(b"P2P/9 PEERS\r\n", wire.UPGRADE_REQUIRED)

    def test_unknownVerb(self):
        """An unknown verb is answered 400."""
        message = self.assertRefused(b"P2P/1 FROB\r\n", wire.BAD_REQUEST)
        self.assertIn("FROB", message.text)

    def test_getIsNotForTheRelay(self):
        """GET (a peer node's verb) is refused by the relay."""
        self.assertRefused(wire.request(wire.GET, name="a"), wire.BAD_REQUEST)

    def test_statusAsRequest(self):
        """A status line sent as a request is refused."""
        self.assertRefused(wire.status(200), wire.BAD_REQUEST)

    def test_overLongLine(self):
        """A line over MAX_LINE is answered 414 without waiting for its end."""
        self.assertRefused(b"P2P/1 SEARCH pattern=" + b"a" * wire.MAX_LINE, wire.LINE_TOO_LONG)

    def test_overLongLineWithEnd(self):
        """A complete but over-long line is answered 414."""
        self.assertRefused(b"P2P/1 SEARCH pattern=" + b"a" * wire.MAX_LINE + b"\r\n", wire.LINE_TOO_LONG)

    def test_longestLineWithCRLF(self):
        """A line of exactly MAX_LINE bytes is accepted with CRLF as with a bare LF."""
        head = b"P2P/1 PEERS pad="
        line = head + b"a" * (wire.MAX_LINE - len(head))
        for ending in (b"\r\n", b"\n"):
            [status, end] = self.answer(line + ending)
            self.assertEqual(status.status, wire.OK, ending)

    def test_oneRequestPerConnection(self):
        """After answering, further lines on the connection are ignored."""
        self.register("n1", "10.0.0.1", 5000, [])
        transport = self.ask(wire.request(wire.PEERS) + wire.request(wire.UNREGISTER, node="n1"), key=None)
        self.assertEqual(parse(transport.value())[-1].word, "END")
        self.assertIsNotNone(self.registry.get("n1"))

    def test_byteAtATime(self):
        """A registration split at every byte is understood the same."""
        proto, transport = self.connect()
        data = registration(KEY, 5000, ["a b.txt", "c"])
        for byte in data:
            proto.dataReceived(bytes([byte]))
        self.prove(proto, transport, data)
        self.assertEqual(parse(transport.value())[0].status, wire.OK)
        self.assertEqual(sorted(self.registry.get(KEY.node).files), ["a b.txt", "c"])

    def test_arbitrarySplits(self):
        """Splitting a request at any boundary gives the same answer."""
        self.register("n1", "10.0.0.1", 5000, ["a"])
        data = wire.request(wire.WHOHAS, name="a")
        expected = self.ask(data).value()
        for cut in range(1, len(data)):
            proto, transport = self.connect()
            proto.dataReceived(data[:cut])
            proto.dataReceived(data[cut:])
            self.assertEqual(transport.value(), expected, cut)

    def test_crlfSplitBetweenCrAndLf(self):
        """A CRLF split between its CR and LF is still one line end."""
        proto, transport = self.connect()
        proto.dataReceived(b"P2P/1 PEERS\r")
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(b"\n")
        self.assertEqual(parse(transport.value())[0].status, wire.OK)

    def test_bareLF(self):
        """Lines ending in a bare LF are accepted."""
        data = registration(KEY, 5000, ["a"]).replace(b"\r\n", b"\n")
        self.assertNotIn(b"\r", data)
        [reply] = self.answer(data)
        self.assertEqual(reply.status, wire.OK)


class LogTests(RelayTestCase):
    def test_refusalNamesPeerAsHostPort(self):
        """A refused request is logged with the peer as host:port, not an address repr."""
        with capturedLogs() as events:
            self.ask(b"P2P/1 FROB\r\n")
        [line] = [formatEvent(e) for e in events]
        self.assertIn("refusing 10.1.2.3:40000:", line)
        self.assertNotIn("IPv4Address", line)

    def test_factoryQuiet(self):
        """The relay's factory logs no "Starting factory" when a port starts or stops it."""
        with capturedLogs() as events:
            self.factory.doStart()
            self.factory.doStop()
        self.assertEqual(list(events), [])


class TimeoutTests(RelayTestCase):
    def test_idle(self):
        """A connection that sends nothing is answered 408 and closed at the negotiation deadline."""
        proto, transport = self.connect()
        self.clock.advance(NEGOTIATION_DEADLINE - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        [reply] = parse(transport.value())
        self.assertEqual(reply.status, wire.TIMEOUT)
        self.assertTrue(transport.disconnecting)

    def test_idleMidRegistration(self):
        """A registration that stalls mid-list times out and registers nothing."""
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.REGISTER, key=KEY.public, port=5000, files=2) + fileLine("a"))
        self.clock.advance(IDLE_TIMEOUT)
        self.assertEqual(parse(transport.value())[0].status, wire.TIMEOUT)
        self.assertIsNone(self.registry.get(KEY.node))

    def test_splitRequestWithinDeadline(self):
        """A request that arrives in pieces within the deadline is answered."""
        proto, transport = self.connect()
        self.clock.advance(NEGOTIATION_DEADLINE - 1)
        proto.dataReceived(b"P2P/1 PE")
        self.clock.advance(0.5)
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(b"ERS\r\n")
        self.assertEqual(parse(transport.value())[0].status, wire.OK)

    def test_noTimeoutAfterAnswer(self):
        """Once answered, no 408 is appended later."""
        proto, transport = self.connect()
        proto.dataReceived(wire.request(wire.PEERS))
        answered = transport.value()
        self.clock.advance(IDLE_TIMEOUT * 2)
        self.assertEqual(transport.value(), answered)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HalfListServer(Protocol):
    """A relay that announces two items, sends one, and hangs up."""

    def connectionMade(self) -> None:
        self.transport.write(wire.status(200, count=2) + wire.item(wire.PEER, node="x"))
        self.transport.loseConnection()


class ScriptedServer(Protocol):
    """A relay that answers with fixed bytes and hangs up."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.data)
        self.transport.loseConnection()


class QueryProtocolTests(RelayTestCase):
    """
    QueryProtocol against a relay, through an in-memory connection.
    """

    def exchange(self, server, payload: bytes, prover=None):
        def serverTransport(proto):
            return iosim.FakeTransport(proto, True, peerAddress=CLIENT)

        client, _, pump = iosim.connectedServerAndClient(
            server,
            lambda: QueryProtocol(self.clock, payload, 15.0, prover),
            serverTransportFactory=serverTransport,
            clock=self.clock,
        )
        pump.flush()
        return client.deferred

    def test_reply(self):
        """A list request yields a Reply with the status, the items and END."""
        self.register("n1", "10.0.0.1", 5000, ["a"])
        d = self.exchange(lambda: self.factory.buildProtocol(CLIENT), wire.request(wire.PEERS))
        reply = self.successResultOf(d)
        self.assertIsInstance(reply, Reply)
        self.assertEqual(reply.status.status, 200)
        self.assertEqual([m.get("node") for m in reply.items], ["n1"])
        self.assertEqual(reply.end.word, "END")

    def test_statusOnly(self):
        """A reply without count= is just its status line."""
        d = self.exchange(
            lambda: self.factory.buildProtocol(CLIENT),
            registration(),
            keyProver(KEY, identity.REGISTER_PROOF),
        )
        reply = self.successResultOf(d)
        self.assertEqual((reply.status.get("host"), reply.items, reply.end), ("10.1.2.3", [], None))

    def test_closedMidList(self):
        """A relay that closes before END gives IncompleteReply."""
        d = self.exchange(HalfListServer, wire.request(wire.PEERS))
        self.failureResultOf(d, IncompleteReply)

    def test_errorStatus(self):
        """A 4xx answer raises wire.ProtocolError with that status."""
        d = self.exchange(
            lambda: self.factory.buildProtocol(CLIENT), wire.request(wire.HEARTBEAT, node="n1")
        )
        self.assertEqual(self.failureResultOf(d, wire.ProtocolError).value.status, 404)

    def test_moreItemsThanAnnounced(self):
        """An item beyond the announced count is an error at once, without waiting for END."""
        data = wire.status(200, count=1) + wire.item("PEER", node="a") + wire.item("PEER", node="b")
        d = self.exchange(lambda: ScriptedServer(data), wire.request(wire.PEERS))
        self.failureResultOf(d, wire.ProtocolError)

    def test_endMiscounted(self):
        """An END whose count differs from the status count is an error."""
        data = wire.status(200, count=1) + wire.item("PEER", node="a") + wire.end(2)
        d = self.exchange(lambda: ScriptedServer(data), wire.request(wire.PEERS))
        self.failureResultOf(d, wire.ProtocolError)

    def test_noStatusLine(self):
        """An answer that does not start with a status is an error."""
        d = self.exchange(lambda: ScriptedServer(wire.end(0)), wire.request(wire.PEERS))
        self.failureResultOf(d, wire.ProtocolError)

    def test_garbage(self):
        """An answer that is not the protocol at all is a ProtocolError."""
        d = self.exchange(lambda: ScriptedServer(b"HTTP/1.1 200 OK\r\n\r\n"), wire.request(wire.PEERS))
        self.failureResultOf(d, wire.ProtocolError)

    def test_timeout(self):
        """A relay that never answers gives TimeoutError after the timeout."""
        d = self.exchange(Protocol, wire.request(wire.PEERS))
        self.assertNoResult(d)
        self.clock.advance(15.0)
        self.failureResultOf(d, TimeoutError)


class QuerySplitTests(SynchronousTestCase):
    """
    The relay's reply parsed the same however TCP cuts it, as the servers
    are tested with their requests.
    """

    REPLY = (
        wire.status(wire.OK, "2 active peers", count=2, boot="b00t")
        + wire.item(wire.PEER, node="n1", host="10.0.0.1", port=5000, files=1)
        + wire.item(wire.PEER, node="n 2", host="::1", port=6000, udp=6001, files=0)
        + wire.end(2)
    )

    def outcome(self, chunks) -> tuple[object, StringTransport]:
        proto = QueryProtocol(Clock(), wire.request(wire.PEERS), timeout=15.0)
        transport = StringTransport()
        proto.makeConnection(transport)
        results: list = []
        proto.deferred.addBoth(results.append)
        for chunk in chunks:
            self.assertEqual(results, [], "no outcome before the reply is complete")
            proto.dataReceived(chunk)
        [result] = results
        return result, transport

    def test_whole(self):
        """The whole reply in one segment is the status, both items and END."""
        reply, transport = self.outcome([self.REPLY])
        self.assertEqual([m.get("node") for m in reply.items], ["n1", "n 2"])
        self.assertEqual((reply.status.get("boot"), reply.end.get("count")), ("b00t", "2"))
        self.assertTrue(transport.disconnecting)

    def test_everySplitPoint(self):
        """A reply cut in two at any byte gives the same Reply."""
        expected, _ = self.outcome([self.REPLY])
        for cut in range(1, len(self.REPLY)):
            reply, _ = self.outcome([self.REPLY[:cut], self.REPLY[cut:]])
            self.assertEqual(reply, expected, cut)

    def test_byteAtATime(self):
        """A reply arriving one byte at a time gives the same Reply."""
        expected, _ = self.outcome([self.REPLY])
        reply, _ = self.outcome([bytes([b]) for b in self.REPLY])
        self.assertEqual(reply, expected)

    def test_errorStatusSplit(self):
        """An error status cut at any byte is the same ProtocolError."""
        data = wire.status(wire.NOT_FOUND, "unknown node; register again", boot="b00t")
        for cut in range(1, len(data)):
            failure, _ = self.outcome([data[:cut], data[cut:]])
            self.assertEqual(
                (failure.value.status, failure.value.message),
                (404, "unknown node; register again"),
                cut,
            )


class _Endpoint:
    def __init__(self, result) -> None:
        self.result = result

    def connect(self, factory):
        if isinstance(self.result, Exception):
            return fail(self.result)
        proto = factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        self.result.append((proto, transport))
        return succeed(proto)


class QueryFunctionTests(SynchronousTestCase):
    def test_sendsPayloadAndReturnsReply(self):
        """query() connects, sends the payload and returns the parsed reply."""
        clock = Clock()
        connections: list = []
        d = ensureDeferred(query(_Endpoint(connections), wire.request(wire.PEERS), clock))
        [(proto, transport)] = connections
        self.assertEqual(transport.value(), wire.request(wire.PEERS))
        proto.dataReceived(wire.status(200, count=0) + wire.end(0))
        self.assertEqual(self.successResultOf(d).status.status, 200)
        self.assertTrue(transport.disconnecting)

    def test_connectionRefused(self):
        """A refused connection surfaces as ConnectionRefusedError."""
        d = ensureDeferred(query(_Endpoint(ConnectionRefusedError()), b"", Clock()))
        self.failureResultOf(d, ConnectionRefusedError)


class QueryCancelTests(SynchronousTestCase):
    def test_cancelAbortsAndStaysQuiet(self):
        """A cancelled query aborts its connection; its timeout later does nothing."""
        from twisted.internet.defer import CancelledError

        from p2prelay.client.relay import QueryProtocol

        clock = Clock()
        proto = QueryProtocol(clock, wire.request(wire.PEERS), timeout=5)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.deferred.cancel()
        self.failureResultOf(proto.deferred, CancelledError)
        self.assertTrue(transport.disconnecting)
        clock.advance(10)  # the idle timeout must not fire the Deferred again
        proto.connectionLost(None)


class ListenBacklogTests(SynchronousTestCase):
    """The relay's port queues bursts of connections."""

    def test_defaultBacklog(self):
        """The relay listens with a backlog of LISTEN_BACKLOG, not Twisted's 50."""
        from twisted.internet.testing import MemoryReactorClock

        from p2prelay.relay.service import LISTEN_BACKLOG, RelayService

        reactor = MemoryReactorClock()
        service = RelayService(reactor, "tcp:0:interface=127.0.0.1", TTL)
        service.startService()
        self.addCleanup(service.stopService)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual(backlog, LISTEN_BACKLOG)

    def test_explicitBacklogKept(self):
        """A description that names a backlog keeps it; non-TCP ones get none."""
        from p2prelay.listening import withBacklog

        self.assertEqual(withBacklog("tcp:0:backlog=5", 1024), "tcp:0:backlog=5")
        self.assertEqual(withBacklog("tcp:0", 1024), "tcp:0:backlog=1024")
        self.assertEqual(withBacklog("unix:/tmp/x", 1024), "unix:/tmp/x")
        self.assertEqual(withBacklog("tcp:0", None), "tcp:0")


class MetricsTests(RelayTestCase):
    """What the relay protocol tells its RelayMetrics (read back with a scrape in process)."""

    def setUp(self) -> None:
        super().setUp()
        from p2prelay.metrics import RelayMetrics, newRegistry

        self.metrics = RelayMetrics(newRegistry(process=False))
        self.factory.metrics = self.metrics
        self.factory.connections.onRefused = self.metrics.connectionRefused

    def sample(self, name: str, **labels) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def test_lookupHitAndMiss(self):
        """A WHOHAS that lists a holder is a hit, one that lists none a miss; a SEARCH too."""
        self.register("n1", "10.0.0.1", 5000, ["a"])
        self.answer(wire.request(wire.WHOHAS, name="a"))
        self.answer(wire.request(wire.WHOHAS, name="nope"))
        self.answer(wire.request(wire.SEARCH, pattern="nothing*"))
        self.assertEqual(self.sample("p2prelay_relay_lookups_total", result="hit"), 1)
        self.assertEqual(self.sample("p2prelay_relay_lookups_total", result="miss"), 2)

    def test_rootLookupCounted(self):
        """A WHOHAS root= is a lookup like WHOHAS name=: a hit or a miss, and counted in STATS."""
        self.registry.register("n1", "10.0.0.1", 5000, [FileEntry("a", 5, SHA_A, root=SHA_B)])
        self.answer(wire.request(wire.WHOHAS, root=SHA_B))
        self.answer(wire.request(wire.WHOHAS, root=SHA_A))
        self.assertEqual(self.sample("p2prelay_relay_lookups_total", result="hit"), 1)
        self.assertEqual(self.sample("p2prelay_relay_lookups_total", result="miss"), 1)
        [status] = self.answer(wire.request(wire.STATS))
        self.assertEqual(status.get("lookups"), "2")

    def test_lookupRefused(self):
        """A malformed WHOHAS is a refused lookup, and neither a hit nor a miss."""
        self.assertRefused(wire.request(wire.WHOHAS), wire.BAD_REQUEST)
        self.assertEqual(self.sample("p2prelay_relay_lookups_total", result="refused"), 1)
        self.assertEqual(self.sample("p2prelay_relay_lookups_total", result="miss"), 0)

    def test_registrationAccepted(self):
        """A REGISTER that is recorded counts as accepted, once."""
        self.answer(registration(KEY, 5000, ["a.txt"]))
        self.assertEqual(self.sample("p2prelay_relay_registrations_total", result="accepted"), 1)
        self.assertEqual(self.sample("p2prelay_relay_registrations_total", result="refused"), 0)

    def test_registrationRefused(self):
        """A REGISTER with a bad proof counts as refused."""
        self.assertRefused(registration(KEY), wire.UNAUTHORIZED, key=OTHER)
        self.assertEqual(self.sample("p2prelay_relay_registrations_total", result="refused"), 1)

    def test_registrationInvalid(self):
        """A REGISTER whose END count does not match counts as invalid."""
        data = wire.request(wire.REGISTER, key=KEY.public, port=5000, files=0) + wire.end(3)
        self.assertRefused(data, wire.BAD_REQUEST)
        self.assertEqual(self.sample("p2prelay_relay_registrations_total", result="invalid"), 1)

    def test_latency(self):
        """A request's latency runs from its line to its answer, on the relay's clock."""
        data = registration(KEY, 5000, ["a.txt"])
        first, rest = data.split(b"\n", 1)
        proto, transport = self.connect()
        self.clock.advance(3)  # before the request line: not the relay's latency
        proto.dataReceived(first + b"\n")
        self.clock.advance(0.5)
        proto.dataReceived(rest)
        self.prove(proto, transport, data)
        self.assertEqual(self.sample("p2prelay_relay_request_seconds_count"), 1)
        self.assertAlmostEqual(self.sample("p2prelay_relay_request_seconds_sum"), 0.5)

    def test_connectionsOpen(self):
        """Each connection is counted open until it is lost."""
        proto, transport = self.connect()
        self.connect()
        self.assertEqual(self.sample("p2prelay_relay_connections_open"), 2)
        proto.connectionLost(None)
        self.assertEqual(self.sample("p2prelay_relay_connections_open"), 1)

    def test_connectionsRefused(self):
        """A connection over the per-address cap is counted refused, by that cap, each time."""
        self.factory.connections.counter.perAddress = 1
        self.connect()
        self.connect()
        self.connect()
        self.assertEqual(self.sample("p2prelay_relay_connections_refused_total", reason="per-address"), 2)
        self.assertEqual(self.sample("p2prelay_relay_connections_open"), 1)

    def test_noMetrics(self):
        """Without metrics the factory counts lookups for STATS all the same."""
        self.factory.metrics = None
        self.answer(wire.request(wire.WHOHAS, name="a"))
        self.assertEqual(self.factory.lookups, 1)


class StatsTests(RelayTestCase):
    def test_figures(self):
        """STATS answers one status line: peers, distinct files, entries, bytes, lookups, uptime."""
        self.registry.register("n1", "10.0.0.1", 5000, [FileEntry("a", 10, SHA_A), FileEntry("b", 5, SHA_A)])
        self.registry.register("n2", "10.0.0.2", 5000, [FileEntry("a", 10, SHA_A)])
        self.answer(wire.request(wire.WHOHAS, name="a"))
        self.clock.advance(75)
        [status] = self.answer(wire.request(wire.STATS))
        self.assertEqual(status.status, wire.OK)
        self.assertEqual(
            {key: status.get(key) for key in wire.STATS_FIELDS},
            {"peers": "2", "files": "2", "entries": "3", "bytes": "25", "lookups": "1", "uptime": "75"},
        )
        self.assertEqual(status.get("boot"), self.factory.boot)
        self.assertEqual(status.text, "2 peers, 2 files (25 B)")

    def test_unreachableLeftOut(self):
        """Peers the relay could not reach are not counted, as they are not listed."""
        self.registry.register("n1", "10.0.0.1", 5000, [FileEntry("a", 10, SHA_A)], reachable=False)
        [status] = self.answer(wire.request(wire.STATS))
        self.assertEqual((status.get("peers"), status.get("bytes")), ("0", "0"))
        self.assertEqual(status.text, "0 peers, 0 files (0 B)")

    def test_oneOfEach(self):
        """One peer with one file reads "1 peer, 1 file"."""
        self.register("n1", "10.0.0.1", 5000, ["a"])
        [status] = self.answer(wire.request(wire.STATS))
        self.assertEqual(status.text, "1 peer, 1 file (1 B)")


class VerboseTests(RelayTestCase):
    def lines(self, data: bytes) -> List[str]:
        with capturedLogs() as events:
            self.answer(data)
        return [formatEvent(e) for e in events if e["log_level"].name == "debug"]

    def test_quietByDefault(self):
        """Without verbose, lookups log nothing."""
        self.assertEqual(self.lines(wire.request(wire.WHOHAS, name="a")), [])

    def test_lookupsAtDebug(self):
        """With verbose, each WHOHAS, PEERS and SEARCH is one debug line naming the client."""
        self.factory.verbose = True
        self.register("n1", "10.0.0.1", 5000, ["a"])
        self.assertEqual(self.lines(wire.request(wire.WHOHAS, name="a")), ["WHOHAS a from 10.1.2.3:40000: 1 found"])
        self.assertEqual(self.lines(wire.request(wire.PEERS)), ["PEERS from 10.1.2.3:40000: 1 active"])
        with capturedLogs() as events:
            self.ask(wire.request(wire.SEARCH, pattern="a*"))
            self.clock.advance(1)
        self.assertIn(
            "SEARCH 'a*' from 10.1.2.3:40000: 1 found",
            [formatEvent(e) for e in events if e["log_level"].name == "debug"],
        )


class StatsCommandTests(RelayTestCase):
    """p2p-fetch --stats against this relay protocol: the figures for people, or JSON."""

    def setUp(self) -> None:
        super().setUp()
        from tests.test_cli_fetch import CommandTestCase

        self.command = CommandTestCase("setUp")
        self.command.setUp()
        relay = self

        class Fetcher:
            async def ask(self, payload: bytes) -> Reply:
                status, *items = relay.answer(payload)
                return Reply(status, items)

        self.fetcher = Fetcher()
        self.registry.register("n1", "10.0.0.1", 5000, [FileEntry("a", 2 * 1024**3, SHA_A)])
        self.registry.register("n2", "10.0.0.2", 5000, [FileEntry("a", 2 * 1024**3, SHA_A), FileEntry("b", 7, SHA_B)])
        self.factory.started -= 90061  # up a day, an hour, a minute and a second

    def test_forPeople(self):
        """--stats prints peers, files with their copies and human size, lookups and uptime on stdout."""
        self.assertEqual(self.command.p2pFetch(["--stats"], self.fetcher), 0)
        self.assertEqual(
            self.command.terminal.stdout.decode(),
            "peers    2\nfiles    2 (3 copies, 4.0 GiB)\nlookups  0\nuptime   1 d 1:01:01\n",
        )
        self.assertEqual(self.command.terminal.stderr, "")

    def test_json(self):
        """--stats --json is one JSON object of exact figures."""
        import json

        self.assertEqual(self.command.p2pFetch(["--stats", "--json"], self.fetcher), 0)
        self.assertEqual(
            json.loads(self.command.terminal.stdout),
            {"peers": 2, "files": 2, "entries": 3, "bytes": 4 * 1024**3 + 7, "lookups": 0, "uptime": 90061},
        )

    def test_excludesOthers(self):
        """--stats with file names or --peers is a usage error."""
        import io
        from contextlib import redirect_stderr

        from p2prelay.cli.fetch import parseArgs

        for argv in (["--stats", "x"], ["--stats", "--peers"]):
            with redirect_stderr(io.StringIO()) as stderr:
                self.assertRaises(SystemExit, parseArgs, argv)
            self.assertIn("--stats takes no file names", stderr.getvalue())
