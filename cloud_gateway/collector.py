"""The fleet collector: subscribes to every device's status and telemetry of one fleet and exposes
per-device Prometheus series (labels ``fleet`` and ``device``).

Status is folded by :class:`edgecloud.fleet.status.FleetView`, as ``edgecloud fleet status`` does, so
both agree on online, model and last seen (the device's ``at``). Telemetry is deduplicated by ``seq``:
QoS 1 delivers at least once, and an agent resends what it was not sure the broker got. A jump in
``seq`` counts the messages that never arrived (dropped by a device's full buffer, or sent while this
collector was away without a persistent session); a ``seq`` far below the last one means the device
lost its state and starts over.

Counters are the device's totals since its agent started (Prometheus' ``rate()`` handles the reset at
a restart). Escalation ratio and latency quantiles are those of the latest telemetry interval, absent
when it had no calls; over longer windows, divide the counters' rates.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgecloud.exposition import COUNTERS, PREFIX
from edgecloud.fleet.status import DeviceRow, FleetView
from edgecloud.mqtt.client import Message, MqttClient, MqttConfig
from edgecloud.mqtt.topics import TopicKind

log = logging.getLogger(__name__)

DEVICE = PREFIX + "device_"
LABELS = ("fleet", "device")
#: seqs remembered per device to recognize a late duplicate; a seq further back is a restart from zero
RECENT = 1024
QUANTILES = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}


@dataclass
class DeviceTelemetry:
    """One device's telemetry stream: the newest message and what the seqs say about delivery."""

    latest: dict[str, Any] | None = None
    highest: int = -1
    messages: int = 0
    duplicates: int = 0
    missing: int = 0
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT))

    def accept(self, seq: int, device: str) -> bool:
        """Count the message with ``seq``; True when it is new and the newest (it becomes ``latest``).

        An agent delivers in seq order, so a new seq below the newest comes from elsewhere: it is
        counted as a message (it was already counted missing: counters never go down) and not used.
        """
        if seq in self.recent:
            self.duplicates += 1
            return False
        if seq < self.highest - RECENT:
            log.info("event=telemetry_seq_restarted device=%s seq=%d previous=%d", device, seq, self.highest)
            self.recent.clear()
            self.highest = -1
        self.recent.append(seq)
        self.messages += 1
        if seq < self.highest:
            return False
        if self.highest >= 0 and seq > self.highest + 1:
            self.missing += seq - self.highest - 1
            log.warning("event=telemetry_gap device=%s after_seq=%d seq=%d missing=%d", device,
                        self.highest, seq, seq - self.highest - 1)
        self.highest = seq
        return True


class FleetCollector(Collector):
    """Per-device series of one fleet, fed by MQTT (``start``) or by :meth:`apply` directly."""

    def __init__(self, mqtt: MqttConfig, fleet: str) -> None:
        self.fleet = fleet
        self.view = FleetView(fleet)
        self.telemetry: dict[str, DeviceTelemetry] = {}
        self._lock = threading.Lock()
        if not mqtt.client_id and mqtt.session_expiry_s:  # a lasting session needs a stable id
            mqtt = mqtt.model_copy(update={"client_id": f"edgecloud-collector-{fleet}"})
        self.client = MqttClient(mqtt, on_message=self.apply)

    def start(self) -> FleetCollector:
        for kind in (TopicKind.STATUS, TopicKind.TELEMETRY):
            self.client.subscribe(self.view.topics.every(kind))  # made on every connect
        self.client.start()
        log.info("event=collector_started fleet=%s broker=%s", self.fleet, self.client.config.broker)
        return self

    def stop(self) -> None:
        self.client.close()

    def apply(self, message: Message) -> None:
        """Fold one status or telemetry message in (paho's network thread: parse and return)."""
        parsed = self.view.topics.parse(message.topic)
        if parsed is None or not parsed.device:
            return
        with self._lock:
            if parsed.kind is TopicKind.TELEMETRY and not self._new_telemetry(parsed.device, message):
                return
            self.view.apply(message)

    def _new_telemetry(self, device: str, message: Message) -> bool:
        try:
            body = json.loads(message.payload)
            seq = body["seq"]
        except (ValueError, TypeError, KeyError):
            log.warning("event=telemetry_unreadable device=%s bytes=%d", device, len(message.payload))
            return False
        if not isinstance(seq, int) or seq < 0:
            log.warning("event=telemetry_unreadable device=%s seq=%r", device, seq)
            return False
        stream = self.telemetry.setdefault(device, DeviceTelemetry())
        if not stream.accept(seq, device):
            return False
        stream.latest = body
        return True

    # -- Prometheus ---------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        families = _Families()
        with self._lock:
            for row in self.view.sorted_rows():
                families.add(self.fleet, row, self.telemetry.get(row.device))
        yield from families.all()
        yield GaugeMetricFamily(PREFIX + "collector_mqtt_connected", "1 while the fleet's broker is "
                                "connected", value=int(self.client.is_connected))


