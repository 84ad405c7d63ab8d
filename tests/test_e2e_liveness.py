"""
End-to-end: a registry that stays true (expiry, unregistering, relay
restarts, state files) and the interactive peer serving while it
downloads.  Real daemons on loopback, as in test_e2e; every wait is on
something the relay or a log shows, with a deadline.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from p2prelay import identity, wire
from p2prelay.human import humanSize
from p2prelay.relay.store import StateStore

from .support import LOOPBACK, Network, NetworkTestCase, script, waitUntil

TTL = 2.0
HEARTBEAT = "0.5"


class ExpiryTests(NetworkTestCase):
    """
    A relay granting a 2 s lifetime and nodes heartbeating twice a second:
    one left alone, one to be killed, one to be stopped.
    """

    relayArgs = ("--ttl", str(TTL))

    @classmethod
    def startNodes(cls, net: Network) -> None:
        cls.steady = net.node(net.folder("steady", {"s.txt": "s"}), "--heartbeat", HEARTBEAT)
        cls.steadySince = time.monotonic()
        cls.victim, cls.leaver = net.nodesInParallel(
            (net.folder("victim", {"v.txt": "v"}), "--heartbeat", HEARTBEAT),
            (net.folder("leaver", {"l.txt": "l"}), "--heartbeat", HEARTBEAT),
        )
        cls.victimExpiredAfter = None

    def ports(self) -> list:
        return [p.port() for p in self.net.peers()]

    def killVictim(self) -> float:
        """SIGKILL the victim (once) and wait for the relay to drop it; seconds that took."""
        cls = type(self)
        if cls.victimExpiredAfter is None:
            port = self.net.listening(self.victim)[1]
            self.assertIn(port, self.ports())
            self.victim.stop(signal.SIGKILL)
            cls.victimExpiredAfter = waitUntil(lambda: port not in self.ports(), TTL + 3)
        return cls.victimExpiredAfter

    def test_killedNodeExpires(self) -> None:
        """A SIGKILLed node is gone from the relay's peers within its lifetime and a sweep or two."""
        self.assertLess(self.killVictim(), TTL + 2)

    def test_heartbeatsKeepNodeAlive(self) -> None:
        """
        A live node outlives its lifetime thanks to heartbeats: when the
        killed one has expired it is still listed, never having had to
        register again.
        """
        self.killVictim()
        self.assertGreater(time.monotonic() - self.steadySince, TTL)
        port = self.net.listening(self.steady)[1]
        self.assertIn(port, self.ports())
        self.assertEqual(self.net.registrations(port), 1, "it expired and registered again")

    def test_terminatedNodeUnregisters(self) -> None:
        """A node stopped with SIGTERM has left the relay's peers by the time it has exited."""
        port = self.net.listening(self.leaver)[1]
        self.assertIn(port, self.ports())
        # Exited of its own accord (twistd re-raises the signal), not killed after a timeout.
        self.assertIn(self.leaver.stop(signal.SIGTERM), (0, -signal.SIGTERM))
        self.assertNotIn(port, self.ports())


def holders(net: Network, name: str) -> list:
    """Ports of the peers the relay names as holding ``name``; [] while it does not answer."""
    try:
        return [p.port() for p in net.query(wire.request(wire.WHOHAS, name=name))[1:]]
    except OSError:
        return []


class RestartTests(SynchronousTestCase):
    """
    Relay restarts.  Each test restarts its own relay, so the relay is what
    is under test and no daemon set is shared.
    """

    def network(self, *relayArgs: str) -> Network:
        net = Network(relayArgs=relayArgs)
        self.addCleanup(net.close)
        return net

    def test_relayRestartWithoutState(self) -> None:
        """A relay restarted with no state has every node back within 3 s."""
        net = self.network("--ttl", "4")
        nodes = net.nodesInParallel(
            *[(net.folder(name, {f"{name}.txt": name}), "--heartbeat", HEARTBEAT) for name in "ab"]
        )
        net.restartRelay("--ttl", "4")
        waitUntil(lambda: net.peerCount() == 2, 3.0)
        self.assertEqual(holders(net, "b.txt"), [net.listening(nodes[1])[1]])

    def test_relayRestartWithState(self) -> None:
        """A relay SIGKILLed and restarted with --state answers at once with the live peers."""
        state = Path(self.mktemp()).resolve()
        net = self.network("--state", str(state))
        # A heartbeat far away: only the state file can bring this node back.
        node = net.node(net.folder("a", {"a.txt": "a"}), "--heartbeat", "600")
        waitUntil(lambda: len(StateStore(state).load()) == 1, 5.0)
        net.restartRelay("--state", str(state))
        self.assertEqual(holders(net, "a.txt"), [net.listening(node)[1]])
        result = net.fetch("a.txt")
        self.assertEqual((result.returncode, result.stdout), (0, b"a"), result.stderr)

    def test_nodeStartsBeforeRelay(self) -> None:
        """A node started before its relay registers once the relay comes up."""
        net = self.network()
        net.relay.stop(signal.SIGKILL)
        node = net.startNode(net.folder("early", {"early.txt": "early"}), "--heartbeat", "1")
        node.waitFor(re.compile(r"relay \S+ unreachable"))
        net.restartRelay()
        net.registered(node)
        self.assertEqual(holders(net, "early.txt"), [net.listening(node)[1]])

    def test_corruptStateFile(self) -> None:
        """A corrupt state file is moved aside and the relay starts empty."""
        state = Path(self.mktemp()).resolve()
        state.write_bytes(b"this is not sqlite" * 100)
        net = self.network("--state", str(state))
        self.assertEqual(net.peerCount(), 0)
        self.assertTrue(list(state.parent.glob(state.name + ".corrupt-*")))


