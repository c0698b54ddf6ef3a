"""torch → ONNX for the inspection models: input ``image`` FP32 [-1,1,32,32], output ``logits`` FP32
[-1,4], dynamic batch, opset 17 and IR ≤ 10 so that ONNX Runtime 1.23 (Python 3.10) and TensorRT 10.3
load it (docs/design.md §11).

torch is imported only by :func:`export_onnx`, so the format constants serve torch-free code too.
Uses the TorchScript exporter (``dynamo=False``): the torch.export-based one writes opset 18 and up.
In eval mode it folds BatchNorm into the convolutions, which is what INT8 quantization wants.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from edgecloud.backends.ort_session import OrtBackend
from edgecloud_tools.toolchain.dataset import SIZE

if TYPE_CHECKING:
    from torch import nn

OPSET = 17
MAX_IR_VERSION = 10
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def cap_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower the IR version to :data:`MAX_IR_VERSION` if a writer set a newer one (opset 17 needs 8)."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model


def write_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...],
               output_names: Sequence[str]) -> Path:
    """Export ``model`` in eval mode to ``path`` with input :data:`INPUT_NAME` of ``input_shape`` and a
    dynamic batch on the input and every output, at :data:`OPSET` and IR ≤ :data:`MAX_IR_VERSION`,
    checked by onnx.checker."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    dummy = torch.zeros(*input_shape)
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo, which cannot write opset 17
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(path), input_names=[INPUT_NAME],
                          output_names=list(output_names), opset_version=OPSET, do_constant_folding=True,
                          dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *output_names)})
    proto = cap_ir_version(onnx.load(str(path)))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def export_onnx(model: nn.Module, path: Path, check_images: np.ndarray) -> Path:
    """Export ``model`` to ``path`` and check it: onnx.checker, then ONNX Runtime against torch on
    ``check_images`` (same argmax, logits within 1e-3)."""
    write_onnx(model, path, (2, 1, SIZE, SIZE), [OUTPUT_NAME])
    _check_against_torch(model, path, check_images)
    return path


def _check_against_torch(model: nn.Module, path: Path, images: np.ndarray) -> None:
    import torch

    backend = OrtBackend()
    backend.load(path)
    try:
        got = backend.infer({INPUT_NAME: images})[OUTPUT_NAME]
    finally:
        backend.close()
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    if not (np.array_equal(got.argmax(1), want.argmax(1)) and np.allclose(got, want, atol=1e-3)):
        raise RuntimeError(f"{path}: ONNX Runtime disagrees with torch "
                           f"(max |diff| {np.abs(got - want).max():.2e})")
