"""The rollout controller end to end: a real mosquitto, releases published and commands signed for
real, the controller as its own process (``edgecloud fleet controller``), and a few devices played with
plain paho that follow the contract of docs/design.md §11 (take the release inside the current wave's
share, report, send telemetry with agreement counts per version, roll back on a halt)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgecloud.mqtt.topics import FleetTopics
from edgecloud.release import Envelope, ReleasePayload, ReleaseRejected, in_rollout, verify_envelope
from edgecloud.rollout import (
    ROLLOUT_HALTED,
    CommandEnvelope,
    CommandRefused,
    WaveCommand,
    share,
    verify_command,
)
from edgecloud.signing import TrustStore, key_id, load_public_key
from edgecloud_tools import cli
from edgecloud_tools.fleet.controller import FAULT_ENV
from edgecloud_tools.fleet.controller_state import STATE_FILE, Decision, LeaseHeld, Rollout, SqliteState
from edgecloud_tools.fleet.gates import Counts

if TYPE_CHECKING:
    from edgecloud_tools.rig.broker import LocalBroker

FLEET, GROUP, MODEL = "plant-1", "line-a", "inspection"
TOPICS = FleetTopics(FLEET)
ROOT = Path(__file__).resolve().parents[2]
ROLLOUT_SCHEMA = json.loads((ROOT / "protos" / "schemas" / "rollout.schema.json").read_text())
RELEASE_SCHEMA = json.loads((ROOT / "protos" / "schemas" / "release.schema.json").read_text())


class Devices:
    """``n`` devices of GROUP on one paho session, serving MODEL v1. :meth:`step` is one telemetry
    interval: each device first follows the retained release and wave command (verified with the
    operator's keys), then reports 20 audited rows drawn from the agreement ``truth`` of the version
    it serves, with a per-device offset (cameras differ)."""

    def __init__(self, broker: LocalBroker, n: int, truth: dict[int, float], trust: TrustStore) -> None:
        self.truth, self.trust = truth, trust
        self.rng = random.Random(11)
        self.active = {f"cam-{i:02d}": 1 for i in range(n)}
        self.offset = {d: self.rng.gauss(0, 0.02) for d in self.active}
        self.seq = 0
        self.ever_on_new: set[str] = set()
        self._lock = threading.Lock()
        self._retained: dict[str, bytes] = {}
        self.commands: list[bytes] = []  # every wave command received, in order
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe([(str(TOPICS.group_desired(GROUP, MODEL)), 1), (str(TOPICS.rollout(MODEL)), 1)])
        for device in self.active:
            self._status(device)

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self._retained[message.topic] = bytes(message.payload)
            if message.topic == str(TOPICS.rollout(MODEL)):
                self.commands.append(bytes(message.payload))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _publish(self, topic: Any, body: dict[str, Any], retain: bool = False) -> None:
        self.client.publish(str(topic), json.dumps(body), qos=1, retain=retain).wait_for_publish(5)

    def _status(self, device: str) -> None:
        self._publish(TOPICS.status(device), {
            "device": device, "state": "online", "at": "2026-01-01T00:00:00Z", "agent_version": "test",
            "model": MODEL, "active_version": self.active[device], "group": GROUP,
            "models": [{"name": MODEL, "active_version": self.active[device], "ready": True}]}, retain=True)

    def _report(self, device: str, version: int, state: str, reason: str | None = None) -> None:
        self._publish(TOPICS.reported(device, MODEL), {
            "device": device, "model": MODEL, "version": version, "state": state, "progress": None,
            "reason": reason, "active_version": self.active[device], "at": "2026-01-01T00:00:00Z"},
            retain=True)

    def _follow(self) -> None:
        with self._lock:
            desired = self._retained.get(str(TOPICS.group_desired(GROUP, MODEL)))
            command_bytes = self._retained.get(str(TOPICS.rollout(MODEL)))
        if not desired:
            return
        release = verify_envelope(Envelope.from_json(desired), self.trust)
        command = None
        if command_bytes:
            try:
                command = verify_command(CommandEnvelope.from_json(command_bytes), release, self.trust)
            except (CommandRefused, ReleaseRejected):
                command = None
        percent = share(release, command)
        for device, version in self.active.items():
            inside = percent > 0 and in_rollout(device, percent, release.rollout.salt)
            if version == release.version and command is not None and command.state == "halted":
                self.active[device] = 1
                self._report(device, release.version, "rolled_back", ROLLOUT_HALTED)
                self._status(device)
            elif version != release.version and inside:
                self.active[device] = release.version
                self.ever_on_new.add(device)
                self._report(device, release.version, "active")
                self._status(device)

    def step(self) -> None:
        self._follow()
        self.seq += 1
        for device, version in self.active.items():
            level = min(1.0, max(0.0, self.truth[version] + self.offset[device]))
            agree = sum(self.rng.random() < level for _ in range(20))
            counts = {"rows": 400, "escalated": 20, "audited": 20, "audit_agree": agree}
            quality = {"version": version, **counts, "confidence_hist": [0] * 10, "totals": counts}
            served = {"name": MODEL, "model_version": version, "latency_ms": {"edge": {"p95": 5.0}},
                      "quality": quality}
            self._publish(TOPICS.telemetry(device),
                          {"schema": 1, "device": device, "seq": self.seq, "models": [served]})

    def on_new(self, version: int) -> int:
        return sum(v == version for v in self.active.values())


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    prefix = tmp_path / "keys" / "ops"
    assert cli.main(["keygen", "--out", str(prefix)]) == 0
    return prefix


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "inspection-edge.onnx"
    path.parent.mkdir()
    path.write_bytes(os.urandom(1000))
    return path


def broker_args(broker: LocalBroker) -> list[str]:
    return ["--mqtt", f"127.0.0.1:{broker.port}", "--fleet", FLEET]


def publish_waves(broker: LocalBroker, model: Path, keys: Path, *extra: str) -> None:
    argv = ["fleet", "publish", "--model", str(model), "--name", MODEL, "--version", "2", "--group", GROUP,
            "--key", f"{keys}.key", "--uri", model.as_uri(), "--waves", "25,50,100", "--soak", "1s",
            "--gate", "min_devices=2", "--gate", "max_agree_drop=0.05", "--gate", "max_failed_share=0.2",
            *extra, *broker_args(broker)]
    assert cli.main(argv) == 0


class ControllerProcess:
    """``edgecloud fleet controller`` in its own process, its log kept in a file."""

    def __init__(self, broker: LocalBroker, keys: Path, state_dir: Path, env: dict[str, str] | None = None,
                 trusted: bool = True):
        """``trusted`` False: the command line of docs/design.md §12 alone (no --trusted-key: the releases
        are verified with the controller's own key, which signed them here)."""
        config = state_dir.parent / "controller.toml"
        config.write_text("[controller]\nsettle_s = 0.3\nlease_s = 6\n")
        self.log = state_dir.parent / f"controller-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "edgecloud_tools.cli", "fleet", "controller", "--config", str(config),
                "--key", f"{keys}.key", *(["--trusted-key", f"{keys}.pub"] if trusted else []),
                "--state-dir", str(state_dir), "--judge-interval", "0.1", *broker_args(broker)]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=out, env={**os.environ, **(env or {})})

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def controllers() -> Iterator[list[ControllerProcess]]:
    started: list[ControllerProcess] = []
    yield started
    for c in started:
        c.stop()


