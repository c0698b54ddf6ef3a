"""The two detector families, CenterNet-style on a stride-4 grid: a backbone of 3×3 convolutions, then
per cell a class heatmap and the distances (left, top, right, bottom) from the cell's centre to the
box's sides. :class:`Decoded` wraps a trained one with the decoding the exported graph carries.

Decoding is the CenterNet way, so the graph needs no NonMaxSuppression: a cell is kept when its score
is the maximum of its 3×3 neighbourhood in its class, then a fixed-K top-k over classes and cells; the
rest of the K slots are padding, score 0 and box 0. Only Conv, BatchNorm (folded at export), ReLU and
MaxPool are weighted or quantized; the decoding stays FP32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgecloud_tools.toolchain.detection.dataset import DET_LABELS, DET_SIZE
from edgecloud_tools.toolchain.nets import conv_bn_relu

STRIDE = 4
#: boxes each frame's answer holds (padded with score 0)
TOP_K = 10
#: initial heatmap bias: a prior of 1 % per cell keeps early training from drowning in negatives
_PRIOR_BIAS = -4.6


class Detector(nn.Module):
    """Backbone to stride 4, then a 1×1 head: ``heat`` logits [N, C, H/4, W/4] and ``ltrb`` [N, 4, H/4,
    W/4] as log distances in strides. ``depth`` convolutions per stage, ``width``, 2×, 4× channels."""

    def __init__(self, width: int, depth: int = 1, classes: int = len(DET_LABELS)) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        for cin, cout, pool in ((1, w, True), (w, 2 * w, True), (2 * w, 4 * w, False)):
            layers += conv_bn_relu(cin, cout)
            for _ in range(depth - 1):
                layers += conv_bn_relu(cout, cout)
            if pool:
                layers.append(nn.MaxPool2d(2))
        layers += conv_bn_relu(4 * w, 4 * w)
        self.features = nn.Sequential(*layers)
        self.heat = nn.Conv2d(4 * w, classes, 1)
        self.ltrb = nn.Conv2d(4 * w, 4, 1)
        nn.init.constant_(self.heat.bias, _PRIOR_BIAS)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.heat(f), self.ltrb(f)


def edge_detector() -> Detector:
    """The edge detector: ~15k parameters, a few MFLOPs a 64×64 frame."""
    return Detector(width=8)


def cloud_detector() -> Detector:
    """The cloud detector: twice as wide and two convolutions a stage, ~7× the edge one's parameters."""
    return Detector(width=16, depth=2)


class Decoded(nn.Module):
    """``detector`` plus decoding: ``image`` [N, 1, H, W] → ``boxes`` [N, K, 4] (x1, y1, x2, y2 in input
    pixels, within the ``size``×``size`` frame), ``scores`` [N, K], ``classes`` [N, K] int64, best first."""

    def __init__(self, detector: Detector, k: int = TOP_K, size: int = DET_SIZE) -> None:
        super().__init__()
        self.detector, self.k, self.size = detector, k, size

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        heat, ltrb = self.detector(image)
        n, c, h, w = heat.shape
        prob = torch.sigmoid(heat)
        peak = prob * (nn.functional.max_pool2d(prob, 3, stride=1, padding=1) == prob).float()
        scores, index = torch.topk(peak.reshape(n, c * h * w), self.k, dim=1)
        classes = torch.div(index, h * w, rounding_mode="floor")
        cell = index - classes * (h * w)
        cy = torch.div(cell, w, rounding_mode="floor")
        cx = cell - cy * w
        dist = torch.exp(ltrb.reshape(n, 4, h * w)).gather(2, cell[:, None, :].expand(n, 4, self.k)) * STRIDE
        centre_x = (cx.float() + 0.5) * STRIDE
        centre_y = (cy.float() + 0.5) * STRIDE
        boxes = torch.stack([centre_x - dist[:, 0], centre_y - dist[:, 1], centre_x + dist[:, 2],
                             centre_y + dist[:, 3]], dim=2)
        boxes = boxes.clamp(0.0, float(self.size)) * (scores > 0).float()[:, :, None]
        return boxes, scores, classes
