"""
End-to-end: the attacks of issue 8, replayed as an attacker on loopback
would replay them against real daemons, each now refused with a clear
status line, while an honest ``p2p-fetch`` of the same file keeps
succeeding.

The attacker speaks raw sockets from the test process (from loopback
addresses of its own, 127.0.0.x, where the system has them, so its
dial-back and report allowances are not the honest nodes'); fake nodes and
a fake relay are small threads here.  Every wait polls something the relay
or a daemon's log shows, with a deadline.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

from twisted.trial.unittest import SynchronousTestCase

from p2prelay import identity, wire

from .support import Network, NetworkTestCase, script, waitUntil

ESC = b"\x1b"
ANSWER_TIMEOUT = 8.0  # seconds to wait for any one answer (a dial-back takes up to 5)

VICTIM = b"the victim's own bytes\n"
BYSTANDER = b"an unrelated peer's file\n"
SHARED = b"held by the doomed node and a steady one\n"
EVIL = b"the attacker's bytes, self-consistent\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canBind(host: str) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


_nextSource = [10]


def attackerSource() -> Optional[str]:
    """A loopback address of the attacker's own (127.0.0.10 and up), or None: 127.0.0.1."""
    _nextSource[0] += 1
    host = f"127.0.0.{_nextSource[0]}"
    return host if _canBind(host) else None


def connect(address: str, source: Optional[str] = None, timeout: float = ANSWER_TIMEOUT) -> socket.socket:
    host, port = address.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(timeout)
    if source is not None:
        s.bind((source, 0))
    s.connect((host, int(port)))
    return s


def readMessage(reader) -> wire.Message:
    line = reader.readline()
    if not line:
        raise AssertionError("closed without an answer")
    return wire.parseLine(line.rstrip(b"\n"))


Prover = Callable[[str, bytes], bytes]


def exchange(
    address: str, request: bytes, prove: Optional[Prover] = None, source: Optional[str] = None
) -> List[wire.Message]:
    """
    Send ``request`` to the relay; if it challenges and ``prove`` is given,
    answer with ``prove(nonce, request)`` (a whole PROOF line).  Every
    status line the relay sent, in order.
    """
    with connect(address, source) as s:
        s.sendall(request)
        reader = s.makefile("rb")
        answers = [readMessage(reader)]
        if answers[0].status == wire.CONTINUE and prove is not None:
            s.sendall(prove(answers[0].nonce(), request))
            answers.append(readMessage(reader))
        return answers


def signedBy(key: identity.NodeKey, purpose: bytes) -> Prover:
    """PROOF lines signed by ``key``: what any stranger with a key of its own can make."""
    return lambda nonce, request: wire.request(wire.PROOF, sig=key.prove(purpose, nonce, request))


def registration(key: identity.NodeKey, port: int, files: Dict[str, bytes], **extra: object) -> bytes:
    """A REGISTER request (header, FILE lines, END) announcing ``files`` with their real size and hash."""
    lines = [wire.request(wire.REGISTER, key=key.public, port=port, files=len(files), **extra)]
    for name, content in files.items():
        lines.append(wire.item(wire.FILE, name=name, size=len(content), sha256=sha(content)))
    lines.append(wire.end(len(files)))
    return b"".join(lines)


def register(
    address: str, key: identity.NodeKey, port: int, files: Dict[str, bytes], **extra: object
) -> List[wire.Message]:
    """Register properly: the documented exchange, proved with ``key``."""
    return exchange(address, registration(key, port, files, **extra), signedBy(key, identity.REGISTER_PROOF))


def proveAnswer(key: identity.NodeKey, nonce: str) -> bytes:
    """A node's answer to the relay's dial-back, PROVE nonce=."""
    return wire.status(wire.OK, key=key.public, sig=key.prove(identity.DIALBACK_PROOF, nonce, b""))


class Server:
    """
    A listening socket on loopback whose connections are handed, one thread
    each, to ``handle(connection, reader)``.
    """

    def __init__(self, handle: Callable[[socket.socket, object], None], host: str = "127.0.0.1") -> None:
        self.handle = handle
        self.listener = socket.create_server((host, 0))
        self.host = host
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(ANSWER_TIMEOUT)
            try:
                self.handle(conn, conn.makefile("rb"))
            except OSError:
                pass

    def close(self) -> None:
        """Stop listening: the port is closed (connections there are refused)."""
        self.closed = True
        try:
            # Wakes the thread blocked in accept(); close() alone would leave
            # the socket listening until that accept() returned.
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


