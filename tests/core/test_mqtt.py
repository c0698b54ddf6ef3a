"""MQTT layer: topic names without a broker; the client against a real mosquitto (connect, receive,
reconnect and re-subscribe after a broker restart, refused password, TLS, Last Will on SIGKILL,
goodbye on close, publish timeouts, persistent sessions); payloads against their JSON Schemas."""

from __future__ import annotations

import logging
import queue
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import jsonschema
import pytest

from edgecloud.config import build
from edgecloud.errors import ConfigError
from edgecloud.mqtt.client import (
    ConnectionRefused,
    ConnectionState,
    Message,
    MqttClient,
    MqttConfig,
    MqttTimeout,
    NotConnected,
    Outgoing,
)
from edgecloud.mqtt.payloads import Event, Reported, Status
from edgecloud.mqtt.topics import FleetTopics, Topic, TopicKind, Wildcard
from tests.support.fleet import ROOT, schema
from tests.support.net import free_port, wait_for

if TYPE_CHECKING:
    from edgecloud_tools.rig.broker import LocalBroker


TOPICS = FleetTopics("plant-1")


def status(device: str, state: str) -> Outgoing:
    return Outgoing(TOPICS.status(device), Status(device=device, state=state, agent_version="0.1.0",  # type: ignore[arg-type]
                                                  model="inspection", active_version=3), retain=True)


