"""
Prometheus metrics for the relay and the node (``--metrics DESC``).

Each daemon keeps its own :class:`~prometheus_client.CollectorRegistry`,
never the process-wide one, so tests and several daemons in one process
cannot collide.  The protocols call small methods on a
:class:`RelayMetrics` or :class:`NodeMetrics` (``metrics.lookup("hit")``,
``metrics.observeLatency(seconds)``); figures the daemon already keeps
(peers, index entries, files shared) are gauges read at scrape time from
callables, so nothing is counted twice.

:class:`MetricsService` serves ``/metrics`` on a server endpoint
description (``tcp:9101:interface=127.0.0.1``).  The page is rendered in
the reactor thread: prometheus_client's own ``twisted.MetricsResource``
renders in the reactor's thread pool (and on the global reactor), where
the scrape-time callables would read the registry and the share while the
reactor changes them.

``prometheus_client`` and ``twisted.web`` are imported only when a
metrics object or service is made, i.e. only with ``--metrics``: importing
this module costs nothing, and p2p-fetch never imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:  # pragma: no cover
    from prometheus_client import CollectorRegistry

# Request latencies at a relay: sub-millisecond lookups up to slow
# registrations of long file lists.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

LOOKUP_RESULTS = ("hit", "miss", "refused")  # a holder listed / none / the query was refused
REGISTRATION_RESULTS = ("accepted", "refused", "invalid")
REFUSAL_REASONS = ("per-address", "total")  # which connection cap was reached
TRANSFER_RESULTS = ("complete", "failed", "refused", "not-found")
# A relayed circuit: ended by a side / cut at a limit / the node never came / refused at a limit.
CIRCUIT_RESULTS = ("complete", "cut", "timeout", "refused")

PATH = b"metrics"


def newRegistry(process: bool = True) -> "CollectorRegistry":
    """A registry of one daemon's own; with ``process``, its CPU, memory and file descriptors too."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=True)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


def _zero() -> float:
    return 0


class _Metrics:
    """What both daemons' metrics share: a registry, labelled counters that exist from the start."""

    def __init__(self, registry: Optional["CollectorRegistry"]) -> None:
        self.registry = registry if registry is not None else newRegistry()

    def _gauge(self, name: str, doc: str, read: Callable[[], float]):
        from prometheus_client import Gauge

        gauge = Gauge(name, doc, registry=self.registry)
        gauge.set_function(read)
        return gauge

    def _byResult(self, name: str, doc: str, label: str, values: Iterable[str]):
        from prometheus_client import Counter

        counter = Counter(name, doc, [label], registry=self.registry)
        for value in values:
            counter.labels(value)  # shown as 0 before the first one
        return counter

    @staticmethod
    def _check(value: str, known: tuple) -> str:
        # Labels come from our code, never from the network: an unknown one
        # is a bug, and must not become an unbounded set of series.
        if value not in known:
            raise ValueError(f"{value!r} is not one of {', '.join(known)}")
        return value


