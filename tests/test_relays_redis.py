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

from twisted.trial.unittest import SynchronousTestCase

from p2prelay import wire

from . import redisserver
from .support import LOOPBACK, Network, relayQuery

CONTENT = b"served through two relays\n"


class TwoRelaysTests(SynchronousTestCase):
    """Relays A and B on one Redis; a node registered with A."""

    def setUp(self) -> None:
        redis = redisserver.started(self)
        self.net = Network(relayArgs=["--registry", redis.url])
        self.addCleanup(self.net.close)
        self.first, self.firstAddress = self.net.relay, self.net.address
        self.second = self.net.startRelay(LOOPBACK, "--registry", redis.url)
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
