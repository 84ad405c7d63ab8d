"""
End to end on loopback: a node the relay cannot reach.  The node is
started with ``--advertise 127.0.0.1:PORT`` where PORT is a port nothing
listens on, so the relay's dial-back is refused: it records the node
firewalled, the node keeps a control connection, and ``p2p-fetch`` gets
its files by a reverse connection (the node connects out to the client)
or, with ``--no-listen``, through a circuit at the relay.  The real
``twistd relay``, ``twistd peernode`` and ``p2p-fetch``, as a user runs
them; the bytes are checked here as well as by the client's hashes.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time

from .support import Network, NetworkTestCase

# More than a circuit's buffers in either direction, and every byte value.
BLOB = bytes(range(256)) * 4096 + os.urandom(3 * 1024 * 1024 + 555)
PIECES = os.urandom(64 * 16 * 1024)  # 64 pieces of 16 KiB, as many as 256 MiB in 4 MiB pieces
SMALL = b"served over whatever path works\n"


def closedPort() -> int:
    """A loopback port that nothing listens on (the OS picked it, then it was closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NODE_OPEN = re.compile(r"control connection to relay \S+ open")
RELAY_OPEN = re.compile(r"control connection from (\S+) at \S+ open")


def firewalledNode(net: Network, folder, port: int, *extra: str):
    """
    A node advertising 127.0.0.1:PORT (closed), once the relay has registered
    it and both ends have logged its control connection open (the relay's
    log is read apart from the node's, so both are waited for).
    """
    node = net.node(folder, "--advertise", f"127.0.0.1:{port}", *extra)
    node.waitFor(NODE_OPEN)
    net.relay.waitFor(RELAY_OPEN)
    return node


class FirewalledNodeTests(NetworkTestCase):
    """A relay and one node whose advertised address refuses connections."""

    @classmethod
    def startNodes(cls, net: Network) -> None:
        cls.port = closedPort()
        cls.folder = net.folder("firewalled", {"blob.bin": BLOB, "small.txt": SMALL})
        cls.node = firewalledNode(net, cls.folder, cls.port)

    def listed(self):
        return [p for p in self.net.peers() if p.port() == self.port]

    def test_listedFirewalled(self) -> None:
        """The relay lists the node at its advertised address with reach=firewalled."""
        (peer,) = self.listed()
        self.assertEqual((peer.require("host"), peer.get("reach")), ("127.0.0.1", "firewalled"))

    def test_reverse(self) -> None:
        """A client that can listen gets the file by a reverse connection and says so."""
        out = self.net.root / "out-reverse"
        result = self.net.fetch("-o", str(out), "blob.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b" via reverse connection", result.stderr)
        self.assertTrue((out / "blob.bin").read_bytes() == BLOB)

    def test_reverseJSON(self) -> None:
        """The --json record of a reverse fetch says "path": "reverse"."""
        out = self.net.root / "out-reverse-json"
        result = self.net.fetch("--json", "-o", str(out), "small.txt")
        self.assertEqual(result.returncode, 0, result.stderr)
        record = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual((record["ok"], record["path"]), (True, "reverse"))
        self.assertEqual((out / "small.txt").read_bytes(), SMALL)

    def test_relayed(self) -> None:
        """--no-listen: the file comes through the relay, byte-exact, and the client says so."""
        out = self.net.root / "out-relay"
        result = self.net.fetch("--no-listen", "-o", str(out), "blob.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b" via relay", result.stderr)
        self.assertTrue((out / "blob.bin").read_bytes() == BLOB)

    def test_relayedJSON(self) -> None:
        """The --json record of a relayed fetch says "path": "relay"."""
        out = self.net.root / "out-relay-json"
        result = self.net.fetch("--no-listen", "--json", "-o", str(out), "small.txt")
        self.assertEqual(result.returncode, 0, result.stderr)
        record = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual((record["ok"], record["path"]), (True, "relay"))
        self.assertEqual((out / "small.txt").read_bytes(), SMALL)

    def test_relayedToStdout(self) -> None:
        """A relayed fetch to stdout delivers the exact bytes."""
        result = self.net.fetch("--no-listen", "blob.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout == BLOB, f"{len(result.stdout)} bytes, not {len(BLOB)}")


class ControlConnectionTests(NetworkTestCase):
    """A relay whose entries live 3 s, and a firewalled node heartbeating over its control connection."""

    relayArgs = ("--ttl", "1")

    @classmethod
    def startNodes(cls, net: Network) -> None:
        cls.port = closedPort()
        cls.node = firewalledNode(net, net.folder("firewalled", {"small.txt": SMALL}), cls.port)

    def opened(self) -> int:
        return sum(1 for line in self.net.relay.log if RELAY_OPEN.search(line))

    def test_keptOpen(self) -> None:
        """
        Over three TTLs the node stays listed (firewalled) on its one control
        connection: no second one opens and it does not register again.
        """
        self.assertEqual(self.opened(), 1, "".join(self.net.relay.log))
        registrations = self.net.registrations(self.port)
        time.sleep(3)  # three TTLs: an unheartbeaten control connection or entry would be gone
        self.assertEqual([p.get("reach") for p in self.net.peers() if p.port() == self.port], ["firewalled"])
        self.assertEqual((self.opened(), self.net.registrations(self.port)), (1, registrations))


class NoRelayingTests(NetworkTestCase):
    """A relay started with --no-relaying, and a firewalled node."""

    relayArgs = ("--no-relaying",)

    @classmethod
    def startNodes(cls, net: Network) -> None:
        folder = net.folder("firewalled", {"small.txt": SMALL})
        cls.node = firewalledNode(net, folder, closedPort())

    def test_relayedRefused(self) -> None:
        """
        --no-listen against --no-relaying: not fetched, exit status 1; the
        relay's reason is one line on stderr and in the --json record's attempts.
        """
        out = self.net.root / "out-refused"
        result = self.net.fetch("--no-listen", "--json", "-o", str(out), "small.txt")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertFalse((out / "small.txt").exists())
        stderr = result.stderr.decode()
        self.assertNotIn("Traceback", stderr)
        self.assertEqual(len([line for line in stderr.splitlines() if "does not relay" in line]), 1, stderr)
        self.assertIn("p2p-fetch: small.txt: not fetched: ", stderr)
        record = json.loads(result.stdout.splitlines()[-1])
        self.assertFalse(record["ok"])
        self.assertEqual(len(record["attempts"]), 1, record)
        self.assertIn("503 this relay does not relay", record["attempts"][0]["error"])

    def test_reverseStillWorks(self) -> None:
        """--no-relaying leaves the reverse path: a client that can listen still gets the file."""
        out = self.net.root / "out-reverse"
        result = self.net.fetch("--json", "-o", str(out), "small.txt")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout.splitlines()[-1])["path"], "reverse")
        self.assertEqual((out / "small.txt").read_bytes(), SMALL)


class ManyPiecesTests(NetworkTestCase):
    """
    A firewalled node cutting files into 16 KiB pieces, and a file of 64
    of them, as many as a 256 MiB file has at the default piece size: each
    piece is one REVERSE or RELAY request, so the relay's allowance of
    path requests per address must not starve one fetch (at 20 at once,
    the fetch never finished: every request past them was refused or
    cancelled).
    """

    @classmethod
    def startNodes(cls, net: Network) -> None:
        folder = net.folder("pieces", {"pieces.bin": PIECES})
        cls.node = firewalledNode(net, folder, closedPort(), "--piece-size", "16K")

    def fetched(self, *args: str) -> dict:
        out = self.net.root / f"out-pieces{len(args)}"
        try:
            result = self.net.fetch("--json", "-o", str(out), *args, "pieces.bin", timeout=10)
        except subprocess.TimeoutExpired as e:
            self.fail(f"not fetched in 10 s: {(e.stderr or b'').decode()[-500:]}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue((out / "pieces.bin").read_bytes() == PIECES)
        return json.loads(result.stdout.splitlines()[-1])

    def test_reverse(self) -> None:
        """A file of 64 pieces comes by reverse connections, one per piece."""
        self.assertEqual(self.fetched()["path"], "reverse")

    def test_relayed(self) -> None:
        """A file of 64 pieces comes through the relay, one circuit per piece."""
        self.assertEqual(self.fetched("--no-listen")["path"], "relay")
