"""``edgecloud doctor`` against a real gateway and a real mosquitto (TLS with the configured CA): one line
per check, a failed check names what to fix, and checks needing a Jetson or systemd say so."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from edge_agent.config import AgentConfig
from edge_agent.update.state import SCHEMA
from edgecloud.clock import format_time, utc_now
from edgecloud.config import build
from edgecloud.engine.sidecar import EngineSidecar, write_sidecar
from edgecloud_tools.doctor import (
    Check,
    Device,
    check_certificates,
    check_clocks,
    check_engine,
    check_gpu,
    run_checks,
)
from tests.support.net import free_port
from tests.support.onnx_models import linear_classifier
from tests.support.services import GatewayCloud


def config(tmp_path: Path, **sections: Any) -> AgentConfig:
    model = linear_classifier(tmp_path / "m.onnx", card={"name": "clf", "version": 3})
    data: dict[str, Any] = {"agent": {"state_dir": str(tmp_path / "state")}, "model": {"path": str(model)}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return build(AgentConfig, data, "test")


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


@pytest.fixture
def cloud(tmp_path: Path):
    gateway = GatewayCloud(tmp_path / "gateway", linear_classifier(tmp_path / "cloud.onnx"), "clf").start()
    yield gateway
    gateway.stop()


def test_a_reachable_cloud_and_broker_with_its_ca_are_ok(tmp_path, cloud, broker_factory, tls_files) -> None:
    broker = broker_factory(tls=tls_files)
    checks = by_name(run_checks(Device(config(
        tmp_path, cloud={"target": f"127.0.0.1:{cloud.port}", "model": "clf"},
        fleet={"name": "plant-1"}, mqtt=broker.mqtt_section()))))
    assert checks["model"].status == "ok" and "clf v3, backend onnxruntime" in checks["model"].message
    assert checks["cloud"].status == "ok" and "for model 'clf'" in checks["cloud"].message, checks["cloud"]
    assert checks["broker"].status == "ok" and "over TLS" in checks["broker"].message, checks["broker"]
    assert checks["certificate mqtt.tls.ca"].status == "ok"
    assert checks["disk"].status == "ok" and checks["clock skew"].status == "ok"
    assert checks["gpu"].message.startswith("needs Jetson hardware") and checks["gpu"].status == "skipped"

    wrong_ca = broker.mqtt_section()
    wrong_ca["tls"] = {"ca": str(tls_files.other_ca)}
    checks = by_name(run_checks(Device(config(tmp_path, fleet={"name": "plant-1"}, mqtt=wrong_ca),
                                       timeout_s=2)))
    assert checks["broker"].status == "FAIL"
    assert "check mqtt.host, mqtt.port, mqtt.tls" in checks["broker"].message

    gone = {**broker.mqtt_section(), "tls": {"ca": str(tmp_path / "moved" / "ca.pem")}}  # not named before
    checks = by_name(run_checks(Device(config(tmp_path, fleet={"name": "plant-1"}, mqtt=gone), timeout_s=2)))
    assert checks["broker"].status == "FAIL"
    moved = tmp_path / "moved" / "ca.pem"
    assert checks["broker"].message == f"mqtt.tls.ca {moved}: no such file; fix the path"


def test_what_is_wrong_is_one_line_each_saying_what_to_fix(tmp_path) -> None:
    dead = free_port()
    cfg = config(tmp_path, cloud={"target": f"127.0.0.1:{dead}", "model": "clf"}, fleet={"name": "plant-1"},
                 mqtt={"port": dead, "connect_timeout_s": 1}, spool={"max_bytes": 10 ** 18})
    state = tmp_path / "state" / "update" / "state.json"
    state.parent.mkdir(parents=True)
    ahead = format_time(utc_now() + timedelta(days=1))  # a release issued "tomorrow": this clock is behind
    state.write_text(json.dumps({"schema": SCHEMA, "newest_issued_at": ahead, "rolled_back": []}))
    checks = by_name(run_checks(Device(cfg, timeout_s=1)))
    assert checks["cloud"].status == "FAIL" and "UNAVAILABLE" in checks["cloud"].message
    assert checks["cloud"].message.endswith("check cloud.target, cloud.tls (ca, cert, key) and "
                                            "cloud.token_file")
    assert checks["broker"].status == "FAIL"
    assert checks["disk"].status == "FAIL" and "lower spool.max_bytes" in checks["disk"].message
    skew = checks["clock skew"]
    assert skew.status == "FAIL" and "behind the newest release" in skew.message, skew
    assert all("\n" not in str(c) for c in checks.values())

    lost = cfg.model_copy(update={"cloud": cfg.cloud.model_copy(update={"token_file": tmp_path / "gone"})})
    (cloud,) = [c for c in run_checks(Device(lost, timeout_s=1)) if c.name == "cloud"]
    assert cloud.status == "FAIL" and "gone" in cloud.message  # a missing token file, not a traceback

    Path(cfg.model.path).unlink()
    (model,) = [c for c in run_checks(Device(cfg, timeout_s=1)) if c.name == "model"]
    assert model.status == "FAIL" and "does not exist: fix [model] path" in model.message


def test_certificates_expiring_soon_warn_and_expired_ones_fail(tmp_path, tls_files) -> None:
    cfg = config(tmp_path, cloud={"target": "127.0.0.1:1", "tls": {"ca": str(tls_files.ca)}})
    until = x509.load_pem_x509_certificate(tls_files.ca.read_bytes()).not_valid_after_utc
    for now, status in ((until - timedelta(days=400), "ok"), (until - timedelta(days=10), "warn"),
                        (until + timedelta(days=1), "FAIL")):
        (check,) = check_certificates(Device(cfg, now=lambda now=now: now))
        assert (check.name, check.status) == ("certificate cloud.tls.ca", status), check
    (tmp_path / "junk.pem").write_text("not a certificate")
    junk = config(tmp_path, cloud={"target": "127.0.0.1:1", "tls": {"ca": str(tmp_path / "junk.pem")}})
    (check,) = check_certificates(Device(junk))
    assert check.status == "FAIL" and "fix cloud.tls.ca" in check.message


def test_checks_needing_a_jetson_or_tensorrt_say_so_and_run_on_a_jetson(tmp_path) -> None:
    cfg = config(tmp_path)
    engine = tmp_path / "edge.plan"
    engine.write_bytes(b"plan")
    write_sidecar(engine, EngineSidecar("10.3.0", "NVIDIA Jetson AGX Orin", "int8+fp16", "0" * 64))
    check = check_engine(engine)
    assert check.status == "skipped"
    assert "built with TensorRT 10.3.0 on 'NVIDIA Jetson AGX Orin'" in check.message
    (tmp_path / "bare.plan").write_bytes(b"plan")
    assert check_engine(tmp_path / "bare.plan").status == "FAIL"  # no sidecar: how to rebuild it
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0\n")
    jetson = Device(cfg, tegra_release=release)
    gpu = check_gpu(jetson)  # this machine has no GPU nodes: on a "Jetson" that is a failure
    assert gpu.status == "FAIL" and "no GPU device node" in gpu.message
    assert check_clocks(jetson).status in ("ok", "warn")


def test_the_command_prints_one_line_per_check_and_exits_1_on_a_failure(tmp_path) -> None:
    model = linear_classifier(tmp_path / "m.onnx")
    agent = tmp_path / "agent.toml"
    state = tmp_path / "state"
    agent.write_text(f'[agent]\nstate_dir = "{state}"\n[model]\npath = "{tmp_path / "none.onnx"}"\n')
    run = subprocess.run([sys.executable, "-m", "edgecloud_tools.cli", "doctor", "--config", str(agent)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("FAIL    model: ") and "none.onnx does not exist" in lines[0]
    assert any(line.startswith("skipped gpu: needs Jetson hardware") for line in lines)
    assert "to fix" in run.stderr and "Traceback" not in run.stderr
    agent.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[model]\npath = "{model}"\n')
    run = subprocess.run([sys.executable, "-m", "edgecloud_tools.cli", "doctor", "--config", str(agent)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == (1 if "\nFAIL" in "\n" + run.stdout else 0), run.stdout
    assert run.stdout.splitlines()[0].startswith("ok      model: ")
    agent.write_text("[agent]\nlisten = 7\n")
    run = subprocess.run([sys.executable, "-m", "edgecloud_tools.cli", "doctor", "--config", str(agent)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and "agent.listen" in run.stderr
