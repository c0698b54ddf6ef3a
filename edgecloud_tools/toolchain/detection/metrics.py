"""Mean average precision the COCO way, in numpy: greedy matching in score order, the precision
envelope read at 101 recall points, averaged over the classes that have ground truth, at IoU 0.5
(mAP@0.5) and over IoU 0.50:0.05:0.95 (mAP@0.5:0.95).

Boxes with score 0 are a detector's padding and never count as detections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgecloud_tools.toolchain.detection.dataset import box_iou

IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class Detections:
    """A detector's answer for each of N frames: boxes [N, K, 4], scores [N, K], classes [N, K]."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def where(self, rows: np.ndarray, other: Detections) -> Detections:
        """These answers, with ``other``'s for the frames where ``rows`` is true (same K)."""
        return Detections(np.where(rows[:, None, None], other.boxes, self.boxes),
                          np.where(rows[:, None], other.scores, self.scores),
                          np.where(rows[:, None], other.classes, self.classes))


def average_precision(tp: np.ndarray, scores: np.ndarray, n_truth: int) -> float:
    """AP of one class at one IoU threshold: ``tp`` says which detections matched, ``n_truth`` > 0."""
    if not len(scores):
        return 0.0
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(tp[order])
    recall = hits / n_truth
    precision = hits / np.arange(1, len(hits) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.mean(np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0)))


def _matches(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[thresholds, detections] true where a detection (taken in score order) claims a box of one
    frame's ``truth`` at that IoU threshold, each true box claimed once, by the best unclaimed IoU."""
    tp = np.zeros((len(IOU_THRESHOLDS), len(scores)), dtype=bool)
    if not len(truth) or not len(scores):
        return tp
    iou = box_iou(boxes, truth)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(len(truth), dtype=bool)
        for d in np.argsort(-scores, kind="stable"):
            candidates = np.where(taken | (iou[d] < threshold), -1.0, iou[d])
            best = int(np.argmax(candidates))
            if candidates[best] >= 0:
                taken[best] = True
                tp[t, d] = True
    return tp


@dataclass(frozen=True)
class MeanAP:
    """mAP@0.5 and mAP@0.5:0.95, and the AP per class at each IoU threshold (NaN: no ground truth)."""

    map50: float
    map50_95: float
    per_class: np.ndarray  # [classes, thresholds]


def mean_ap(detections: Detections, truth_boxes: Sequence[np.ndarray], truth_classes: Sequence[np.ndarray],
            classes: int) -> MeanAP:
    """COCO-style mAP of ``detections`` against each frame's true boxes and classes."""
    if len(detections) != len(truth_boxes):
        raise ValueError(f"{len(detections)} frames of detections for {len(truth_boxes)} of ground truth")
    tps: list[list[np.ndarray]] = [[] for _ in range(classes)]
    scores: list[list[np.ndarray]] = [[] for _ in range(classes)]
    n_truth = np.zeros(classes, dtype=int)
    for i in range(len(detections)):
        keep = detections.scores[i] > 0
        boxes, score, cls = detections.boxes[i][keep], detections.scores[i][keep], detections.classes[i][keep]
        for c in range(classes):
            mine, true = cls == c, truth_boxes[i][truth_classes[i] == c]
            n_truth[c] += len(true)
            tps[c].append(_matches(boxes[mine], score[mine], true))
            scores[c].append(score[mine])
    per_class = np.full((classes, len(IOU_THRESHOLDS)), np.nan)
    for c in range(classes):
        if n_truth[c]:
            tp, s = np.concatenate(tps[c], axis=1), np.concatenate(scores[c])
            per_class[c] = [average_precision(tp[t], s, int(n_truth[c])) for t in range(len(IOU_THRESHOLDS))]
    if np.isnan(per_class).all():
        raise ValueError("no ground truth boxes: mAP is undefined")
    return MeanAP(float(np.nanmean(per_class[:, 0])), float(np.nanmean(per_class)), per_class)
