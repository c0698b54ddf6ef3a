"""A detector's boxes as a client reads them (docs/design.md §10): ``edgecloud.detections``, BYTES [N],
per frame a JSON list of ``{"label", "score", "box": [x1, y1, x2, y2]}`` of the boxes scoring >= the
card's score threshold, best first; and the top box's label (``none`` for a frame with no box)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from edgecloud.confidence.detection import DetectionOutputs

#: the label of a frame with no box scoring >= the threshold
NO_BOX = "none"


def label_of(index: int, labels: Sequence[str]) -> str:
    """A class's label, its index as text when the card names no label for it."""
    return labels[index] if 0 <= index < len(labels) else str(index)


def frame_detections(outputs: Mapping[str, np.ndarray], detection: DetectionOutputs,
                     labels: Sequence[str] = ()) -> list[list[dict[str, object]]]:
    """Per frame, its boxes scoring >= the threshold, best first, as plain JSON values."""
    scores = detection.frame_scores(outputs)
    boxes = np.asarray(outputs[detection.boxes], dtype=np.float64).reshape(scores.shape[0], -1, 4)
    classes = np.asarray(outputs[detection.classes]).reshape(scores.shape[0], -1)
    frames = []
    for row in range(scores.shape[0]):
        found = np.flatnonzero(scores[row] >= detection.score_threshold)
        found = found[np.argsort(-scores[row, found], kind="stable")]
        frames.append([{"label": label_of(int(classes[row, k]), labels),
                        "score": round(float(scores[row, k]), 6),
                        "box": [round(float(v), 6) for v in boxes[row, k]]} for k in found])
    return frames


def detections_output(outputs: Mapping[str, np.ndarray], detection: DetectionOutputs,
                      labels: Sequence[str] = ()) -> np.ndarray:
    """``edgecloud.detections``: BYTES [N], one JSON list per frame."""
    return np.array([json.dumps(frame).encode() for frame in frame_detections(outputs, detection, labels)],
                    dtype=np.object_)


def top_label(outputs: Mapping[str, np.ndarray], detection: DetectionOutputs, labels: Sequence[str],
              row: int = 0) -> str:
    """The label of ``row``'s best box scoring >= the threshold, :data:`NO_BOX` when it has none."""
    scores = detection.frame_scores(outputs)[row]
    if not scores.size or scores.max() < detection.score_threshold:
        return NO_BOX
    classes = np.asarray(outputs[detection.classes])[row].reshape(-1)
    return label_of(int(classes[int(scores.argmax())]), labels)
