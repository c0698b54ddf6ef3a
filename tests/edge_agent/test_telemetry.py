"""Telemetry and fleet presence of real agents on a real mosquitto: payloads against the JSON Schema,
``seq`` across restarts, nothing lost (and nothing out of order) across a broker restart, the disk
buffer's bound, circuit events, the Last Will of a killed agent and the goodbye of a stopped one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jsonschema
import numpy as np
import pytest

from edge_agent.disk_queue import DiskQueue
from edge_agent.fleet.telemetry import system_figures
from edge_agent.serving.stats import CONFIDENCE_EDGES, CallRecord, Stats
from edgecloud.mqtt.client import MqttClient
from edgecloud.mqtt.payloads import Counters, Event
from edgecloud.mqtt.topics import FleetTopics, TopicKind
from edgecloud.protocol.parameters import AgentResponse
from edgecloud_tools.rig.services import ServiceProcess
from tests.support.fleet import FLEET, Recorder, Scrape, fleet_sections, schema
from tests.support.net import free_port, wait_for
from tests.support.onnx_models import linear_classifier
from tests.support.services import Client, start_agent

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from edgecloud_tools.rig.broker import LocalBroker

TOPICS = FleetTopics(FLEET)
X = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return linear_classifier(tmp_path / "edge.onnx", card={"name": "clf", "version": 3})


@pytest.fixture
def recorder(broker: LocalBroker) -> Iterator[Recorder]:
    """Every status, telemetry and event message of device d1, from before any agent starts."""
    recorder = Recorder()
    with MqttClient(broker.mqtt_config(), on_message=recorder) as watcher:
        watcher.wait_connected(5)
        for topic in (TOPICS.status("d1"), TOPICS.telemetry("d1"), TOPICS.events("d1")):
            watcher.subscribe(topic)
        yield recorder


def next_seq(state_dir: Path) -> int:
    return int((state_dir / "telemetry" / "seq").read_text())


def test_payloads_follow_the_schema_and_seq_survives_a_restart(broker, recorder, model, tmp_path) -> None:
    state, topic, device = tmp_path / "state", TOPICS.telemetry("d1"), {"device_id": "d1"}
    with start_agent(state, model, agent=device, **fleet_sections(broker, 0.2)) as agent:
        with Client(agent.port) as client:
            for _ in range(5):
                client.infer("clf", {"x": X})
        assert wait_for(lambda: any(b["counters"]["requests"] == 5 for b in recorder.bodies(topic)))
    first_life = next_seq(state)
    assert wait_for(lambda: first_life - 1 in recorder.seqs(topic))
    # a second life reporting once a minute sends two messages: one at start, the last one at stop
    with start_agent(state, model, agent=device, **fleet_sections(broker, 60)) as agent:
        assert wait_for(lambda: first_life in recorder.seqs(topic))
        with Client(agent.port) as client:
            for _ in range(2):
                client.infer("clf", {"x": X})
    assert wait_for(lambda: first_life + 1 in recorder.seqs(topic)), "no last message at stop"

    seqs = recorder.seqs(topic)
    assert seqs == list(range(first_life + 2)), f"seq reused, skipped or out of order: {seqs}"
    bodies = recorder.bodies(topic)
    for body in bodies:
        jsonschema.validate(body, schema("telemetry"))
    first, (started, stopped) = bodies[:first_life], bodies[first_life:]
    assert started["counters"]["requests"] == 0  # counters restart with the agent
    assert stopped["counters"] == {"requests": 2, "rows": 8, "escalated": 0, "cloud_answers": 0,
                                   "degraded": 0, "rate_limited": 0, "in_flight_limited": 0, "errors": 0,
                                   "audited": 0, "reused": 0, "upstream_bytes": 0}
    assert (stopped["model"], stopped["model_version"], stopped["circuit_state"]) == ("clf", 3, "disabled")
    assert {"cpu_percent", "memory_total_bytes", "temperatures_c"} <= stopped["system"].keys()
    # histograms and latencies cover one interval each: together they count every row exactly once
    assert sum(sum(b["confidence_histogram"]["counts"]) for b in first) == 20
    assert sum(stopped["confidence_histogram"]["counts"]) == 8
    busy = [b for b in bodies if sum(b["confidence_histogram"]["counts"])]
    assert all(b["escalation_rate"] == 0.0 and b["latency_ms"]["edge"]["p50"] > 0 for b in busy)
    assert all(b["escalation_rate"] is None and b["latency_ms"]["edge"]["p50"] is None
               for b in bodies if b not in busy)


def test_broker_restart_loses_no_telemetry_and_keeps_its_order(broker, model, tmp_path) -> None:
    topic = TOPICS.telemetry("d1")
    state, events, recorder, commands = tmp_path / "state", TOPICS.events("d1"), Recorder(), Recorder()
    # a persistent session: what is published while the watcher reconnects waits for it on the broker
    with MqttClient(broker.mqtt_config(client_id="telemetry-watcher", session_expiry_s=300),
                    on_message=recorder) as watcher:
        watcher.wait_connected(5)
        watcher.subscribe(topic)
        with start_agent(state, model, agent={"device_id": "d1"}, **fleet_sections(broker, 0.1)) as agent:
            agent.fleet.on(events, commands)
            assert wait_for(lambda: len(recorder.seqs(topic)) >= 3)
            broker.stop()
            assert wait_for(lambda: agent.telemetry.buffer.depth() >= 8), "telemetry did not pile up on disk"
            scrape = Scrape(agent.metrics.port)
            assert scrape.value("edgecloud_mqtt_connected") == 0
            assert scrape.value("edgecloud_telemetry_buffered_messages") >= 8
            broker.start()
            agent.fleet.client.wait_connected(10)
            produced = next_seq(state) - 1
            assert wait_for(lambda: agent.telemetry.buffer.depth() == 0 and produced in recorder.seqs(topic))
            with MqttClient(broker.mqtt_config()) as operator:  # the agent subscribed again
                operator.wait_connected(5)
                operator.publish(events, Event(device="d1", type="test.ping"))
            assert wait_for(lambda: any(b["type"] == "test.ping" for b in commands.bodies(events)))
        last = next_seq(state) - 1
        assert wait_for(lambda: last in recorder.seqs(topic))
    arrivals = recorder.seqs(topic)
    first_arrivals = list(dict.fromkeys(arrivals))
    lost = sorted(set(range(last + 1)) - set(arrivals))
    assert lost == [], f"{len(lost)} telemetry messages lost across the broker restart: {lost}"
    assert first_arrivals == list(range(last + 1)), f"out of order: {first_arrivals}"
    assert agent.telemetry.buffer.dropped == 0


def test_buffer_drops_the_oldest_beyond_its_bound_and_survives_a_restart(tmp_path) -> None:
    message = b"x" * 100
    buffer = DiskQueue(tmp_path, 350, ".json", "telemetry")
    for seq in range(5):
        buffer.put(seq, message)
    assert (buffer.depth(), buffer.dropped, buffer.oldest()) == (3, 2, (2, message))
    buffer.remove(2)
    (tmp_path / ".00000000000000000009.json.1.tmp").write_bytes(b"half")  # a crash mid-write
    reopened = DiskQueue(tmp_path, 150, ".json", "telemetry")  # a smaller bound applies at once
    assert (reopened.depth(), reopened.dropped, reopened.highest()) == (1, 1, 4)
    assert reopened.oldest() == (4, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000000000000000004.json"]


def test_system_figures_of_a_jetson_fit_the_schema() -> None:
    sample = {"cpu": {"load1": 1.5, "count": 6, "usage": 0.375},
              "memory": {"total_bytes": 8_000_000_000, "available_bytes": 6_000_000_000,
                         "used_bytes": 2_000_000_000},
              "temperatures_c": {"cpu-thermal": 48.5}, "gpu_load": 0.615, "power_mw": {"VDD_IN": 5123.0}}
    figures = system_figures(sample)
    assert figures == {"cpu_percent": 37.5, "memory_used_bytes": 2_000_000_000,
                       "memory_total_bytes": 8_000_000_000, "temperatures_c": {"cpu-thermal": 48.5},
                       "gpu_load_percent": 61.5, "power_mw": {"VDD_IN": 5123.0}}
    jsonschema.validate(figures, schema("telemetry")["properties"]["system"])
    jsonschema.validate(system_figures({}), schema("telemetry")["properties"]["system"])  # a bare machine


def test_a_call_counts_into_every_telemetry_counter() -> None:
    stats = Stats()
    stats.record(CallRecord(rows=5, escalated_rows=4, cloud_rows=2, degraded_rows=2, rate_limited_rows=1,
                            in_flight_limited_rows=1, reused_rows=1, latency_s=0.01,
                            confidences=np.array([0.1, 0.2, 0.3, 0.9, 1.0]).tolist()))
    stats.audit()
    stats.upstream(1234)
    interval = stats.interval()
    assert Counters(**interval["counters"]).to_dict() == {
        "requests": 1, "rows": 5, "escalated": 4, "cloud_answers": 2, "degraded": 2, "rate_limited": 1,
        "in_flight_limited": 1, "errors": 0, "audited": 1, "reused": 1, "upstream_bytes": 1234}
    assert interval["confidence_histogram"]["counts"] == [0, 1, 1, 1, 0, 0, 0, 0, 0, 2]
    with pytest.raises(TypeError):  # by keyword only: a new count cannot slip into another's place
        CallRecord(5, 4, 2, 2, 1, 1, 0.01, [0.5] * 5)  # type: ignore[misc]


def test_the_confidence_histogram_bins_rows_as_numpy_does() -> None:
    values = np.concatenate([np.random.default_rng(6).random(500), np.arange(11) / 10, [-0.5, 1.5, np.nan]])
    stats = Stats()
    for chunk in np.array_split(values.astype(np.float32), 7):
        stats.record(CallRecord(rows=len(chunk), escalated_rows=0, cloud_rows=0, degraded_rows=0,
                                rate_limited_rows=0, in_flight_limited_rows=0, latency_s=0.001,
                                confidences=chunk.tolist()))
    counts, _ = np.histogram(np.clip(values.astype(np.float32), 0, 1), bins=CONFIDENCE_EDGES)
    assert stats.snapshot()["confidence_histogram"]["counts"] == counts.tolist()


def test_circuit_changes_are_events_and_telemetry_says_open(broker, recorder, model, tmp_path) -> None:
    dead_cloud = {"cloud": {"target": f"127.0.0.1:{free_port()}", "failure_threshold": 1, "reset_s": 60,
                            "deadline_ms": 200}}
    with start_agent(tmp_path / "state", model, agent={"device_id": "d1"}, **dead_cloud,
                     **fleet_sections(broker)) as agent:
        agent.fleet.client.wait_connected(5)
        with Client(agent.port) as client:
            reply = client.infer("clf", {"x": X}, escalate="always")
        assert reply.parameters[AgentResponse.DEGRADED] is True
        assert wait_for(lambda: recorder.bodies(TOPICS.events("d1")))
        assert wait_for(lambda: any(b["circuit_state"] == "open" and b["spool_depth"] == 1
                                    for b in recorder.bodies(TOPICS.telemetry("d1"))))
    event = recorder.bodies(TOPICS.events("d1"))[0]
    jsonschema.validate(event, schema("events"))
    assert (event["type"], event["severity"], event["data"]) == ("circuit.changed", "warning",
                                                                 {"model": "clf", "from": "closed",
                                                                  "to": "open"})


def agent_process(tmp_path: Path, device: str, broker: LocalBroker, model: Path) -> ServiceProcess:
    port = free_port()
    config = tmp_path / f"{device}.toml"
    config.write_text(f'[agent]\ndevice_id = "{device}"\nlisten = "127.0.0.1:{port}"\n'
                      f'state_dir = "{tmp_path / device}"\n[model]\npath = "{model}"\n'
                      f'[mqtt]\nport = {broker.port}\n[fleet]\nname = "{FLEET}"\n'
                      '[telemetry]\ninterval_s = 0.2\n[metrics]\nlisten = "127.0.0.1:0"\n')
    return ServiceProcess("edge-agent", ["--config", str(config)], port, tmp_path / f"{device}.log")


def test_killed_agent_leaves_its_will_and_a_stopped_one_says_goodbye(broker, model, tmp_path) -> None:
    recorder = Recorder()
    with MqttClient(broker.mqtt_config(), on_message=recorder) as watcher:
        watcher.wait_connected(5)
        for device in ("killed", "stopped"):
            watcher.subscribe(TOPICS.status(device))
            watcher.subscribe(TOPICS.telemetry(device))

        def states(device: str) -> list[str]:
            return [b["state"] for b in recorder.bodies(TOPICS.status(device))]

        with agent_process(tmp_path, "killed", broker, model) as killed, \
                agent_process(tmp_path, "stopped", broker, model) as stopped:
            assert wait_for(lambda: states("killed") == ["online"] and states("stopped") == ["online"])
            killed.proc.kill()  # SIGKILL: no goodbye, the broker publishes the Will
            assert wait_for(lambda: states("killed") == ["online", "offline"])
            assert stopped.stop() == 0  # SIGTERM: drain, last telemetry, goodbye
        assert wait_for(lambda: states("stopped") == ["online", "offline"])
        last = next_seq(tmp_path / "stopped") - 1
        assert last in recorder.seqs(TOPICS.telemetry("stopped"))
    late = Recorder()  # retained: whoever looks later sees both offline
    with MqttClient(broker.mqtt_config(), on_message=late) as looker:
        looker.wait_connected(5)
        looker.subscribe(TOPICS.every(TopicKind.STATUS))
        assert wait_for(lambda: all(late.bodies(TOPICS.status(d)) for d in ("killed", "stopped")))
    for device in ("killed", "stopped"):
        status = late.bodies(TOPICS.status(device))[0]
        jsonschema.validate(status, schema("status"))
        assert (status["state"], status["device"], status["active_version"]) == ("offline", device, 3)
