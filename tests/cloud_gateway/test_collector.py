"""The gateway's fleet collector: per-device Prometheus series from real agents' status and telemetry
over a real mosquitto, scraped over HTTP; deduplication and gap counting by ``seq``; the gateway's own
serving figures; ``cloud-gateway collect`` as a process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from cloud_gateway import cli
from cloud_gateway.collector import FleetCollector
from edgecloud.config import build
from edgecloud.metrics.buckets import LATENCY_BUCKETS
from edgecloud.mqtt.client import Message, MqttClient, MqttConfig
from edgecloud.mqtt.payloads import Status
from edgecloud.mqtt.topics import FleetTopics
from tests.support.fleet import FLEET, ROOT, Scrape, fleet_sections
from tests.support.net import free_port, wait_for
from tests.support.onnx_models import linear_classifier
from tests.support.services import Client, GatewayCloud, start_agent

if TYPE_CHECKING:
    from pathlib import Path

    from edgecloud_tools.rig.broker import LocalBroker

TOPICS = FleetTopics(FLEET)
X = np.random.default_rng(9).standard_normal((4, 8)).astype(np.float32)


def buckets(edge: int, escalated: int = 0) -> dict:
    """Latency buckets of ``edge`` calls under 2 ms and ``escalated`` ones of 0.2-0.3 s."""
    def path(calls: int, first: int, seconds: float) -> dict:
        return {"counts": [0] * first + [calls] * (len(LATENCY_BUCKETS) + 1 - first),
                "sum_s": calls * seconds}
    return {"le": list(LATENCY_BUCKETS), "edge": path(edge, LATENCY_BUCKETS.index(0.002), 0.0015),
            "escalated": path(escalated, LATENCY_BUCKETS.index(0.3), 0.25)}


def telemetry(device: str, seq: int, requests: int = 0, at: str = "2025-06-01T12:00:00Z",
              **fields: object) -> Message:
    body = {"device": device, "seq": seq, "at": at, "model": "clf", "model_version": 2,
            "counters": {"requests": requests}, "latency_buckets": buckets(requests),
            "escalation_rate": 0.25, "spool_depth": 0, "circuit_state": "closed", **fields}
    return Message(str(TOPICS.telemetry(device)), json.dumps(body).encode(), 1, False)


def test_telemetry_is_deduplicated_by_seq_and_gaps_are_counted() -> None:
    collector = FleetCollector(build(MqttConfig, {}), FLEET)  # fed directly, never connected
    registry = CollectorRegistry()
    registry.register(collector)

    def value(name: str, device: str = "cam-1", **labels: str) -> float | None:
        return registry.get_sample_value(name, {"fleet": FLEET, "device": device, **labels})

    for seq, requests in [(0, 1), (1, 2), (1, 2), (2, 3), (5, 9), (2, 3), (4, 7)]:
        collector.apply(telemetry("cam-1", seq, requests))
    assert value("edgecloud_device_telemetry_messages_total") == 5  # 0, 1, 2, 5 and the late 4
    assert value("edgecloud_device_telemetry_duplicate_messages_total") == 2
    assert value("edgecloud_device_telemetry_missing_messages_total") == 2  # 3 and 4 were missing at 5
    assert value("edgecloud_device_telemetry_seq") == 5
    assert value("edgecloud_device_requests_total") == 9  # the newest, not the late one
    latency = "edgecloud_device_request_latency_seconds"
    assert value(latency + "_count", path="edge") == 9  # the newest totals
    assert value(latency + "_bucket", path="edge", le="0.001") == 0
    assert value(latency + "_bucket", path="edge", le="0.002") == 9
    assert value(latency + "_sum", path="edge") == pytest.approx(9 * 0.0015)
    assert value(latency + "_count", path="escalated") == 0  # there, at zero
    assert value("edgecloud_device_escalation_ratio") == 0.25
    assert value("edgecloud_device_model_version", model="clf") == 2
    assert value("edgecloud_device_online") is None  # no status seen yet

    for seq in (5000, 0):  # a device that lost its state starts over from zero
        collector.apply(telemetry("cam-2", seq, requests=seq))
    collector.apply(Message(str(TOPICS.telemetry("cam-2")), b"not json", 1, False))
    assert value("edgecloud_device_telemetry_seq", "cam-2") == 0
    assert value("edgecloud_device_telemetry_missing_messages_total", "cam-2") == 0
    assert value("edgecloud_device_requests_total", "cam-2") == 0


def test_malformed_telemetry_is_dropped_and_a_reflashed_device_starts_over() -> None:
    collector = FleetCollector(build(MqttConfig, {}), FLEET)
    registry = CollectorRegistry()
    registry.register(collector)

    def value(name: str, device: str) -> float | None:
        return registry.get_sample_value(name, {"fleet": FLEET, "device": device})

    collector.apply(telemetry("cam-1", 0, requests=4))
    for seq, bad in ((0, {"model_version": "v2"}), (1, {"counters": ["x"]}), (2, {"escalation_rate": "high"}),
                     (-1, {})):
        collector.apply(telemetry("cam-2", seq, **bad))  # one device's junk …
    assert value("edgecloud_device_requests_total", "cam-1") == 4  # … does not break the scrape
    assert value("edgecloud_device_telemetry_messages_total", "cam-2") is None

    for seq in range(100):
        at = f"2025-06-01T12:{seq // 60:02d}:{seq % 60:02d}Z"
        collector.apply(telemetry("cam-3", seq, requests=seq, at=at))
    for seq in range(3):  # state lost, seq from 0 again: new messages (another ``at``), not resends
        collector.apply(telemetry("cam-3", seq, requests=seq + 1, at=f"2025-06-02T08:00:{seq:02d}Z"))
    assert value("edgecloud_device_telemetry_seq", "cam-3") == 2
    assert value("edgecloud_device_requests_total", "cam-3") == 3
    assert value("edgecloud_device_telemetry_duplicate_messages_total", "cam-3") == 0


def test_an_idle_device_keeps_its_ratio_and_latency_series_at_zero_and_odd_buckets_are_left_out() -> None:
    collector = FleetCollector(build(MqttConfig, {}), FLEET)
    registry = CollectorRegistry()
    registry.register(collector)

    def value(name: str, device: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"fleet": FLEET, "device": device, **labels})

    collector.apply(telemetry("idle", 0, escalation_rate=None))  # an interval without a call
    assert value("edgecloud_device_escalation_ratio", "idle") == 0
    for path in ("edge", "escalated"):
        assert value("edgecloud_device_request_latency_seconds_count", "idle", path=path) == 0
        assert value("edgecloud_device_request_latency_seconds_bucket", "idle", path=path, le="0.1") == 0
    other = {"le": [0.1], "edge": {"counts": [1, 2], "sum_s": 0.3},
             "escalated": {"counts": [0, 0], "sum_s": 0}}
    collector.apply(telemetry("old", 0, requests=2, latency_buckets=other))  # another agent's bounds
    assert value("edgecloud_device_requests_total", "old") == 2
    assert value("edgecloud_device_request_latency_seconds_count", "old", path="edge") is None


def test_each_models_own_figures_are_series_of_their_own_beside_the_devices_totals() -> None:
    collector = FleetCollector(build(MqttConfig, {}), FLEET)
    registry = CollectorRegistry()
    registry.register(collector)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"fleet": FLEET, "device": "cam-1", **labels})

    models = [{"name": "clf", "model_version": 2, "ready": True, "counters": {"requests": 5},
               "escalation_rate": 0.5, "spool_depth": 3, "circuit_state": "closed"},
              {"name": "weld", "model_version": 7, "ready": True, "counters": {"requests": 2},
               "escalation_rate": 0.0, "spool_depth": 0, "circuit_state": "open"},
              {"name": "broken", "model_version": None, "ready": False, "counters": {"requests": 0},
               "escalation_rate": None, "spool_depth": 0, "circuit_state": "closed"}]
    collector.apply(telemetry("cam-1", 0, requests=7, models=models))
    assert value("edgecloud_device_requests_total") == 7  # the device's total, as before
    names = ("clf", "weld", "broken")
    assert [value("edgecloud_device_model_requests_total", model=m) for m in names] == [5, 2, 0]
    assert [value("edgecloud_device_model_version", model=m) for m in names] == [2, 7, None]
    assert [value("edgecloud_device_model_ready", model=m) for m in names] == [1, 1, 0]
    assert value("edgecloud_device_model_escalation_ratio", model="clf") == 0.5
    assert value("edgecloud_device_model_escalation_ratio", model="broken") == 0  # idle: 0, not gone
    assert value("edgecloud_device_model_spool_depth", model="clf") == 3
    assert [value("edgecloud_device_model_circuit_open", model=m) for m in ("clf", "weld")] == [0, 1]
    collector.apply(telemetry("cam-1", 1, requests=8, models=[{"name": ""}]))  # a model without a name
    assert value("edgecloud_device_telemetry_seq") == 0  # dropped whole


def quality(version: int, audited: int, audit_agree: int, escalated: int = 0,
            escalated_agree: int = 0) -> dict:
    """A model's telemetry ``quality`` whose totals are the given counts (its interval: the same)."""
    counts = {"rows": 100, "escalated": escalated, "audited": audited, "audit_agree": audit_agree,
              "escalated_agree": escalated_agree}
    return {"version": version, **counts, "confidence_hist": [0] * 9 + [100], "totals": counts}


