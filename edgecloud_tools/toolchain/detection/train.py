"""Training a detector on CPU: CenterNet targets (a Gaussian bump per box on its class's heatmap, the
log distances to its sides at its centre cell), the penalty-reduced focal loss on the heatmap and L1
on the distances, AdamW with a one-cycle schedule and the 8 flips/rotations of the square grid."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from edgecloud_tools.toolchain.detection.dataset import DET_LABELS, DetectionSplit
from edgecloud_tools.toolchain.detection.nets import STRIDE, Detector
from edgecloud_tools.toolchain.train import TrainConfig


def targets(split: DetectionSplit, classes: int = len(DET_LABELS)) -> tuple[np.ndarray, np.ndarray,
                                                                              np.ndarray]:
    """Heatmaps [N, C, h, w], log distances [N, 4, h, w] and the centre-cell mask [N, 1, h, w]."""
    n, _, height, width = split.images.shape
    h, w = height // STRIDE, width // STRIDE
    heat = np.zeros((n, classes, h, w), np.float32)
    dist = np.zeros((n, 4, h, w), np.float32)
    mask = np.zeros((n, 1, h, w), np.float32)
    gy, gx = (np.mgrid[0:h, 0:w] + 0.5) * STRIDE
    for i, (boxes, labels) in enumerate(zip(split.boxes, split.classes)):
        for (x1, y1, x2, y2), c in zip(boxes, labels):
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            sigma = max(min(x2 - x1, y2 - y1) / 6, STRIDE / 2)
            heat[i, c] = np.maximum(heat[i, c], np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * sigma ** 2)))
            row, col = min(int(cy // STRIDE), h - 1), min(int(cx // STRIDE), w - 1)
            heat[i, c, row, col] = 1.0
            centre_x, centre_y = (col + 0.5) * STRIDE, (row + 0.5) * STRIDE
            sides = np.array([centre_x - x1, centre_y - y1, x2 - centre_x, y2 - centre_y])
            dist[i, :, row, col] = np.log(np.maximum(sides, 0.5) / STRIDE)
            mask[i, 0, row, col] = 1.0
    return heat, dist, mask


def _augment(image: Tensor, heat: Tensor, dist: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    """One of the 8 flips/rotations per batch, applied to the targets alike (distances swap sides)."""
    if bool(torch.randint(0, 2, ())):  # mirror left-right: left and right distances swap
        image, heat, dist, mask = (t.flip(3) for t in (image, heat, dist, mask))
        dist = dist[:, [2, 1, 0, 3]]
    if bool(torch.randint(0, 2, ())):  # mirror top-bottom
        image, heat, dist, mask = (t.flip(2) for t in (image, heat, dist, mask))
        dist = dist[:, [0, 3, 2, 1]]
    if bool(torch.randint(0, 2, ())):  # transpose: x and y swap
        image, heat, dist, mask = (t.transpose(2, 3) for t in (image, heat, dist, mask))
        dist = dist[:, [1, 0, 3, 2]]
    return image, heat, dist, mask


def focal_loss(logits: Tensor, heat: Tensor) -> Tensor:
    """CenterNet's penalty-reduced focal loss, per box."""
    prob = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = heat.eq(1).float()
    pos = -torch.log(prob) * (1 - prob) ** 2 * positive
    neg = -torch.log(1 - prob) * prob ** 2 * (1 - heat) ** 4 * (1 - positive)
    return (pos.sum() + neg.sum()) / positive.sum().clamp(min=1)


def train_detector(model: Detector, split: DetectionSplit, config: TrainConfig, name: str,
                   log: Callable[[str], None] | None = None) -> float:
    """Train ``model`` in place; return the last epoch's mean loss. One progress line per epoch."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    torch.manual_seed(config.seed)
    x = torch.from_numpy(split.images)
    heat, dist, mask = (torch.from_numpy(a) for a in targets(split))
    steps = -(-len(x) // config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, epochs=config.epochs,
                                                   steps_per_epoch=steps)
    mean = 0.0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            idx = order[start:start + config.batch_size]
            image, h, d, m = _augment(x[idx], heat[idx], dist[idx], mask[idx])
            heat_logits, ltrb = model(image)
            box_loss = ((ltrb - d).abs() * m).sum() / m.sum().clamp(min=1)
            loss = focal_loss(heat_logits, h) + box_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        mean = total / len(x)
        elapsed = time.perf_counter() - started
        log(f"  {name}: epoch {epoch}/{config.epochs}  loss {mean:.4f}  ({elapsed:.1f} s)")
    model.eval()
    return mean