class FakeNode(Server):
    """
    A malicious node in the test process: its own key, registered by the
    documented exchange, it answers the relay's PROVE as an honest node
    does -- and every GET with ``answer`` (raw bytes, sent as they are).
    """

    def __init__(self, answer: bytes = b"") -> None:
        self.key = identity.NodeKey.generate()
        self.answer = answer
        self.gets: List[wire.Message] = []
        self.proves = 0
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket, reader) -> None:
        request = readMessage(reader)
        if request.word == wire.PROVE:
            self.proves += 1
            conn.sendall(proveAnswer(self.key, request.nonce()))
        elif request.word == wire.GET:
            self.gets.append(request)
            conn.sendall(self.answer)

    def register(self, relay: str, files: Dict[str, bytes]) -> wire.Message:
        answers = register(relay, self.key, self.port, files)
        reply = answers[-1]
        assert reply.status == wire.OK and reply.get("reachable") == "1", answers
        return reply


class CaptureProxy(Server):
    """
    A tiny TCP proxy between a real node and the relay that keeps every
    byte each side sent: what an eavesdropper on the path records.
    """

    def __init__(self, relay: str) -> None:
        self.relay = relay
        self.exchanges: List[dict] = []  # {"up": bytes sent, "down": bytes answered, "done"}
        super().__init__(self._forward)

    def _forward(self, conn: socket.socket, reader) -> None:
        record = {"up": bytearray(), "down": bytearray(), "done": False}
        self.exchanges.append(record)
        with connect(self.relay) as upstream:
            def pump(src: socket.socket, dst: socket.socket, into: bytearray) -> None:
                try:
                    while True:
                        data = src.recv(65536)
                        if not data:
                            break
                        into += data
                        dst.sendall(data)
                except OSError:
                    pass
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            up = threading.Thread(target=pump, args=(conn, upstream, record["up"]), daemon=True)
            up.start()
            pump(upstream, conn, record["down"])
            up.join(ANSWER_TIMEOUT)
        record["done"] = True

    def captured(self, verb: str) -> tuple[bytes, bytes]:
        """
        The first finished exchange that started with ``verb`` and was
        answered 200: (the request bytes before PROOF, the PROOF line).
        """
        for record in list(self.exchanges):
            up, down = bytes(record["up"]), bytes(record["down"])
            if record["done"] and up.startswith(f"P2P/1 {verb} ".encode()) and b" 200 " in down:
                at = up.index(b"P2P/1 PROOF ")
                return up[:at], up[at:]
        raise LookupError(verb)


def listedPorts(net: Network) -> List[int]:
    return [p.port() for p in net.peers()]


def whohas(net: Network, name: str) -> List[wire.Message]:
    return net.query(wire.request(wire.WHOHAS, name=name))[1:]


class AttackerTestCase(NetworkTestCase):
    def assertFetches(self, name: str, content: bytes, *args: str):
        """An honest p2p-fetch of ``name`` prints exactly ``content``, exit 0, no traceback."""
        result = self.net.fetch(*args, name)
        self.assertEqual((result.returncode, result.stdout), (0, content), result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)
        return result

    def assertStatus(self, answer: wire.Message, code: int) -> None:
        self.assertEqual(answer.status, code, answer)


