"""The fleet collector: subscribes to every device's status and telemetry of one fleet and exposes
per-device Prometheus series (labels ``fleet`` and ``device``).

Status is folded by :class:`edgecloud_tools.fleet.status.FleetView`, as ``edgecloud fleet status`` does, so
both agree on online, model and last seen (the device's ``at``). Telemetry is deduplicated by ``seq``:
QoS 1 delivers at least once, and an agent resends what it was not sure the broker got. A jump in
``seq`` counts the messages that never arrived (dropped by a device's full buffer, or sent while this
collector was away without a persistent session); a ``seq`` far below the last one means the device
lost its state and starts over.

Counters are the device's totals since its agent started (Prometheus' ``rate()`` handles the reset at
a restart), and so is the latency histogram, which sums across devices. The escalation ratio is that of
the latest telemetry interval, 0 when it had no rows, so an idle device's series stay (at zero) rather
than vanish; over longer windows, divide the counters' rates.

A model's agreement with the cloud (telemetry's ``models[].quality``, docs/design.md §12) becomes
``edgecloud_device_model_agreement_rows_total`` (labels ``model``, ``version``, ``reason`` escalated or
audit, ``agree`` true or false): the totals since that version became active on the device, kept per
version, so a version a device left stays (no longer growing) beside the one it serves now; an agent
restart or a version served again starts from zero, which ``rate()`` and ``increase()`` take as a
counter reset. A model whose telemetry carries no quality (an older agent) has no such series: its
agreement is unknown, never counted as agreement.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgecloud.metrics.buckets import LATENCY_BUCKETS, add_latency
from edgecloud.metrics.names import COUNTERS, PREFIX
from edgecloud.mqtt.client import Message, MqttClient, MqttConfig
from edgecloud.mqtt.fleet_view import DeviceRow, FleetView, json_object
from edgecloud.mqtt.payloads import AgreementCounts, LatencyBuckets, Quality
from edgecloud.mqtt.topics import TopicKind

log = logging.getLogger(__name__)

DEVICE = PREFIX + "device_"
LABELS = ("fleet", "device")
#: seqs remembered per device to recognize a late duplicate; a seq further back is a restart from zero
RECENT = 1024
#: model versions whose agreement totals are kept per device (the oldest go first)
VERSIONS_KEPT = 16


class _Figures(BaseModel):
    """Figures that telemetry gives for the device (every model's total) and for each model."""

    model_config = ConfigDict(extra="ignore")

    model_version: int | None = None
    counters: dict[str, int] = Field(default_factory=dict)
    escalation_rate: float | None = Field(None, ge=0, le=1)
    spool_depth: int | None = None
    circuit_state: str | None = None


class ModelFigures(_Figures):
    """One served model's own figures (telemetry's ``models``)."""

    name: str = Field(min_length=1)
    ready: bool | None = None
    quality: Quality | None = None


class TelemetryFigures(_Figures):
    """The telemetry fields this collector exposes, checked when a message arrives, so one device's
    malformed message is dropped (and logged) instead of failing every later scrape."""

    seq: int = Field(ge=0)
    at: str = ""
    model: str | None = None
    latency_buckets: LatencyBuckets | None = None
    models: list[ModelFigures] = Field(default_factory=list)


@dataclass
class DeviceTelemetry:
    """One device's telemetry stream: the newest message and what the seqs say about delivery."""

    latest: TelemetryFigures | None = None
    highest: int = -1
    messages: int = 0
    duplicates: int = 0
    missing: int = 0
    #: seq → ``at`` of the last RECENT messages: a resend carries the same ``at``
    recent: OrderedDict[int, str] = field(default_factory=OrderedDict)
    #: (model, version) → its agreement totals since that version became active, the newest last
    agreement: OrderedDict[tuple[str, int], AgreementCounts] = field(default_factory=OrderedDict)

    def accept(self, figures: TelemetryFigures, device: str) -> bool:
        """Count one message; True when it is new and the newest (it becomes ``latest``).

        A known seq with the same ``at`` is a resend; with another ``at``, or a seq far below the
        newest, the device lost its state and starts over. An agent delivers in seq order, so a new
        seq below the newest comes from elsewhere: it is counted as a message (it was already counted
        missing: counters never go down) and not used.
        """
        seq = figures.seq
        if self.recent.get(seq) == figures.at:
            self.duplicates += 1
            return False
        if seq in self.recent or seq < self.highest - RECENT:
            log.info("event=telemetry_seq_restarted device=%s seq=%d previous=%d", device, seq, self.highest)
            self.recent.clear()
            self.highest = -1
        self.recent[seq] = figures.at
        if len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        self.messages += 1
        if seq < self.highest:
            return False
        if self.highest >= 0 and seq > self.highest + 1:
            self.missing += seq - self.highest - 1
            log.warning("event=telemetry_gap device=%s after_seq=%d seq=%d missing=%d", device,
                        self.highest, seq, seq - self.highest - 1)
        self.highest = seq
        self.latest = figures
        for served in figures.models:
            if served.quality is not None:
                key = (served.name, served.quality.version)
                self.agreement.pop(key, None)
                self.agreement[key] = served.quality.totals
        while len(self.agreement) > VERSIONS_KEPT:
            self.agreement.popitem(last=False)
        return True


class FleetCollector(Collector):
    """Per-device series of one fleet, fed by MQTT (``start``) or by :meth:`apply` directly."""

    def __init__(self, mqtt: MqttConfig, fleet: str) -> None:
        self.fleet = fleet
        self.view = FleetView(fleet)
        self.telemetry: dict[str, DeviceTelemetry] = {}
        self._lock = threading.Lock()
        if not mqtt.client_id and mqtt.session_expiry_s:  # a lasting session needs a stable id, one per
            # host so that gateway replicas collecting the same fleet do not take it from each other
            client_id = f"edgecloud-collector-{fleet}-{socket.gethostname()}"
            mqtt = mqtt.model_copy(update={"client_id": client_id})
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
        body = json_object(message)
        if body is None:
            log.warning("event=fleet_message_unreadable device=%s bytes=%d", parsed.device,
                        len(message.payload))
            return
        with self._lock:
            if parsed.kind is TopicKind.TELEMETRY and not self._new_telemetry(parsed.device, body):
                return
            self.view.fold(parsed.kind, parsed.device, body)

    def _new_telemetry(self, device: str, body: dict[str, Any]) -> bool:
        try:
            figures = TelemetryFigures.model_validate(body)
        except ValidationError as e:
            log.warning("event=telemetry_unreadable device=%s error=%r", device,
                        "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
            return False
        return self.telemetry.setdefault(device, DeviceTelemetry()).accept(figures, device)

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

        def counter(name: str, documentation: str, *extra: str) -> CounterMetricFamily:
            return CounterMetricFamily(DEVICE + name, documentation, labels=(*LABELS, *extra))

        self.online = gauge("online", "1 while the device's status is online (0 after its goodbye or Will)")
        self.model = gauge("model_version", "Version of the model the device serves", "model")
        self.last_seen = gauge("last_seen_timestamp_seconds", "Newest 'at' the device sent (its clock)")
        self.counters = {key: counter(name, f"{text} (device's total since its agent started)")
                         for key, (name, text) in COUNTERS.items()}
        self.escalation = gauge("escalation_ratio", "Share of rows escalated over the last telemetry "
                                "interval")
        self.latency = HistogramMetricFamily(DEVICE + "request_latency_seconds", "Call latency by path "
                                             "(device's total since its agent started)",
                                             labels=(*LABELS, "path"))
        self.spool = gauge("spool_depth", "Cases waiting in the device's spool for the cloud")
        self.circuit = gauge("circuit_open", "1 while the device's cloud circuit is open")
        self.seq = gauge("telemetry_seq", "Newest telemetry sequence number received")
        self.messages = counter("telemetry_messages_total", "Telemetry messages received, without duplicates")
        self.duplicates = counter("telemetry_duplicate_messages_total", "Telemetry messages received again")
        self.missing = counter("telemetry_missing_messages_total", "Telemetry seqs never received")
        # each model's own, beside the device's totals (other names, so that sums do not count twice)
        self.model_ready = gauge("model_ready", "1 while the model serves, 0 while it is not ready", "model")
        self.model_counters = {key: counter(f"model_{name}", f"{text} (the model's own, since its agent "
                                            "started)", "model") for key, (name, text) in COUNTERS.items()}
        self.model_escalation = gauge("model_escalation_ratio", "Share of the model's rows escalated over "
                                      "the last telemetry interval", "model")
        self.model_spool = gauge("model_spool_depth", "The model's cases waiting in the spool", "model")
        self.model_circuit = gauge("model_circuit_open", "1 while the model's cloud circuit is open", "model")
        self.agreement = counter("model_agreement_rows_total", "Rows the cloud answered in time for the "
                                 "model version, escalated or audited, by whether it answered as the edge "
                                 "did (since the version became active on the device)", "model", "version",
                                 "reason", "agree")

    def add(self, fleet: str, row: DeviceRow, stream: DeviceTelemetry | None) -> None:
        labels = (fleet, row.device)
        latest = stream.latest if stream else None
        if row.online is not None:
            self.online.add_metric(labels, int(row.online))
        if row.last_seen is not None:
            self.last_seen.add_metric(labels, row.last_seen.timestamp())
        model, version = row.model, row.active_version
        if latest is not None:  # fresher than the status, which is only sent on connect
            model = latest.model if latest.model is not None else model
            version = latest.model_version if latest.model_version is not None else version
        if latest is not None and latest.models:
            for served in latest.models:
                if served.model_version is not None:
                    self.model.add_metric((*labels, served.name), served.model_version)
        elif version is not None:
            self.model.add_metric((*labels, model or ""), version)
        if stream is None or latest is None:
            return
        self._telemetry(labels, stream, latest)
        for served in latest.models:
            self._model(labels, served)
        for (model, version), totals in stream.agreement.items():
            for reason, rows, agree in totals.by_reason():
                self.agreement.add_metric((*labels, model, str(version), reason, "true"), agree)
                self.agreement.add_metric((*labels, model, str(version), reason, "false"), rows - agree)

    def _telemetry(self, labels: tuple[str, str], stream: DeviceTelemetry, latest: TelemetryFigures) -> None:
        self._figures(labels, latest, self.counters, self.escalation)
        buckets = latest.latency_buckets
        if buckets is not None and tuple(buckets.le) == LATENCY_BUCKETS:  # other bounds cannot be summed
            for path in ("edge", "escalated"):
                figures = getattr(buckets, path)
                add_latency(self.latency, (*labels, path), figures.counts, figures.sum_s)
        self._states(labels, latest, self.spool, self.circuit)
        self.seq.add_metric(labels, stream.highest)
        self.messages.add_metric(labels, stream.messages)
        self.duplicates.add_metric(labels, stream.duplicates)
        self.missing.add_metric(labels, stream.missing)

    def _model(self, device: tuple[str, str], served: ModelFigures) -> None:
        labels = (*device, served.name)
        if served.ready is not None:
            self.model_ready.add_metric(labels, int(served.ready))
        self._figures(labels, served, self.model_counters, self.model_escalation)
        self._states(labels, served, self.model_spool, self.model_circuit)

    @staticmethod
    def _figures(labels: tuple[str, ...], figures: _Figures, counters: dict[str, CounterMetricFamily],
                 escalation: GaugeMetricFamily) -> None:
        for key, family in counters.items():
            if key in figures.counters:
                family.add_metric(labels, figures.counters[key])
        escalation.add_metric(labels, figures.escalation_rate or 0.0)  # idle: 0, not gone

    @staticmethod
    def _states(labels: tuple[str, ...], figures: _Figures, spool: GaugeMetricFamily,
                circuit: GaugeMetricFamily) -> None:
        if figures.spool_depth is not None:
            spool.add_metric(labels, figures.spool_depth)
        if figures.circuit_state is not None:
            circuit.add_metric(labels, int(figures.circuit_state == "open"))

    def all(self) -> Iterator[Metric]:
        yield from (self.online, self.model, self.last_seen, *self.counters.values(), self.escalation,
                    self.latency, self.spool, self.circuit, self.seq, self.messages, self.duplicates,
                    self.missing, self.model_ready, *self.model_counters.values(), self.model_escalation,
                    self.model_spool, self.model_circuit, self.agreement)
