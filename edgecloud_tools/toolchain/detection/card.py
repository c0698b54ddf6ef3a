"""Scoring detectors with ONNX Runtime on labelled splits and writing their model cards: task
``detection``, the ``detection`` section naming the outputs and ``score_threshold``, the labels, the
cascade's calibration for policy ``box_mean`` and the mAP figures (docs/design.md §10). numpy and
ONNX Runtime only."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecloud.files import atomic_write
from edgecloud.guards import InputGuard
from edgecloud.modelcard import CardCalibration, ModelCard, card_path
from edgecloud.preprocess import Preprocess
from edgecloud.tensors import TensorSpec
from edgecloud_tools.toolchain.dataset import PIXEL_RANGE
from edgecloud_tools.toolchain.detection.cascade import DEFAULT_POLICY
from edgecloud_tools.toolchain.detection.dataset import DET_LABELS, DET_SIZE, DetectionSplit
from edgecloud_tools.toolchain.detection.export import BOXES, CLASSES, OUTPUTS, SCORES
from edgecloud_tools.toolchain.detection.metrics import Detections, MeanAP, mean_ap
from edgecloud_tools.toolchain.evaluate import FRAMES_INPUT, model_outputs

TASK = "detection"


@dataclass(frozen=True)
class ScoredDetector:
    """A detector's answers on the calibration split and the held-out one, the held-out mAP and the
    model's contract."""

    val: Detections
    test: Detections
    test_map: MeanAP
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def score_detector(path: Path, val: DetectionSplit, test: DetectionSplit) -> ScoredDetector:
    """Run the detector at ``path`` on both splits (one ONNX Runtime session)."""
    run = model_outputs(path, val.images, test.images, names=OUTPUTS)
    on_val, on_test = (Detections(n[BOXES], n[SCORES], n[CLASSES]) for n in run.named)
    return ScoredDetector(on_val, on_test, mean_ap(on_test, test.boxes, test.classes, len(DET_LABELS)),
                          run.inputs, run.outputs)


def detection_section(score_threshold: float) -> dict[str, Any]:
    """The card's ``detection`` section for the exported outputs."""
    return {"boxes": BOXES, "scores": SCORES, "classes": CLASSES, "score_threshold": score_threshold}


def cascade_calibration(threshold: float) -> CardCalibration:
    """The calibration a detection card ships: policy ``box_mean`` on the ``scores`` output, which are
    probabilities already (temperature 1)."""
    return CardCalibration(DEFAULT_POLICY, 1.0, threshold, SCORES, "probabilities")


def write_detector_card(model: Path, scored: ScoredDetector, *, name: str, version: int, threshold: float,
                        score_threshold: float, metrics: Mapping[str, Any], source: Mapping[str, Any],
                        calibrated_on: Mapping[str, Any] | None = None) -> Path:
    """Write the card beside ``model``: the synthetic data set's labels, input range and a gray-frame
    preprocess, as for the classifiers, plus the ``detection`` section."""
    image = scored.inputs[0].name
    card = ModelCard.describe(
        model, name=name, version=version, task=TASK, inputs=scored.inputs, outputs=scored.outputs,
        labels=DET_LABELS, calibration=cascade_calibration(threshold), metrics=dict(metrics),
        source=dict(source), calibrated_on=None if calibrated_on is None else dict(calibrated_on),
        guards=(InputGuard(image, range=PIXEL_RANGE),),
        preprocess=Preprocess(input=image, frames=FRAMES_INPUT, color="gray", size=(DET_SIZE, DET_SIZE)))
    data = card.to_dict()
    data["detection"] = detection_section(score_threshold)
    path = card_path(model)
    atomic_write(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())
    return path
