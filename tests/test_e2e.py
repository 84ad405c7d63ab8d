"""
End-to-end: the real ``twistd relay``, ``twistd peernode`` and ``p2p-fetch``
as subprocesses on OS-chosen loopback ports, exactly as a user runs them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional

from twisted.trial.unittest import SynchronousTestCase

from p2prelay.cli.demo import REGISTERED, Daemon, script

LOOPBACK = "tcp:0:interface=127.0.0.1"


class Network:
    """A relay and any number of nodes, torn down by the test's cleanup."""

    def __init__(self, case: SynchronousTestCase, relayArgs: List[str] = ()) -> None:
        self.case = case
        self.root = Path(case.mktemp()).resolve()
        self.root.mkdir()
        self.relay = self.daemon(["relay", "--port", LOOPBACK, *relayArgs])
        host, port = self.relay.listening()
        self.address = f"{host}:{port}"
        self.nodes: List[Daemon] = []

    def daemon(self, args: List[str]) -> Daemon:
        d = Daemon(args, cwd=str(self.root))
        self.case.addCleanup(d.stop, signal.SIGKILL)
        return d

    def folder(self, name: str, files: dict) -> Path:
        folder = self.root / name
        folder.mkdir()
        for fname, content in files.items():
            path = folder / fname
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return folder

    def node(self, folder: Path, *extra: str) -> Daemon:
        d = self.daemon(
            ["peernode", "--relay", self.address, "--dir", str(folder), "--port", LOOPBACK, *extra]
        )
        d.listening()
        d.waitFor(REGISTERED)
        self.nodes.append(d)
        return d

    def fetch(self, *args: str, input: Optional[bytes] = None, timeout: float = 60):
        env = dict(os.environ, P2PRELAY_RELAY=self.address)
        return subprocess.run(
            script("p2p-fetch") + list(args),
            env=env,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd=str(self.root),
        )


class SeedScenarioTests(SynchronousTestCase):
    """The seeds' scenario: three nodes, a file each, fetched and printed."""

    def setUp(self) -> None:
        self.net = Network(self)
        self.contents = {}
        for i in (1, 2, 3):
            text = f"Hello from peer {i}.\nThis is sample{i}.txt.\n".encode()
            self.contents[f"sample{i}.txt"] = text
            self.net.node(self.net.folder(f"peer{i}", {f"sample{i}.txt": text}))

    def test_eachFilePrinted(self) -> None:
        """Each sample file, fetched by name, is printed byte for byte on stdout."""
        for name, content in self.contents.items():
            result = self.net.fetch(name)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stdout, content)

    def test_peers(self) -> None:
        """--peers prints the three active peers, one per line, with host and port."""
        result = self.net.fetch("--peers")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.decode().splitlines()
        self.assertEqual(len(lines), 3)
        for line in lines:
            self.assertRegex(line, r"^127\.0\.0\.1:\d+ ")

    def test_parallelIntoDirectory(self) -> None:
        """Several names (separate and as a comma list) are saved into -o DIR, verified."""
        out = self.net.root / "out"
        result = self.net.fetch("-o", str(out), "sample1.txt, sample2.txt", "sample3.txt")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"")
        for name, content in self.contents.items():
            self.assertEqual((out / name).read_bytes(), content)
        self.assertEqual(sorted(p.name for p in out.iterdir()), sorted(self.contents))

    def test_missingFile(self) -> None:
        """A file nobody has: exit 1, a one-line error, nothing written."""
        out = self.net.root / "out"
        result = self.net.fetch("-o", str(out), "nope.txt")
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"nope.txt: not fetched", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertEqual(list(out.iterdir()) if out.exists() else [], [])

    def test_existingFileNotClobbered(self) -> None:
        """-o never replaces an existing file unless --force is given."""
        out = self.net.root / "out"
        out.mkdir()
        (out / "sample1.txt").write_bytes(b"mine")
        result = self.net.fetch("-o", str(out), "sample1.txt")
        self.assertEqual(result.returncode, 1)
        self.assertEqual((out / "sample1.txt").read_bytes(), b"mine")
        result = self.net.fetch("-o", str(out), "--force", "sample1.txt")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual((out / "sample1.txt").read_bytes(), self.contents["sample1.txt"])

    def test_interactive(self) -> None:
        """With no name, names are read from stdin until quit; the prompt goes to stderr."""
        result = self.net.fetch(input=b"sample1.txt\nSend sample2.txt, sample3.txt\nquit\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout,
            self.contents["sample1.txt"] + self.contents["sample2.txt"] + self.contents["sample3.txt"],
        )
        self.assertIn(b"file name", result.stderr)


