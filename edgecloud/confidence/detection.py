"""The built-in policies for a detector's outputs (docs/design.md §10): ``box_mean`` and ``box_low_share``.

A detector gives per frame K boxes, their scores (0 for padding) and classes; non-maximum suppression
is inside the exported model, so these read the scores alone. With t the card's ``score_threshold``
and f the floor (``[cascade] box_floor``):

- ``box_mean``: the mean score of the boxes scoring >= t; 1.0 when there is none;
- ``box_low_share``: among the boxes scoring >= f, the share ``low`` scoring < t; confidence 1 - low,
  1.0 when there is none.

A frame with no box >= t is confident under both, so a missed defect never escalates by score: the
cascade audits a share of such empty frames instead (``[cascade] empty_audit_rate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgecloud.jsontypes import Number, Str

DEFAULT_BOX_FLOOR = 0.1


@dataclass(frozen=True, slots=True)
class DetectionOutputs:
    """Which outputs of a detector hold its boxes [N, K, 4], scores [N, K] and classes [N, K], and the
    score from which a box counts as found: a detection card's ``detection`` section."""

    boxes: Str
    scores: Str
    classes: Str
    score_threshold: Number

    def __post_init__(self) -> None:
        if not 0 <= self.score_threshold <= 1:
            raise ValueError(f"score_threshold must be within [0, 1], not {self.score_threshold}")
        if len({self.boxes, self.scores, self.classes}) != 3:
            raise ValueError("boxes, scores and classes must name three different outputs")

    def names(self) -> tuple[str, str, str]:
        return self.boxes, self.scores, self.classes

    def to_dict(self) -> dict[str, object]:
        return {"boxes": self.boxes, "scores": self.scores, "classes": self.classes,
                "score_threshold": self.score_threshold}

    def frame_scores(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The box scores as [N, K] float64."""
        scores = np.asarray(outputs[self.scores], dtype=np.float64)
        return scores.reshape(scores.shape[0], -1)

    def found(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """[N, K]: the boxes scoring >= the score threshold."""
        return self.frame_scores(outputs) >= self.score_threshold

    def empty(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """[N]: the frames with no box scoring >= the score threshold."""
        return ~self.found(outputs).any(axis=1)


def box_mean(scores: np.ndarray, threshold: float, floor: float) -> np.ndarray:
    """Per frame, the mean score of the boxes >= ``threshold``; 1.0 for a frame with none."""
    found = scores >= threshold
    count = found.sum(axis=1)
    total = np.where(found, scores, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), 1.0)


def box_low_share(scores: np.ndarray, threshold: float, floor: float) -> np.ndarray:
    """Per frame, 1 - the share of boxes >= ``floor`` that score < ``threshold``; 1.0 for none."""
    candidates = scores >= floor
    count = candidates.sum(axis=1)
    low = (candidates & (scores < threshold)).sum(axis=1)
    return np.where(count > 0, 1.0 - low / np.maximum(count, 1), 1.0)


DETECTION_POLICIES = {"box_mean": box_mean, "box_low_share": box_low_share}


@dataclass(frozen=True, slots=True)
class DetectionPolicy:
    """A built-in detection policy applied to the score output a detection card names."""

    name: str
    outputs: DetectionOutputs
    floor: float = DEFAULT_BOX_FLOOR

    def __post_init__(self) -> None:
        if self.name not in DETECTION_POLICIES:
            raise ValueError(f"unknown detection policy {self.name!r}; built-in: "
                             f"{sorted(DETECTION_POLICIES)}")
        if not 0 <= self.floor <= 1:
            raise ValueError(f"box_floor must be within [0, 1], not {self.floor}")

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return DETECTION_POLICIES[self.name](self.outputs.frame_scores(outputs), self.outputs.score_threshold,
                                             self.floor)
