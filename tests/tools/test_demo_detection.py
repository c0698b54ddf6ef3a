"""``edgecloud demo --task detection`` with hand-built detectors in a models directory of its own: the
table's mAP of edge, cloud and cascade, the share escalated, and the PNG; one line and exit 2 without
the detection models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecloud_tools import cli
from edgecloud_tools.demo_detection import DETECTION_EDGE, DETECTION_REPOSITORY
from edgecloud_tools.toolchain import DET_CLOUD_NAME, MODELS_ENV
from tests.support.detectors import LABELS, detection_card, grid_detector, run_detector
from tests.support.images import encode

T = 0.5
N = 30


def grid_frame(seed: int) -> np.ndarray:
    levels = np.random.default_rng(seed).integers(0, 256, (4, 4))
    return np.kron(levels, np.ones((4, 4), dtype=np.int64)).astype(np.uint8)[..., None]


def models_and_data(tmp_path: Path) -> tuple[Path, Path]:
    """A models directory with an edge and a cloud detector, and held-out frames whose true boxes are
    the cloud's: the cloud scores mAP 1 on them and the edge less."""
    models = tmp_path / "models"
    edge = grid_detector(models / DETECTION_EDGE, card=detection_card(
        "defects-edge", T, calibration={"policy": "box_mean", "threshold": 0.86}))
    cloud = grid_detector(models / DETECTION_REPOSITORY / DET_CLOUD_NAME / "1" / "model.onnx", gain=1.2,
                          bias=0.05, card=detection_card(DET_CLOUD_NAME, T))
    assert edge.is_file()
    data = tmp_path / "data"
    data.mkdir()
    pixels = [grid_frame(s) for s in range(N)]
    truth = run_detector(cloud, np.stack([p.transpose(2, 0, 1) for p in pixels]).astype(np.float32) / 255)
    images, annotations = [], []
    for i, p in enumerate(pixels):
        (data / f"{i}.png").write_bytes(encode(p, "PNG"))
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 16, "height": 16})
        for k in np.flatnonzero(truth["scores"][i] >= T):
            x1, y1, x2, y2 = truth["boxes"][i, k].tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(truth["classes"][i, k]) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1]})
    coco = data / "coco.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(LABELS)]}))
    return models, coco


def test_the_detection_demo_reports_map_of_edge_cloud_and_cascade_and_draws_the_boxes(tmp_path: Path) -> None:
    models, coco = models_and_data(tmp_path)
    out, png = tmp_path / "summary.json", tmp_path / "boxes.png"
    proc = subprocess.run([sys.executable, "-m", "edgecloud_tools.cli", "demo", "--task", "detection",
                           "--n", str(N), "--wan-ms", "5", "--data", str(coco), "--png", str(png),
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, MODELS_ENV: str(models)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["frames"] == N and s["failed_requests"] == 0
    assert s["cloud"]["map50"] == pytest.approx(1.0)
    assert s["edge"]["map50"] < 0.99
    assert s["edge"]["map50"] < s["cascade"]["map50"] <= 1.0
    assert s["edge"]["escalated"] == 0 and s["cloud"]["escalated"] == 1.0
    assert 0 < s["cascade"]["escalated"] < 1
    assert s["cloud"]["mean_ms"] >= 5  # the emulated WAN is on the cloud path
    assert "mAP@0.5" in proc.stdout and "cascade (edge + unsure frames to the cloud)" in proc.stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 16 * 4


def test_without_the_detection_models_the_demo_says_so_in_one_line(tmp_path: Path, monkeypatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    models, _ = models_and_data(tmp_path)
    shutil.rmtree(models / DETECTION_EDGE.parent)
    monkeypatch.setenv(MODELS_ENV, str(models))
    assert cli.main(["demo", "--task", "detection"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no detection model" in err and str(DETECTION_EDGE) in err
