"""
End to end, several relays on one Redis: a real ``redis-server`` and two
``twistd -n relay --registry redis://...`` processes on OS-chosen loopback
ports, a real ``twistd peernode`` and ``p2p-fetch``, exactly as a user runs
them (the README's commands).  What each piece does is specified in
process in ``test_relay_shared`` and ``test_backends``; this shows the
pieces hold together.
"""

from __future__ import annotations

import signal
import time

from twisted.trial.unittest import SynchronousTestCase

from p2prelay import wire

from . import redisserver
from .support import LOOPBACK, Network, relayQuery

CONTENT = b"served through two relays\n"
TTL = 2  # seconds the relays grant: an entry not heartbeated is gone after it
HEARTBEAT = "0.5"


class TwoRelaysTests(SynchronousTestCase):
    """Relays A and B on one Redis; a node registered with A."""

    def setUp(self) -> None:
        redis = redisserver.started(self)
        self.net = Network(relayArgs=["--registry", redis.url, "--ttl", str(TTL)])
        self.addCleanup(self.net.close)
        self.first, self.firstAddress = self.net.relay, self.net.address
        self.second = self.net.startRelay(LOOPBACK, "--registry", redis.url, "--ttl", str(TTL))
        self.secondAddress = self.net.address

    def listed(self, address: str) -> list:
        return [m.get("node") for m in relayQuery(address, wire.request(wire.PEERS))[1:]]

    def test_registeredAtOneFetchedThroughTheOther(self) -> None:
        """A node registered with A is fetched from by a client asking B; with A killed, B still lists it."""
        self.net.address = self.firstAddress  # the node's --relay
        self.net.node(self.net.folder("seed", {"both.txt": CONTENT}))
        self.net.address = self.secondAddress  # the client's
        [status] = relayQuery(self.firstAddress, wire.request(wire.STATS))
        [other] = relayQuery(self.secondAddress, wire.request(wire.STATS))
        self.assertEqual(status.get("boot"), other.get("boot"), "one registry, one boot")
        result = self.net.fetch("both.txt")
        self.assertEqual((result.returncode, result.stdout), (0, CONTENT), result.stderr)
        listed = self.listed(self.secondAddress)
        self.assertEqual(len(listed), 1)
        self.first.stop(signal.SIGKILL)
        self.assertEqual(self.listed(self.secondAddress), listed, "nothing lost with A")
        result = self.net.fetch("both.txt")
        self.assertEqual((result.returncode, result.stdout), (0, CONTENT), result.stderr)

    def test_nodeWithARelayList(self) -> None:
        """A node with --relay A,B keeps heartbeating through B once A is killed: listed past several TTLs, fetched from."""
        self.net.address = f"{self.firstAddress},{self.secondAddress}"
        self.net.node(self.net.folder("listed", {"both.txt": CONTENT}), "--heartbeat", HEARTBEAT)
        self.net.address = self.secondAddress
        [node] = self.listed(self.secondAddress)
        self.first.stop(signal.SIGKILL)
        time.sleep(2.5 * TTL)  # real daemons, real time: past the lifetime of an entry not heartbeated
        self.assertEqual(self.listed(self.secondAddress), [node])
        result = self.net.fetch("both.txt")
        self.assertEqual((result.returncode, result.stdout), (0, CONTENT), result.stderr)