class Inbox:
    """Collects messages from the network thread; tests wait on it instead of sleeping."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Message] = queue.Queue()

    def __call__(self, message: Message) -> None:
        self.queue.put(message)

    def next(self, topic: str | None = None, timeout: float = 5.0) -> Message:
        while True:
            message = self.queue.get(timeout=timeout)
            if topic is None or message.topic == topic:
                return message


# -- topics ---------------------------------------------------------------------------------------------
def test_topics_are_the_design_table() -> None:
    assert str(TOPICS.status("d1")) == "edgecloud/plant-1/devices/d1/status"
    assert str(TOPICS.telemetry("d1")) == "edgecloud/plant-1/devices/d1/telemetry"
    assert str(TOPICS.events("d1")) == "edgecloud/plant-1/devices/d1/events"
    assert str(TOPICS.group_desired("line-a")) == "edgecloud/plant-1/groups/line-a/model/desired"
    assert str(TOPICS.device_desired("d1")) == "edgecloud/plant-1/devices/d1/model/desired"
    assert str(TOPICS.reported("d1")) == "edgecloud/plant-1/devices/d1/model/reported"
    assert str(TOPICS.group_desired("line-a", "weld")) == \
        "edgecloud/plant-1/groups/line-a/models/weld/desired"
    assert str(TOPICS.device_desired("d1", "weld")) == "edgecloud/plant-1/devices/d1/models/weld/desired"
    retained = {kind for kind in TopicKind if kind.retained}
    assert retained == {TopicKind.STATUS, TopicKind.GROUP_DESIRED, TopicKind.DEVICE_DESIRED,
                        TopicKind.REPORTED, TopicKind.GROUP_MODEL_DESIRED, TopicKind.DEVICE_MODEL_DESIRED,
                        TopicKind.MODEL_REPORTED, TopicKind.ROLLOUT}
    assert str(TOPICS.rollout("weld")) == "edgecloud/plant-1/models/weld/rollout"
    assert TOPICS.parse("edgecloud/plant-1/models/weld/rollout").model == "weld"
    assert str(TOPICS.reported("d1", "weld")) == "edgecloud/plant-1/devices/d1/models/weld/reported"
    assert all(kind.qos == 1 for kind in TopicKind)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a b", "..", ".hidden", "-x", "x" * 129, "é", "a\x00"])
def test_ids_that_could_break_a_topic_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        TOPICS.status(bad)
    with pytest.raises(ValueError, match="invalid"):
        FleetTopics(bad)


def test_topic_and_wildcard_validation() -> None:
    for bad in ("a/+", "a/#", "", "a\x00b"):
        with pytest.raises(ValueError):
            Topic(bad)
    for bad in ("a/#/b", "a/b+", "a/#x", ""):
        with pytest.raises(ValueError):
            Wildcard(bad)
    every_status = TOPICS.every(TopicKind.STATUS)
    assert every_status.matches(TOPICS.status("d1"))
    assert not every_status.matches(TOPICS.telemetry("d1"))
    assert not every_status.matches("edgecloud/other/devices/d1/status")
    assert TOPICS.every(TopicKind.GROUP_DESIRED).matches(TOPICS.group_desired("g"))
    assert not TOPICS.every(TopicKind.DEVICE_DESIRED).matches(TOPICS.reported("d1"))
    assert Wildcard("edgecloud/#").matches("edgecloud")  # '#' also matches the parent level
    assert not Wildcard("a/+").matches("a/b/c")


def test_parse_maps_a_topic_back_to_its_kind() -> None:
    for kind in TopicKind:
        parsed = TOPICS.parse(TOPICS.topic(kind, "x1", "weld" if kind.per_model else ""))
        assert parsed is not None and parsed.kind is kind
        named = {"groups": parsed.group, "devices": parsed.device, "models": parsed.model}
        assert named[kind.scope] == "x1"
        assert parsed.model == ("weld" if kind.per_model else "x1" if kind.scope == "models" else "")
        assert TOPICS.every(kind).matches(TOPICS.topic(kind, "x1", "weld" if kind.per_model else ""))
    assert TOPICS.parse("edgecloud/other/devices/d1/status") is None
    assert TOPICS.parse("edgecloud/plant-1/devices/d1/unknown") is None
    assert TOPICS.parse("edgecloud/plant-1/devices/+/status") is None
    assert TOPICS.parse("edgecloud/plant-1/groups/g/models/+/desired") is None
    every_model = TOPICS.every(TopicKind.DEVICE_MODEL_DESIRED, "d1")  # one device's, of every model
    assert every_model.matches(TOPICS.device_desired("d1", "weld"))
    assert not every_model.matches(TOPICS.device_desired("d2", "weld"))
    assert not every_model.matches(TOPICS.device_desired("d1"))
    assert TOPICS.parse("edgecloud/plant-1/groups/g/models/weld/reported") is None
    with pytest.raises(ValueError, match="model id"):
        TOPICS.group_desired("g", "a b")


# -- payloads -------------------------------------------------------------------------------------------
def test_payloads_match_their_schemas() -> None:
    jsonschema.validate(Status(device="d1", state="online", agent_version="0.1.0", model=None,
                               active_version=None).to_dict(), schema("status"))
    for state, extra in [("downloading", {"progress": 0.25}), ("verifying", {}), ("staged", {}),
                         ("active", {}), ("failed", {"reason": "sha256_mismatch: file differs"}),
                         ("rolled_back", {"reason": "watch_regression: error rate 0.4"})]:
        body = Reported(device="d1", model="inspection", version=4, state=state, active_version=3, **extra)
        jsonschema.validate(body.to_dict(), schema("reported"))
    jsonschema.validate(Event(device="d1", type="circuit.changed", severity="warning",
                              data={"from": "closed", "to": "open"}).to_dict(), schema("events"))
    with pytest.raises(ValueError):
        Reported(device="d1", model="m", version=1, state="failed", active_version=None)  # needs its reason
    with pytest.raises(ValueError):
        Reported(device="d1", model="m", version=1, state="done", active_version=None)
    with pytest.raises(jsonschema.ValidationError):  # the schema refuses what the model refuses
        jsonschema.validate(dict(Reported(device="d1", model="m", version=1, state="active",
                                          active_version=1).to_dict(), reason="Bad!"), schema("reported"))
    with pytest.raises(ValueError):
        Reported(device="d1", model="m", version=1, state="failed", active_version=None, reason="Bad!")


def test_telemetry_schema_takes_an_agent_report_and_refuses_drift() -> None:
    percentiles = {"p50": 1.2, "p95": 3.4, "p99": None}
    telemetry = {
        "schema": 1, "device": "cam-1", "seq": 42, "at": "2025-06-01T12:00:00Z", "model": "inspection",
        "model_version": 4,
        "counters": {"requests": 1000, "rows": 1200, "escalated": 80, "cloud_answers": 75, "degraded": 5,
                     "errors": 0, "rate_limited": 3, "in_flight_limited": 1, "audited": 2, "reused": 4,
                     "upstream_bytes": 96_000},
        "latency_ms": {"edge": percentiles, "escalated": {"p50": 40.0, "p95": 95.0, "p99": 180.0}},
        "latency_buckets": {"le": [0.005, 0.5], "edge": {"counts": [900, 920, 920], "sum_s": 1.1},
                            "escalated": {"counts": [0, 79, 80], "sum_s": 3.5}},
        "escalation_rate": 0.08, "confidence_histogram": {"edges": [0, 0.5, 1], "counts": [80, 920]},
        "spool_depth": 5, "circuit_state": "closed",
        "system": {"cpu_percent": 37.5, "memory_used_bytes": 2_000_000_000,
                   "memory_total_bytes": 8_000_000_000, "temperatures_c": {"cpu-thermal": 51.5},
                   "gpu_load_percent": None},
    }
    jsonschema.validate(telemetry, schema("telemetry"))
    no_errors = {k: v for k, v in telemetry["counters"].items() if k != "errors"}
    p90 = {"edge": {**percentiles, "p90": 2.0}, "escalated": percentiles}
    for broken in ({**telemetry, "seq": -1}, {**telemetry, "counters": no_errors},
                   {**telemetry, "latency_ms": p90}, {**telemetry, "circuit_state": "broken"},
                   {**telemetry, "latency_buckets": {**telemetry["latency_buckets"],
                                                     "edge": {"counts": [-1, 0, 0], "sum_s": 0}}},
                   {**telemetry, "at": "2025-06-01 12:00"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema("telemetry"))


def test_config_hides_the_password_and_names_bad_keys() -> None:
    config = build(MqttConfig, {"username": "u", "password": "hunter2"})
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.model_dump())
    with pytest.raises(ConfigError, match=r"tls: .*cert and key must be given together"):
        build(MqttConfig, {"tls": {"cert": "c.pem"}})
    with pytest.raises(ConfigError, match="prot: unknown key"):
        build(MqttConfig, {"prot": 1})


# -- against mosquitto ----------------------------------------------------------------------------------
def test_connect_receive_and_retained_birth(broker: LocalBroker) -> None:
    inbox = Inbox()
    device = MqttClient(broker.mqtt_config(client_id="d1"), on_message=inbox,
                        birth=lambda: status("d1", "online"), will=lambda: status("d1", "offline"))
    with device:
        device.wait_connected(5)
        assert device.state is ConnectionState.CONNECTED and device.last_error == ""
        device.subscribe(TOPICS.every(TopicKind.GROUP_DESIRED))
        with MqttClient(broker.mqtt_config()) as operator:
            operator.wait_connected(5)
            operator.publish(TOPICS.group_desired("line-a"), {"hello": "ä"}, retain=True)
        got = inbox.next(str(TOPICS.group_desired("line-a")))
        assert got.json() == {"hello": "ä"} and got.qos == 1
        late = Inbox()  # someone subscribing later still sees the device's birth, retained
        with MqttClient(broker.mqtt_config(), on_message=late) as watcher:
            watcher.wait_connected(5)
            watcher.subscribe(TOPICS.every(TopicKind.STATUS))
            birth = late.next(str(TOPICS.status("d1")))
        assert birth.retain and birth.json()["state"] == "online"
        jsonschema.validate(birth.json(), schema("status"))


def test_reconnects_and_resubscribes_after_a_broker_restart(broker: LocalBroker) -> None:
    inbox, states = Inbox(), []
    births = []

    def birth() -> Outgoing:
        births.append(1)
        return status("d1", "online")

    device = MqttClient(broker.mqtt_config(), on_message=inbox, birth=birth)
    device.add_state_listener(lambda state, detail: states.append(state))
    with device:
        device.wait_connected(5)
        device.subscribe(TOPICS.events("d1"))
        broker.restart()
        assert wait_for(lambda: states.count(ConnectionState.CONNECTED) == 2, timeout=10), states
        assert ConnectionState.BACKING_OFF in states
        assert len(births) == 2  # the birth goes out again on every connect
        with MqttClient(broker.mqtt_config()) as other:
            other.wait_connected(5)
            other.publish(TOPICS.events("d1"), b"after-restart")
        assert inbox.next(str(TOPICS.events("d1"))).payload == b"after-restart"


def test_bad_password_is_refused_not_connected(broker_factory, caplog: pytest.LogCaptureFixture) -> None:
    broker = broker_factory(users={"device-1": "right-password"})
    caplog.set_level(logging.DEBUG)
    wrong = MqttClient(broker.mqtt_config(username="device-1", password="wrong-password"))
    with wrong:
        with pytest.raises(ConnectionRefused, match=r"Not authorized|Bad user name"):
            wrong.wait_connected(5)
        assert wrong.state is not ConnectionState.CONNECTED and not wrong.is_connected
        assert "refused" in wrong.last_error
        with pytest.raises(NotConnected):
            wrong.publish(TOPICS.events("device-1"), b"x")
    anonymous = MqttClient(broker.mqtt_config())
    with anonymous, pytest.raises(ConnectionRefused):
        anonymous.wait_connected(5)
    right = MqttClient(broker.mqtt_config(username="device-1", password="right-password"))
    with right:
        right.wait_connected(5)
        right.publish(TOPICS.events("device-1"), b"hello")
    assert "wrong-password" not in caplog.text and "right-password" not in caplog.text


def test_tls_listener_right_and_wrong_ca(broker_factory, tls_files) -> None:
    broker = broker_factory(tls=tls_files)
    with MqttClient(broker.mqtt_config()) as good:
        good.wait_connected(5)
        good.publish(TOPICS.events("d1"), b"over tls")
    bad = MqttClient(broker.mqtt_config(tls={"ca": str(tls_files.other_ca)}))
    with bad:
        with pytest.raises(ConnectionRefused, match="CERTIFICATE_VERIFY_FAILED"):
            bad.wait_connected(5)
        assert not bad.is_connected
    plain = MqttClient(broker.mqtt_config(tls=None))  # plaintext to a TLS port never connects
    with plain, pytest.raises(MqttTimeout):
        plain.wait_connected(1)


def test_no_broker_times_out_with_the_cause() -> None:
    config = build(MqttConfig, {"port": free_port(), "reconnect_min_delay_s": 0.1,
                                "reconnect_max_delay_s": 0.2})
    with MqttClient(config) as client:
        with pytest.raises(MqttTimeout, match=r"not connected after .*cannot connect"):
            client.wait_connected(1)
        assert client.state in (ConnectionState.BACKING_OFF, ConnectionState.CONNECTING)
        with pytest.raises(NotConnected):
            client.publish(TOPICS.events("d1"), b"x")
    assert client.state is ConnectionState.DISCONNECTED


def test_publish_not_acknowledged_in_time_raises(broker: LocalBroker) -> None:
    with MqttClient(broker.mqtt_config()) as client:
        client.wait_connected(5)
        broker.pause()
        try:
            with pytest.raises(MqttTimeout, match="not acknowledged"):
                client.publish(TOPICS.telemetry("d1"), b"{}", timeout=0.3)
        finally:
            broker.resume()


_KILLED_DEVICE = textwrap.dedent("""
    import sys, time
    from edgecloud.config import build
    from edgecloud.mqtt.client import MqttClient, MqttConfig, Outgoing
    from edgecloud.mqtt.payloads import Status
    from edgecloud.mqtt.topics import FleetTopics

    topic = FleetTopics("plant-1").status("d9")
    def status(state):
        return Outgoing(topic, Status(device="d9", state=state, agent_version="0.1.0", model="inspection",
                                      active_version=2), retain=True)
    client = MqttClient(build(MqttConfig, {"port": int(sys.argv[1]), "client_id": "d9"}),
                        birth=lambda: status("online"), will=lambda: status("offline"))
    client.start().wait_connected(5)
    print("connected", flush=True)
    time.sleep(60)
