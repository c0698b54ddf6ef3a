"""Confidence policies: built-in ones by name, or a user's own by dotted path."""

from __future__ import annotations

import importlib

from edgecloud.confidence.base import ConfidencePolicy
from edgecloud.confidence.probability import POLICIES, ProbabilityPolicy, calibrated_probabilities

__all__ = [
    "POLICIES",
    "ConfidencePolicy",
    "ProbabilityPolicy",
    "calibrated_probabilities",
    "make_policy",
]


def make_policy(name: str, score_output: str, scores: str = "logits",
                temperature: float = 1.0) -> ConfidencePolicy:
    """A built-in policy by name, or ``package.module:callable`` for a user's own."""
    if name in POLICIES:
        return ProbabilityPolicy(name, score_output, scores, temperature)
    module, sep, attr = name.partition(":")
    if not sep:
        module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise ValueError(f"policy {name!r} is neither built-in {sorted(POLICIES)} "
                         "nor a dotted path 'package.module:function'")
    try:
        policy = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"policy {name!r} cannot be imported: {e}") from e
    if not callable(policy):
        raise ValueError(f"policy {name!r} is not callable")
    return policy
