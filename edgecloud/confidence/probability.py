"""The built-in policies, which read a classifier's scores: ``max_prob``, ``margin``, ``entropy``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SCORE_KINDS = ("logits", "probabilities")


def _check(kind: str, temperature: float) -> None:
    if kind not in SCORE_KINDS:
        raise ValueError(f"scores must be one of {SCORE_KINDS}, not {kind!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")


def log_calibrated_probabilities(scores: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """log softmax(z/T) along the last axis, z being the logits or log(max(p, 1e-12)) of probabilities,
    in float64: calibration fits the temperature on it, where tiny probabilities must keep their logs.
    """
    _check(kind, temperature)
    z = np.asarray(scores, dtype=np.float64)
    if kind == "probabilities":
        z = np.log(np.maximum(z, 1e-12))
    z = z / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def calibrated_probabilities(scores: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """softmax(z/T) for logits, softmax(log(max(p, 1e-12))/T) for probabilities, along the last axis:
    the exponential of :func:`log_calibrated_probabilities`, which serving reads confidences from.

    Computed the direct way, on the serving path: in float32 unless the scores are float64, with no
    log/exp round trip (probabilities are only clipped and renormalized, raised to 1/T when T != 1).
    """
    _check(kind, temperature)
    p = np.asarray(scores)
    p = p.astype(np.float64 if p.dtype == np.float64 else np.float32, copy=False)
    if kind == "probabilities":
        p = np.maximum(p, 1e-12)
        if temperature != 1.0:
            p = p ** (1.0 / temperature)
    else:
        p = p - p.max(axis=-1, keepdims=True)
        if temperature != 1.0:
            p /= temperature
        p = np.exp(p, out=p)
    return p / p.sum(axis=-1, keepdims=True)


def max_prob(p: np.ndarray) -> np.ndarray:
    """Top-1 probability."""
    return p.max(axis=-1)


def margin(p: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability."""
    if p.shape[-1] < 2:
        return p[..., 0]
    top2 = np.partition(p, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def entropy(p: np.ndarray) -> np.ndarray:
    """1 − H(p)/ln K: 1 for a one-hot answer, 0 for a uniform one (Sedna's normalized form)."""
    k = p.shape[-1]
    if k < 2:
        return np.ones(p.shape[:-1])
    h = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=-1)
    return 1.0 - h / np.log(k)


POLICIES = {"max_prob": max_prob, "margin": margin, "entropy": entropy}


@dataclass(frozen=True, slots=True)
class ProbabilityPolicy:
    """A built-in policy applied to the calibrated probabilities of one score output."""

    name: str
    score_output: str
    scores: str = "logits"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; built-in: {sorted(POLICIES)}")
        if self.scores not in SCORE_KINDS:
            raise ValueError(f"scores must be one of {SCORE_KINDS}, not {self.scores!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, not {self.temperature}")

    def probabilities(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Calibrated class probabilities [N, K] of the score output."""
        scores = outputs[self.score_output]
        return calibrated_probabilities(scores.reshape(scores.shape[0], -1), self.scores,
                                        self.temperature)

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.name == "max_prob" and self.scores == "logits":
            return _top_softmax(outputs[self.score_output], self.temperature)
        return POLICIES[self.name](self.probabilities(outputs))


def _top_softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """max softmax(z/T) per row, the default policy on logits, in four array operations: after the
    shift by the row's maximum the top term is exp(0) = 1, so the top probability is 1 / sum(exp)."""
    z = np.asarray(scores)
    z = z.reshape(z.shape[0], -1).astype(np.float64 if z.dtype == np.float64 else np.float32, copy=False)
    shifted = z - z.max(axis=-1, keepdims=True)
    if temperature != 1.0:
        shifted /= temperature
    return 1.0 / np.exp(shifted, out=shifted).sum(axis=-1)