def retained_command(devices: Devices) -> WaveCommand | None:
    with devices._lock:
        payload = devices._retained.get(str(TOPICS.rollout(MODEL)))
    if not payload:
        return None
    envelope = CommandEnvelope.from_json(payload)
    jsonschema.validate(json.loads(payload), ROLLOUT_SCHEMA)
    return WaveCommand.from_dict(dict(envelope.payload))


def run_until(devices: Devices, done: Callable[[], bool], controller: ControllerProcess,
              timeout: float = 60.0) -> None:
    """Telemetry intervals (every 0.1 s) until ``done``; fails with the controller's log otherwise."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out; controller log:\n{controller.text()}"
        assert controller.process.poll() is None, f"controller exited:\n{controller.text()}"
        devices.step()
        time.sleep(0.1)


def command_is(devices: Devices, wave: int, state: str) -> Callable[[], bool]:
    def check() -> bool:
        command = retained_command(devices)
        return command is not None and (command.wave, command.state) == (wave, state)
    return check


def test_a_good_release_advances_through_every_wave(broker, keys, model, tmp_path, controllers) -> None:
    publish_waves(broker, model, keys)
    devices = Devices(broker, 24, {1: 0.9, 2: 0.9}, TrustStore.from_files([Path(f"{keys}.pub")]))
    controllers.append(controller := ControllerProcess(broker, keys, tmp_path / "state"))
    run_until(devices, command_is(devices, 2, "complete"), controller)
    run_until(devices, lambda: devices.on_new(2) == 24, controller)
    seen = [(c.wave, c.state) for c in map(WaveCommand.from_dict, (json.loads(p)["payload"]
                                                                 for p in devices.commands))]
    assert seen == [(1, "advancing"), (2, "advancing"), (2, "complete")]
    log = controller.text()
    assert log.count("event=rollout_wave_advanced model=inspection version=2") == 2
    assert "event=rollout_complete model=inspection version=2 wave=2" in log
    assert "event=rollout_halted" not in log
    advanced = next(line for line in log.splitlines() if "event=rollout_wave_advanced" in line)
    for figure in ("devices=", "agree_new=", "agree_control=", "agree_z=", "percent=50"):
        assert figure in advanced

    status = cli_json(["fleet", "rollout", "status", "--json", "--state-dir", str(tmp_path / "state"),
                       "--trusted-key", f"{keys}.pub", *broker_args(broker)])
    (row,) = status["rollouts"]
    assert (row["model"], row["version"], row["wave"], row["state"]) == (MODEL, 2, 2, "complete")
    assert row["waves"] == [25, 50, 100] and row["devices"]["active"] == 24 and row["devices"]["pending"] == 0
    assert row["controller"]["state"] == "complete" and not row["controller"]["unpublished"]
    assert row["gates"] == {"soak_s": 1, "min_devices": 2, "max_agree_drop": 0.05, "max_failed_share": 0.2}


def cli_json(argv: list[str]) -> dict[str, Any]:
    """Run the CLI in a subprocess (its own output), return its JSON."""
    done = subprocess.run([sys.executable, "-m", "edgecloud_tools.cli", *argv], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_bad_release_is_halted_in_the_first_wave(broker, keys, model, tmp_path, controllers,
                                                    capsys) -> None:
    publish_waves(broker, model, keys)
    devices = Devices(broker, 24, {1: 0.9, 2: 0.45}, TrustStore.from_files([Path(f"{keys}.pub")]))
    controllers.append(controller := ControllerProcess(broker, keys, tmp_path / "state", trusted=False))
    run_until(devices, command_is(devices, 0, "halted"), controller)
    command = retained_command(devices)
    assert command is not None and command.reason.startswith("max_agree_drop: audit agreement")
    first_wave = {d for d in devices.active if in_rollout(d, 25, MODEL)}
    assert devices.ever_on_new <= first_wave
    run_until(devices, lambda: devices.on_new(2) == 0, controller)  # every one rolled back
    halted = next(line for line in controller.text().splitlines() if "event=rollout_halted" in line)
    assert "model=inspection version=2 wave=0" in halted and "agree_z=" in halted

    status = cli_json(["fleet", "rollout", "status", "--json", *broker_args(broker)])
    (row,) = status["rollouts"]
    assert (row["wave"], row["state"]) == (0, "halted")
    assert row["devices"]["rolled_back"] == len(devices.ever_on_new) and row["devices"]["active"] == 0
    capsys.readouterr()
    assert cli.main(["fleet", "rollout", "status", *broker_args(broker)]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["MODEL", "VERSION", "WAVE", "STATE"]
    assert line.split()[:5] == ["inspection", "2", "1/3", "(25%)", "halted"]


def test_killed_controller_resumes_where_it_was(broker, keys, model, tmp_path, controllers) -> None:
    """Killed right after committing its first decision (before publishing it), then with SIGKILL in
    the middle of wave 1: each restart publishes what the broker lacked, takes up the wave's counts
    written so far and goes on, deciding each wave once."""
    state_dir = tmp_path / "state"
    publish_waves(broker, model, keys)
    devices = Devices(broker, 24, {1: 0.9, 2: 0.9}, TrustStore.from_files([Path(f"{keys}.pub")]))
    first = ControllerProcess(broker, keys, state_dir, env={FAULT_ENV: "decided"})
    controllers.append(first)
    deadline = time.monotonic() + 60
    while first.process.poll() is None:
        assert time.monotonic() < deadline, first.text()
        devices.step()
        time.sleep(0.1)
    assert first.process.returncode == -signal.SIGKILL
    assert retained_command(devices) is None  # decided, never published
    state = SqliteState(state_dir / STATE_FILE, read_only=True)
    (stored,) = state.rollouts().values()
    assert (stored.wave, stored.state) == (1, "advancing") and stored.outbox is not None

    controllers.append(second := ControllerProcess(broker, keys, state_dir))
    run_until(devices, lambda: bool(devices.commands), second)
    assert devices.commands[0] == (stored.outbox or "").encode()  # the decision the first one committed
    run_until(devices, lambda: bool(state.wave_counts(MODEL, 2)), second)  # wave 1's first counts written
    second.process.send_signal(signal.SIGKILL)  # in wave 1: its soak has only begun
    second.process.wait(10)
    kept = state.wave_counts(MODEL, 2)

    controllers.append(third := ControllerProcess(broker, keys, state_dir))
    run_until(devices, command_is(devices, 2, "complete"), third)
    resumed = next(line for line in third.text().splitlines() if "event=rollout_resumed" in line)
    assert kept and f"devices={len(kept)} audited={sum(c.audited for c in kept.values())}" in resumed
    decided = [(d.wave, d.state) for d in state.decisions(MODEL, 2) if d.figures]
    assert decided == [(1, "advancing"), (2, "advancing"), (2, "complete")]
    payloads = [json.loads(c)["payload"] for c in devices.commands]
    published = {p["issued_at"]: p["wave"] for p in payloads}
    assert sorted(published.values()) == [1, 2, 2]  # each decision published once (whatever QoS 1 repeats)
    state.close()


def test_a_second_controller_is_refused(broker, keys, model, tmp_path, controllers) -> None:
    publish_waves(broker, model, keys)
    controllers.append(first := ControllerProcess(broker, keys, tmp_path / "state"))
    deadline = time.monotonic() + 30
    while "event=rollout_found" not in first.text():
        assert time.monotonic() < deadline and first.process.poll() is None, first.text()
        time.sleep(0.05)
    second = ControllerProcess(broker, keys, tmp_path / "state")
    assert second.process.wait(30) == 1
    assert "event=controller_lease_refused" in second.text() and "is locked by pid" in second.text()
    assert first.process.poll() is None


def test_the_lease_row_keeps_a_second_holder_out_until_it_expires(tmp_path) -> None:
    one, two = SqliteState(tmp_path / STATE_FILE), SqliteState(tmp_path / STATE_FILE)
    one.acquire_lease("fleet", "host-a", 0.5)
    with pytest.raises(LeaseHeld, match="held by host-a"):
        two.acquire_lease("fleet", "host-b", 0.5)
    one.acquire_lease("fleet", "host-a", 0.5)  # renewing is the same holder's right
    time.sleep(0.6)
    two.acquire_lease("fleet", "host-b", 30)  # expired: taken over
    with pytest.raises(LeaseHeld, match="held by host-b"):
        one.acquire_lease("fleet", "host-a", 30)


def test_operator_halts_and_resumes(broker, keys, model, tmp_path, controllers, capsys) -> None:
    publish_waves(broker, model, keys, "--gate", "min_devices=30")  # the controller waits in wave 0
    devices = Devices(broker, 24, {1: 0.9, 2: 0.9}, TrustStore.from_files([Path(f"{keys}.pub")]))
    controllers.append(controller := ControllerProcess(broker, keys, tmp_path / "state"))
    run_until(devices, lambda: devices.on_new(2) > 0, controller)
    operator = [f"--key={keys}.key", *broker_args(broker)]
    assert cli.main(["fleet", "rollout", "resume", MODEL, "2", *operator]) == 2
    assert "is not halted" in capsys.readouterr().err
    assert cli.main(["fleet", "rollout", "halt", MODEL, "2", "--reason", "line stopped", *operator]) == 0
    run_until(devices, lambda: devices.on_new(2) == 0, controller)
    halted = retained_command(devices)
    assert halted is not None and (halted.wave, halted.state, halted.reason) == (0, "halted", "line stopped")
    assert cli.main(["fleet", "rollout", "resume", MODEL, "2", *operator]) == 0
    run_until(devices, lambda: devices.on_new(2) > 0, controller)
    command = retained_command(devices)
    assert command is not None and (command.wave, command.state) == (0, "advancing")
    adopted = "event=rollout_command_adopted model=inspection version=2 wave=0 state=advancing"
    run_until(devices, lambda: adopted in controller.text(), controller)
    assert "state=halted reason='line stopped'" in controller.text()


def test_publish_with_waves_gates_and_a_controller_key(broker, keys, model, tmp_path) -> None:
    assert cli.main(["keygen", "--out", str(tmp_path / "keys" / "controller")]) == 0
    publish_waves(broker, model, keys, "--gate", "confidence=0.99", "--gate", "max_p95_ratio=1.5",
                  "--controller-key", str(tmp_path / "keys" / "controller.pub"))
    got: list[bytes] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_message = lambda *a: got.append(bytes(a[2].payload))
    client.connect("127.0.0.1", broker.port)
    client.subscribe(str(TOPICS.group_desired(GROUP, MODEL)), 1)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        client.loop(0.1)
    client.disconnect()
    assert got
    jsonschema.validate(json.loads(got[0]), RELEASE_SCHEMA)
    release = verify_envelope(Envelope.from_json(got[0]), TrustStore.from_files([Path(f"{keys}.pub")]))
    assert release == ReleasePayload.from_dict(release.to_dict())
    rollout = release.rollout
    assert rollout.waves == (25, 50, 100) and rollout.percent == 25
    assert rollout.gates is not None and rollout.gates.to_dict() == {
        "soak_s": 1, "min_devices": 2, "max_failed_share": 0.2, "max_agree_drop": 0.05, "confidence": 0.99,
        "max_p95_ratio": 1.5}
    controller_key = load_public_key(tmp_path / "keys" / "controller.pub")
    assert rollout.controller_key == key_id(controller_key) and rollout.controller_public_key


@pytest.mark.parametrize("extra, flag", [
    (["--waves", "50,25,100"], "--waves"),
    (["--waves", "5,x"], "--waves"),
    (["--soak", "soon"], "--soak"),
    (["--gate", "max_agree_drop=2"], "--gate max_agree_drop"),
    (["--gate", "bogus=1"], "--gate"),
    (["--gate", "confidence=high"], "--gate confidence"),
    (["--controller-key", "/nonexistent.pub"], "--controller-key"),
])
def test_bad_wave_options_exit_2_naming_the_flag(broker, keys, model, capsys, extra, flag) -> None:
    argv = ["fleet", "publish", "--model", str(model), "--name", MODEL, "--version", "2", "--group", GROUP,
            "--key", f"{keys}.key", "--uri", model.as_uri(), *extra, *broker_args(broker)]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own refusal (a type that does not parse)
        code = e.code
    assert code == 2
    assert flag in capsys.readouterr().err


def test_a_release_driven_by_another_key_is_left_alone(broker, keys, model, tmp_path, controllers,
                                                       capsys) -> None:
    """A release that names its controller key: a controller with another key does not drive it, the
    operator's key cannot halt it, the named key can (devices trust it from the release alone)."""
    controller_key = tmp_path / "keys" / "controller"
    assert cli.main(["keygen", "--out", str(controller_key)]) == 0
    publish_waves(broker, model, keys, "--controller-key", f"{controller_key}.pub")
    devices = Devices(broker, 4, {1: 0.9, 2: 0.9}, TrustStore.from_files([Path(f"{keys}.pub")]))
    controllers.append(controller := ControllerProcess(broker, keys, tmp_path / "state"))
    run_until(devices, lambda: "event=rollout_not_driven model=inspection version=2" in controller.text(),
              controller)
    assert cli.main(["fleet", "rollout", "halt", MODEL, "2", "--reason", "x", f"--key={keys}.key",
                     *broker_args(broker)]) == 2
    assert "names controller key" in capsys.readouterr().err
    assert cli.main(["fleet", "rollout", "halt", MODEL, "2", "--reason", "stop",
                     f"--key={controller_key}.key", *broker_args(broker)]) == 0
    run_until(devices, command_is(devices, 0, "halted"), controller)  # verified by the devices' rule
    assert "event=rollout_command_adopted" not in controller.text()


