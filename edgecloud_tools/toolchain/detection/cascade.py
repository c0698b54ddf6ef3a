"""The detection cascade offline: per-frame confidence by the card's default policy, which frames
escalate at a threshold, and the choice of ``score_threshold`` and of the cascade threshold on a
labelled split (docs/design.md §10).

:func:`box_mean` and :func:`escalated` are the runtime's rule written once for offline use: a frame's
confidence is the mean score of its boxes with score >= t (1.0 when there is none), and it escalates
when that is strictly below the threshold; escalated frames take the cloud's boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgecloud.calibration import CalibrationError
from edgecloud.confidence.detection import box_mean as runtime_box_mean
from edgecloud_tools.toolchain.detection.dataset import box_iou
from edgecloud_tools.toolchain.detection.metrics import Detections, MeanAP, mean_ap

#: the policy the cards name for the cascade
DEFAULT_POLICY = "box_mean"
#: IoU at which a box counts as found when ``score_threshold`` is chosen
MATCH_IOU = 0.5


def box_mean(scores: np.ndarray, score_threshold: float) -> np.ndarray:
    """Confidence [N] of frames whose boxes score ``scores`` [N, K]: the runtime's own ``box_mean``
    policy (the mean of the scores >= t, 1.0 for a frame without one), which reads no floor."""
    return runtime_box_mean(scores, score_threshold, floor=0.0)


def escalated(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """Which frames go to the cloud: confidence strictly below the threshold (0 never escalates)."""
    return confidence < threshold


@dataclass(frozen=True)
class CascadeResult:
    """What a cascade threshold does on one labelled split."""

    threshold: float
    escalation: float
    map: MeanAP


def cascade(edge: Detections, cloud: Detections, score_threshold: float, threshold: float,
            truth_boxes: Sequence[np.ndarray], truth_classes: Sequence[np.ndarray],
            classes: int) -> CascadeResult:
    """The cascade's mAP and escalated share at ``threshold`` (policy ``box_mean``)."""
    up = escalated(box_mean(edge.scores, score_threshold), threshold)
    return CascadeResult(threshold, float(up.mean()),
                         mean_ap(edge.where(up, cloud), truth_boxes, truth_classes, classes))


def f1_score_threshold(edge: Detections, truth_boxes: Sequence[np.ndarray],
                       truth_classes: Sequence[np.ndarray]) -> float:
    """The ``score_threshold`` with the best F1 of boxes found at IoU 0.5 and right class: the boxes
    a frame reports (and ``box_mean`` averages) are then the ones worth reporting."""
    scores, hits = [], []
    for i in range(len(edge)):
        keep = edge.scores[i] > 0
        s, b, c = edge.scores[i][keep], edge.boxes[i][keep], edge.classes[i][keep]
        order = np.argsort(-s, kind="stable")
        iou = box_iou(b[order], truth_boxes[i]) * (c[order, None] == truth_classes[i][None, :])
        taken = np.zeros(len(truth_boxes[i]), dtype=bool)
        for d, row in zip(order, iou):
            free = np.where(taken, -1.0, row)
            best = int(np.argmax(free)) if len(row) else -1
            hit = best >= 0 and free[best] >= MATCH_IOU
            if hit:
                taken[best] = True
            scores.append(s[d])
            hits.append(hit)
    n_truth = sum(len(t) for t in truth_boxes)
    if not scores or not n_truth:
        return 0.5
    order = np.argsort(-np.array(scores), kind="stable")
    s, tp = np.array(scores)[order], np.cumsum(np.array(hits)[order])
    f1 = 2 * tp / (np.arange(1, len(s) + 1) + n_truth)
    return float(s[int(np.argmax(f1))])


def choose_threshold(edge: Detections, cloud: Detections, score_threshold: float,
                     truth_boxes: Sequence[np.ndarray], truth_classes: Sequence[np.ndarray], classes: int,
                     target_map50: float | None = None,
                     target_escalation: float | None = None) -> CascadeResult:
    """The cascade threshold for one target on a labelled split: the least escalation whose cascade
    mAP@0.5 reaches ``target_map50``, or the most escalation within ``target_escalation``.

    CalibrationError when no threshold reaches the mAP target.
    """
    if (target_map50 is None) == (target_escalation is None):
        raise ValueError("give one target: target_map50 or target_escalation")
    conf = box_mean(edge.scores, score_threshold)
    # each distinct confidence (< 1: a frame without boxes never escalates) is where escalation steps
    candidates = np.concatenate([[0.0], np.unique(conf[conf < 1.0])])
    candidates = np.nextafter(candidates, np.inf)
    candidates[0] = 0.0
    shares = np.array([escalated(conf, t).mean() for t in candidates])
    if target_escalation is not None:
        best = candidates[shares <= target_escalation + 1e-12].max()
        return cascade(edge, cloud, score_threshold, float(best), truth_boxes, truth_classes, classes)
    low, high = 0, len(candidates) - 1  # cascade mAP grows with escalation here: bisect the steps
    top = cascade(edge, cloud, score_threshold, float(candidates[high]), truth_boxes, truth_classes, classes)
    if top.map.map50 < target_map50:
        raise CalibrationError(f"cascade mAP@0.5 {top.map.map50:.4f} at the most escalation "
                               f"({top.escalation:.1%}) is below the target {target_map50:.4f}")
    found = top
    while low < high:
        mid = (low + high) // 2
        result = cascade(edge, cloud, score_threshold, float(candidates[mid]), truth_boxes, truth_classes,
                         classes)
        if result.map.map50 >= target_map50:
            high, found = mid, result
        else:
            low = mid + 1
    return found