class IdentityAttackTests(AttackerTestCase):
    """
    A relay, a victim node registered through an eavesdropper's proxy, a
    bystander node, and a fake node that registered properly and then went
    away (its port closed).  The relay's negotiation deadline is 2 s (the
    default 5 s is the unit tests'), so the trickle is cut sooner.
    """

    relayArgs = ("--deadline", "2")

    @classmethod
    def startNodes(cls, net: Network) -> None:
        cls.proxy = CaptureProxy(net.address)
        cls.victim, cls.bystander = net.nodesInParallel(
            (net.folder("victim", {"victim.txt": VICTIM}), "--relay", cls.proxy.address),
            (net.folder("bystander", {"bystander.txt": BYSTANDER}),),
        )
        cls.victimPort = net.listening(cls.victim)[1]
        cls.gone = FakeNode()
        cls.gone.register(net.address, {"gone.txt": b"gone"})
        cls.gone.close()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.proxy.close()
        super().tearDownClass()

    def victimEntry(self) -> wire.Message:
        [entry] = [p for p in self.net.peers() if p.port() == self.victimPort]
        return entry

    def assertVictimIntact(self) -> None:
        """The victim is listed once, as itself; the honest fetch prints its bytes."""
        [holder] = whohas(self.net, "victim.txt")
        self.assertEqual((holder.port(), holder.get("sha256")), (self.victimPort, sha(VICTIM)))
        self.assertFetches("victim.txt", VICTIM)

    def test_strangerUnregister(self) -> None:
        """A stranger's UNREGISTER node=ID (the id read from PEERS) is 401; the node stays listed."""
        node = self.victimEntry().require("node")
        stranger = identity.NodeKey.generate()
        request = wire.request(wire.UNREGISTER, node=node)
        answers = exchange(
            self.net.address, request, signedBy(stranger, identity.UNREGISTER_PROOF), attackerSource()
        )
        self.assertStatus(answers[0], wire.CONTINUE)
        self.assertStatus(answers[-1], wire.UNAUTHORIZED)
        # Proofs that are no signature at all fare no better.
        unsigned = exchange(
            self.net.address, request, lambda nonce, req: wire.request(wire.PROOF), attackerSource()
        )
        self.assertStatus(unsigned[-1], wire.UNAUTHORIZED)
        self.assertEqual(self.victimEntry().require("node"), node)
        self.assertVictimIntact()

    def test_victimIdAnotherKey(self) -> None:
        """
        A REGISTER naming the victim's node id with another key is 400; one
        with the victim's public key (read off the wire) but signed by
        another key is 401.  Neither replaces the victim.
        """
        node = self.victimEntry().require("node")
        forger = identity.NodeKey.generate()
        forged = {"victim.txt": EVIL}
        answers = register(self.net.address, forger, self.victimPort, forged, node=node, host="127.0.0.1")
        self.assertStatus(answers[-1], wire.BAD_REQUEST)
        request, _ = self.proxy.captured(wire.REGISTER)
        victimKey = wire.parseLine(request.split(b"\n", 1)[0].rstrip(b"\r")).publicKey()
        self.assertEqual(identity.nodeIdOf(victimKey), node)
        stolen = registration(forger, self.victimPort, forged, host="127.0.0.1").replace(
            forger.public.encode(), victimKey.encode(), 1
        )
        answers = exchange(
            self.net.address, stolen, signedBy(forger, identity.REGISTER_PROOF), attackerSource()
        )
        self.assertStatus(answers[0], wire.CONTINUE)
        self.assertStatus(answers[-1], wire.UNAUTHORIZED)
        self.assertVictimIntact()

    def test_newKeyAtVictimAddress(self) -> None:
        """
        A new key registered, properly proved, at the victim's host and
        port is 409: the relay's dial-back finds the victim's key there.
        """
        attacker = identity.NodeKey.generate()
        forged = {"victim.txt": EVIL}
        answers = register(self.net.address, attacker, self.victimPort, forged, host="127.0.0.1")
        self.assertStatus(answers[-1], wire.CONFLICT)
        self.assertNotIn(attacker.node, [p.get("node") for p in self.net.peers()])
        self.assertVictimIntact()

    def test_replayedRegister(self) -> None:
        """
        The victim's REGISTER, captured on the path and replayed byte for
        byte, meets a fresh nonce and is 401; the victim's entry is the one
        it made.
        """
        request, proof = self.proxy.captured(wire.REGISTER)
        before = self.net.registrations(self.victimPort)
        answers = exchange(self.net.address, request, lambda nonce, req: proof, attackerSource())
        self.assertStatus(answers[0], wire.CONTINUE)
        self.assertStatus(answers[-1], wire.UNAUTHORIZED)
        # Sent all at once, before any challenge, it fares no better.
        with connect(self.net.address, attackerSource()) as s:
            s.sendall(request + proof)
            reader = s.makefile("rb")
            self.assertStatus(readMessage(reader), wire.CONTINUE)
            self.assertStatus(readMessage(reader), wire.UNAUTHORIZED)
        self.assertEqual(self.net.registrations(self.victimPort), before)
        self.assertVictimIntact()

    def test_unprovenAddressNeverListed(self) -> None:
        """
        Registrations pointing at a closed port, at a plain socket that
        closes at once, and at one that answers PROVE with another key's
        valid proof are accepted as reachable=0 and never listed.
        """
        closed = Server(lambda conn, reader: None)
        closed.close()
        plain = Server(lambda conn, reader: None)
        other = identity.NodeKey.generate()
        impostor = Server(lambda conn, reader: conn.sendall(proveAnswer(other, readMessage(reader).nonce())))
        self.addCleanup(plain.close)
        self.addCleanup(impostor.close)
        names = {}
        for label, server in [("closed", closed), ("plain", plain), ("impostor", impostor)]:
            key = identity.NodeKey.generate()
            name = f"unproven-{label}.txt"
            names[name] = server.port
            answers = exchange(
                self.net.address,
                registration(key, server.port, {name: EVIL}, host="127.0.0.1"),
                signedBy(key, identity.REGISTER_PROOF),
                attackerSource(),
            )
            self.assertStatus(answers[-1], wire.OK)
            self.assertEqual(answers[-1].get("reachable"), "0", answers[-1])
        listed = listedPorts(self.net)
        for name, port in names.items():
            self.assertNotIn(port, listed)
            self.assertEqual(whohas(self.net, name), [])
        self.assertEqual(self.net.files("unproven-"), [])

    def test_deadReportsHideNobody(self) -> None:
        """
        DEAD reports in a loop for every listed peer, from several
        addresses, hide only the peer that is really gone (the relay's own
        check fails there); every live peer stays listed and serves.
        """
        peers = [(p.require("host"), p.port()) for p in self.net.peers()]
        self.assertIn(self.gone.port, [port for _, port in peers])
        nodes = [self.victim, self.bystander]
        proved = [sum("proving our key" in line for line in n.log) for n in nodes]
        statuses = set()
        for _ in range(3):
            source = attackerSource()
            for _ in range(4):
                for host, port in peers:
                    with connect(self.net.address, source) as s:
                        s.sendall(wire.request(wire.DEAD, host=host, port=port))
                        statuses.add(readMessage(s.makefile("rb")).status)
        self.assertIn(wire.OK, statuses)
        self.assertLessEqual(statuses, {wire.OK, wire.BUSY})
        # The relay checked each one itself: the live nodes were asked to prove their key ...
        for node, before in zip(nodes, proved):
            waitUntil(lambda: sum("proving our key" in line for line in node.log) > before, 5.0)
        # ... and the one that is gone, whose check failed, is hidden.
        waitUntil(lambda: self.gone.port not in listedPorts(self.net), 5.0)
        self.assertFetches("bystander.txt", BYSTANDER)
        self.assertEqual(sorted(listedPorts(self.net)), sorted(p for _, p in peers if p != self.gone.port))

    def test_trickleCut(self) -> None:
        """
        A request trickling in a byte a second is answered 408 and closed at
        the relay's negotiation deadline (2 s here); meanwhile an honest fetch works.
        """
        request = wire.request(wire.PEERS)
        with connect(self.net.address, attackerSource()) as s:
            started = time.monotonic()
            s.sendall(request[:1])
            self.assertFetches("victim.txt", VICTIM)  # while the trickle goes on
            answer = b""
            for sent, byte in enumerate(request[1:-1], 1):
                # The next byte is due a second after the last one; until
                # then, watch for the relay's answer.
                s.settimeout(max(0.01, started + sent - time.monotonic()))
                try:
                    answer = s.recv(4096)
                    break
                except socket.timeout:
                    s.sendall(bytes([byte]))
            cut = time.monotonic() - started
            s.settimeout(2)
            reader = s.makefile("rb")
            answer += reader.readline()
            self.assertEqual(reader.read(), b"", "closed after the 408")
        self.assertGreater(cut, 1.5)
        self.assertLess(cut, 4.5)
        self.assertStatus(wire.parseLine(answer.rstrip(b"\r\n")), wire.TIMEOUT)