def test_a_decision_and_the_end_of_its_waves_counts_are_one_transaction(tmp_path) -> None:
    state = SqliteState(tmp_path / STATE_FILE)
    rollout = Rollout(MODEL, 2, wave=0, wave_started=1.0)
    state.save(rollout)
    state.save_counts(MODEL, 2, {("cam-1", 2): Counts(10, 1, 5, 4), ("cam-2", 1): Counts(20, 2, 6, 6)})
    state.save_counts(MODEL, 2, {("cam-1", 2): Counts(30, 3, 9, 8)})  # the sums so far replace the old
    counts = {("cam-1", 2): Counts(30, 3, 9, 8), ("cam-2", 1): Counts(20, 2, 6, 6)}
    assert state.wave_counts(MODEL, 2) == counts
    moved = rollout.moved(wave=1, issued_at="2026-01-01T00:00:00Z", outbox="{}")
    broken = Decision(MODEL, 2, 1, "advancing", 2.0, "every gate held", {"agree_z": object()})
    with pytest.raises(TypeError):  # fails after the counts went and the rollout moved: all rolled back
        state.save(moved, broken, new_wave=True)
    assert state.wave_counts(MODEL, 2) == counts and state.rollouts()[(MODEL, 2)] == rollout
    decision = Decision(MODEL, 2, 1, "advancing", 2.0, "every gate held", {"agree_z": -3.1})
    state.save(moved, decision, new_wave=True)
    assert state.wave_counts(MODEL, 2) == {} and state.rollouts()[(MODEL, 2)] == moved
    assert state.decisions(MODEL, 2) == [decision]
    state.close()
