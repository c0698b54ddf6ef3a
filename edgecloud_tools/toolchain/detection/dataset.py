"""Synthetic inspection surfaces for detection: grayscale 64×64 patches holding zero to three defects
of the classification set's kinds (scratch, spot, crack), each with its box and class.

Each defect is drawn by the classification generator's own shapes on a 32×32 canvas pasted at a
random place, so both data sets share one look; the surface is the same generator at 64×64. A box
is the extent of its defect where the shape is at least :data:`BOX_LEVEL` of its peak, in input
pixels (x1, y1, x2, y2; pixel i spans [i, i + 1)). Seeded per sample (split seed, index) like
:mod:`..dataset`, so a shorter split is the longer one's start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecloud_tools.toolchain.dataset import (
    DEFECTS,
    LABELS,
    SEEDS,
    SIZE,
    defect_contrast,
    sensor_noise,
    surface,
)

#: the detector's classes: the defect kinds (no "ok": a clean patch is a frame without boxes)
DET_LABELS: tuple[str, ...] = LABELS[1:]
DET_SIZE = 64
MAX_DEFECTS = 3
#: share of a defect's peak that counts as part of it for its box
BOX_LEVEL = 0.25
#: two defects of one patch overlap by at most this IoU, so every box stays findable
MAX_OVERLAP = 0.2
_PLACEMENT_TRIES = 20
#: a per-sample seed stream apart from the classification one's (0: labels, 1: images)
_STREAM = 2


@dataclass(frozen=True)
class DetectionSplit:
    """Patches float32 [n, 1, 64, 64] in [0, 1] and, per patch, its boxes float32 [m, 4] and classes
    int64 [m] indexing :data:`DET_LABELS` (m from 0 to 3)."""

    images: np.ndarray
    boxes: tuple[np.ndarray, ...]
    classes: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> DetectionSplit:
        return DetectionSplit(self.images[:n], self.boxes[:n], self.classes[:n])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [len(a), len(b)] of two sets of (x1, y1, x2, y2) boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def extent(shape: np.ndarray, level: float = BOX_LEVEL) -> np.ndarray:
    """The box (x1, y1, x2, y2) of the pixels where ``shape`` is at least ``level`` of its peak."""
    ys, xs = np.nonzero(shape >= level * shape.max())
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


@dataclass(frozen=True)
class Defect:
    """One defect as drawn: its class, its box, and its signed layer over the whole patch."""

    cls: int
    box: np.ndarray
    layer: np.ndarray


def draw_defects(rng: np.random.Generator) -> list[Defect]:
    """Zero to three defects placed on a 64×64 patch, overlapping by at most :data:`MAX_OVERLAP`."""
    defects: list[Defect] = []
    for _ in range(int(rng.integers(0, MAX_DEFECTS + 1))):
        label = int(rng.integers(1, len(LABELS)))
        contrast = defect_contrast(rng, label)
        shape = DEFECTS[label](rng)
        local = extent(shape)
        for _ in range(_PLACEMENT_TRIES):
            ox, oy = rng.integers(0, DET_SIZE - SIZE + 1, 2)
            box = local + np.array([ox, oy, ox, oy], dtype=np.float32)
            if not defects or box_iou(box, np.array([d.box for d in defects])).max() <= MAX_OVERLAP:
                break
        else:
            continue  # no room left on this patch
        layer = np.zeros((DET_SIZE, DET_SIZE))
        layer[oy:oy + SIZE, ox:ox + SIZE] = contrast * shape
        defects.append(Defect(label - 1, box, layer))
    return defects


def render_detection(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One [64, 64] float32 patch in [0, 1], its boxes [m, 4] and classes [m] (0 to 3 defects)."""
    image = surface(rng, DET_SIZE)
    defects = draw_defects(rng)
    for d in defects:
        image = image + d.layer
    return (sensor_noise(rng, image), np.array([d.box for d in defects], dtype=np.float32).reshape(-1, 4),
            np.array([d.cls for d in defects], dtype=np.int64))


def make_detection_split(split: str, n: int) -> DetectionSplit:
    """``n`` patches of ``split`` ("train", "val", "test"), their boxes and classes."""
    if split not in SEEDS:
        raise ValueError(f"unknown split {split!r}; splits are {sorted(SEEDS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    images = np.empty((n, 1, DET_SIZE, DET_SIZE), dtype=np.float32)
    boxes, classes = [], []
    for i in range(n):
        images[i, 0], b, c = render_detection(np.random.default_rng((SEEDS[split], _STREAM, i)))
        boxes.append(b)
        classes.append(c)
    return DetectionSplit(images, tuple(boxes), tuple(classes))