class HeartbeatAttackTests(AttackerTestCase):
    """
    A relay granting a 2 s lifetime; a node heartbeating twice a second
    through an eavesdropper's proxy, to be killed, and a steady node
    holding the same file.
    """

    relayArgs = ("--ttl", "2")

    @classmethod
    def startNodes(cls, net: Network) -> None:
        cls.proxy = CaptureProxy(net.address)
        cls.doomed, cls.steady = net.nodesInParallel(
            (
                net.folder("doomed", {"shared.txt": SHARED}),
                *("--relay", cls.proxy.address, "--heartbeat", "0.5"),
            ),
            (net.folder("steady", {"shared.txt": SHARED}), "--heartbeat", "0.5"),
        )

    @classmethod
    def tearDownClass(cls) -> None:
        cls.proxy.close()
        super().tearDownClass()

    def test_strangerHeartbeatForKilledNode(self) -> None:
        """
        After a node is killed, strangers' HEARTBEATs for it (signed by
        another key, or a captured one replayed) are 401 and do not keep it
        alive: it leaves the list within its lifetime; the file still comes
        from the steady holder.
        """
        waitUntil(lambda: self.captures(wire.HEARTBEAT), 3.0)
        captured, proof = self.proxy.captured(wire.HEARTBEAT)
        port = self.net.listening(self.doomed)[1]
        node = [p.require("node") for p in self.net.peers() if p.port() == port][0]
        self.assertEqual(wire.parseLine(captured.rstrip(b"\r\n")).get("node"), node)
        self.doomed.stop(signal.SIGKILL)
        stranger = identity.NodeKey.generate()
        forged = wire.request(wire.HEARTBEAT, node=node)
        statuses: List[int] = []

        def attackAndLook() -> bool:
            signed = exchange(self.net.address, forged, signedBy(stranger, identity.HEARTBEAT_PROOF))
            statuses.append(signed[-1].status)
            statuses.append(exchange(self.net.address, captured, lambda nonce, req: proof)[-1].status)
            return port not in listedPorts(self.net)

        waitUntil(attackAndLook, 5.0)
        self.assertIn(wire.UNAUTHORIZED, statuses)
        self.assertLessEqual(set(statuses), {wire.UNAUTHORIZED, wire.NOT_FOUND})
        self.assertFetches("shared.txt", SHARED)

    def captures(self, verb: str) -> bool:
        try:
            self.proxy.captured(verb)
            return True
        except LookupError:
            return False


