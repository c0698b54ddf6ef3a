"""The built-in policies, which read a classifier's scores: ``max_prob``, ``margin``, ``entropy``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SCORE_KINDS = ("logits", "probabilities")


def log_calibrated_probabilities(scores: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """log softmax(z/T) along the last axis, z being the logits or log(max(p, 1e-12)) of probabilities.

    The one definition of calibrated scores: serving reads confidences from it and calibration fits
    the temperature on it, so the two cannot drift apart.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"scores must be one of {SCORE_KINDS}, not {kind!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")
    z = np.asarray(scores, dtype=np.float64)
    if kind == "probabilities":
        z = np.log(np.maximum(z, 1e-12))
    z = z / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def calibrated_probabilities(scores: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """softmax(z/T) for logits, softmax(log(max(p, 1e-12))/T) for probabilities, along the last axis."""
    return np.exp(log_calibrated_probabilities(scores, kind, temperature))


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
        return POLICIES[self.name](self.probabilities(outputs))