def test_agreement_is_a_series_per_version_and_unknown_without_quality() -> None:
    collector = FleetCollector(build(MqttConfig, {}), FLEET)
    registry = CollectorRegistry()
    registry.register(collector)

    def agreement(device: str, version: str, reason: str, agree: str) -> float | None:
        return registry.get_sample_value("edgecloud_device_model_agreement_rows_total", {
            "fleet": FLEET, "device": device, "model": "clf", "version": version, "reason": reason,
            "agree": agree})

    def served(version: int, **fields: object) -> list[dict]:
        return [{"name": "clf", "model_version": version, "ready": True, "counters": {"requests": 1},
                 "escalation_rate": 0.0, "spool_depth": 0, "circuit_state": "closed", **fields}]

    collector.apply(telemetry("cam-1", 0, models=served(2, quality=quality(2, 40, 38, 10, 6))))
    assert [agreement("cam-1", "2", "audit", a) for a in ("true", "false")] == [38, 2]
    assert [agreement("cam-1", "2", "escalated", a) for a in ("true", "false")] == [6, 4]
    collector.apply(telemetry("cam-1", 1, models=served(3, quality=quality(3, 5, 1))))  # a new version
    assert [agreement("cam-1", "3", "audit", a) for a in ("true", "false")] == [1, 4]
    assert [agreement("cam-1", "2", "audit", a) for a in ("true", "false")] == [38, 2]  # kept, not growing
    # an older agent sends no quality: its agreement is unknown, not a series at zero
    collector.apply(telemetry("old", 0, models=served(2)))
    assert registry.get_sample_value("edgecloud_device_model_requests_total",
                                     {"fleet": FLEET, "device": "old", "model": "clf"}) == 1
    assert all(agreement("old", "2", reason, a) is None for reason in ("audit", "escalated")
               for a in ("true", "false"))
    # more rows agreeing than were compared does not read: the message is dropped whole
    collector.apply(telemetry("cam-1", 2, models=served(3, quality=quality(3, 5, 6))))
    seq = registry.get_sample_value("edgecloud_device_telemetry_seq", {"fleet": FLEET, "device": "cam-1"})
    assert seq == 1


