"""Operator CLI: ``edgecloud keygen`` and ``edgecloud fleet publish|rollback|status`` end to end,
against a real mosquitto and a real artifact service on loopback; what the CLI publishes is checked
against the release JSON Schema, verified with the public key, and downloaded back."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import jsonschema
import pytest

from cloud_gateway.artifacts import add_artifact_service
from edgecloud.artifacts import download
from edgecloud.clock import utc_now
from edgecloud.mqtt.client import Message, MqttClient
from edgecloud.mqtt.fleet_view import FleetView
from edgecloud.mqtt.payloads import Reported, Status
from edgecloud.mqtt.topics import FleetTopics
from edgecloud.release import Envelope, sign_release, verify_envelope
from edgecloud.signing import TrustStore, generate_key, key_id, load_public_key
from edgecloud_tools import cli
from edgecloud_tools.fleet.status import collect, render_table

if TYPE_CHECKING:
    from edgecloud_tools.rig.broker import LocalBroker


SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "protos/schemas/release.schema.json").read_text())
TOPICS = FleetTopics("plant-1")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_artifact_service(tmp_path / "repo")(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    assert cli.main(["keygen", "--out", str(tmp_path / "keys" / "release")]) == 0
    return tmp_path / "keys" / "release"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "inspection-edge.onnx"
    path.parent.mkdir()
    path.write_bytes(os.urandom(150_000))
    card = {"name": "inspection", "version": 4, "labels": ["ok", "scratch", "dent"],
            "calibration": {"policy": "max_prob", "temperature": 1.7, "threshold": 0.6,
                            "score_output": "logits", "scores": "logits", "target_accuracy": 0.99}}
    path.with_name(path.name + ".card.json").write_text(json.dumps(card))
    return path


def retained(broker: LocalBroker, topic: str) -> Message:
    """The retained message on ``topic``, as a device subscribing now would get it."""
    got: list[Message] = []
    with MqttClient(broker.mqtt_config(), on_message=got.append) as client:
        client.wait_connected(5)
        client.subscribe(topic)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    assert got, f"nothing retained on {topic}"
    return got[0]


def broker_args(broker: LocalBroker) -> list[str]:
    return ["--mqtt", f"127.0.0.1:{broker.port}", "--fleet", "plant-1"]


def release_args(model: Path, key: Path, version: int, *extra: str) -> list[str]:
    return ["--model", str(model), "--name", "inspection", "--version", str(version),
            "--key", str(key) + ".key", *extra]


def test_keygen_writes_a_private_and_a_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "ops"
    assert cli.main(["keygen", "--out", str(prefix)]) == 0
    out = capsys.readouterr().out
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert key_id(load_public_key(public)) in out
    assert cli.main(["keygen", "--out", str(prefix)]) == 2  # refuses to overwrite a key
    assert "exists" in capsys.readouterr().err
    assert cli.main(["keygen", "--out", str(prefix), "--force"]) == 0


def test_a_private_key_made_inside_a_clone_is_ignored_by_git() -> None:
    """``edgecloud keygen --out keys/release`` in a checkout: the private key must not be one ``git add .``
    away from a commit; the public key may be committed."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("needs a git checkout of the project")
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "--no-index", "keys/release.key",
                              "keys/release.pub"], capture_output=True, text=True, check=False)
    assert ignored.stdout.split() == ["keys/release.key"], ignored.stderr


