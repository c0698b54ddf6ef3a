"""Scoring ONNX models on the synthetic splits with ONNX Runtime, and fitting a cascade's calibration
from their logits. numpy and onnxruntime only: ``edgecloud calibrate`` runs where torch is absent."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud.backends.ort_session import OrtBackend, OrtConfig
from edgecloud.calibration import (
    CascadeOutcome,
    cascade_outcome,
    choose_threshold,
    confidence,
    fit_temperature,
)
from edgecloud.errors import ModelLoadError
from edgecloud.guards import InputGuard
from edgecloud.modelcard import CardCalibration, ModelCard
from edgecloud.preprocess import Preprocess
from edgecloud.tensors import TensorSpec, check_inputs
from edgecloud_tools.toolchain.dataset import LABELS, PIXEL_RANGE, SIZE, make_split

#: the BYTES input a camera sends the inspection models' frames in
FRAMES_INPUT = "frames"

#: cascade accuracy the demo models are calibrated for on "val": above the 97.5 % held-out
#: target, so the threshold keeps a margin on data it has not seen
TARGET_ACCURACY = 0.9875


@dataclass(frozen=True)
class ModelOutputs:
    """Some outputs of a model (by name) for each of several image sets, and the model's contract."""

    named: tuple[dict[str, np.ndarray], ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: the output :attr:`sets` gives
    first: str

    @property
    def sets(self) -> tuple[np.ndarray, ...]:
        """The first requested output, per image set."""
        return tuple(named[self.first] for named in self.named)


#: called after each batch with (rows done, rows in all sets)
Progress = Callable[[int, int], None]


def model_outputs(path: Path, *image_sets: np.ndarray, names: Sequence[str] | None = None,
                  batch_size: int = 500, threads: int = 0, progress: Progress | None = None) -> ModelOutputs:
    """Outputs ``names`` (default: the first) of the ONNX model at ``path`` for each image set, in
    batches; one ONNX Runtime session serves every set, since loading a model costs more than a split."""
    backend = OrtBackend(OrtConfig(intra_op_threads=threads))
    backend.load(Path(path))
    try:
        if len(backend.inputs) != 1:
            raise ModelLoadError(f"{path}: expected one input, the model has {len(backend.inputs)}")
        known = [o.name for o in backend.outputs]
        names = list(names or known[:1])
        for output in names:
            if output not in known:
                raise ModelLoadError(f"{path}: no output {output!r}; the model's outputs are {known}")
        name = backend.inputs[0].name
        for images in image_sets:
            check_inputs(backend.inputs, {name: images}, str(path))
        total, done = sum(len(images) for images in image_sets), 0
        sets = []
        for images in image_sets:
            batches: dict[str, list[np.ndarray]] = {output: [] for output in names}
            for i in range(0, len(images), batch_size):
                result = backend.infer({name: images[i:i + batch_size]})
                for output in names:
                    batches[output].append(result[output])
                done += len(result[names[0]])
                if progress is not None:
                    progress(done, total)
            sets.append({output: np.concatenate(parts) for output, parts in batches.items()})
        return ModelOutputs(tuple(sets), backend.inputs, backend.outputs, names[0])
    finally:
        backend.close()


def model_logits(path: Path, *image_sets: np.ndarray, output: str | None = None, batch_size: int = 500,
                 threads: int = 0, progress: Progress | None = None) -> ModelOutputs:
    """Output ``output`` (default: the first) of the ONNX model at ``path`` for each image set."""
    return model_outputs(path, *image_sets, names=None if output is None else [output], batch_size=batch_size,
                         threads=threads, progress=progress)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float(np.mean(logits.argmax(axis=1) == labels))


@dataclass(frozen=True)
class Scored:
    """One model's score output on "val" and "test", its held-out accuracy and its contract."""

    val: np.ndarray
    test: np.ndarray
    test_accuracy: float
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Splits:
    """(images, labels) of the split a cascade is fitted on ("val") and of the held-out one ("test"),
    and their names as the card records them."""

    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    names: tuple[str, str] = ("val", "test")

    @classmethod
    def make(cls, n_val: int, n_test: int) -> Splits:
        return cls(make_split("val", n_val), make_split("test", n_test))

    def score(self, path: Path, output: str | None = None, progress: Progress | None = None) -> Scored:
        """The model at ``path`` on both splits."""
        run = model_logits(path, self.val[0], self.test[0], output=output, progress=progress)
        val, test = run.sets
        return Scored(val, test, accuracy(test, self.test[1]), run.inputs, run.outputs)


@dataclass(frozen=True, slots=True)
class CascadeFit:
    """A calibration chosen on a labelled set and what it gave there."""

    policy: str
    temperature: float
    threshold: float
    outcome: CascadeOutcome
    scores: str = "logits"


def fit_cascade(edge_scores: np.ndarray, cloud_scores: np.ndarray, labels: np.ndarray, policy: str,
                target_accuracy: float | None = None, target_escalation: float | None = None,
                scores: str = "logits") -> CascadeFit:
    """Temperature by NLL, then the threshold for the target, both on the same labelled set.

    ``scores`` says how to read the edge model's score output: ``logits`` or ``probabilities``.
    """
    temperature = fit_temperature(edge_scores, labels, scores)
    conf = confidence(edge_scores, policy, temperature, scores)
    edge_ok, cloud_ok = edge_scores.argmax(1) == labels, cloud_scores.argmax(1) == labels
    threshold = choose_threshold(conf, edge_ok, cloud_ok, target_accuracy, target_escalation)
    return CascadeFit(policy, temperature, threshold, cascade_outcome(conf, edge_ok, cloud_ok, threshold),
                      scores)


def cascade_on(edge_scores: np.ndarray, cloud_scores: np.ndarray, labels: np.ndarray,
               fit: CascadeFit) -> CascadeOutcome:
    """What ``fit`` does on another labelled set (the held-out one)."""
    conf = confidence(edge_scores, fit.policy, fit.temperature, fit.scores)
    return cascade_outcome(conf, edge_scores.argmax(1) == labels, cloud_scores.argmax(1) == labels,
                           fit.threshold)


@dataclass(frozen=True)
class CascadeCalibration:
    """A cascade fitted on "val" and measured on "test", with what a model card records of it."""

    fit: CascadeFit
    held_out: CascadeOutcome
    calibration: CardCalibration
    calibrated_on: dict[str, Any]
    metrics: dict[str, Any]


def calibrate_cascade(splits: Splits, edge: Scored, cloud: Scored, policy: str, target: Mapping[str, float],
                      *, cloud_model: str, score_output: str, scores: str = "logits") -> CascadeCalibration:
    """Fit on "val" for ``target`` (``target_accuracy`` or ``target_escalation``) and re-measure on
    "test", so the card's held-out figures describe the threshold it ships.

    CalibrationError when an accuracy target is out of reach on "val".
    """
    (_, val_labels), (_, test_labels) = splits.val, splits.test
    fit = fit_cascade(edge.val, cloud.val, val_labels, policy, target.get("target_accuracy"),
                      target.get("target_escalation"), scores)
    held_out = cascade_on(edge.test, cloud.test, test_labels, fit)
    calibrated_on = {"split": splits.names[0], "n": len(val_labels), "cloud_model": cloud_model, **target,
                     "accuracy": fit.outcome.accuracy, "escalation_rate": fit.outcome.escalation}
    metrics = {"split": splits.names[1], "n": len(test_labels), "accuracy": edge.test_accuracy,
               "cloud_accuracy": cloud.test_accuracy, "cascade_accuracy": held_out.accuracy,
               "escalation_rate": held_out.escalation, "threshold": fit.threshold}
    calibration = CardCalibration(policy, fit.temperature, fit.threshold, score_output, scores)
    return CascadeCalibration(fit, held_out, calibration, calibrated_on, metrics)


def classifier_card(model: Path, scored: Scored, calibration: CardCalibration, metrics: Mapping[str, Any],
                    *, name: str, version: int, source: Mapping[str, Any],
                    calibrated_on: Mapping[str, Any] | None = None,
                    labels: tuple[str, ...] | None = None) -> ModelCard:
    """A new card for a classifier, with the contract it was scored through. Without ``labels``, one of
    the synthetic data set: its labels, the range of its patches (a row outside it is never answered
    confidently at the edge) and the preprocess that makes such a patch from a camera's gray frame
    (docs/design.md §10)."""
    synthetic = labels is None
    guards = (InputGuard(scored.inputs[0].name, range=PIXEL_RANGE),) if synthetic else ()
    preprocess = (Preprocess(input=scored.inputs[0].name, frames=FRAMES_INPUT, color="gray",
                             size=(SIZE, SIZE)) if synthetic else None)
    return ModelCard.describe(model, name=name, version=version, task="classification", inputs=scored.inputs,
                              outputs=scored.outputs, labels=LABELS if labels is None else labels,
                              calibration=calibration, metrics=dict(metrics), source=dict(source),
                              calibrated_on=None if calibrated_on is None else dict(calibrated_on),
                              guards=guards, preprocess=preprocess)