class TransferTests(SynchronousTestCase):
    def test_binaryFile(self) -> None:
        """A binary file with every byte value arrives byte-exact on stdout."""
        net = Network(self)
        content = bytes(range(256)) * 4096 + os.urandom(12345)
        net.node(net.folder("bin", {"data/blob.bin": content}))
        result = net.fetch("data/blob.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, content)

    def test_failoverWhenNodeKilled(self) -> None:
        """
        A holder killed with SIGKILL is skipped: the next peer delivers, and
        the client's report makes the relay stop handing the dead one out.
        """
        net = Network(self)
        content = b"shared by two\n"
        first = net.node(net.folder("a", {"both.txt": content}))
        net.node(net.folder("b", {"both.txt": content}))
        first.stop(signal.SIGKILL)
        result = net.fetch("both.txt")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, content)
        self.assertIn(b"connection refused, trying next", result.stderr)
        peers = net.fetch("--peers")
        self.assertEqual(len(peers.stdout.splitlines()), 1, peers.stdout)

    def test_unusualName(self) -> None:
        """A name with spaces, '=', ':' and non-ASCII travels intact."""
        net = Network(self)
        name = "notes/my report = draft: \u00e9t\u00e9 \u2603.txt"
        net.node(net.folder("a", {name: "snow"}))
        result = net.fetch(name)
        self.assertEqual((result.returncode, result.stdout), (0, b"snow"), result.stderr)
        out = net.root / "out"
        result = net.fetch("-o", str(out), name)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual((out / name).read_bytes(), b"snow")

    def test_relayUnreachable(self) -> None:
        """A relay nobody listens on: exit 3 within seconds, one clear line."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            script("p2p-fetch") + ["--relay", f"127.0.0.1:{port}", "x.txt"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn(b"unreachable", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertEqual(result.stdout, b"")

    def test_usageError(self) -> None:
        """A bad option value is a usage error: exit 2."""
        result = subprocess.run(
            script("p2p-fetch") + ["--parallel", "0", "x"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 2)


class UDPTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = Network(self)
        self.content = os.urandom(3 * 1024 * 1024 + 777)

    def test_udpMultiMegabyte(self) -> None:
        """p2p-fetch --udp delivers a multi-megabyte binary file, verified, to stdout and -o."""
        self.net.node(self.net.folder("u", {"blob.bin": self.content}))
        result = self.net.fetch("--udp", "blob.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, self.content)
        out = self.net.root / "out"
        result = self.net.fetch("--udp", "--udp-block", "16384", "-o", str(out), "blob.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual((out / "blob.bin").read_bytes(), self.content)

    def test_udpFailoverPastNodeWithoutUDP(self) -> None:
        """A holder started with --no-udp counts as a failed attempt; the next peer delivers."""
        self.net.node(self.net.folder("a", {"blob.bin": self.content}), "--no-udp")
        self.net.node(self.net.folder("b", {"blob.bin": self.content}))
        result = self.net.fetch("--udp", "blob.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, self.content)
        self.assertIn(b"peer serves no UDP, trying next", result.stderr)

    def test_udpMissingFile(self) -> None:
        """Over UDP, a missing file is a 404 from every peer and exit 1."""
        self.net.node(self.net.folder("a", {"x": "x"}))
        result = self.net.fetch("--udp", "nope.bin")
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"404", result.stderr)


class PipeTests(SynchronousTestCase):
    def test_stdoutClosedEarly(self) -> None:
        """'p2p-fetch big | head -c 10': the reader gets its bytes, no traceback, exit 0."""
        net = Network(self)
        net.node(net.folder("a", {"big.bin": os.urandom(8 * 1024 * 1024)}))
        env = dict(os.environ, P2PRELAY_RELAY=net.address)
        fetch = subprocess.Popen(
            script("p2p-fetch") + ["big.bin"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.assertEqual(len(fetch.stdout.read(10)), 10)
        fetch.stdout.close()
        stderr = fetch.stderr.read()
        self.assertEqual(fetch.wait(30), 0, stderr)
        self.assertNotIn(b"Traceback", stderr)


class StartupTests(SynchronousTestCase):
    def test_portTaken(self) -> None:
        """A relay whose port is taken exits 1 at once with one clear line, no traceback."""
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            result = subprocess.run(
                script("twistd") + ["-n", "--pidfile=", "relay", "--port", f"tcp:{port}:interface=127.0.0.1"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=30,
            )
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("relay cannot listen on", result.stdout)
        self.assertIn("Address already in use", result.stdout)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