class _Families:
    """The per-device metric families of one scrape."""

    def __init__(self) -> None:
        def gauge(name: str, documentation: str, *extra: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(DEVICE + name, documentation, labels=(*LABELS, *extra))

        def counter(name: str, documentation: str) -> CounterMetricFamily:
            return CounterMetricFamily(DEVICE + name, documentation, labels=LABELS)

        self.online = gauge("online", "1 while the device's status is online (0 after its goodbye or Will)")
        self.model = gauge("model_version", "Version of the model the device serves", "model")
        self.last_seen = gauge("last_seen_timestamp_seconds", "Newest 'at' the device sent (its clock)")
        self.counters = {key: counter(name, f"{text} (device's total since its agent started)")
                         for key, (name, text) in COUNTERS.items()}
        self.escalation = gauge("escalation_ratio", "Share of rows escalated over the last telemetry "
                                "interval")
        self.latency = gauge("request_latency_seconds", "Call latency over the last telemetry interval",
                             "path", "quantile")
        self.spool = gauge("spool_depth", "Cases waiting in the device's spool for the cloud")
        self.circuit = gauge("circuit_open", "1 while the device's cloud circuit is open")
        self.seq = gauge("telemetry_seq", "Newest telemetry sequence number received")
        self.messages = counter("telemetry_messages_total", "Telemetry messages received, without duplicates")
        self.duplicates = counter("telemetry_duplicate_messages_total", "Telemetry messages received again")
        self.missing = counter("telemetry_missing_messages_total", "Telemetry seqs never received")

    def add(self, fleet: str, row: DeviceRow, stream: DeviceTelemetry | None) -> None:
        labels = (fleet, row.device)
        latest = stream.latest if stream else None
        if row.online is not None:
            self.online.add_metric(labels, int(row.online))
        if row.last_seen is not None:
            self.last_seen.add_metric(labels, row.last_seen.timestamp())
        model, version = row.model, row.active_version
        if latest is not None:  # fresher than the status, which is only sent on connect
            model, version = latest.get("model", model), latest.get("model_version", version)
        if version is not None:
            self.model.add_metric((*labels, model or ""), version)
        if stream is None or latest is None:
            return
        self._telemetry(labels, stream, latest)

    def _telemetry(self, labels: tuple[str, str], stream: DeviceTelemetry, latest: dict[str, Any]) -> None:
        counters = latest.get("counters", {})
        for key, family in self.counters.items():
            if isinstance(counters.get(key), int):
                family.add_metric(labels, counters[key])
        if latest.get("escalation_rate") is not None:
            self.escalation.add_metric(labels, latest["escalation_rate"])
        for path, percentiles in latest.get("latency_ms", {}).items():
            for key, quantile in QUANTILES.items():
                if percentiles.get(key) is not None:
                    self.latency.add_metric((*labels, path, quantile), percentiles[key] / 1000.0)
        if "spool_depth" in latest:
            self.spool.add_metric(labels, latest["spool_depth"])
        if "circuit_state" in latest:
            self.circuit.add_metric(labels, int(latest["circuit_state"] == "open"))
        self.seq.add_metric(labels, stream.highest)
        self.messages.add_metric(labels, stream.messages)
        self.duplicates.add_metric(labels, stream.duplicates)
        self.missing.add_metric(labels, stream.missing)

    def all(self) -> Iterator[Metric]:
        yield from (self.online, self.model, self.last_seen, *self.counters.values(), self.escalation,
                    self.latency, self.spool, self.circuit, self.seq, self.messages, self.duplicates,
                    self.missing)
