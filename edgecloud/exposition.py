"""Prometheus exposition shared by the agent's and the gateway's ``/metrics``: the HTTP endpoint of a
service's own registry (``/metrics`` only; any other path is 404), the metric names of the cascade's
counters, so a device's figures carry the same names whether scraped from the agent or from the
gateway's fleet collector, the latency histogram's buckets, and the admission figures both services
expose under the same names.

Latencies are histograms, not summaries: bucket counts add up across devices and replicas
(``histogram_quantile(0.99, sum by (le) (rate(…_bucket[5m])))``), quantiles do not. One set of
buckets serves the edge's milliseconds and the cloud's hundreds of milliseconds, so the agent's, the
gateway's and the collector's series can be compared and summed (docs/design.md §9).
"""

from __future__ import annotations

import logging
import socket
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, core, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from edgecloud.endpoint import parse_endpoint
from edgecloud.errors import EdgecloudError
from edgecloud.mqtt.payloads import Counters, Metric
from edgecloud.protocol.admission import AdmissionFigures

log = logging.getLogger(__name__)

PREFIX = "edgecloud_"

#: cascade counter (key of the agent's stats and of telemetry ``counters``) → (metric name, help)
COUNTERS = {key: (next(m.name for m in field.metadata if isinstance(m, Metric)), field.description or "")
            for key, field in Counters.model_fields.items()}


#: upper bounds (seconds) of the latency buckets, +Inf implied: fine from 0.5 ms (edge answers) to
#: 100s of ms (escalations over a WAN, the gateway's batching window), coarse up to 5 s
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
PATH = "/metrics"


def bucket_of(seconds: float) -> int:
    """Index of the bucket a latency falls in (``len(LATENCY_BUCKETS)`` for +Inf): the first bound
    at or above it, as Prometheus' ``le`` says."""
    return bisect_left(LATENCY_BUCKETS, seconds)


def cumulative(counts: Iterable[int]) -> list[int]:
    """Per-bucket counts → the cumulative counts a histogram exposes (the last is every call)."""
    return list(accumulate(counts))


def add_latency(family: HistogramMetricFamily, labels: Sequence[str], counts: Sequence[int],
                sum_s: float) -> None:
    """One labelled histogram from cumulative ``counts`` (one per bound of LATENCY_BUCKETS, then +Inf)."""
    bounds = [*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"]
    family.add_metric(list(labels), list(zip(bounds, counts)), sum_s)


def admission_metrics(figures: AdmissionFigures) -> Iterator[core.Metric]:
    """``edgecloud_admission_*``: ModelInfer calls running and waiting now, those refused so far, and
    the limits they are held to."""
    admission = PREFIX + "admission_"
    yield GaugeMetricFamily(admission + "in_flight", "Inference calls running now", value=figures.in_flight)
    yield GaugeMetricFamily(admission + "queued", "Inference calls waiting for a turn", value=figures.queued)
    yield CounterMetricFamily(admission + "shed_total", "Inference calls refused with RESOURCE_EXHAUSTED "
                              "(in flight and queue full)", value=figures.shed)
    yield GaugeMetricFamily(admission + "max_in_flight", "[admission] max_in_flight",
                            value=figures.max_in_flight)
    yield GaugeMetricFamily(admission + "max_queue", "[admission] max_queue", value=figures.max_queue)


class MetricsUnavailable(EdgecloudError):
    """The /metrics endpoint could not listen (address in use, not permitted)."""


class MetricsServer:
    """``/metrics`` of ``registry`` over HTTP on ``listen`` (HOST:PORT, checked by ``MetricsSection``;
    port 0 picks a free one)."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        self.endpoint = parse_endpoint(listen)
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else 0

    def start(self) -> MetricsServer:
        app = make_wsgi_app(self.registry)

        def only_metrics(environ, start_response):
            if environ.get("PATH_INFO") != PATH:
                start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
                return [f"not found: the metrics are at {PATH}\n".encode()]
            return app(environ, start_response)

        server_class = _Server6 if ":" in self.endpoint.host else _Server
        try:
            self._server = make_server(self.endpoint.host, self.endpoint.port, only_metrics, server_class,
                                       _QuietHandler)
        except OSError as e:
            raise MetricsUnavailable(f"cannot serve /metrics on {self.endpoint}: {e}") from e
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("event=metrics_listening host=%s port=%d", self.endpoint.host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving and free the port; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per scrape, none outliving the process."""

    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format, *args) -> None:
        pass