def test_publish_uploads_signs_and_retains_the_release(broker, gateway, key, model, tmp_path, capsys) -> None:
    argv = ["fleet", "publish", *release_args(model, key, 4, "--group", "line-a", "--gateway", gateway,
                                              "--threshold", "0.8", "--rollout-percent", "50",
                                              "--expires", "7d"), *broker_args(broker)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "edgecloud/plant-1/groups/line-a/model/desired" in capsys.readouterr().out
    message = retained(broker, str(TOPICS.group_desired("line-a")))
    assert message.retain and message.qos == 1
    jsonschema.validate(message.json(), SCHEMA)
    trust = TrustStore.from_files([Path(f"{key}.pub")])
    release = verify_envelope(Envelope.from_json(message.payload), trust)
    assert release.version == 4 and not release.allow_downgrade
    assert release.calibration.threshold == 0.8  # the flag wins over the card
    assert release.calibration.temperature == 1.7 and release.calibration.policy == "max_prob"
    assert release.labels == ("ok", "scratch", "dent")
    assert release.rollout.percent == 50 and release.rollout.salt == "inspection"
    assert timedelta(days=6) < release.expires_at - utc_now() <= timedelta(days=7)
    assert release.artifact.uri == f"grpc://{gateway}/inspection/4"
    got = download(release.artifact.uri, tmp_path / "device" / "model.onnx", sha256=release.artifact.sha256,
                   size=release.artifact.size)
    assert got.read_bytes() == model.read_bytes()


def test_device_release_by_uri_and_signed_rollback(broker, key, model, capsys) -> None:
    uri = model.as_uri()
    assert cli.main(["fleet", "publish", *release_args(model, key, 5, "--device", "cam-7", "--uri", uri),
                     *broker_args(broker)]) == 0, capsys.readouterr().err
    topic = str(TOPICS.device_desired("cam-7"))
    assert json.loads(retained(broker, topic).payload)["payload"]["version"] == 5
    assert cli.main(["fleet", "rollback", *release_args(model, key, 3, "--device", "cam-7", "--uri", uri),
                     *broker_args(broker)]) == 0, capsys.readouterr().err
    wire = retained(broker, topic).json()
    jsonschema.validate(wire, SCHEMA)
    trust = TrustStore.from_files([Path(f"{key}.pub")])
    release = verify_envelope(Envelope.from_json(json.dumps(wire)), trust)
    assert release.version == 3 and release.allow_downgrade and release.artifact.uri == uri


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "1.5"], "threshold"),
    (["--expires", "tomorrow"], "--expires"),
    (["--expires", "2020-01-01T00:00:00Z"], "not in the future"),
    (["--tensorrt-version", "10.3"], "together"),
    (["--tensorrt-version", "10.3", "--target-device", "orin"], "are for plans only"),
    (["--rollout-percent", "120"], "rollout.percent"),
])
def test_bad_release_options_exit_2(broker, key, model, capsys, extra, message) -> None:
    argv = ["fleet", "publish", *release_args(model, key, 4, "--group", "g", "--uri", model.as_uri(), *extra),
            *broker_args(broker)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unusable_inputs_exit_2(broker, model, tmp_path, capsys) -> None:
    not_a_key = tmp_path / "bad.key"
    not_a_key.write_text("nope")
    common = ["--name", "inspection", "--version", "4", "--group", "g", "--uri", model.as_uri(),
              *broker_args(broker)]
    assert cli.main(["fleet", "publish", "--model", str(model), "--key", str(not_a_key), *common]) == 2
    assert "bad.key" in capsys.readouterr().err
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine")
    key_path = tmp_path / "k"
    assert cli.main(["keygen", "--out", str(key_path)]) == 0
    assert cli.main(["fleet", "publish", "--model", str(plan), "--key", f"{key_path}.key", *common]) == 2
    assert "--tensorrt-version" in capsys.readouterr().err
    weights = tmp_path / "m.bin"
    weights.write_bytes(b"weights")
    assert cli.main(["fleet", "publish", "--model", str(weights), "--key", f"{key_path}.key", *common]) == 2
    assert "no backend for suffix '.bin'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse: --group and --device exclude each other
        cli.main(["fleet", "publish", "--model", str(model), "--key", f"{key_path}.key", "--device", "d",
                  *common])
    assert info.value.code == 2


def test_refused_broker_and_refused_upload_exit_1(broker_factory, gateway, key, model, tmp_path,
                                                  monkeypatch, capsys) -> None:
    locked = broker_factory(users={"operator": "s3cret"})
    argv = ["fleet", "publish", *release_args(model, key, 4, "--group", "g", "--uri", model.as_uri()),
            *broker_args(locked)]
    assert cli.main(argv) == 1
    assert "refused" in capsys.readouterr().err
    monkeypatch.setenv("EDGECLOUD_MQTT_PASSWORD", "s3cret")
    assert cli.main([*argv, "--mqtt-username", "operator"]) == 0, capsys.readouterr().err
    # the same version with another file: the gateway keeps published versions immutable
    assert cli.main(["fleet", "publish", *release_args(model, key, 4, "--group", "g", "--gateway", gateway),
                     *broker_args(locked), "--mqtt-username", "operator"]) == 0
    model.write_bytes(b"changed")
    assert cli.main(["fleet", "publish", *release_args(model, key, 4, "--group", "g", "--gateway", gateway),
                     *broker_args(locked), "--mqtt-username", "operator"]) == 1
    assert "ALREADY_EXISTS" in capsys.readouterr().err


def test_status_table_from_retained_topics(broker, capsys) -> None:
    with MqttClient(broker.mqtt_config()) as device:
        device.wait_connected(5)
        for topic, body in [
            (TOPICS.status("cam-1"), Status(device="cam-1", state="online", agent_version="0.1.0",
                                            model="inspection", active_version=4)),
            (TOPICS.reported("cam-1"), Reported(device="cam-1", model="inspection", version=4, state="active",
                                                active_version=4)),
            (TOPICS.status("cam-2"), Status(device="cam-2", state="offline", agent_version="0.1.0",
                                            model="inspection", active_version=3)),
            (TOPICS.reported("cam-2"), Reported(device="cam-2", model="inspection", version=5, state="failed",
                                                active_version=3, reason="sha256_mismatch")),
        ]:
            device.publish(topic, body, retain=True)
    assert cli.main(["fleet", "status", *broker_args(broker), "--wait", "0.3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["DEVICE", "ONLINE", "MODEL", "ACTIVE", "UPDATE"]
    assert lines[1].split()[:6] == ["cam-1", "yes", "inspection", "4", "active", "v4"]
    assert lines[2].split()[:7] == ["cam-2", "no", "inspection", "3", "failed", "v5", "(sha256_mismatch)"]


def test_fleet_view_folds_telemetry_and_ignores_junk() -> None:
    view = FleetView("plant-1")

    def message(topic: Any, body: Any) -> Message:
        return Message(str(topic), body if isinstance(body, bytes) else json.dumps(body).encode(), 1, False)

    view.apply(message(TOPICS.telemetry("cam-1"), {"escalation_rate": 0.125, "at": "2025-06-01T12:00:00Z"}))
    view.apply(message(TOPICS.reported("cam-1"), Reported(device="cam-1", model="inspection", version=5,
                                                          state="downloading", active_version=4,
                                                          progress=0.4).to_dict()))
    view.apply(message(TOPICS.status("cam-1"), b"not json"))
    view.apply(message(TOPICS.status("cam-9"), b""))  # a cleared retained message
    view.apply(message("edgecloud/other-fleet/devices/x/status", {"state": "online"}))
    rows = view.sorted_rows()
    assert [r.device for r in rows] == ["cam-1"]
    table = render_table(rows)
    assert "12.5%" in table and "downloading v5 40%" in table and "4" in table


def test_status_shows_pending_and_rolled_back_releases_and_clear_removes_one(
        broker, gateway, key, model, capsys) -> None:
    def status(device: str, group: str, active: int) -> tuple[Any, Status]:
        return TOPICS.status(device), Status(device=device, state="online", agent_version="0.1.0",
                                             model="inspection", active_version=active, group=group)

    with MqttClient(broker.mqtt_config()) as devices:
        devices.wait_connected(5)
        for topic, body in [
            status("cam-1", "line-a", 5), status("cam-2", "line-a", 4), status("cam-3", "line-a", 4),
            status("cam-4", "line-b", 4),
            (TOPICS.reported("cam-2"), Reported(device="cam-2", model="inspection", version=5,
                                                state="rolled_back", active_version=4,
                                                reason="error_rate: 12 of 40 calls failed")),
        ]:
            devices.publish(topic, body, retain=True)
    releases = (("publish", 5, "--group", "line-a"), ("rollback", 3, "--device", "cam-4"))
    for action, version, *target in releases:
        assert cli.main(["fleet", action, *release_args(model, key, version, *target, "--gateway", gateway),
                         *broker_args(broker)]) == 0
    capsys.readouterr()
    assert cli.main(["fleet", "status", *broker_args(broker), "--wait", "0.3"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index(next(line for line in out if line.startswith("RELEASE")))
    assert out[at].split() == ["RELEASE", "MODEL", "VERSION", "ISSUED", "ACTIVE", "PENDING", "ROLLED", "BACK",
                               "FAILED"]
    group, device = out[at + 1].split(), out[at + 2].split()
    assert group[:4] == ["group", "line-a", "inspection", "5"]
    assert group[5:] == ["cam-1", "cam-3", "cam-2", "-"]  # active, pending, rolled back, failed
    assert device[:5] == ["device", "cam-4", "inspection", "3", "(rollback)"]
    assert device[6:] == ["-", "cam-4", "-", "-"]  # a rollback not taken yet

    assert cli.main(["fleet", "clear", "--device", "cam-4", *broker_args(broker)]) == 0
    assert "edgecloud/plant-1/devices/cam-4/model/desired" in capsys.readouterr().out
    assert cli.main(["fleet", "status", *broker_args(broker), "--wait", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "device cam-4" not in out and "group line-a" in out
    assert cli.main(["fleet", "clear", "--group", "no/such", *broker_args(broker)]) == 2


def test_each_model_keeps_its_release_and_clear_takes_one_models_or_every_one(
        broker, gateway, key, model, capsys) -> None:
    for name, version in (("inspection", 5), ("weld", 2)):
        args = release_args(model, key, version, "--group", "line-a", "--gateway", gateway)
        args[args.index("--name") + 1] = name
        assert cli.main(["fleet", "publish", *args, *broker_args(broker)]) == 0

    def listed() -> list[tuple[str, str, int]]:
        view = collect(broker.mqtt_config(), "plant-1", listen_s=0.3)
        return [(str(s.release.target), s.release.model, s.release.version) for s in view.releases()]

    # weld's is on its own topic and on the shared one (where it replaced inspection's): listed once
    assert listed() == [("group line-a", "inspection", 5), ("group line-a", "weld", 2)]
    capsys.readouterr()
    assert cli.main(["fleet", "clear", "--group", "line-a", "--model", "weld", *broker_args(broker)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["cleared the release retained on edgecloud/plant-1/groups/line-a/models/weld/desired",
                   "cleared the release retained on edgecloud/plant-1/groups/line-a/model/desired"]
    assert listed() == [("group line-a", "inspection", 5)]
    assert cli.main(["fleet", "clear", "--group", "line-a", *broker_args(broker)]) == 0
    assert "groups/line-a/models/inspection/desired" in capsys.readouterr().out
    assert listed() == []


def test_the_fleet_view_keeps_a_state_per_model_and_only_for_models_served() -> None:
    view = FleetView("plant-1")

    def message(topic: Any, body: dict) -> Message:
        return Message(str(topic), json.dumps(body).encode(), 1, True)

    refused = {"device": "cam-1", "model": "zzz", "version": 5, "state": "failed", "active_version": 1,
               "reason": "contract_mismatch: no such model"}
    view.apply(message(TOPICS.reported("cam-1"), refused))  # before the status: a model not seen yet
    view.apply(message(TOPICS.reported("cam-1", "b"), {"device": "cam-1", "model": "b", "version": 2,
                                                        "state": "active", "active_version": 2}))
    view.apply(message(TOPICS.status("cam-1"), {
        "device": "cam-1", "state": "online", "model": "a", "active_version": 1,
        "models": [{"name": "a", "active_version": 1, "ready": True},
                   {"name": "b", "active_version": 2, "ready": True}]}))
    row = view.rows["cam-1"]
    assert {(m.name, m.active_version, m.update) for m in row.models.values()} == {
        ("a", 1, "-"), ("b", 2, "active v2")}
    view.apply(message(TOPICS.reported("cam-1"), refused))  # after it: the first model's refusal
    assert row.models["a"].update == "failed v5 (contract_mismatch: no such model)"
    assert [line.split()[:5] for line in render_table([row]).splitlines()[1:]] == [
        ["cam-1", "yes", "a", "1", "failed"], ["cam-1", "yes", "b", "2", "active"]]


def test_a_device_counts_under_the_release_its_agent_follows_for_each_model() -> None:
    """For each model: the device's release over its group's; at one level the later issued of the
    model's own topic and the shared one; the shared one not for another model's line."""
    from tests.core.test_release import NOW, payload

    view = FleetView("plant-1")
    key = generate_key()

    def retain(topic: Any, model: str, version: int, minutes: int) -> None:
        release = payload(model=model, version=version, issued_at=NOW + timedelta(minutes=minutes))
        view.apply(Message(str(topic), sign_release(release, key).to_json(), 1, True))

    view.apply(Message(str(TOPICS.status("cam-1")), json.dumps({
        "device": "cam-1", "state": "online", "model": "a", "active_version": 1, "group": "line-a",
        "models": [{"name": "a", "active_version": 1, "ready": True},
                   {"name": "b", "active_version": 3, "ready": True}]}).encode(), 1, True))
    retain(TOPICS.group_desired("line-a", "a"), "a", 2, 0)
    retain(TOPICS.group_desired("line-a", "b"), "b", 3, 1)
    retain(TOPICS.group_desired("line-a"), "a", 4, 2)  # a's, later, by a publisher of the shared topic only

    def standings() -> list[tuple[str, str, int, dict]]:
        return [(str(s.release.target), s.release.model, s.release.version, dict(s.devices))
                for s in view.releases()]

    assert standings() == [("group line-a", "a", 4, {"pending": ("cam-1",)}),  # the later issued
                           ("group line-a", "a", 2, {}),
                           ("group line-a", "b", 3, {"active": ("cam-1",)})]  # not under a's shared
    retain(TOPICS.device_desired("cam-1", "b"), "b", 5, 3)
    assert ("device cam-1", "b", 5, {"pending": ("cam-1",)}) in standings()


def test_status_shows_the_audit_agreement_of_the_active_version_or_unknown() -> None:
    view = FleetView("plant-1")
    totals = {"rows": 5000, "escalated": 300, "audited": 412, "audit_agree": 383, "escalated_agree": 200}
    quality = {"version": 4, **totals, "confidence_hist": [0] * 10, "totals": totals}

    def telemetry(device: str, **fields: Any) -> Message:
        body = {"at": "2025-06-01T12:00:00Z", "models": [{"name": "inspection", **fields}]}
        return Message(str(TOPICS.telemetry(device)), json.dumps(body).encode(), 1, False)

    for device in ("cam-1", "cam-2", "cam-3", "cam-4", "cam-5"):
        status = Status(device=device, state="online", agent_version="0.1.0", model="inspection",
                        active_version=4)
        view.apply(Message(str(TOPICS.status(device)), json.dumps(status.to_dict()).encode(), 1, True))
    view.apply(telemetry("cam-1", quality=quality))
    view.apply(telemetry("cam-2"))  # an older agent: no quality
    view.apply(telemetry("cam-3", quality={**quality, "version": 3}))  # of the version before
    view.apply(telemetry("cam-4", quality={**quality, "audit_agree": 500}))  # does not read
    # cam-5: no telemetry during the listening window
    lines = render_table(view.sorted_rows()).splitlines()
    assert lines[0].split()[5:8] == ["ESCALATION", "AGREEMENT", "LAST"]
    column = lines[0].index("AGREEMENT")
    assert [line[column:].split("  ")[0].strip() for line in lines[1:]] == [
        "audit 93.0% of 412", "unknown", "unknown", "unknown", "-"]
    assert view.rows["cam-1"].models["inspection"].audit_agreement == (383, 412)
    assert view.rows["cam-2"].models["inspection"].audit_agreement is None
