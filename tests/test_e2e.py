"""
End-to-end smoke tests: the real ``twistd relay``, ``twistd peernode`` and
``p2p-fetch`` as subprocesses on OS-chosen loopback ports, exactly as a
user runs them.

They check what only real processes show -- the plugins start, register
and serve, real stdin/stdout/pipes, real UDP sockets, a real SIGKILL.  The
command's options, exit statuses and output are specified in process in
``test_cli_fetch``.  One daemon set serves every test of a class.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from .support import Network, NetworkTestCase, script, waitUntil

SAMPLES = {
    f"sample{i}.txt": f"Hello from peer {i}.\nThis is sample{i}.txt.\n".encode() for i in (1, 2, 3)
}
# Every byte value, and more than a pipe buffer, a UDP window and a stdout chunk.
BLOB = bytes(range(256)) * 8192 + os.urandom(1024 * 1024 + 777)
SHARED = b"shared by two\n"


class SeedNetworkTests(NetworkTestCase):
    """
    The seeds' network: a relay and three nodes with a sample file each,
    plus nodes sharing a large binary file (the first without UDP), two
    nodes sharing one small file (the first to be killed) and a node that
    rescans its folder twice a second.
    """

    @classmethod
    def startNodes(cls, net: Network) -> None:
        # The relay lists holders of one tier in random order: tests that
        # need one of these two tried first fetch until it was (fetchUntil).
        cls.noUDP, cls.doomed = net.nodesInParallel(
            (net.folder("noudp", {"blob.bin": BLOB}), "--no-udp"),
            (net.folder("doomed", {"both.txt": SHARED}),),
        )
        cls.seeds = net.nodesInParallel(
            *[(net.folder(f"peer{i}", {name: SAMPLES[name]}),) for i, name in enumerate(SAMPLES, 1)],
            (net.folder("udp", {"blob.bin": BLOB}),),
            (net.folder("backup", {"both.txt": SHARED}),),
        )[:3]
        cls.growing = net.folder("growing", {"old.txt": "old"})
        net.node(cls.growing, "--rescan", "0.5")

    def test_registered(self) -> None:
        """Each seed node is listed by the relay at the loopback port it listens on."""
        listed = {(p.require("host"), p.port()) for p in self.net.peers()}
        for node in self.seeds:
            host, port = self.net.listening(node)
            self.assertEqual(host, "127.0.0.1")
            self.assertIn((host, port), listed)

    def test_interactiveSession(self) -> None:
        """Names typed on stdin, the seeds' 'Send a, b' form too, print in turn until quit."""
        result = self.net.fetch(input=b"sample1.txt\nSend sample2.txt, sample3.txt\nquit\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"".join(SAMPLES.values()))
        self.assertIn(b"file name (or quit)> ", result.stderr)

    def test_savedIntoDirectory(self) -> None:
        """Several names (separate and as a comma list) are saved into -o DIR, verified."""
        out = self.net.root / "out-seeds"
        result = self.net.fetch("-o", str(out), "sample1.txt, sample2.txt", "sample3.txt")
        self.assertEqual((result.returncode, result.stdout), (0, b""), result.stderr)
        self.assertEqual({p.name: p.read_bytes() for p in out.iterdir()}, SAMPLES)

    def test_binaryToStdout(self) -> None:
        """A multi-megabyte binary file arrives byte-exact on stdout."""
        result = self.net.fetch("blob.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout == BLOB, f"{len(result.stdout)} bytes, not the {len(BLOB)} shared")

    def fetchUntil(self, marker: bytes, *args: str, tries: int = 12):
        """
        Fetch until stderr shows ``marker`` (the relay orders holders at
        random, so a given one comes first about every other time); every
        fetch must succeed.  The last result.
        """
        for _ in range(tries):
            result = self.net.fetch(*args)
            self.assertEqual(result.returncode, 0, result.stderr)
            if marker in result.stderr:
                return result
        self.fail(f"{marker!r} not seen in {tries} fetches: {result.stderr!r}")

    def test_udpPastNodeWithoutUDP(self) -> None:
        """--udp: a holder started with --no-udp is a failed attempt; the next delivers over UDP."""
        result = self.fetchUntil(b"peer serves no UDP, trying next", "--udp", "blob.bin")
        self.assertTrue(result.stdout == BLOB, f"{len(result.stdout)} bytes, not the {len(BLOB)} shared")

    def test_udpLargeBlocks(self) -> None:
        """--udp-block 16384 (loopback-sized datagrams) delivers the file intact into -o DIR."""
        out = self.net.root / "out-udp"
        result = self.net.fetch("--udp", "--udp-block", "16384", "-o", str(out), "blob.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue((out / "blob.bin").read_bytes() == BLOB)

    def test_stdoutClosedEarly(self) -> None:
        """'p2p-fetch big | head -c 10': the reader gets its bytes, no traceback, exit 0."""
        fetch = subprocess.Popen(
            script("p2p-fetch") + ["blob.bin"],
            env=self.net.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.assertEqual(len(fetch.stdout.read(10)), 10)
        fetch.stdout.close()
        stderr = fetch.stderr.read()
        self.assertEqual(fetch.wait(30), 0, stderr)
        self.assertNotIn(b"Traceback", stderr)

    def test_failoverWhenNodeKilled(self) -> None:
        """
        A holder killed with SIGKILL is skipped: the next peer delivers, and
        the client's report makes the relay check the dead one itself and
        stop handing it out.
        """
        port = self.net.listening(self.doomed)[1]
        self.doomed.stop(signal.SIGKILL)
        result = self.fetchUntil(b"connection refused, trying next", "both.txt")
        self.assertEqual(result.stdout, SHARED)
        waitUntil(lambda: port not in [p.port() for p in self.net.peers()], 5.0)

    def test_newFileFetchable(self) -> None:
        """A file dropped into a shared folder is announced at the next rescan, and fetchable."""
        (self.growing / "new.txt").write_text("new")
        waitUntil(lambda: [f.name() for f in self.net.files("new.txt")] == ["new.txt"], 5.0)
        result = self.net.fetch("new.txt")
        self.assertEqual((result.returncode, result.stdout), (0, b"new"), result.stderr)


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

