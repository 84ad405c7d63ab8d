"""
The daemons' Prometheus metrics (p2prelay.metrics): the families exist
from the start, the methods the protocols call move them, scrape-time
gauges read their callables, each daemon has a registry of its own, and
the page is served by a real Site on a loopback port.
"""

from __future__ import annotations

import gzip
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from p2prelay.metrics import MetricsService, NodeMetrics, RelayMetrics, metricsResource, newRegistry

RELAY_FAMILIES = {
    "p2prelay_relay_peers": "gauge",
    "p2prelay_relay_index_entries": "gauge",
    "p2prelay_relay_lookups": "counter",
    "p2prelay_relay_registrations": "counter",
    "p2prelay_relay_request_seconds": "histogram",
    "p2prelay_relay_connections_open": "gauge",
    "p2prelay_relay_connections_refused": "counter",
    "p2prelay_relay_circuits_open": "gauge",
    "p2prelay_relay_control_connections_open": "gauge",
    "p2prelay_relay_circuits": "counter",
    "p2prelay_relay_relayed_bytes": "counter",
}
NODE_FAMILIES = {
    "p2prelay_node_files_shared": "gauge",
    "p2prelay_node_bytes_shared": "gauge",
    "p2prelay_node_uploads_running": "gauge",
    "p2prelay_node_sent_bytes": "counter",
    "p2prelay_node_transfers": "counter",
    "p2prelay_node_hashing_backlog_files": "gauge",
}


def scrape(registry, path: bytes = b"metrics", headers: dict | None = None) -> DummyRequest:
    """GET ``/path`` from the metrics resource in process; the request, with its written body."""
    request = DummyRequest([path])
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    resource = getChildForRequest(metricsResource(registry), request)
    body = resource.render(request)
    request.write(body)
    return request


def samples(registry) -> dict:
    """Every sample of a scrape, as {(name, sorted labels): value}, read with prometheus_client's parser."""
    text = b"".join(scrape(registry).written).decode("utf-8")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def families(registry) -> dict:
    text = b"".join(scrape(registry).written).decode("utf-8")
    return {f.name: f.type for f in text_string_to_metric_families(text)}


class RelayMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = RelayMetrics(newRegistry(process=False))

    def value(self, name: str, **labels: str) -> float:
        return samples(self.metrics.registry)[(name, tuple(sorted(labels.items())))]

    def test_families(self) -> None:
        """A scrape lists every relay family with its type, before anything happened."""
        found = families(self.metrics.registry)
        self.assertEqual({k: found.get(k) for k in RELAY_FAMILIES}, RELAY_FAMILIES)

    def test_resultsStartAtZero(self) -> None:
        """Every lookup and registration result is a series from the start, at 0."""
        for result in ("hit", "miss", "refused"):
            self.assertEqual(self.value("p2prelay_relay_lookups_total", result=result), 0)
        for result in ("accepted", "refused", "invalid"):
            self.assertEqual(self.value("p2prelay_relay_registrations_total", result=result), 0)

    def test_lookups(self) -> None:
        """lookup(result) counts under that result only."""
        self.metrics.lookup("hit")
        self.metrics.lookup("hit")
        self.metrics.lookup("miss")
        self.assertEqual(self.value("p2prelay_relay_lookups_total", result="hit"), 2)
        self.assertEqual(self.value("p2prelay_relay_lookups_total", result="miss"), 1)
        self.assertEqual(self.value("p2prelay_relay_lookups_total", result="refused"), 0)

    def test_registrations(self) -> None:
        """registration(result) counts under that result."""
        self.metrics.registration("accepted")
        self.metrics.registration("refused")
        self.assertEqual(self.value("p2prelay_relay_registrations_total", result="accepted"), 1)
        self.assertEqual(self.value("p2prelay_relay_registrations_total", result="refused"), 1)

    def test_unknownResult(self) -> None:
        """A result outside the known set is a ValueError (a bug), not a new series."""
        self.assertRaises(ValueError, self.metrics.lookup, "maybe")
        self.assertRaises(ValueError, self.metrics.connectionRefused, "whim")
        self.assertNotIn("maybe", b"".join(scrape(self.metrics.registry).written).decode())

    def test_latency(self) -> None:
        """observeLatency fills the histogram's buckets, count and sum."""
        self.metrics.observeLatency(0.0002)
        self.metrics.observeLatency(0.3)
        self.assertEqual(self.value("p2prelay_relay_request_seconds_count"), 2)
        self.assertAlmostEqual(self.value("p2prelay_relay_request_seconds_sum"), 0.3002)
        self.assertEqual(self.value("p2prelay_relay_request_seconds_bucket", le="0.0005"), 1)
        self.assertEqual(self.value("p2prelay_relay_request_seconds_bucket", le="0.5"), 2)

    def test_connections(self) -> None:
        """Connections open go up and down; refusals count by cap."""
        self.metrics.connectionOpened()
        self.metrics.connectionOpened()
        self.metrics.connectionClosed()
        self.metrics.connectionRefused("per-address")
        self.assertEqual(self.value("p2prelay_relay_connections_open"), 1)
        self.assertEqual(self.value("p2prelay_relay_connections_refused_total", reason="per-address"), 1)
        self.assertEqual(self.value("p2prelay_relay_connections_refused_total", reason="total"), 0)

    def test_scrapeTimeGauges(self) -> None:
        """Peers and index entries are read from their callables at each scrape, set at once or later."""
        peers = [3]
        self.metrics.peers = lambda: peers[0]
        self.metrics.entries = lambda: 40
        self.assertEqual(self.value("p2prelay_relay_peers"), 3)
        peers[0] = 5
        self.assertEqual(self.value("p2prelay_relay_peers"), 5)
        self.assertEqual(self.value("p2prelay_relay_index_entries"), 40)
        given = RelayMetrics(newRegistry(process=False), peers=lambda: 7)
        self.assertEqual(samples(given.registry)[("p2prelay_relay_peers", ())], 7)


    def test_circuits(self) -> None:
        """circuit(result) counts circuits by result, every result a series from the start."""
        for result in ("complete", "cut", "timeout", "refused"):
            self.assertEqual(self.value("p2prelay_relay_circuits_total", result=result), 0)
        self.metrics.circuit("complete")
        self.metrics.circuit("timeout")
        self.metrics.circuit("timeout")
        self.assertEqual(self.value("p2prelay_relay_circuits_total", result="complete"), 1)
        self.assertEqual(self.value("p2prelay_relay_circuits_total", result="timeout"), 2)
        self.assertRaises(ValueError, self.metrics.circuit, "whatever")

    def test_relayedBytes(self) -> None:
        """relayed(count) adds to the bytes relayed."""
        self.metrics.relayed(1000)
        self.metrics.relayed(24)
        self.assertEqual(self.value("p2prelay_relay_relayed_bytes_total"), 1024)

    def test_openPathGauges(self) -> None:
        """Open circuits and control connections are read from their callables at each scrape."""
        self.metrics.circuitsOpen = lambda: 3
        self.metrics.controlsOpen = lambda: 9
        self.assertEqual(self.value("p2prelay_relay_circuits_open"), 3)
        self.assertEqual(self.value("p2prelay_relay_control_connections_open"), 9)


class NodeMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.shared = {"files": 2, "bytes": 2048, "backlog": 1}
        self.metrics = NodeMetrics(
            newRegistry(process=False),
            files=lambda: self.shared["files"],
            sharedBytes=lambda: self.shared["bytes"],
            backlog=lambda: self.shared["backlog"],
        )

    def value(self, name: str, **labels: str) -> float:
        return samples(self.metrics.registry)[(name, tuple(sorted(labels.items())))]

    def test_families(self) -> None:
        """A scrape lists every node family with its type."""
        found = families(self.metrics.registry)
        self.assertEqual({k: found.get(k) for k in NODE_FAMILIES}, NODE_FAMILIES)

    def test_shared(self) -> None:
        """Files, bytes shared and the hashing backlog are read at each scrape."""
        self.assertEqual(
            [self.value(n) for n in ("p2prelay_node_files_shared", "p2prelay_node_bytes_shared",
                                     "p2prelay_node_hashing_backlog_files")],
            [2, 2048, 1],
        )
        self.shared.update(files=3, backlog=0)
        self.assertEqual(self.value("p2prelay_node_files_shared"), 3)
        self.assertEqual(self.value("p2prelay_node_hashing_backlog_files"), 0)

    def test_upload(self) -> None:
        """An upload is running between uploadStarted and uploadFinished, its bytes counted as they go."""
        self.metrics.uploadStarted()
        self.metrics.sent(1000)
        self.assertEqual(self.value("p2prelay_node_uploads_running"), 1)
        self.assertEqual(self.value("p2prelay_node_sent_bytes_total"), 1000)
        self.metrics.sent(24)
        self.metrics.uploadFinished("complete")
        self.assertEqual(self.value("p2prelay_node_uploads_running"), 0)
        self.assertEqual(self.value("p2prelay_node_sent_bytes_total"), 1024)
        self.assertEqual(self.value("p2prelay_node_transfers_total", result="complete"), 1)

    def test_transfersByResult(self) -> None:
        """Refused and unknown-name GETs count without an upload."""
        self.metrics.transfer("refused")
        self.metrics.transfer("not-found")
        self.assertEqual(self.value("p2prelay_node_transfers_total", result="refused"), 1)
        self.assertEqual(self.value("p2prelay_node_transfers_total", result="not-found"), 1)
        self.assertEqual(self.value("p2prelay_node_transfers_total", result="failed"), 0)
        self.assertEqual(self.value("p2prelay_node_uploads_running"), 0)