""")


def test_last_will_is_delivered_when_the_client_is_killed(broker: LocalBroker) -> None:
    inbox = Inbox()
    with MqttClient(broker.mqtt_config(), on_message=inbox) as watcher:
        watcher.wait_connected(5)
        watcher.subscribe(TOPICS.status("d9"))
        with subprocess.Popen([sys.executable, "-c", _KILLED_DEVICE, str(broker.port)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) as child:
            try:
                assert child.stdout is not None and child.stdout.readline().strip() == "connected"
                assert inbox.next(str(TOPICS.status("d9"))).json()["state"] == "online"
                child.kill()  # SIGKILL: no goodbye, the broker must send the Will
            finally:
                child.kill()
        will = inbox.next(str(TOPICS.status("d9")), timeout=10)
    assert will.json()["state"] == "offline" and will.json()["device"] == "d9"
    jsonschema.validate(will.json(), schema("status"))


def test_close_publishes_the_goodbye_and_the_broker_drops_the_will(broker: LocalBroker) -> None:
    inbox = Inbox()
    with MqttClient(broker.mqtt_config(), on_message=inbox) as watcher:
        watcher.wait_connected(5)
        watcher.subscribe(TOPICS.status("d1"))
        device = MqttClient(broker.mqtt_config(), birth=lambda: status("d1", "online"),
                            will=lambda: status("d1", "offline")).start()
        device.wait_connected(5)
        assert inbox.next().json()["state"] == "online"
        device.close(final=status("d1", "offline"))
        device.close()  # twice is fine
        assert inbox.next().json()["state"] == "offline"
        with pytest.raises(queue.Empty):  # exactly one offline: the Will was discarded
            inbox.next(timeout=0.5)
    assert device.state is ConnectionState.DISCONNECTED


def test_persistent_session_keeps_messages_across_a_broker_restart(broker: LocalBroker) -> None:
    collector = broker.mqtt_config(client_id="collector", session_expiry_s=300)
    first = MqttClient(collector).start()
    first.wait_connected(5)
    first.subscribe(TOPICS.every(TopicKind.TELEMETRY))
    first.close()
    broker.restart()
    with MqttClient(broker.mqtt_config()) as device:
        device.wait_connected(5)
        for seq in range(3):
            device.publish(TOPICS.telemetry("d1"), {"seq": seq})
    inbox = Inbox()
    with MqttClient(collector, on_message=inbox) as second:  # no subscribe: the session has it
        second.wait_connected(5)
        assert [inbox.next().json()["seq"] for _ in range(3)] == [0, 1, 2]