class RelayMetrics(_Metrics):
    """
    The relay's figures.  ``peers``, ``entries``, ``circuitsOpen`` and
    ``controlsOpen`` are callables read at each scrape (they may also be
    set later, once the registry and the factory exist).
    """

    def __init__(
        self,
        registry: Optional["CollectorRegistry"] = None,
        *,
        peers: Callable[[], float] = _zero,
        entries: Callable[[], float] = _zero,
        circuitsOpen: Callable[[], float] = _zero,
        controlsOpen: Callable[[], float] = _zero,
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        super().__init__(registry)
        self.peers = peers
        self.entries = entries
        self.circuitsOpen = circuitsOpen
        self.controlsOpen = controlsOpen
        self._gauge("p2prelay_relay_circuits_open", "Relayed circuits open now.", lambda: self.circuitsOpen())
        self._gauge(
            "p2prelay_relay_control_connections_open",
            "Control connections firewalled nodes hold now.",
            lambda: self.controlsOpen(),
        )
        self._circuits = self._byResult(
            "p2prelay_relay_circuits",
            "Relayed circuits by result: complete (a side closed), cut (a limit), "
            "timeout (the node did not open it), refused (a limit, before it opened).",
            "result",
            CIRCUIT_RESULTS,
        )
        self._relayed = Counter(
            "p2prelay_relay_relayed_bytes",
            "Bytes passed through circuits, both directions.",
            registry=self.registry,
        )
        self._gauge("p2prelay_relay_peers", "Peers registered and live.", lambda: self.peers())
        self._gauge(
            "p2prelay_relay_index_entries",
            "Entries in the index (one per file a peer holds).",
            lambda: self.entries(),
        )
        self._lookups = self._byResult(
            "p2prelay_relay_lookups",
            "Lookups by result: hit (a holder listed), miss (none), refused.",
            "result",
            LOOKUP_RESULTS,
        )
        self._registrations = self._byResult(
            "p2prelay_relay_registrations",
            "Registrations by result: accepted, refused (a cap, a failed check), invalid.",
            "result",
            REGISTRATION_RESULTS,
        )
        self._latency = Histogram(
            "p2prelay_relay_request_seconds",
            "Seconds from a request's first line to its answer.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._open = Gauge(
            "p2prelay_relay_connections_open", "Connections open now.", registry=self.registry
        )
        self._refused = Counter(
            "p2prelay_relay_connections_refused",
            "Connections refused at a cap, by which: per-address or total.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:
            self._refused.labels(reason)

    def lookup(self, result: str) -> None:
        """One WHOHAS/SEARCH answered: ``hit``, ``miss`` or ``refused``."""
        self._lookups.labels(self._check(result, LOOKUP_RESULTS)).inc()

    def registration(self, result: str) -> None:
        """One REGISTER settled: ``accepted``, ``refused`` or ``invalid``."""
        self._registrations.labels(self._check(result, REGISTRATION_RESULTS)).inc()

    def observeLatency(self, seconds: float) -> None:
        """One request answered, ``seconds`` after it began."""
        self._latency.observe(seconds)

    def circuit(self, result: str) -> None:
        """One circuit ended (or was refused): see :data:`CIRCUIT_RESULTS`."""
        self._circuits.labels(self._check(result, CIRCUIT_RESULTS)).inc()

    def relayed(self, count: int) -> None:
        """``count`` more bytes passed through a circuit."""
        self._relayed.inc(count)

    def connectionOpened(self) -> None:
        self._open.inc()

    def connectionClosed(self) -> None:
        self._open.dec()

    def connectionRefused(self, reason: str) -> None:
        """A connection refused at a cap: ``per-address`` or ``total``."""
        self._refused.labels(self._check(reason, REFUSAL_REASONS)).inc()


class NodeMetrics(_Metrics):
    """
    The node's figures.  ``files``, ``sharedBytes`` and ``backlog`` (files
    waiting to be hashed) are callables read at each scrape.
    """

    def __init__(
        self,
        registry: Optional["CollectorRegistry"] = None,
        *,
        files: Callable[[], float] = _zero,
        sharedBytes: Callable[[], float] = _zero,
        backlog: Callable[[], float] = _zero,
    ) -> None:
        from prometheus_client import Counter, Gauge

        super().__init__(registry)
        self.files = files
        self.sharedBytes = sharedBytes
        self.backlog = backlog
        self._gauge("p2prelay_node_files_shared", "Files shared (hashed and announced).", lambda: self.files())
        self._gauge("p2prelay_node_bytes_shared", "Bytes in the files shared.", lambda: self.sharedBytes())
        self._gauge(
            "p2prelay_node_hashing_backlog_files",
            "Files found in the folder and not hashed yet.",
            lambda: self.backlog(),
        )
        self._uploads = Gauge(
            "p2prelay_node_uploads_running", "Uploads sending now.", registry=self.registry
        )
        self._sent = Counter(
            "p2prelay_node_sent_bytes", "Body bytes sent to other peers.", registry=self.registry
        )
        self._transfers = self._byResult(
            "p2prelay_node_transfers",
            "Transfers (GETs) by result: complete, failed, refused (busy), not-found.",
            "result",
            TRANSFER_RESULTS,
        )

    def uploadStarted(self) -> None:
        self._uploads.inc()

    def uploadFinished(self, result: str) -> None:
        """An upload that :meth:`uploadStarted` ended: ``complete`` or ``failed``."""
        self._uploads.dec()
        self.transfer(result)

    def transfer(self, result: str) -> None:
        """A transfer's outcome; ``refused`` and ``not-found`` ones never start an upload."""
        self._transfers.labels(self._check(result, TRANSFER_RESULTS)).inc()

    def sent(self, count: int) -> None:
        """``count`` more body bytes sent (as they go, so a scrape sees a long upload move)."""
        self._sent.inc(count)


def metricsResource(registry: "CollectorRegistry"):
    """
    A ``twisted.web`` resource tree: ``/metrics`` is the text exposition
    (OpenMetrics when the scraper asks for it, gzip when it accepts it),
    ``/`` a line pointing there.
    """
    import gzip

    from prometheus_client.exposition import choose_encoder, gzip_accepted
    from twisted.web.resource import Resource

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request) -> bytes:
            encoder, contentType = choose_encoder(
                (request.getHeader(b"accept") or b"").decode("latin-1")
            )
            output = encoder(registry)
            request.setHeader(b"content-type", contentType.encode("ascii"))
            if gzip_accepted((request.getHeader(b"accept-encoding") or b"").decode("latin-1")):
                output = gzip.compress(output)
                request.setHeader(b"content-encoding", b"gzip")
            return output

    class Root(Resource):
        def render_GET(self, request) -> bytes:
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"p2prelay metrics: /metrics\n"

        def getChild(self, path: bytes, request):
            return self if path == b"" else Resource.getChild(self, path, request)

    root = Root()
    root.putChild(PATH, Page())
    return root


def metricsSite(registry: "CollectorRegistry"):
    """A quiet Site for :func:`metricsResource`: no access-log line per scrape."""
    from twisted.web.server import Site

    class QuietSite(Site):
        noisy = False

        def log(self, request) -> None:
            pass  # a scrape every 15 s would otherwise be a log line every 15 s

    return QuietSite(metricsResource(registry))


def MetricsService(reactor, description: str, registry: "CollectorRegistry"):
    """Serve ``registry`` at ``/metrics`` on the server endpoint ``description``."""
    from .listening import ListeningService

    return ListeningService(reactor, description, metricsSite(registry), "metrics")
