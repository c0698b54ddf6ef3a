"""The detection toolchain: the data set's boxes, mAP on a worked example, the offline cascade rule,
the committed detectors against their contract and cards, and the quick build (needs torch)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgecloud.backends.ort_session import OrtBackend
from edgecloud.modelcard import ModelCard, card_path
from edgecloud_tools.toolchain import DET_CLOUD, DET_CLOUD_NAME, DET_EDGE_FP32, DET_EDGE_INT8
from edgecloud_tools.toolchain.dataset import sensor_noise, surface
from edgecloud_tools.toolchain.detection.cascade import box_mean, cascade, choose_threshold, escalated
from edgecloud_tools.toolchain.detection.dataset import (
    BOX_LEVEL,
    DET_LABELS,
    DET_SIZE,
    MAX_DEFECTS,
    MAX_OVERLAP,
    box_iou,
    draw_defects,
    extent,
    make_detection_split,
    render_detection,
)
from edgecloud_tools.toolchain.detection.export import OUTPUTS, contract_problems
from edgecloud_tools.toolchain.detection.metrics import Detections, mean_ap
from edgecloud_tools.toolchain.quantize import check_tensorrt_ready
from tests.conftest import MODELS, ROOT

SCHEMA = json.loads((ROOT / "protos" / "schemas" / "model_card.schema.json").read_text())
DETECTORS = (DET_EDGE_FP32, DET_EDGE_INT8, DET_CLOUD)


# -- data set ----------------------------------------------------------------------------------------
def test_detection_split_is_reproducible_and_its_boxes_lie_inside_the_patch() -> None:
    split = make_detection_split("test", 300)
    again = make_detection_split("test", 40)
    assert np.array_equal(split.images[:40], again.images)
    assert all(np.array_equal(a, b) for a, b in zip(split.boxes[:40], again.boxes))
    assert split.images.shape == (300, 1, DET_SIZE, DET_SIZE) and split.images.dtype == np.float32
    assert split.images.min() >= 0.0 and split.images.max() <= 1.0
    counts = np.bincount([len(b) for b in split.boxes], minlength=MAX_DEFECTS + 1)
    assert len(counts) == MAX_DEFECTS + 1 and counts.min() > 30, counts  # 0 to 3 defects, each common
    for boxes, classes in zip(split.boxes, split.classes):
        assert boxes.dtype == np.float32 and classes.dtype == np.int64 and len(boxes) == len(classes)
        assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] <= DET_SIZE)
        assert np.all(boxes[:, 2:] > boxes[:, :2])
        assert set(classes.tolist()) <= set(range(len(DET_LABELS)))
    with pytest.raises(ValueError, match="unknown split"):
        make_detection_split("holdout", 2)


def test_each_box_is_the_extent_of_its_drawn_defect() -> None:
    seen = 0
    for i in range(60):
        defects = draw_defects(np.random.default_rng((7, i)))
        for d in defects:
            assert np.array_equal(extent(np.abs(d.layer)), d.box), (i, d.box)
            ys, xs = np.nonzero(np.abs(d.layer) >= BOX_LEVEL * np.abs(d.layer).max())
            assert xs.min() == d.box[0] and ys.max() + 1 == d.box[3]
            x1, y1, x2, y2 = d.box.astype(int)
            outside = np.abs(d.layer).copy()
            outside[y1:y2, x1:x2] = 0
            assert outside.max() < BOX_LEVEL * np.abs(d.layer).max()
            seen += 1
        if len(defects) > 1:
            iou = box_iou(np.array([d.box for d in defects]), np.array([d.box for d in defects]))
            assert (iou[~np.eye(len(defects), dtype=bool)] <= MAX_OVERLAP).all()
    assert seen > 60


def test_the_rendered_patch_differs_from_its_clean_surface_where_the_boxes_are() -> None:
    """Render a patch, then replay its seed without pasting the defects: the difference is the
    defects, and it lies in the boxes the patch reports."""
    for i in range(40):
        image, boxes, classes = render_detection(np.random.default_rng((11, i)))
        rng = np.random.default_rng((11, i))
        base = surface(rng, DET_SIZE)
        defects = draw_defects(rng)
        clean = sensor_noise(rng, base)
        assert np.array_equal(boxes, np.array([d.box for d in defects]).reshape(-1, 4))
        assert classes.tolist() == [d.cls for d in defects]
        difference = np.abs(image - clean)
        inside = np.zeros(image.shape, dtype=bool)
        for x1, y1, x2, y2 in boxes.astype(int):
            inside[y1:y2, x1:x2] = True
        assert difference[~inside].max(initial=0) < 0.1  # below a quarter of the faintest contrast
        for d, (x1, y1, x2, y2) in zip(defects, boxes.astype(int)):
            assert difference[y1:y2, x1:x2].max() > 0.5 * np.abs(d.layer).max()  # clipping may cut some


# -- mAP -----------------------------------------------------------------------------------------------
def _worked_example() -> tuple[Detections, list[np.ndarray], list[np.ndarray]]:
    """Two frames, K = 5. Class 0: three true boxes; detections d1 (0.9, exact), d3 (0.8, nowhere),
    d4 (0.7, exact, frame B), d2 (0.6, IoU 2/3 with its box); padding at a true box's place with score 0.
    Class 1: one true box, found exactly. Class 2: no true box, one detection (the class is left out)."""
    boxes = np.zeros((2, 5, 4), np.float32)
    scores = np.zeros((2, 5), np.float32)
    classes = np.zeros((2, 5), np.int64)
    boxes[0, :4] = [[0, 0, 10, 10], [40, 40, 50, 50], [20, 20, 30, 35], [20, 20, 30, 30]]
    scores[0, :3] = [0.9, 0.8, 0.6]
    boxes[1, :3] = [[0, 0, 10, 10], [5, 5, 15, 15], [50, 50, 60, 60]]
    scores[1, :3] = [0.7, 0.5, 0.4]
    classes[1, :3] = [0, 1, 2]
    truth_boxes = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
                   np.array([[0, 0, 10, 10], [5, 5, 15, 15]], np.float32)]
    truth_classes = [np.array([0, 0]), np.array([0, 1])]
    return Detections(boxes, scores, classes), truth_boxes, truth_classes


def test_mean_ap_matches_the_hand_computed_worked_example() -> None:
    """Class 0 in score order: TP, FP, TP, then d2 (TP up to IoU 0.65, FP from 0.7), 3 true boxes.
    IoU <= 0.65: precision 1, .5, 2/3, .75 at recall 1/3, 1/3, 2/3, 1; the envelope is 1 for the 34
    recall points <= 1/3 and .75 for the other 67: AP = (34 + 67 * .75) / 101 = 84.25 / 101.
    IoU >= 0.7: recall stops at 2/3; envelope 1 (34 points), 2/3 (33 points up to 0.66), 0 (34):
    AP = (34 + 22) / 101 = 56 / 101. Class 1: AP 1 everywhere; class 2 has no truth and is left out."""
    detections, truth_boxes, truth_classes = _worked_example()
    result = mean_ap(detections, truth_boxes, truth_classes, classes=3)
    ap_low, ap_high = 84.25 / 101, 56 / 101
    np.testing.assert_allclose(result.per_class[0], [ap_low] * 4 + [ap_high] * 6)
    np.testing.assert_allclose(result.per_class[1], 1.0)
    assert np.isnan(result.per_class[2]).all()
    assert result.map50 == pytest.approx((ap_low + 1) / 2)
    assert result.map50_95 == pytest.approx(((4 * ap_low + 6 * ap_high) / 10 + 1) / 2)
    assert result.map50_95 == pytest.approx((673 / 1010 + 1) / 2)


def test_mean_ap_of_perfect_and_of_empty_answers() -> None:
    split = make_detection_split("test", 50)
    k = MAX_DEFECTS
    boxes, scores, classes = np.zeros((50, k, 4), np.float32), np.zeros((50, k), np.float32), \
        np.zeros((50, k), np.int64)
    for i, (b, c) in enumerate(zip(split.boxes, split.classes)):
        boxes[i, :len(b)], scores[i, :len(b)], classes[i, :len(b)] = b, 0.9, c
    perfect = mean_ap(Detections(boxes, scores, classes), split.boxes, split.classes, len(DET_LABELS))
    assert (perfect.map50, perfect.map50_95) == (1.0, 1.0)
    empty = Detections(boxes, np.zeros_like(scores), classes)  # every box is padding
    assert mean_ap(empty, split.boxes, split.classes, len(DET_LABELS)).map50 == 0.0
    with pytest.raises(ValueError, match="frames of detections"):
        mean_ap(empty, split.boxes[:3], split.classes[:3], len(DET_LABELS))


# -- the offline cascade rule ----------------------------------------------------------------------------
def test_box_mean_and_escalation_follow_the_runtime_rule() -> None:
    scores = np.array([[0.9, 0.5, 0.2, 0.0], [0.3, 0.1, 0.0, 0.0], [0.6, 0.6, 0.6, 0.1]])
    np.testing.assert_allclose(box_mean(scores, 0.5), [0.7, 1.0, 0.6])  # no box >= t: confident
    assert escalated(box_mean(scores, 0.5), 0.65).tolist() == [False, False, True]
    assert escalated(box_mean(scores, 0.5), 0.6).tolist() == [False, False, False]  # strictly below
    assert not escalated(box_mean(scores, 0.5), 0.0).any()


def test_choose_threshold_meets_either_target_and_escalated_frames_take_the_clouds_boxes() -> None:
    detections, truth_boxes, truth_classes = _worked_example()
    cloud = Detections(np.stack([np.pad(t, ((0, 5 - len(t)), (0, 0))) for t in truth_boxes]),
                       np.array([[0.95, 0.95, 0, 0, 0], [0.95, 0.95, 0, 0, 0]], np.float32),
                       np.array([[0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]))
    none = cascade(detections, cloud, 0.5, 0.0, truth_boxes, truth_classes, 3)
    assert none.escalation == 0.0
    assert none.map.map50 == mean_ap(detections, truth_boxes, truth_classes, 3).map50
    everything = choose_threshold(detections, cloud, 0.5, truth_boxes, truth_classes, 3, target_map50=1.0)
    assert everything.map.map50 == 1.0 and everything.escalation == 1.0  # the cloud is perfect here
    half = choose_threshold(detections, cloud, 0.5, truth_boxes, truth_classes, 3, target_escalation=0.5)
    assert half.escalation == 0.5  # frame B: mean of 0.7 and 0.5 is the lower confidence
    assert escalated(box_mean(detections.scores, 0.5), half.threshold).tolist() == [False, True]


# -- the committed detectors -----------------------------------------------------------------------------
def _check_card(model: Path) -> ModelCard:
    card = ModelCard.load(model)
    assert card is not None and card.file_problems(model) == []
    data = json.loads(card_path(model).read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    assert card.task == "detection" and card.labels == DET_LABELS
    assert data["detection"]["boxes"] == "boxes" and data["detection"]["scores"] == "scores"
    assert data["detection"]["classes"] == "classes" and 0 < data["detection"]["score_threshold"] < 1
    assert card.calibration.policy == "box_mean" and card.calibration.score_output == "scores"
    assert [(o.name, o.datatype) for o in card.outputs] == [("boxes", "FP32"), ("scores", "FP32"),
                                                            ("classes", "INT64")]
    for key in ("map50", "map50_95"):
        assert 0 <= card.metrics[key] <= 1
    return card


def _run(model: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    backend = OrtBackend()
    backend.load(model)
    try:
        return backend.infer({"image": images})
    finally:
        backend.close()


def _check_outputs(model: Path, n: int = 3) -> None:
    out = _run(model, make_detection_split("test", n).images)
    k = out["scores"].shape[1]
    assert set(out) == set(OUTPUTS)
    assert out["boxes"].shape == (n, k, 4) and out["boxes"].dtype == np.float32
    assert out["scores"].shape == (n, k) and out["scores"].dtype == np.float32
    assert out["classes"].shape == (n, k) and out["classes"].dtype == np.int64


@pytest.mark.parametrize("rel", DETECTORS, ids=str)
def test_committed_detectors_meet_the_contract_and_their_cards_validate(rel: Path) -> None:
    model = MODELS / rel
    assert contract_problems(model) == []
    _check_outputs(model)
    card = _check_card(model)
    if rel == DET_EDGE_INT8:
        assert check_tensorrt_ready(model) == []
        assert card.calibrated_on is not None and card.calibrated_on["cloud_model"] == DET_CLOUD_NAME
        for key in ("map50_fp32", "map50_int8", "cloud_map50", "cascade_map50", "cascade_map50_95",
                    "escalation_rate"):
            assert 0 <= card.metrics[key] <= 1, key
    if rel == DET_CLOUD:
        assert card.name == DET_CLOUD_NAME and card.calibration.threshold == 0.0


def test_committed_detectors_score_as_their_cards_say_on_fresh_held_out_frames() -> None:
    """mAP measured here with the installed ONNX Runtime on a prefix of 'test', near the card's."""
    split = make_detection_split("test", 400)
    for rel in DETECTORS:
        out = _run(MODELS / rel, split.images)
        got = mean_ap(Detections(out["boxes"], out["scores"], out["classes"]), split.boxes, split.classes,
                      len(DET_LABELS))
        card = ModelCard.load(MODELS / rel)
        assert got.map50 == pytest.approx(card.metrics["map50"], abs=0.06), rel


def test_quick_is_for_the_detectors_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgecloud_tools import cli

    assert cli.main(["models", "build", "--quick", "--out", str(tmp_path)]) != 0
    assert "give --task detection" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# -- the quick build -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="the build needs torch (the train extra): pip install -c constraints.txt "
                           "-e '.[train]'")
def test_quick_build_makes_two_detectors_with_the_contract_and_valid_cards(tmp_path: Path) -> None:
    from edgecloud_tools import cli

    assert cli.main(["models", "build", "--task", "detection", "--quick", "--out", str(tmp_path)]) == 0
    for rel in DETECTORS:
        model = tmp_path / rel
        assert contract_problems(model) == [], rel
        _check_outputs(model)
        _check_card(model)
    assert check_tensorrt_ready(tmp_path / DET_EDGE_INT8) == []
    edge = ModelCard.load(tmp_path / DET_EDGE_INT8)
    assert edge.calibrated_on["target_escalation"] == 0.3 and edge.calibrated_on["escalation_rate"] <= 0.3
    assert (tmp_path / DET_EDGE_INT8).stat().st_size < (tmp_path / DET_CLOUD).stat().st_size
