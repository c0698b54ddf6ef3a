"""Prometheus exposition shared by the agent's and the gateway's ``/metrics``: the HTTP endpoint of a
service's own registry, the metric names of the cascade's counters, so a device's figures carry
the same names whether scraped from the agent or from the gateway's fleet collector, and the
admission figures both services expose under the same names.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, core, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edgecloud.endpoint import parse_endpoint
from edgecloud.errors import EdgecloudError
from edgecloud.mqtt.payloads import Counters, Metric
from edgecloud.protocol.admission import AdmissionFigures

log = logging.getLogger(__name__)

PREFIX = "edgecloud_"

#: cascade counter (key of the agent's stats and of telemetry ``counters``) → (metric name, help)
COUNTERS = {key: (next(m.name for m in field.metadata if isinstance(m, Metric)), field.description or "")
            for key, field in Counters.model_fields.items()}


#: percentile key of the agent's latency figures → Prometheus summary quantile
QUANTILES = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}


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
        try:
            self._server, self._thread = start_http_server(self.endpoint.port, self.endpoint.host,
                                                           registry=self.registry)
        except OSError as e:
            raise MetricsUnavailable(f"cannot serve /metrics on {self.endpoint}: {e}") from e
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
