"""Confidence policies: built-in ones by name, or a user's own by dotted path."""

from __future__ import annotations

import importlib

from edgecloud.confidence.base import ConfidencePolicy
from edgecloud.confidence.detection import (
    DEFAULT_BOX_FLOOR,
    DETECTION_POLICIES,
    DetectionOutputs,
    DetectionPolicy,
)
from edgecloud.confidence.probability import POLICIES, ProbabilityPolicy, calibrated_probabilities

__all__ = [
    "DEFAULT_BOX_FLOOR",
    "DETECTION_POLICIES",
    "POLICIES",
    "ConfidencePolicy",
    "DetectionOutputs",
    "DetectionPolicy",
    "ProbabilityPolicy",
    "calibrated_probabilities",
    "make_policy",
]


def make_policy(name: str, score_output: str, scores: str = "logits",
                temperature: float = 1.0, detection: DetectionOutputs | None = None,
                floor: float = DEFAULT_BOX_FLOOR) -> ConfidencePolicy:
    """A built-in policy by name, or ``package.module:callable`` for a user's own. A detection policy
    reads the outputs ``detection`` names (a detection card's); it needs them."""
    if name in POLICIES:
        return ProbabilityPolicy(name, score_output, scores, temperature)
    if name in DETECTION_POLICIES:
        if detection is None:
            raise ValueError(f"policy {name!r} reads a detector's outputs: it needs a model card with "
                             "task 'detection' and its 'detection' section")
        return DetectionPolicy(name, detection, floor)
    module, sep, attr = name.partition(":")
    if not sep:
        module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise ValueError(f"policy {name!r} is neither built-in {sorted({**POLICIES, **DETECTION_POLICIES})} "
                         "nor a dotted path 'package.module:function'")
    try:
        policy = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"policy {name!r} cannot be imported: {e}") from e
    if not callable(policy):
        raise ValueError(f"policy {name!r} is not callable")
    return policy