class SlowPeer:
    """
    A peer that sends the first half of a file, then waits to be released:
    it keeps a download in progress for as long as a test needs.
    """

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.halfSent = threading.Event()
        self.release = threading.Event()
        self.key = identity.NodeKey.generate()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.server.accept()
            request = wire.parseLine(conn.recv(65536).rstrip(b"\r\n"))
            if request.word != wire.PROVE:
                break
            with conn:  # the relay's dial-back: prove our key here
                sig = self.key.prove(identity.DIALBACK_PROOF, request.nonce(), b"")
                conn.sendall(wire.status(200, key=self.key.public, sig=sig))
        with conn:
            digest = hashlib.sha256(self.content).hexdigest()
            size = len(self.content)
            conn.sendall(wire.status(200, size=size, sha256=digest, offset=0, length=size))
            conn.sendall(self.content[: size // 2])
            self.halfSent.set()
            self.release.wait(30)
            conn.sendall(self.content[size // 2 :])

    def register(self, relay: str, name: str) -> None:
        host, port = relay.rsplit(":", 1)
        digest = hashlib.sha256(self.content).hexdigest()
        request = (
            wire.request(wire.REGISTER, key=self.key.public, port=self.port, files=1)
            + wire.item(wire.FILE, name=name, size=len(self.content), sha256=digest)
            + wire.end(1)
        )
        with socket.create_connection((host, int(port))) as s:
            s.sendall(request)
            challenge = wire.parseLine(s.recv(4096).rstrip(b"\r\n"))  # 100 nonce=
            sig = self.key.prove(identity.REGISTER_PROOF, challenge.nonce(), request)
            s.sendall(wire.request(wire.PROOF, sig=sig))
            self.reply = s.recv(4096)

    def close(self) -> None:
        self.release.set()
        self.server.close()


class InteractivePeerTests(NetworkTestCase):
    """A relay, a peer that serves slowly, and the interactive p2p-peer."""

    def test_servesWhileDownloading(self) -> None:
        """
        The seeds' concurrency scenario: peer A downloads a large file from
        peer C while peer B downloads another file from peer A; both verified.
        """
        net = self.net
        big = os.urandom(8 * 1024 * 1024)
        slow = SlowPeer(big)
        self.addCleanup(slow.close)
        slow.register(net.address, "big.bin")
        self.assertIn(b" 200 ", slow.reply)
        folderA = net.folder("A", {"a.txt": "served by A while it downloads\n"})

        a = subprocess.Popen(
            script("p2p-peer") + ["--relay", net.address, "--dir", str(folderA), "--port", LOOPBACK],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(lambda: a.poll() is None and (a.kill(), a.wait()))
        lines: "queue.Queue[str]" = queue.Queue()

        def read() -> None:
            for raw in iter(a.stdout.readline, b""):
                lines.put(raw.decode("utf-8", "replace"))

        threading.Thread(target=read, daemon=True).start()

        def expect(pattern: str, timeout: float = 20) -> str:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    continue
                if re.search(pattern, line):
                    return line
            raise AssertionError(f"p2p-peer never printed {pattern!r}")

        def type(text: str) -> None:
            a.stdin.write(text.encode())
            a.stdin.flush()

        expect(r"p2p-peer: sharing 1 file ")
        type("3\nbig.bin\n")
        self.assertTrue(slow.halfSent.wait(20), "A never started downloading from C")

        # While A's download is stuck half way, B fetches from A.
        result = net.fetch("a.txt")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"served by A while it downloads\n")
        type("5\n")
        progress = expect(r"big\.bin +\S+ \S+ of \S+ \S+ +\d+%")
        self.assertIn(f" of {humanSize(len(big))} ", progress)

        slow.release.set()
        expect("big.bin: done")
        self.assertEqual((folderA / "big.bin").read_bytes(), big)
        # Announced at once: the relay now names A as a holder too.
        [listed] = net.files("big.bin")
        self.assertEqual(listed.integer("holders"), 2)
        type("6\n")
        self.assertEqual(a.wait(20), 0)
