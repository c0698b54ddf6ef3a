"""Cascade calibration: a softmax temperature fitted by NLL, and the confidence threshold that meets a
target cascade accuracy or a target escalation fraction (docs/design.md §4).

Pure numpy, so a device or an operator's laptop can recalibrate without torch. Confidences come from
:mod:`edgecloud.confidence`, the same code the agent scores rows with, so a threshold chosen here means
the same thing at serving time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgecloud.confidence import ProbabilityPolicy
from edgecloud.confidence.probability import log_calibrated_probabilities
from edgecloud.errors import EdgecloudError

#: temperatures searched by :func:`fit_temperature`
TEMPERATURE_BOUNDS = (0.05, 20.0)
_GOLDEN = (math.sqrt(5) - 1) / 2


class CalibrationError(EdgecloudError):
    """A calibration target cannot be met on the given data."""


@dataclass(frozen=True, slots=True)
class CascadeOutcome:
    """What a threshold does on a labelled set: accuracy of the cascade and share escalated."""

    threshold: float
    accuracy: float
    escalation: float
    n: int


def _rows(scores: np.ndarray) -> np.ndarray:
    """Scores as [N, K], the way the agent's policies read a score output."""
    scores = np.asarray(scores)
    return scores.reshape(len(scores), -1)


def nll(scores: np.ndarray, labels: np.ndarray, temperature: float, kind: str = "logits") -> float:
    """Mean negative log-likelihood of ``labels`` under the calibrated probabilities at ``temperature``."""
    log_p = log_calibrated_probabilities(_rows(scores), kind, temperature)
    return float(-log_p[np.arange(len(log_p)), labels].mean())


def fit_temperature(scores: np.ndarray, labels: np.ndarray, kind: str = "logits",
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS, tol: float = 1e-5) -> float:
    """The temperature T minimizing NLL on a labelled set (Guo et al., 2017).

    NLL is convex in 1/T, so a golden-section search over 1/T within ``bounds`` finds the optimum;
    the probabilities are those the agent computes, so the fitted T means the same when serving.
    """
    scores = _rows(scores)
    labels = np.asarray(labels, dtype=np.int64)
    if len(scores) == 0 or len(scores) != len(labels):
        raise ValueError(f"need as many labels as score rows (got {len(labels)} and {len(scores)}, > 0)")

    def loss(inv_t: float) -> float:
        return nll(scores, labels, 1.0 / inv_t, kind)

    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    a, b = lo + (1 - _GOLDEN) * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > tol * max(1.0, lo):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - _GOLDEN) * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = loss(b)
    return 1.0 / ((lo + hi) / 2)


def confidence(scores: np.ndarray, policy: str = "max_prob", temperature: float = 1.0,
               kind: str = "logits") -> np.ndarray:
    """Per-row confidence exactly as the agent computes it (built-in policies only)."""
    return ProbabilityPolicy(policy, "scores", kind, temperature)({"scores": np.asarray(scores)})


def cascade_outcome(edge_conf: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray,
                    threshold: float) -> CascadeOutcome:
    """Accuracy and escalation when rows with confidence strictly below ``threshold`` go to the cloud."""
    conf = np.asarray(edge_conf, dtype=np.float64)
    escalated = conf < threshold
    correct = np.where(escalated, np.asarray(cloud_correct, bool), np.asarray(edge_correct, bool))
    return CascadeOutcome(float(threshold), float(correct.mean()), float(escalated.mean()), len(conf))


def choose_threshold(edge_conf: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray,
                     target_accuracy: float | None = None,
                     target_escalation: float | None = None) -> float:
    """The threshold for exactly one target, measured on a labelled set.

    ``target_accuracy``: the smallest escalation whose cascade accuracy reaches the target
    (CalibrationError when even the best escalation misses it). ``target_escalation``: the most
    rows escalated without exceeding that fraction. Thresholds sit halfway between neighbouring
    confidences, so a row's decision does not flip on the last bits of a float.
    """
    if (target_accuracy is None) == (target_escalation is None):
        raise ValueError("give exactly one of target_accuracy and target_escalation")
    conf = np.asarray(edge_conf, dtype=np.float64)
    n = len(conf)
    if n == 0 or not len(edge_correct) == len(cloud_correct) == n:
        raise ValueError("edge_conf, edge_correct and cloud_correct must be non-empty and equally long")
    order = np.argsort(conf, kind="stable")
    c = conf[order]
    # k = rows escalated (the k least confident); only k where c[k-1] < c[k] are reachable
    k = np.arange(n + 1)
    reachable = np.ones(n + 1, dtype=bool)
    reachable[1:n] = c[:-1] < c[1:]
    gain = np.asarray(cloud_correct, bool)[order].astype(np.int64) - \
        np.asarray(edge_correct, bool)[order].astype(np.int64)
    accuracy = (np.asarray(edge_correct, bool).sum() + np.concatenate([[0], np.cumsum(gain)])) / n
    if target_accuracy is not None:
        meets = reachable & (accuracy >= target_accuracy - 1e-12)
        if not meets.any():
            best = int(np.argmax(np.where(reachable, accuracy, -1.0)))
            raise CalibrationError(f"target cascade accuracy {target_accuracy:.4f} is out of reach: the "
                                   f"best is {accuracy[best]:.4f} escalating {best / n:.1%} of {n} rows")
        chosen = int(k[meets][0])
    else:
        if not 0 <= target_escalation <= 1:
            raise ValueError(f"target_escalation must be within [0, 1], not {target_escalation}")
        chosen = int(k[reachable & (k <= target_escalation * n + 1e-9)][-1])
    if chosen == 0:
        return 0.0
    if chosen == n:
        return float(min(1.0, np.nextafter(c[-1], np.inf)))
    return float((c[chosen - 1] + c[chosen]) / 2)
