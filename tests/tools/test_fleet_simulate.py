"""``edgecloud fleet simulate`` against a real mosquitto: the simulated devices take a release with waves
only inside the share the signed wave commands say, roll back on a halt (a device offline during the
halt when it returns) and come back when the rollout resumes, refuse a command signed by a stranger,
say online and offline on their status, and send telemetry that the committed schema takes, with
per-version quality drawn from the truth."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgecloud.clock import utc_now
from edgecloud.mqtt.client import Message, MqttClient
from edgecloud.mqtt.topics import FleetTopics, TopicKind
from edgecloud.release import Artifact, ReleasePayload, Rollout, in_rollout, sign_release
from edgecloud.rollout import ROLLOUT_HALTED, WaveCommand, sign_command
from edgecloud.signing import load_private_key, write_keypair
from edgecloud_tools.fleet.simulate import device_ids
from edgecloud_tools.rig.services import ServiceProcess, wait_until
from tests.support.fleet import Recorder, schema

if TYPE_CHECKING:
    from edgecloud_tools.rig.broker import LocalBroker

FLEET, GROUP, MODEL, SALT = "sim-fleet", "line-1", "digits", "line-1-salt"
TOPICS = FleetTopics(FLEET)
TRUTH = {"1": {"audit_accuracy": 0.9, "escalation_rate": 0.05, "p95_ms": 2.0},
         "2": {"audit_accuracy": 0.6, "escalation_rate": 0.2, "p95_ms": 3.0}}


class Fleet:
    """The simulator in its own process (as ``edgecloud fleet simulate`` runs) and a recorder of every
    message of the fleet."""

    def __init__(self, broker: LocalBroker, tmp: Path, devices: int, watch: str = f"edgecloud/{FLEET}/#",
                 **flags: Any) -> None:
        self.broker, self.devices = broker, devices
        self.private, public, _ = write_keypair(tmp / "keys" / "operator")
        self.key: Ed25519PrivateKey = load_private_key(self.private)
        tmp.mkdir(parents=True, exist_ok=True)
        truth = tmp / "truth.json"
        truth.write_text(json.dumps(TRUTH))
        self.recorder = Recorder()
        self._latest: dict[tuple[TopicKind, str], dict] = {}
        self.seen_online: set[str] = set()
        self.watcher = MqttClient(broker.mqtt_config(), on_message=self._received).start()
        self.watcher.wait_connected(5)
        self.watcher.subscribe(watch)
        args = ["fleet", "simulate", "--mqtt", broker.endpoint, "--fleet", FLEET, "--devices", str(devices),
                "--trusted-key", str(public), "--truth", str(truth), "--group", GROUP, "--model", MODEL,
                "--step", "0.05", "--log-level", "DEBUG"]
        for flag, value in {"flaky_share": 0, "offline_share": 0, "interval": 5, **flags}.items():
            args += [f"--{flag.replace('_', '-')}", str(value)]
        self.process = ServiceProcess("fleet-simulate", [], 0, tmp / "simulate.log",
                                      command=[sys.executable, "-m", "edgecloud_tools.cli", *args],
                                      ready=lambda: len(self.seen_online) >= self.expected_online)
        self.expected_online = devices - round(devices * flags.get("offline_share", 0))

    def _received(self, message: Message) -> None:  # paho's thread: kept cheap, or the broker drops
        self.recorder(message)
        parsed = TOPICS.parse(message.topic)
        if parsed is not None and message.payload and parsed.device:
            body = self._latest[(parsed.kind, parsed.device)] = message.json()
            if parsed.kind is TopicKind.STATUS and body["state"] == "online":
                self.seen_online.add(parsed.device)

    def latest(self, kind: TopicKind) -> dict[str, dict]:
        """The last body per device on topics of ``kind``."""
        return {device: body for (k, device), body in list(self._latest.items()) if k is kind}

    def online(self) -> set[str]:
        return {d for d, body in self.latest(TopicKind.STATUS).items() if body["state"] == "online"}

    def reports(self, version: int) -> dict[str, dict]:
        return {d: b for d, b in self.latest(TopicKind.MODEL_REPORTED).items() if b["version"] == version}

    def active_on(self, version: int) -> set[str]:
        """Devices whose status says they serve ``version`` (a device re-announces it on a change)."""
        return {d for d, b in self.latest(TopicKind.STATUS).items() if b["active_version"] == version}

    def publish(self, topic: Any, data: bytes) -> None:
        self.watcher.publish(topic, data, qos=1, retain=True)

    def release(self, version: int, waves: tuple[float, ...]) -> None:
        now = utc_now()
        payload = ReleasePayload(model=MODEL, version=version, publisher="test",
                                 artifact=Artifact(f"grpc://127.0.0.1:1/{MODEL}/{version}", "0" * 64, 1000),
                                 issued_at=now, expires_at=now + timedelta(days=1),
                                 rollout=Rollout(percent=waves[0], salt=SALT, waves=waves))
        self.publish(TOPICS.group_desired(GROUP, MODEL), sign_release(payload, self.key).to_json())

    def command(self, version: int, wave: int, state: str, key: Ed25519PrivateKey | None = None) -> None:
        command = WaveCommand(MODEL, version, wave, state, utc_now(), reason="test")
        self.publish(TOPICS.rollout(MODEL), sign_command(command, key or self.key).to_json())

    def close(self) -> None:
        self.process.stop()
        self.watcher.close()


@pytest.fixture
def fleet_factory(broker: LocalBroker, tmp_path: Path) -> Iterator[Any]:
    made: list[Fleet] = []

    def make(devices: int, **flags: Any) -> Fleet:
        fleet = Fleet(broker, tmp_path / f"fleet{len(made)}", devices, **flags)
        made.append(fleet)
        fleet.process.start(timeout=120)
        return fleet

    yield make
    for fleet in made:
        fleet.close()


def _inside(devices: list[str], percent: float) -> set[str]:
    return {d for d in devices if in_rollout(d, percent, SALT)}


def test_devices_take_a_release_only_inside_the_wave_and_roll_back_on_a_halt(fleet_factory) -> None:
    fleet = fleet_factory(60)
    ids = device_ids("sim", 60)
    first, second = _inside(ids, 20), _inside(ids, 50)
    assert first and second - first, "the salt picks no device for a wave: choose another"
    fleet.release(2, (20, 50, 100))
    assert wait_until(lambda: fleet.active_on(2) == first, 30), (sorted(fleet.active_on(2)), sorted(first))
    # a device outside the first wave never starts downloading
    assert set(fleet.reports(2)) == first
    states = [m.json()["state"] for m in fleet.recorder.messages()
              if m.topic == str(TOPICS.reported(min(first), MODEL))]
    assert states == ["downloading", "verifying", "staged", "active"]
    assert fleet.latest(TopicKind.STATUS)[min(first)]["active_version"] == 2

    stranger = Ed25519PrivateKey.generate()
    fleet.command(2, 2, "complete", key=stranger)
    refused = lambda: [b for b in fleet.latest(TopicKind.EVENTS).values()  # noqa: E731
                       if b["type"] == "rollout.command_refused"]
    # every device holding the release checks the command, inside the wave or not
    assert wait_until(lambda: {b["device"] for b in refused()} == set(ids), 30), len(refused())
    assert {b["data"]["reason"] for b in refused()} == {"untrusted_key"}
    assert fleet.active_on(2) == first

    fleet.command(2, 1, "advancing")
    assert wait_until(lambda: fleet.active_on(2) == second, 30), (sorted(fleet.active_on(2)), sorted(second))

    fleet.command(2, 1, "halted")
    assert wait_until(lambda: fleet.active_on(1) == set(ids), 30), sorted(fleet.active_on(2))
    back = fleet.reports(2)
    assert {d for d, b in back.items() if b["state"] == "rolled_back"} == second
    assert {b["reason"] for d, b in back.items() if d in second} == {ROLLOUT_HALTED}
    # the shared report topic says the same as the model's own
    shared = {d: b for d, b in fleet.latest(TopicKind.REPORTED).items() if b["version"] == 2}
    assert shared == back
    # a halt is the command's state, not remembered against the release: resuming brings them back
    fleet.command(2, 1, "advancing")
    assert wait_until(lambda: fleet.active_on(2) == second, 30), sorted(fleet.active_on(2))

    fleet.close()  # a clean stop says offline on every status
    assert wait_until(lambda: not fleet.online(), 10), sorted(fleet.online())


@pytest.mark.slow
def test_rollout_share_over_a_thousand_devices_is_within_five_points_of_each_wave(fleet_factory) -> None:
    fleet = fleet_factory(1000, interval=60, watch=str(TOPICS.every(TopicKind.STATUS)))
    ids = device_ids("sim", 1000)
    for wave, percent in enumerate((10.0, 50.0)):
        if wave:
            fleet.command(2, wave, "advancing")
        else:
            fleet.release(2, (10, 50, 100))
        inside = _inside(ids, percent)
        assert wait_until(lambda inside=inside: fleet.active_on(2) == inside, 120, interval_s=0.5), \
            (percent, len(fleet.active_on(2)), len(inside))
        assert abs(len(fleet.active_on(2)) / len(ids) * 100 - percent) <= 5


def test_flaky_and_offline_devices_say_so_and_a_device_away_during_a_halt_rolls_back_on_return(
        fleet_factory) -> None:
    fleet = fleet_factory(20, flaky_share=0.5, offline_share=0.1, flaky_up=1.0, flaky_down=1.5)
    ids = device_ids("sim", 20)
    offline_all_along = set(ids) - fleet.seen_online
    assert len(offline_all_along) == 2
    # their retained status says offline from the start
    assert {fleet.latest(TopicKind.STATUS)[d]["state"] for d in offline_all_along} == {"offline"}

    def went_and_came_back() -> set[str]:
        seen: dict[str, list[str]] = {}
        for m in fleet.recorder.messages():
            parsed = TOPICS.parse(m.topic)
            if parsed and parsed.kind is TopicKind.STATUS and m.payload:
                seen.setdefault(parsed.device, []).append(m.json()["state"])
        return {d for d, states in seen.items()
                if "offline" in states and "online" in states[states.index("offline"):]}

    assert wait_until(lambda: len(went_and_came_back()) >= 3, 60), went_and_came_back()
    live = [d for d in ids if d not in offline_all_along]
    fleet.release(2, (100,))
    assert wait_until(lambda: fleet.active_on(2) == set(live), 60), sorted(set(live) - fleet.active_on(2))
    fleet.command(2, 0, "halted")
    # flaky devices away at the halt roll back when they return: in the end every live device is back
    assert wait_until(lambda: fleet.active_on(1) >= set(live), 60), sorted(fleet.active_on(2))
    assert {b["state"] for d, b in fleet.reports(2).items() if d in live} == {"rolled_back"}
    assert not set(fleet.reports(2)) & offline_all_along


def test_telemetry_takes_the_schema_and_draws_quality_per_version_from_the_truth(fleet_factory) -> None:
    fleet = fleet_factory(12, interval=0.3, device_spread=0.05, rows_per_s=200, audit_rate=0.5)
    topic_of = {str(TOPICS.telemetry(d)): d for d in device_ids("sim", 12)}
    validator = jsonschema.Draft202012Validator(schema("telemetry"))

    def bodies() -> list[dict]:
        return [m.json() for m in fleet.recorder.messages() if m.topic in topic_of]

    def every_device_sent(version: int, n: int) -> bool:
        sent = [b["device"] for b in bodies() if b["model_version"] == version]
        return all(sent.count(device) >= n for device in topic_of.values())

    assert wait_until(lambda: every_device_sent(1, 2), 30), len(bodies())
    fleet.release(2, (100,))
    assert wait_until(lambda: every_device_sent(2, 2), 30), len(bodies())
    fleet.release(3, (100,))  # a version the truth does not name: no quality, as an older agent
    assert wait_until(lambda: every_device_sent(3, 1), 30), len(bodies())
    assert "quality" in validator.schema["properties"]["models"]["items"]["properties"]  # validated too
    per_device: dict[str, list[dict]] = {}
    for body in bodies():
        validator.validate(body)
        if body["model_version"] == 3:
            assert "quality" not in body["models"][0]
            continue
        per_device.setdefault(body["device"], []).append(body)
    for device, messages in per_device.items():
        seqs = [b["seq"] for b in messages]
        assert seqs == list(range(len(seqs))), (device, seqs)
        totals: dict[int, dict[str, int]] = {}
        for body in messages:
            quality = body["models"][0]["quality"]
            assert quality["version"] == body["model_version"] == body["models"][0]["model_version"]
            assert quality["audit_agree"] <= quality["audited"] <= quality["rows"] - quality["escalated"]
            assert sum(quality["confidence_hist"]) == quality["rows"]
            running = totals.setdefault(quality["version"], dict.fromkeys(quality["totals"], 0))
            for key in running:
                running[key] += quality[key]
            assert quality["totals"] == running, (device, quality)
    # per version, the pooled audit agreement is near the truth's, and devices differ from each other
    for version, truth in ((1, 0.9), (2, 0.6)):
        shares, agree, audited = [], 0, 0
        for messages in per_device.values():
            last = [b["models"][0]["quality"]["totals"] for b in messages
                    if b["models"][0]["quality"]["version"] == version][-1]
            agree, audited = agree + last["audit_agree"], audited + last["audited"]
            shares.append(last["audit_agree"] / last["audited"])
        assert abs(agree / audited - truth) < 0.06, (version, agree, audited)
        assert len(set(shares)) > 1