GET_ANSWERS = {
    # Self-consistent, but not what it registered: the substituted-content attack.
    "substituted": wire.status(wire.OK, size=len(EVIL), sha256=sha(EVIL), offset=0, length=len(EVIL)) + EVIL,
    # The registered size and hash, but a 5-byte range for a whole-file GET.
    "short": wire.status(wire.OK, size=len(VICTIM), sha256=sha(VICTIM), offset=0, length=5) + VICTIM[:5],
    "garbage": b"\x00\xff\xfeHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    # An error text meant for the user's terminal: retitle the window, clear the screen.
    "escapes": b"P2P/1 500 :\x1b]0;owned\x07\x1b[2Jdisk on fire\r\n",
}
HUGE = 10**15


class MaliciousNodeTests(AttackerTestCase):
    """
    A relay; fake nodes in the test process that registered properly (each
    listed first for a name of its own) and answer GET wrongly; a fake node
    announcing a 10^15-byte file; then an honest node holding every name.
    """

    @classmethod
    def startNodes(cls, net: Network) -> None:
        cls.fakes = {kind: FakeNode(answer) for kind, answer in GET_ANSWERS.items()}
        for kind, fake in cls.fakes.items():
            fake.register(net.address, {f"{kind}.txt": VICTIM})
        cls.huge = FakeNode(wire.status(wire.OK, size=HUGE, sha256=sha(b""), offset=0, length=HUGE))
        reply = exchange(
            net.address,
            wire.request(wire.REGISTER, key=cls.huge.key.public, port=cls.huge.port, files=1)
            + wire.item(wire.FILE, name="iso/huge.bin", size=HUGE, sha256=sha(b"x"))
            + wire.end(1),
            signedBy(cls.huge.key, identity.REGISTER_PROOF),
        )[-1]
        assert reply.get("reachable") == "1", reply
        net.node(net.folder("honest", {f"{kind}.txt": VICTIM for kind in GET_ANSWERS}))

    @classmethod
    def tearDownClass(cls) -> None:
        for fake in [*cls.fakes.values(), cls.huge]:
            fake.close()
        super().tearDownClass()

    def assertFailsOver(self, kind: str) -> bytes:
        """The fake holder is tried first and reported as a failed attempt; the honest one delivers."""
        fake = self.fakes[kind]
        self.assertIn(fake.port, [p.port() for p in whohas(self.net, f"{kind}.txt")])
        # The relay lists direct holders in random order: fetch until the fake
        # came first (twenty tries: a one-in-a-million chance it never does).
        for _ in range(20):
            result = self.assertFetches(f"{kind}.txt", VICTIM)
            if fake.gets:
                break
        self.assertEqual([m.get("name") for m in fake.gets], [f"{kind}.txt"])
        self.assertIn(f"peer 127.0.0.1:{fake.port}: ".encode(), result.stderr)
        self.assertIn(b"trying next", result.stderr)
        return result.stderr

    def test_substitutedContent(self) -> None:
        """A holder whose status line states another size and hash than it registered is a failed attempt."""
        self.assertFailsOver("substituted")

    def test_shortRange(self) -> None:
        """A holder answering a whole-file GET with length=5 is a failed attempt, not a crash."""
        self.assertFailsOver("short")

    def test_garbage(self) -> None:
        """A holder answering with bytes that are no status line is a failed attempt."""
        self.assertFailsOver("garbage")

    def test_escapesInErrorText(self) -> None:
        """A holder's error text with escape sequences reaches stderr escaped, no raw ESC or BEL."""
        stderr = self.assertFailsOver("escapes")
        self.assertNotIn(ESC, stderr)
        self.assertNotIn(b"\x07", stderr)
        self.assertIn(b"\\x1b]0;owned\\x07\\x1b[2Jdisk on fire", stderr)

    def test_escapedNameRefusedByRelay(self) -> None:
        """A REGISTER with an escape sequence in a name is 400, and --list shows nothing raw."""
        key = identity.NodeKey.generate()
        answers = register(self.net.address, key, self.huge.port, {"\x1b[2Jevil.txt": EVIL})
        self.assertStatus(answers[-1], wire.BAD_REQUEST)
        result = self.net.fetch("--list")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(ESC, result.stdout + result.stderr)
        self.assertNotIn(b"evil", result.stdout)

    def test_hugeSizeRefused(self) -> None:
        """
        A name announced at 10^15 bytes: p2p-fetch -o refuses with the
        free-space message before contacting anyone, and writes nothing.
        """
        out = self.net.root / "out-huge"
        out.mkdir()
        result = self.net.fetch("-o", str(out), "iso/huge.bin")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(b"not enough space in", result.stderr)
        self.assertIn(b"909.5 TiB", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertEqual(list(out.iterdir()), [])
        self.assertEqual(self.huge.gets, [])


class FakeRelay(Server):
    """
    A malicious relay in the test process: it lists a peer and a file whose
    id, host and name carry escape sequences, and refuses WHOHAS with an
    error text that does.
    """

    NAME = "\x1b[2Jevil\x1b]0;title\x07.txt"
    NODE = "\x1b]0;owned\x07"

    def __init__(self) -> None:
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket, reader) -> None:
        request = readMessage(reader)
        if request.word == wire.PEERS:
            items = [wire.item(wire.PEER, node=self.NODE, host="127.0.0.1\x1b[2J", port=9, files=1)]
        elif request.word == wire.SEARCH:
            items = [wire.item(wire.FILE, name=self.NAME, size=3, sha256=sha(b"abc"), holders=1)]
        else:
            conn.sendall(b"P2P/1 503 retry=1 :\x1b[2J\x1b]0;owned\x07 go away\r\n")
            return
        conn.sendall(
            b"P2P/1 200 count=1 :\x1b[2J\r\n" + b"".join(items) + wire.end(1)
        )


class MaliciousRelayTests(SynchronousTestCase):
    """p2p-fetch against a relay that puts escape sequences in its listings and errors."""

    def setUp(self) -> None:
        self.relay = FakeRelay()
        self.addCleanup(self.relay.close)

    def fetch(self, *args: str):
        result = subprocess.run(
            script("p2p-fetch") + ["--relay", self.relay.address, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertNotIn(ESC, result.stdout + result.stderr)
        self.assertNotIn(b"\x07", result.stdout + result.stderr)
        return result

    def test_peersEscaped(self) -> None:
        """--peers shows a listed peer's id and host with their escape sequences made visible."""
        result = self.fetch("--peers")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"\\x1b]0;owned\\x07", result.stdout)
        self.assertIn(b"127.0.0.1\\x1b[2J", result.stdout)

    def test_listEscaped(self) -> None:
        """--list shows a listed name with its escape sequences made visible."""
        result = self.fetch("--list")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"\\x1b[2Jevil\\x1b]0;title\\x07.txt", result.stdout)

    def test_errorTextEscaped(self) -> None:
        """The relay's error text with escape sequences reaches stderr escaped."""
        result = self.fetch("a.txt")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(b"\\x1b[2J\\x1b]0;owned\\x07 go away", result.stderr)
