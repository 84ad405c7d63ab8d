"""
End-to-end: a registry that stays true (expiry, unregistering, relay
restarts, new files) and the interactive peer serving while it downloads.
Real daemons on loopback, as in test_e2e.
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
from typing import Callable

from twisted.trial.unittest import SynchronousTestCase

from p2prelay import wire
from p2prelay.cli.demo import script

from .test_e2e import LOOPBACK, Network


def waitUntil(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> float:
    """Seconds until predicate held; fails the test past timeout."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)
    return time.monotonic() - started


def peerCount(net: Network) -> int:
    result = net.fetch("--peers", timeout=20)
    return len(result.stdout.splitlines()) if result.returncode == 0 else -1


class ExpiryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = Network(self, ["--ttl", "4"])

    def test_killedNodeExpires(self) -> None:
        """With --ttl 4 --heartbeat 1, a SIGKILLed node is gone from --peers within 6 s."""
        node = self.net.node(self.net.folder("a", {"a.txt": "a"}), "--heartbeat", "1")
        self.assertEqual(peerCount(self.net), 1)
        node.stop(signal.SIGKILL)
        elapsed = waitUntil(lambda: peerCount(self.net) == 0, 6.0)
        self.assertLess(elapsed, 6.0)

    def test_terminatedNodeUnregisters(self) -> None:
        """A node stopped with SIGTERM vanishes from --peers at once."""
        node = self.net.node(self.net.folder("a", {"a.txt": "a"}), "--heartbeat", "1")
        node.stop(signal.SIGTERM)
        self.assertEqual(peerCount(self.net), 0)

    def test_heartbeatsKeepNodeAlive(self) -> None:
        """A live node outlives its TTL thanks to heartbeats."""
        self.net.node(self.net.folder("a", {"a.txt": "a"}), "--heartbeat", "1")
        time.sleep(5)
        self.assertEqual(peerCount(self.net), 1)


class RestartTests(SynchronousTestCase):
    def restart(self, net: Network, extra=()) -> float:
        """Kill the relay and start a new one on the same port; returns its start time."""
        port = net.address.rsplit(":", 1)[1]
        net.relay.stop(signal.SIGKILL)
        net.relay = net.daemon(
            ["relay", "--port", f"tcp:{port}:interface=127.0.0.1", "--ttl", "4", *extra]
        )
        net.relay.listening()
        return time.monotonic()

    def test_relayRestartWithoutState(self) -> None:
        """A relay restarted with no state has every node back within 3 s."""
        net = Network(self, ["--ttl", "4"])
        for name in ("a", "b"):
            net.node(net.folder(name, {f"{name}.txt": name}), "--heartbeat", "1")
        self.restart(net)
        waitUntil(lambda: peerCount(net) == 2, 3.0)
        result = net.fetch("b.txt")
        self.assertEqual((result.returncode, result.stdout), (0, b"b"), result.stderr)

    def test_relayRestartWithState(self) -> None:
        """A relay restarted with --state answers at once with the live peers."""
        state = str(Path(self.mktemp()).resolve())
        net = Network(self, ["--ttl", "4", "--state", state])
        net.node(net.folder("a", {"a.txt": "a"}), "--heartbeat", "1")
        time.sleep(1)  # let the coalesced save happen
        self.restart(net, ["--state", state])
        # Asked straight away, before any heartbeat could re-register it.
        result = net.fetch("a.txt")
        self.assertEqual((result.returncode, result.stdout), (0, b"a"), result.stderr)

    def test_nodeStartsBeforeRelay(self) -> None:
        """A node started before its relay registers once the relay comes up."""
        net = Network(self, ["--ttl", "4"])
        port = net.address.rsplit(":", 1)[1]
        net.relay.stop(signal.SIGKILL)
        folder = net.folder("early", {"early.txt": "early"})
        node = net.daemon(
            ["peernode", "--relay", net.address, "--dir", str(folder), "--port", LOOPBACK,
             "--heartbeat", "1"]
        )
        node.waitFor(re.compile("relay unreachable"))
        net.relay = net.daemon(["relay", "--port", f"tcp:{port}:interface=127.0.0.1", "--ttl", "4"])
        net.relay.listening()
        waitUntil(lambda: peerCount(net) == 1, 3.0)
        result = net.fetch("early.txt")
        self.assertEqual((result.returncode, result.stdout), (0, b"early"), result.stderr)

    def test_corruptStateFile(self) -> None:
        """A corrupt state file is moved aside and the relay starts empty."""
        state = Path(self.mktemp()).resolve()
        state.write_bytes(b"this is not sqlite" * 100)
        net = Network(self, ["--state", str(state)])
        self.assertEqual(peerCount(net), 0)
        self.assertTrue(list(state.parent.glob(state.name + ".corrupt-*")))


class NewFileTests(SynchronousTestCase):
    def test_newFileBecomesFetchable(self) -> None:
        """A file dropped into a shared folder is fetchable after the next rescan."""
        net = Network(self)
        folder = net.folder("a", {"old.txt": "old"})
        net.node(folder, "--rescan", "1")
        (folder / "new.txt").write_text("new")
        waitUntil(lambda: net.fetch("--list", "new.txt").stdout.count(b"new.txt") == 1, 5.0)
        result = net.fetch("new.txt")
        self.assertEqual((result.returncode, result.stdout), (0, b"new"), result.stderr)

    def test_listAndJson(self) -> None:
        """--list prints a table; --json the same records for scripts."""
        net = Network(self)
        net.node(net.folder("a", {"x.txt": "x", "y.bin": "yy"}))
        table = net.fetch("--list", "*.txt").stdout.decode()
        self.assertIn("x.txt", table)
        self.assertNotIn("y.bin", table)
        records = net.fetch("--list", "--json").stdout.decode().splitlines()
        self.assertEqual(len(records), 2)
        self.assertIn('"name": "y.bin"', records[1])


class SlowPeer:
    """
    A peer that sends the first half of a file, then waits to be released:
    it keeps a download in progress for as long as a test needs.
    """

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.halfSent = threading.Event()
        self.release = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.recv(65536)
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
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                wire.request(wire.REGISTER, node="slowpeer", port=self.port, files=1)
                + wire.item(wire.FILE, name=name, size=len(self.content), sha256=digest)
                + wire.end(1)
            )
            self.reply = s.recv(4096)

    def close(self) -> None:
        self.release.set()
        self.server.close()


class InteractivePeerTests(SynchronousTestCase):
    def test_servesWhileDownloading(self) -> None:
        """
        The seeds' concurrency scenario: peer A downloads a large file from
        peer C while peer B downloads another file from peer A; both verified.
        """
        net = Network(self)
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

        expect(r"p2p-peer: sharing 1 file\(s\)")
        type("3\nbig.bin\n")
        self.assertTrue(slow.halfSent.wait(20), "A never started downloading from C")

        # While A's download is stuck half way, B fetches from A.
        result = net.fetch("a.txt")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"served by A while it downloads\n")
        type("5\n")
        progress = expect(r"big\.bin: \d+/\d+ bytes")
        self.assertIn(f"/{len(big)} bytes", progress)

        slow.release.set()
        expect("big.bin: done")
        self.assertEqual((folderA / "big.bin").read_bytes(), big)
        # Announced at once: the relay now names A as a holder too.
        listing = net.fetch("--list", "big.bin").stdout.decode()
        self.assertRegex(listing, r"big\.bin\s+\d+\s+2 ")
        type("6\n")
        self.assertEqual(a.wait(20), 0)
