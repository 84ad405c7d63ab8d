"""
End-to-end: one address cannot exhaust a relay.  A real ``twistd relay``
held to the usual 1,024 file descriptors, one loopback address opening a
thousand idle sockets, and a client from another loopback address
(127.0.0.2) still served at once.
"""

from __future__ import annotations

import resource
import socket
import sys

from twisted.trial.unittest import SkipTest

from p2prelay import wire
from p2prelay.limits import RELAY_MAX_PER_ADDRESS

from .support import NetworkTestCase, waitUntil

FD_LIMIT = 1024  # the usual default soft limit
FLOOD = 1100  # idle sockets from the attacker: more than 1,024 descriptors hold
HONEST_SOURCE = "127.0.0.2"


def canBind(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


class ConnectionFloodTests(NetworkTestCase):
    """A relay limited to 1,024 descriptors under a flood of idle sockets from 127.0.0.1."""

    @classmethod
    def startNodes(cls, net) -> None:
        if not sys.platform.startswith("linux") or not canBind(HONEST_SOURCE):
            raise SkipTest(f"needs Linux loopback sources beyond 127.0.0.1 ({HONEST_SOURCE})")
        resource.prlimit(net.relay.process.pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
        host, port = net.address.rsplit(":", 1)
        cls.relayAddress = (host, int(port))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < FLOOD + 100:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FLOOD + 500), hard))

    def setUp(self) -> None:
        self.sockets: list[socket.socket] = []
        self.addCleanup(self.closeAll)

    def closeAll(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets = []

    def flood(self, count: int) -> list[socket.socket]:
        """
        Open ``count`` idle connections from 127.0.0.1, sending nothing.
        Past the cap each one's answer is awaited before the next is opened:
        faster, the relay's accept queue (50) overflows and the kernel's SYN
        retries add a second per overflow, which tests nothing of ours.
        """
        opened = []
        for i in range(count):
            s = socket.create_connection(self.relayAddress, timeout=10)
            self.sockets.append(s)
            opened.append(s)
            if i >= RELAY_MAX_PER_ADDRESS:
                self.assertAnswersBusy(s)
        return opened

    def peersFrom(self, source: str) -> wire.Message:
        """A PEERS query from a socket bound to ``source``; the relay's status line."""
        with socket.socket() as s:
            s.settimeout(10)
            s.bind((source, 0))
            s.connect(self.relayAddress)
            s.sendall(wire.request(wire.PEERS))
            line = s.makefile("rb").readline()
        return wire.parseLine(line.rstrip(b"\n"))

    def assertAnswersBusy(self, s: socket.socket) -> wire.Message:
        s.settimeout(5)
        reply = wire.parseLine(s.makefile("rb").readline().rstrip(b"\n"))
        self.assertEqual(reply.status, wire.BUSY, reply)
        self.assertIsNotNone(reply.get("retry"))
        self.assertEqual(s.recv(1), b"", "closed after the 503")
        return reply

    def test_floodDoesNotLockOutOthers(self):
        """Over a thousand idle sockets from one address; a client from another address is served."""
        self.flood(FLOOD)
        reply = self.peersFrom(HONEST_SOURCE)
        self.assertEqual(reply.status, wire.OK, reply)

    def test_floodRefusedBeyondPerAddressCap(self):
        """Beyond the per-address cap, each new socket from the flooding address is answered 503 retry= and closed."""
        sockets = self.flood(RELAY_MAX_PER_ADDRESS)
        for s in self.flood(10):
            self.assertAnswersBusy(s)
        self.assertEqual(len(sockets), RELAY_MAX_PER_ADDRESS)

    def test_slotsReleased(self):
        """Once the flood's sockets close, that address is served again."""
        self.flood(RELAY_MAX_PER_ADDRESS + 5)
        self.closeAll()

        def served() -> bool:
            try:
                return self.peersFrom("127.0.0.1").status == wire.OK
            except OSError:
                return False

        waitUntil(served, timeout=10)
