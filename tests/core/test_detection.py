"""Detection cards and policies (docs/design.md §10): the card's ``detection`` section through the typed
model and the schema, the two policies on hand-made scores, and the boxes as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgecloud.confidence import DetectionOutputs, make_policy
from edgecloud.confidence.detection import box_low_share, box_mean
from edgecloud.modelcard import CardCalibration, ModelCard, ModelCardError
from edgecloud.protocol.detections import detections_output, top_label
from edgecloud.tensors import TensorSpec
from tests.conftest import ROOT
from tests.support.detectors import grid_detector

SCHEMA = json.loads((ROOT / "protos" / "schemas" / "model_card.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
OUTPUTS = DetectionOutputs("boxes", "scores", "classes", 0.5)


def card(model: Path) -> dict:
    return ModelCard.describe(
        model, name="line", version=1, task="detection",
        inputs=(TensorSpec("image", "FP32", (-1, 1, 16, 16)),),
        outputs=(TensorSpec("boxes", "FP32", (-1, 16, 4)), TensorSpec("scores", "FP32", (-1, 16)),
                 TensorSpec("classes", "INT64", (-1, 16))),
        labels=("scratch", "spot", "crack"), calibration=CardCalibration("box_mean", 1.0, 0.8, "scores"),
        metrics={"split": "test", "n": 10}, source={"tool": "test"}, detection=OUTPUTS).to_dict()


def test_a_detection_card_round_trips_and_validates(tmp_path: Path) -> None:
    data = card(grid_detector(tmp_path / "d.onnx"))
    VALIDATOR.validate(data)
    parsed = ModelCard.from_dict(data)
    assert parsed.detection == OUTPUTS
    assert parsed.to_dict() == data


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("detection"), "missing key 'detection'"),
    (lambda d: d["detection"].pop("scores"), "detection: missing key 'scores'"),
    (lambda d: d["detection"].update(score_threshold="0.5"), "'score_threshold' has the wrong type"),
    (lambda d: d["detection"].update(score_threshold=1.5), "score_threshold must be within [0, 1]"),
    (lambda d: d["detection"].update(boxes="bbox"), "detection.boxes: 'bbox' is not an output"),
    (lambda d: d["detection"].update(classes="scores"), "three different outputs"),
    (lambda d: d.update(task="classification"), "'detection' is only for task 'detection'"),
])
def test_a_malformed_detection_section_is_refused_naming_the_key(tmp_path: Path, change, message) -> None:
    data = card(grid_detector(tmp_path / "d.onnx"))
    change(data)
    with pytest.raises(ModelCardError) as e:
        ModelCard.from_dict(data, where="model card x")
    assert message in str(e.value) and "model card x" in str(e.value)
    if "wrong type" not in message and "three" not in message and "not an output" not in message:
        assert not VALIDATOR.is_valid(data)


def test_box_mean_and_box_low_share_as_the_issue_defines_them() -> None:
    scores = np.array([[0.9, 0.7, 0.3, 0.05, 0.0],   # found: 0.9, 0.7; candidates >= 0.1: 3, one low
                       [0.4, 0.2, 0.05, 0.0, 0.0],   # none found; 2 candidates, both low
                       [0.0, 0.0, 0.0, 0.0, 0.0]])   # nothing at all
    np.testing.assert_allclose(box_mean(scores, 0.5, 0.1), [0.8, 1.0, 1.0])
    np.testing.assert_allclose(box_low_share(scores, 0.5, 0.1), [1 - 1 / 3, 0.0, 1.0])
    policy = make_policy("box_low_share", "scores", detection=OUTPUTS, floor=0.1)
    np.testing.assert_allclose(policy({"scores": scores.astype(np.float32)}), [2 / 3, 0.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="needs a model card with task 'detection'"):
        make_policy("box_mean", "scores")


def test_detections_json_holds_the_boxes_above_the_threshold_best_first() -> None:
    outputs = {"scores": np.array([[0.6, 0.9, 0.2], [0.1, 0.0, 0.0]], np.float32),
               "boxes": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
               "classes": np.array([[1, 0, 2], [0, 0, 0]], np.int64)}
    frames = [json.loads(b) for b in detections_output(outputs, OUTPUTS, ("scratch", "spot"))]
    assert [d["label"] for d in frames[0]] == ["scratch", "spot"]
    assert frames[0][0]["box"] == [4.0, 5.0, 6.0, 7.0]
    assert frames[0][1]["score"] == pytest.approx(0.6)
    assert frames[1] == []
    assert top_label(outputs, OUTPUTS, ("scratch", "spot"), 0) == "scratch"
    assert top_label(outputs, OUTPUTS, ("scratch", "spot"), 1) == "none"