def test_gateway_collects_per_device_metrics_from_real_agents(broker: LocalBroker, tmp_path: Path) -> None:
    edge = linear_classifier(tmp_path / "edge.onnx", card={"name": "clf", "version": 3})
    cloud = GatewayCloud(tmp_path / "cloud", linear_classifier(tmp_path / "cloud.onnx", seed=1), "clf",
                         collector={"fleet": FLEET, "mqtt": broker.mqtt_section()},
                         metrics={"listen": "127.0.0.1:0"}).start()
    port = cloud.gateway.metrics.port
    agents = {d: start_agent(tmp_path / d, edge, cloud.port, agent={"device_id": d}, **fleet_sections(broker))
              for d in ("d1", "d2")}
    try:
        for device, calls in (("d1", 3), ("d2", 1)):
            with Client(agents[device].port) as client:
                for _ in range(calls):
                    client.infer("clf", {"x": X}, escalate="always" if device == "d2" else "never")

        def counted() -> bool:
            scrape = Scrape(port)
            return (scrape.value("edgecloud_device_requests_total", device="d1") == 3
                    and scrape.value("edgecloud_device_requests_total", device="d2") == 1)

        assert wait_for(counted, timeout=10)
        scrape = Scrape(port)
        for device in ("d1", "d2"):
            labels = {"fleet": FLEET, "device": device}
            assert scrape.value("edgecloud_device_online", **labels) == 1
            assert scrape.value("edgecloud_device_model_version", model="clf", **labels) == 3
            assert scrape.value("edgecloud_device_last_seen_timestamp_seconds", **labels) > 1.7e9
            assert scrape.value("edgecloud_device_spool_depth", **labels) == 0
            assert scrape.value("edgecloud_device_circuit_open", **labels) == 0
            assert scrape.value("edgecloud_device_telemetry_messages_total", **labels) >= 1
            assert scrape.value("edgecloud_device_telemetry_missing_messages_total", **labels) == 0
        assert scrape.value("edgecloud_device_escalated_rows_total", device="d2") == 4
        assert scrape.value("edgecloud_device_model_escalated_rows_total", device="d2", model="clf") == 4
        assert scrape.value("edgecloud_device_model_ready", device="d1", model="clf") == 1
        assert scrape.value("edgecloud_device_cloud_answers_total", device="d2") == 4
        assert scrape.value("edgecloud_device_escalated_rows_total", device="d1") == 0
        # the forced rows, each compared by d2 with its own answer; d1 sent nothing (escalate=never)
        agreement = "edgecloud_device_model_agreement_rows_total"
        assert sum(scrape.value(agreement, device="d2", model="clf", version="3", reason="escalated",
                                agree=a) for a in ("true", "false")) == 4
        assert scrape.value(agreement, device="d1", model="clf", version="3", reason="audit",
                            agree="false") == 0
        latency = "edgecloud_device_request_latency_seconds_count"
        assert scrape.value(latency, device="d1", path="edge") == 3
        assert scrape.value(latency, device="d2", path="escalated") == 1
        assert scrape.value(latency, device="d2", path="edge") == 0
        assert scrape.value("edgecloud_collector_mqtt_connected") == 1
        assert scrape.value("edgecloud_gateway_batched_rows_total", model="clf", version="1") == 4
        answered = "edgecloud_gateway_request_latency_seconds"
        assert scrape.value(answered + "_count", model="clf", version="1") == 1  # d2's one escalation
        assert scrape.value(answered + "_bucket", model="clf", version="1", le="+Inf") == 1
        assert scrape.value("edgecloud_gateway_hard_examples") == 4
        agents.pop("d2").stop()
        assert wait_for(lambda: Scrape(port).value("edgecloud_device_online", device="d2") == 0)
    finally:
        for agent in agents.values():
            agent.stop()
        cloud.stop()


