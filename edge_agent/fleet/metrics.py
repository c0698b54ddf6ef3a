"""The agent's own Prometheus ``/metrics``, for a local Prometheus or node agent.

A custom collector reads the live figures at scrape time (cascade counters and latencies, spool,
circuit, model, admission, telemetry buffer), so the hot path only updates the stats it already keeps.
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
from edgecloud.exposition import (
    COUNTERS,
    PREFIX,
    MetricsServer,
    MetricsUnavailable,
    add_latency,
    admission_metrics,
)

log = logging.getLogger(__name__)

CIRCUIT_STATES = (CLOSED, OPEN, HALF_OPEN, DISABLED)


class AgentCollector(Collector):
    """Every agent figure, read from the running agent at each scrape (and from its telemetry worker,
    in a fleet)."""

    def __init__(self, agent: AgentReadings, telemetry: Telemetry | None = None) -> None:
        self._agent = agent
        self._telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        snapshot = agent.snapshot()
        for key, (name, documentation) in COUNTERS.items():
            yield CounterMetricFamily(PREFIX + name, documentation, value=snapshot["counters"][key])
        yield self._latency(snapshot)
        info = GaugeMetricFamily(PREFIX + "model_info", "The edge model serving now",
                                 labels=("name", "version"))
        info.add_metric(agent.served(), 1)
        yield info
        state = agent.circuit_state()
        states = GaugeMetricFamily(PREFIX + "circuit_state", "Cloud circuit breaker state (1 = current)",
                                   labels=("state",))
        for name in CIRCUIT_STATES:
            states.add_metric((name,), int(name == state))
        yield states
        yield GaugeMetricFamily(PREFIX + "circuit_open", "1 while escalations fail fast (circuit open)",
                                value=int(state == "open"))
        yield from admission_metrics(agent.admission())
        if agent.spool is not None:
            yield GaugeMetricFamily(PREFIX + "spool_depth", "Cases waiting in the spool for the cloud",
                                    value=agent.spool.depth())
            yield CounterMetricFamily(PREFIX + "spool_dropped_total", "Cases the spool could not keep",
                                      value=agent.spool.dropped)
        yield from self._fleet()

    @staticmethod
    def _latency(snapshot: dict) -> HistogramMetricFamily:
        """Every call since the agent started, by path (both always there, at zero before a call)."""
        histogram = HistogramMetricFamily(PREFIX + "request_latency_seconds",
                                          "Call latency by path: answered at the edge, or escalated",
                                          labels=("path",))
        for path in PATHS:
            buckets = snapshot["latency_buckets"][path]
            add_latency(histogram, (path,), buckets["counts"], buckets["sum_s"])
        return histogram

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
