"""The HTTP endpoint of a service's own registry (``/metrics`` only; any other path is 404), and the
admission figures both services expose under the same names."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, core, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edgecloud.endpoint import parse_endpoint
from edgecloud.errors import EdgecloudError
from edgecloud.metrics.names import PREFIX
from edgecloud.protocol.admission import AdmissionFigures

log = logging.getLogger(__name__)

PATH = "/metrics"


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