class RegistryTests(SynchronousTestCase):
    def test_ownRegistries(self) -> None:
        """Two daemons in one process keep separate figures (no global registry, no duplicate error)."""
        one, two = RelayMetrics(newRegistry(process=False)), RelayMetrics(newRegistry(process=False))
        one.lookup("hit")
        self.assertEqual(samples(one.registry)[("p2prelay_relay_lookups_total", (("result", "hit"),))], 1)
        self.assertEqual(samples(two.registry)[("p2prelay_relay_lookups_total", (("result", "hit"),))], 0)

    def test_notTheGlobalRegistry(self) -> None:
        """Nothing is registered in prometheus_client's process-wide registry."""
        from prometheus_client import REGISTRY

        RelayMetrics()
        NodeMetrics()
        self.assertFalse([n for n in REGISTRY._names_to_collectors if n.startswith("p2prelay_")])

    def test_processFigures(self) -> None:
        """By default a registry also carries the process's CPU and memory."""
        self.assertIn("process_cpu_seconds", families(newRegistry()))


class PageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = newRegistry(process=False)
        RelayMetrics(self.registry).lookup("miss")

    def test_textExposition(self) -> None:
        """/metrics is Prometheus's text format, with its content type."""
        request = scrape(self.registry)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4"))
        self.assertIn(b'p2prelay_relay_lookups_total{result="miss"} 1.0', b"".join(request.written))

    def test_openMetrics(self) -> None:
        """A scraper asking for OpenMetrics gets it."""
        request = scrape(self.registry, headers={b"accept": b"application/openmetrics-text; version=1.0.0"})
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text"))
        self.assertTrue(b"".join(request.written).endswith(b"# EOF\n"))

    def test_gzip(self) -> None:
        """A scraper accepting gzip gets the page compressed."""
        request = scrape(self.registry, headers={b"accept-encoding": b"gzip"})
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertIn(b"p2prelay_relay_lookups_total", gzip.decompress(b"".join(request.written)))

    def test_root(self) -> None:
        """/ says where the metrics are."""
        self.assertEqual(b"".join(scrape(self.registry, b"").written), b"p2prelay metrics: /metrics\n")


class ServiceTests(TestCase):
    async def test_servedOnLoopback(self) -> None:
        """MetricsService serves /metrics on a real loopback port; a scrape sees counters move."""
        from twisted.web.client import Agent, readBody

        metrics = NodeMetrics(newRegistry(process=False), files=lambda: 4)
        service = MetricsService(reactor, "tcp:0:interface=127.0.0.1", metrics.registry)
        service.startService()
        self.addCleanup(service.stopService)
        port = await service.whenListening
        url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
        agent = Agent(reactor)

        async def get() -> str:
            response = await agent.request(b"GET", url)
            self.assertEqual(response.code, 200)
            return (await readBody(response)).decode("utf-8")

        first = await get()
        self.assertIn("p2prelay_node_files_shared 4.0", first)
        self.assertIn('p2prelay_node_transfers_total{result="complete"} 0.0', first)
        metrics.uploadStarted()
        metrics.sent(5)
        metrics.uploadFinished("complete")
        second = await get()
        self.assertIn('p2prelay_node_transfers_total{result="complete"} 1.0', second)
        self.assertIn("p2prelay_node_sent_bytes_total 5.0", second)


class LazyImportTests(SynchronousTestCase):
    def test_importCostsNothing(self) -> None:
        """Importing p2prelay.metrics loads neither prometheus_client nor twisted.web."""
        probe = ("import sys, p2prelay.metrics; "
                 "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prometheus_client' "
                 "or m.startswith('twisted.web')))")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
        self.assertEqual(out.stdout.strip(), "[]")
