"""
End-to-end: a real relay and node (twistd, loopback) with ``--metrics``;
``/metrics`` is scraped over HTTP before and after a p2p-fetch, and
``P2P/1 STATS`` asked of the relay.
"""

from __future__ import annotations

import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from p2prelay import wire

from .support import LOOPBACK, Network, NetworkTestCase, waitUntil

METRICS = re.compile(r"metrics listening on (?P<host>[^\s]+):(?P<port>\d+)")
DATA = b"metrics end to end\n" * 1000


def metricsAddress(daemon) -> str:
    """Where a daemon serves its metrics, as its log says."""
    for line in daemon.log:
        match = METRICS.search(line)
        if match:
            break
    else:
        match = daemon.waitFor(METRICS)
    return f"{match.group('host')}:{match.group('port')}"


def scrape(address: str) -> dict:
    """Every sample at http://ADDRESS/metrics, as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class MetricsTests(NetworkTestCase):
    relayArgs = ("--metrics", LOOPBACK)

    @classmethod
    def startNodes(cls, net: Network) -> None:
        cls.node = net.node(net.folder("share", {"m.bin": DATA}), "--metrics", LOOPBACK)

    def test_countersMoveAfterAFetch(self) -> None:
        """After one p2p-fetch, the relay counts a lookup hit and the node a complete transfer and its bytes."""
        relay, node = metricsAddress(self.net.relay), metricsAddress(self.node)
        before = scrape(relay), scrape(node)
        self.assertEqual(before[0][("p2prelay_relay_peers", ())], 1)
        self.assertEqual(before[0][("p2prelay_relay_index_entries", ())], 1)
        self.assertEqual(before[0][("p2prelay_relay_registrations_total", (("result", "accepted"),))], 1)
        self.assertEqual(before[1][("p2prelay_node_files_shared", ())], 1)
        self.assertEqual(before[1][("p2prelay_node_bytes_shared", ())], len(DATA))
        out = self.net.fetch("-o", str(self.net.root), "m.bin")
        self.assertEqual(out.returncode, 0, out.stderr)
        hit = ("p2prelay_relay_lookups_total", (("result", "hit"),))
        complete = ("p2prelay_node_transfers_total", (("result", "complete"),))
        sent = ("p2prelay_node_sent_bytes_total", ())
        waitUntil(lambda: scrape(node)[complete] > before[1][complete], 10)
        after = scrape(relay), scrape(node)
        self.assertGreater(after[0][hit], before[0][hit])
        self.assertGreater(after[0][("p2prelay_relay_request_seconds_count", ())], 0)
        self.assertGreaterEqual(after[1][sent] - before[1][sent], len(DATA))
        self.assertEqual(after[1][("p2prelay_node_uploads_running", ())], 0)
        self.assertTrue(any("sent m.bin: 18.6 KiB in " in line for line in self.node.log), self.node.log[-5:])

    def test_stats(self) -> None:
        """STATS tells the relay's headline figures on one status line."""
        [status] = self.net.query(wire.request(wire.STATS))
        self.assertEqual((status.get("peers"), status.get("files")), ("1", "1"))
        self.assertEqual(status.get("bytes"), str(len(DATA)))
