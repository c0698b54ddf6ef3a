"""Whether the edge's answer for a row agrees with the cloud's (docs/design.md §12), the one rule the
agent's live counts and the gateway's store both apply.

A classifier agrees when the top-1 class (argmax of the score output) is the same on both sides. A
detector agrees when a greedy match of same-label boxes at IoU >= :data:`MATCH_IOU` (only boxes scoring
>= the card's ``score_threshold``) leaves no box of either side unmatched: the frame would be read the
same way downstream (the same objects, where they are), whatever the scores. The match pairs the
highest IoU first (equal IoUs by the boxes' coordinates), so it does not depend on which side is called
edge and which cloud, nor on the order the boxes come in.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgecloud.confidence.detection import DetectionOutputs

#: two boxes of the same label are the same object from this intersection over union on
MATCH_IOU = 0.5


def top1(scores: np.ndarray) -> np.ndarray:
    """Each row's top class: the argmax of its scores (any per-row shape)."""
    scores = np.asarray(scores)
    return scores.reshape(scores.shape[0], -1).argmax(axis=1)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] intersection over union of x1, y1, x2, y2 boxes; two equal boxes have 1 even
    when they have no area (which would otherwise divide 0 by 0)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    sides = np.clip(high - low, 0, None)
    inter = sides[..., 0] * sides[..., 1]

    def area(boxes: np.ndarray) -> np.ndarray:
        return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)

    union = area(a)[:, None] + area(b)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.where((a[:, None, :] == b[None, :, :]).all(axis=2), 1.0, iou)


def boxes_match(edge_boxes: np.ndarray, edge_labels: np.ndarray, cloud_boxes: np.ndarray,
                cloud_labels: np.ndarray, iou: float = MATCH_IOU) -> bool:
    """Whether a greedy match of same-label boxes at IoU >= ``iou`` (best pair first) leaves no box of
    either side unmatched."""
    edge_labels, cloud_labels = np.asarray(edge_labels).reshape(-1), np.asarray(cloud_labels).reshape(-1)
    if edge_labels.size != cloud_labels.size:
        return False
    if not edge_labels.size:
        return True
    if not np.array_equal(np.sort(edge_labels), np.sort(cloud_labels)):
        return False
    edge_boxes = np.asarray(edge_boxes, dtype=np.float64).reshape(-1, 4)
    cloud_boxes = np.asarray(cloud_boxes, dtype=np.float64).reshape(-1, 4)
    overlap = pairwise_iou(edge_boxes, cloud_boxes)
    overlap[edge_labels[:, None] != cloud_labels[None, :]] = -1.0
    for _ in range(edge_labels.size):
        best = overlap.max()
        if best < iou:
            return False
        ties = np.argwhere(overlap == best)
        i, j = min(ties, key=lambda p: sorted((tuple(edge_boxes[p[0]]), tuple(cloud_boxes[p[1]]))))
        overlap[i, :] = -1.0
        overlap[:, j] = -1.0
    return True


def frames_agree(detection: DetectionOutputs, edge: Mapping[str, np.ndarray],
                 cloud: Mapping[str, np.ndarray]) -> np.ndarray:
    """[N] bool: whether each frame's boxes (scoring >= the threshold) match between ``edge`` and
    ``cloud``, both a detector's outputs for the same N frames."""
    sides = []
    for outputs in (edge, cloud):
        scores = detection.frame_scores(outputs)
        boxes = np.asarray(outputs[detection.boxes], dtype=np.float64).reshape(scores.shape[0], -1, 4)
        classes = np.asarray(outputs[detection.classes]).reshape(scores.shape[0], -1)
        sides.append((scores >= detection.score_threshold, boxes, classes))
    (edge_found, edge_boxes, edge_classes), (cloud_found, cloud_boxes, cloud_classes) = sides
    return np.array([boxes_match(edge_boxes[r, edge_found[r]], edge_classes[r, edge_found[r]],
                                 cloud_boxes[r, cloud_found[r]], cloud_classes[r, cloud_found[r]])
                     for r in range(edge_found.shape[0])], dtype=bool)
