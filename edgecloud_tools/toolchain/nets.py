"""The two classifier families: a small edge CNN and a larger cloud CNN, both [N,1,32,32] → logits [N,4].

Both end in global max pooling: a defect is small and can sit anywhere, so the strongest local
response decides, not the average over a mostly clean surface. Only Conv, BatchNorm (folded into the
convolutions at export), ReLU, MaxPool and one Linear are used, so the INT8 graph stays within what
TensorRT runs in INT8.
"""

from __future__ import annotations

from torch import Tensor, nn

from edgecloud_tools.toolchain.dataset import LABELS


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class EdgeNet(nn.Module):
    """Four 3×3 convolutions of ``width``, 2×, 4×, 4× channels with pooling between: ~9k parameters at
    width 6, ~15k at width 8, cheap enough for an INT8 edge device at camera rate."""

    def __init__(self, width: int = 8, classes: int = len(LABELS)) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *conv_bn_relu(1, w), nn.MaxPool2d(2),
            *conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
            *conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2),
            *conv_bn_relu(4 * w, 4 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class CloudNet(nn.Module):
    """Three stages of two 3×3 convolutions (``width``, 2×, 4× channels): the full model the cloud serves."""

    def __init__(self, width: int = 24, classes: int = len(LABELS)) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *conv_bn_relu(1, w), *conv_bn_relu(w, w), nn.MaxPool2d(2),
            *conv_bn_relu(w, 2 * w), *conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv_bn_relu(2 * w, 4 * w), *conv_bn_relu(4 * w, 4 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(4 * w, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
