"""The agent's own Prometheus ``/metrics``, for a local Prometheus or node agent.

A custom collector reads the live figures at scrape time (cascade counters and latencies, spool,
circuit, model, admission, telemetry buffer), so the hot path only updates the stats it already keeps.
Each served model's series carry its name as the ``model`` label.
Served on ``[metrics] listen`` (loopback by default); an empty value turns it off. A port that cannot
be bound is logged and the agent serves without ``/metrics``: answering the line matters more than
being watched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.cloud.circuit import CLOSED, HALF_OPEN, OPEN
from edge_agent.fleet.readings import DISABLED, AgentReadings
from edge_agent.fleet.telemetry import Telemetry
from edge_agent.serving.stats import PATHS
from edgecloud.metrics.buckets import add_latency
from edgecloud.metrics.exposition import MetricsServer, MetricsUnavailable, admission_metrics
from edgecloud.metrics.names import COUNTERS, PREFIX

log = logging.getLogger(__name__)

CIRCUIT_STATES = (CLOSED, OPEN, HALF_OPEN, DISABLED)


class AgentCollector(Collector):
    """Every agent figure, read from the running agent at each scrape (and from its telemetry worker,
    in a fleet)."""

    def __init__(self, agent: AgentReadings, telemetry: Telemetry | None = None) -> None:
        self._agent = agent
        self._telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        """Per-model series carry a ``model`` label (docs/design.md §10); admission and the fleet link
        are the device's."""
        agent = self._agent
        snapshots = [(model.name, model.snapshot()) for model in agent.models]
        for key, (name, documentation) in COUNTERS.items():
            counter = CounterMetricFamily(PREFIX + name, documentation, labels=("model",))
            for model, snapshot in snapshots:
                counter.add_metric((model,), snapshot["counters"][key])
            yield counter
        yield self._latency(snapshots)
        info = GaugeMetricFamily(PREFIX + "model_info", "The edge model serving now",
                                 labels=("model", "name", "version"))
        ready = GaugeMetricFamily(PREFIX + "model_ready", "1 while the model serves (0: it did not load)",
                                  labels=("model",))
        states = GaugeMetricFamily(PREFIX + "circuit_state", "Cloud circuit breaker state (1 = current)",
                                   labels=("model", "state"))
        circuit_open = GaugeMetricFamily(PREFIX + "circuit_open", "1 while escalations fail fast "
                                         "(circuit open)", labels=("model",))
        depth = GaugeMetricFamily(PREFIX + "spool_depth", "Cases waiting in the spool for the cloud",
                                  labels=("model",))
        dropped = CounterMetricFamily(PREFIX + "spool_dropped_total", "Cases the spool could not keep",
                                      labels=("model",))
        for model in agent.models:
            version = model.version()
            if version is not None:
                info.add_metric((model.name, model.name, version), 1)
            ready.add_metric((model.name,), int(model.ready()))
            state = model.circuit_state()
            for name in CIRCUIT_STATES:
                states.add_metric((model.name, name), int(name == state))
            circuit_open.add_metric((model.name,), int(state == "open"))
            if model.spool is not None:
                depth.add_metric((model.name,), model.spool.depth())
                dropped.add_metric((model.name,), model.spool.dropped)
        yield from (info, ready, states, circuit_open, self._agreement())
        yield from admission_metrics(agent.admission())
        if depth.samples:
            yield from (depth, dropped)
        yield from self._fleet()

    @staticmethod
    def _latency(snapshots: list[tuple[str, dict]]) -> HistogramMetricFamily:
        """Every call since the agent started, by model and path (both paths always there, at zero
        before a call)."""
        histogram = HistogramMetricFamily(PREFIX + "request_latency_seconds",
                                          "Call latency by path: answered at the edge, or escalated",
                                          labels=("model", "path"))
        for model, snapshot in snapshots:
            for path in PATHS:
                buckets = snapshot["latency_buckets"][path]
                add_latency(histogram, (model, path), buckets["counts"], buckets["sum_s"])
        return histogram

    def _agreement(self) -> CounterMetricFamily:
        """Rows the cloud answered in time per version served since the agent started, by whether it
        agreed with the edge (docs/design.md §12): every series of a version at zero from its start."""
        family = CounterMetricFamily(PREFIX + "agreement_rows", "Rows the cloud answered in time, escalated "
                                     "or audited, by whether it answered as the edge did",
                                     labels=("model", "version", "reason", "agree"))
        for model in self._agent.models:
            if model.quality is None:
                continue
            for version, counts in model.quality.totals().items():
                for reason, rows, agree in counts.by_reason():
                    family.add_metric((model.name, version, reason, "true"), agree)
                    family.add_metric((model.name, version, reason, "false"), rows - agree)
        return family

    def _fleet(self) -> Iterator[Metric]:
        if self._agent.mqtt_connected is not None:
            yield GaugeMetricFamily(PREFIX + "mqtt_connected", "1 while the fleet's MQTT broker is connected",
                                    value=int(self._agent.mqtt_connected()))
        telemetry = self._telemetry
        if telemetry is not None:
            yield GaugeMetricFamily(PREFIX + "telemetry_buffered_messages",
                                    "Telemetry messages on disk waiting for the broker",
                                    value=telemetry.buffer.depth())
            yield CounterMetricFamily(PREFIX + "telemetry_sent_messages_total",
                                      "Telemetry messages the broker acknowledged", value=telemetry.sent)
            yield CounterMetricFamily(PREFIX + "telemetry_dropped_messages_total",
                                      "Telemetry messages dropped (buffer bound, unreadable, refused)",
                                      value=telemetry.buffer.dropped)


def serve_metrics(listen: str | None, agent: AgentReadings,
                  telemetry: Telemetry | None = None) -> MetricsServer | None:
    """Start ``/metrics`` for ``agent``; None when ``[metrics] listen`` is empty or cannot be bound."""
    if not listen:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent, telemetry))
    try:
        return MetricsServer(registry, listen).start()
    except MetricsUnavailable as e:
        log.error("event=metrics_unavailable listen=%s error=%r action=serving_without_metrics", listen,
                  str(e))
        return None
