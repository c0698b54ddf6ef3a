"""Scoring ONNX models on the synthetic splits with ONNX Runtime, and fitting a cascade's calibration
from their logits. numpy and onnxruntime only: ``edgecloud calibrate`` runs where torch is absent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
from edgecloud.tensors import TensorSpec

#: cascade accuracy the demo models are calibrated for on "val": above the 97.5 % held-out
#: target, so the threshold keeps a margin on data it has not seen
TARGET_ACCURACY = 0.9875


def model_logits(path: Path, images: np.ndarray, output: str | None = None, batch_size: int = 500,
                 threads: int = 0) -> np.ndarray:
    """Output ``output`` (default: the first) of the ONNX model at ``path`` for ``images``, in batches."""
    backend = OrtBackend(OrtConfig(intra_op_threads=threads))
    backend.load(Path(path))
    try:
        if len(backend.inputs) != 1:
            raise ModelLoadError(f"{path}: expected one input, the model has {len(backend.inputs)}")
        name, output = backend.inputs[0].name, output or backend.outputs[0].name
        return np.concatenate([backend.infer({name: images[i:i + batch_size]})[output]
                               for i in range(0, len(images), batch_size)])
    finally:
        backend.close()


def model_contract(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the ONNX model at ``path``, as ONNX Runtime reads them."""
    backend = OrtBackend()
    backend.load(Path(path))
    backend.close()
    return backend.inputs, backend.outputs


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float(np.mean(logits.argmax(axis=1) == labels))


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
