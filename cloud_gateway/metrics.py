"""The gateway's Prometheus ``/metrics``: what it serves (batches, requests and rows per model version,
requests dropped unrun, hard examples kept, admission) and, with ``[collector]``, the fleet's
per-device series.

``cloud-gateway collect`` runs the collector alone, without a model repository: one collector per
fleet is enough, while serving gateways scale out (each replica would otherwise repeat every device).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from cloud_gateway.collector import FleetCollector
from cloud_gateway.config import GatewayConfig
from cloud_gateway.hard_examples import HardExampleStore
from cloud_gateway.repository import ModelRepository
from edgecloud.errors import ConfigError
from edgecloud.metrics.buckets import add_latency, cumulative
from edgecloud.metrics.exposition import MetricsServer, admission_metrics
from edgecloud.metrics.names import PREFIX
from edgecloud.protocol.admission import Admission
from edgecloud.protocol.statistics import InferenceStatistics

GATEWAY = PREFIX + "gateway_"


class ServingCollector(Collector):
    """The gateway's own figures, read at each scrape: its models' batchers and answer latencies, its
    store and its admission gate."""

    def __init__(self, repository: ModelRepository, store: HardExampleStore | None,
                 admission: Admission, statistics: InferenceStatistics) -> None:
        self._repository = repository
        self._store = store
        self._admission = admission
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        labels = ("model", "version")
        batches = CounterMetricFamily(GATEWAY + "batches_total", "Model runs of merged batches",
                                      labels=labels)
        requests = CounterMetricFamily(GATEWAY + "batched_requests_total", "Requests served through the "
                                       "dynamic batcher", labels=labels)
        rows = CounterMetricFamily(GATEWAY + "batched_rows_total", "Rows served through the dynamic batcher "
                                   "(rows / batches = mean batch size)", labels=labels)
        cancelled = CounterMetricFamily(GATEWAY + "cancelled_requests_total", "Requests dropped before "
                                        "their batch ran: the caller's deadline passed or it gave up",
                                        labels=labels)
        latency = HistogramMetricFamily(GATEWAY + "request_latency_seconds", "Answered inference calls, "
                                        "from admission to answer (gRPC and REST)", labels=labels)
        repository = self._repository
        for name in repository.names:
            for version in repository.versions(name):
                figures = self._statistics.of(name, str(version))  # at zero before a call
                add_latency(latency, (name, str(version)), cumulative(figures.latency_buckets),
                            figures.success_ns / 1e9)
                batcher = repository.get(name, str(version)).batcher
                if batcher is None:
                    continue
                stats, key = batcher.stats(), (name, str(version))
                batches.add_metric(key, stats.batches)
                requests.add_metric(key, stats.requests)
                rows.add_metric(key, stats.rows)
                cancelled.add_metric(key, stats.cancelled)
        yield from (batches, requests, rows, cancelled, latency)
        yield from admission_metrics(self._admission.figures())
        store = self._store
        if store is not None:
            yield GaugeMetricFamily(GATEWAY + "hard_examples", "Rows kept in the hard-example store",
                                    value=store.rows)
            yield CounterMetricFamily(GATEWAY + "reused_request_ids_total", "Rows stored under a device, "
                                      "request id and row that already held another input (a client "
                                      "reusing request ids)", value=store.reused_request_ids)


class GatewayMetrics:
    """Starts what ``[collector]`` and ``[metrics]`` ask for; ``serving`` (the figures of the models
    served) is None in collect mode."""

    def __init__(self, config: GatewayConfig, serving: ServingCollector | None = None) -> None:
        self.config = config
        self.serving = serving
        self.collector: FleetCollector | None = None
        self.server: MetricsServer | None = None

    @property
    def port(self) -> int:
        return self.server.port if self.server else 0

    def start(self) -> GatewayMetrics:
        cfg = self.config
        if self.serving is None and not cfg.collector.fleet:
            raise ConfigError("collector.fleet: collect mode needs a fleet "
                              "(--collect-fleet or [collector] fleet)")
        if not cfg.metrics.listen:
            return self
        registry = CollectorRegistry(auto_describe=False)
        if self.serving is not None:
            registry.register(self.serving)
        try:
            if cfg.collector.fleet:
                self.collector = FleetCollector(cfg.collector.mqtt, cfg.collector.fleet).start()
                registry.register(self.collector)
            self.server = MetricsServer(registry, cfg.metrics.listen).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Safe to call twice."""
        if self.server is not None:
            self.server.stop()
        if self.collector is not None:
            self.collector.stop()
