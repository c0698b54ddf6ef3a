"""``edgecloud demo`` as a user runs it: a real gateway, agent and mosquitto on loopback, the committed
models, a short stream; the summary it prints and writes must tell the truth about what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgecloud.errors import ConfigError
from edgecloud.files import file_sha256
from edgecloud.modelcard import read_card
from edgecloud_tools import cli
from edgecloud_tools.demo_fleet import DemoFleet
from edgecloud_tools.rig.broker import MOSQUITTO_ENV, mosquitto_path
from tests.conftest import CLOUD_REPO, EDGE_V2_INT8

N = 60


def run_demo(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[dict, str, str]:
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "edgecloud_tools.cli", "demo", "--n", str(N),
                           "--wan-ms", "5", "--workdir", str(tmp_path / "work"), "--json", str(out), *flags],
                          capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, proc.stderr


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (dot-directories too) with its size and mtime: what a write would change.
    Compared before and after, so that a release another command left there is not blamed on the demo."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def check_inference_part(summary: dict) -> None:
    assert summary["images"] == N
    assert summary["failed_requests"] == 0
    acc = summary["accuracy"]
    # The committed models score 95 % (edge) and 99 % (cloud) on 5000 held-out images; 60 of the same
    # split leave room for chance, not for a broken path (which would sit near 25 %).
    assert acc["edge_only"] >= 0.8 and acc["cloud_only"] >= 0.9 and acc["cascade"] >= 0.9
    assert summary["degraded"] == 0
    assert summary["latency_ms"]["cloud_only_mean"] >= 5  # the emulated WAN is on the cloud path
    camera = summary["camera"]  # JPEG frames of several sizes through tritonclient, labels back
    assert camera["frames"] == 100 and camera["labelled_right"] >= 80
    assert len(camera["sizes"]) > 1 and camera["upstream_bytes_per_escalated_row"] > 0
    assert camera["still"] == {"stream": "line-1/cam-1", "frames": 20, "escalated": 1, "reused": 19}


@pytest.mark.skipif(mosquitto_path() is None, reason="the update part needs mosquitto")
def test_demo_swaps_to_the_signed_v2_release_without_failed_requests(tmp_path: Path) -> None:
    before = tree(CLOUD_REPO)
    summary, table, _ = run_demo(tmp_path)
    check_inference_part(summary)
    update = summary["update"]
    assert update["publish_error"] is None
    assert update["state"] == "active" and update["watch"] == "passed", update
    assert update["version"] == 2
    assert update["before"]["version"] == "1" and update["before"]["images"] >= N // 2
    assert update["after"]["version"] == "2" and update["after"]["images"] > 0
    assert update["before"]["images"] + update["after"]["images"] == N
    assert update["during"]["answered"] > 0
    assert update["failed_requests"] == 0
    assert "signed release v2 published half-way through the cascade stream: active" in table
    assert tree(CLOUD_REPO) == before, "the demo wrote into the committed models"
    # The device persisted v2 as its active model: the file it serves is the committed v2, byte for byte.
    state_dir = tmp_path / "work" / "agent-state"
    active = json.loads((state_dir / "update" / "state.json").read_text())["active"]
    assert active["version"] == 2
    assert file_sha256(state_dir / active["path"]) == read_card(EDGE_V2_INT8)["sha256"]


@pytest.mark.parametrize("how", ["--no-update", "no mosquitto"])
def test_demo_without_the_update_part(tmp_path: Path, how: str) -> None:
    if how == "--no-update":
        summary, table, log = run_demo(tmp_path, "--no-update")
    else:
        summary, table, log = run_demo(tmp_path, env={MOSQUITTO_ENV: str(tmp_path / "no-such-mosquitto")})
    check_inference_part(summary)
    assert "update" not in summary and "signed release" not in table
    assert not (tmp_path / "work" / "fleet").exists()
    skipped = [line for line in log.splitlines() if line.startswith("update part skipped")]
    if how == "--no-update":
        assert skipped == []
    else:  # one line that says how to get the update part
        assert len(skipped) == 1 and "apt-get install" in skipped[0]


@pytest.mark.parametrize("n", ["0", "-1"])
def test_demo_refuses_fewer_than_one_image(n: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--n", n])
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_update_model_without_a_card_version_is_a_config_error(tmp_path: Path) -> None:
    model = tmp_path / "edge.onnx"
    model.write_bytes(EDGE_V2_INT8.read_bytes())
    (tmp_path / "edge.onnx.card.json").write_text(json.dumps({"name": "inspection-edge"}))
    with pytest.raises(ConfigError, match="no integer version"):
        DemoFleet(tmp_path / "fleet", "device", model, "127.0.0.1:1")
    assert not (tmp_path / "fleet").exists()


def test_the_camera_client_says_what_it_needs_where_tritonclient_is_absent(monkeypatch) -> None:
    """A plain ``pip install edgecloud`` has no tritonclient: the camera part says how to get it."""
    from edgecloud_tools import demo

    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tritonclient" else real(name, *a))
    lines = demo.format_camera(demo.camera(1, 1, "inspection-edge", 10))
    assert lines == ["camera client skipped: needs tritonclient, the client local apps use: "
                     "pip install 'edgecloud[bench]'"]