def test_collect_mode_serves_metrics_without_a_model_repository(broker: LocalBroker) -> None:
    port = free_port()
    args = ["collect", "--collect-mqtt", f"{broker.host}:{broker.port}", "--collect-fleet", FLEET,
            "--metrics-listen", f"127.0.0.1:{port}"]
    with subprocess.Popen([sys.executable, "-m", "cloud_gateway.cli", *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        try:
            assert proc.stdout is not None and "collecting fleet plant-1" in proc.stdout.readline()
            with MqttClient(broker.mqtt_config()) as device:
                device.wait_connected(5)
                device.publish(TOPICS.status("cam-7"), Status(
                    device="cam-7", state="online", agent_version="0.1.0", model="clf", active_version=5),
                    retain=True)

            def online() -> bool:
                return Scrape(port).value("edgecloud_device_online", fleet=FLEET, device="cam-7") == 1

            assert wait_for(online, timeout=10)
            assert Scrape(port).value("edgecloud_device_model_version", device="cam-7", model="clf") == 5
        finally:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


@pytest.mark.parametrize(("args", "message"), [
    (("collect", "--metrics-listen", "127.0.0.1:0"), "collector.fleet: collect mode needs a fleet"),
    (("collect", "--collect-fleet", FLEET), "collector.fleet needs metrics.listen"),
    (("collect", "--collect-fleet", FLEET, "--metrics-listen", "unix:/tmp/m.sock"), "metrics.listen"),
    (("collect", "--collect-mqtt", "nowhere", "--collect-fleet", FLEET), "--collect-mqtt"),
])
def test_collect_mode_bad_configuration_exits_2(args: tuple[str, ...], message: str, capsys) -> None:
    assert cli.main(list(args)) == 2
    assert message in capsys.readouterr().err
