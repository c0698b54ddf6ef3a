"""A detector to ONNX with its decoding inside the graph, and the check of the detection contract
(docs/design.md §10): input ``image`` FP32 [-1, 1, H, W]; outputs ``boxes`` FP32 [-1, K, 4],
``scores`` FP32 [-1, K] and ``classes`` INT64 [-1, K]; opset, IR and ops as for classification; and
the graph loads and runs in ONNX Runtime. torch is imported by :func:`export_detector` only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from edgecloud.backends.ort_session import OrtBackend
from edgecloud.errors import EdgecloudError
from edgecloud_tools.toolchain.detection.dataset import DET_SIZE
from edgecloud_tools.toolchain.export import INPUT_NAME, write_onnx
from edgecloud_tools.toolchain.quantize import format_problems

if TYPE_CHECKING:
    from edgecloud_tools.toolchain.detection.nets import Detector

BOXES, SCORES, CLASSES = "boxes", "scores", "classes"
OUTPUTS = (BOXES, SCORES, CLASSES)


def contract_problems(path: Path) -> list[str]:
    """How the ONNX file at ``path`` breaks the detection contract or the format rules ([] = none)."""
    problems = format_problems(onnx.load(str(path)))
    backend = OrtBackend()
    try:
        backend.load(Path(path))
    except EdgecloudError as e:
        return [*problems, f"ONNX Runtime cannot load it: {e}"]
    try:
        inputs, outputs = backend.inputs, {o.name: o for o in backend.outputs}
        image = inputs[0] if len(inputs) == 1 else None
        if image is None or image.name != INPUT_NAME or image.datatype != "FP32" or len(image.shape) != 4 \
                or image.shape[:2] != (-1, 1):
            problems.append(f"inputs {[(i.name, i.datatype, i.shape) for i in inputs]}: want one "
                            f"{INPUT_NAME!r} FP32 [-1, 1, H, W]")
        if sorted(outputs) != sorted(OUTPUTS):
            return [*problems, f"outputs {sorted(outputs)}: want exactly {list(OUTPUTS)}"]
        k = outputs[SCORES].shape[1] if len(outputs[SCORES].shape) == 2 else -1
        want = {BOXES: ("FP32", (-1, k, 4)), SCORES: ("FP32", (-1, k)), CLASSES: ("INT64", (-1, k))}
        if k < 1:
            problems.append(f"{SCORES} has shape {list(outputs[SCORES].shape)}: want [-1, K] with a fixed K")
        for name, (datatype, shape) in want.items():
            got = outputs[name]
            if (got.datatype, got.shape) != (datatype, shape):
                problems.append(f"{name}: {got.datatype} {list(got.shape)}, want {datatype} {list(shape)}")
        if not problems:
            problems += _run_problems(backend, image.shape)
    finally:
        backend.close()
    return problems


def _run_problems(backend: OrtBackend, shape: tuple[int, ...]) -> list[str]:
    """Run two frames: the outputs' values must be what the contract says."""
    height, width = (d if d > 0 else DET_SIZE for d in shape[2:])
    frames = np.random.default_rng(0).uniform(0, 1, (2, 1, height, width)).astype(np.float32)
    out = backend.infer({INPUT_NAME: frames})
    scores, boxes = out[SCORES], out[BOXES]
    problems = []
    if not (np.all(scores >= 0) and np.all(scores <= 1) and np.all(np.diff(scores, axis=1) <= 1e-6)):
        problems.append("scores are not within [0, 1] in descending order")
    if not (np.all(boxes[..., 2] >= boxes[..., 0]) and np.all(boxes[..., 3] >= boxes[..., 1])):
        problems.append("boxes are not (x1, y1, x2, y2) with x1 <= x2, y1 <= y2")
    return problems


def declare_k(path: Path, k: int) -> Path:
    """Write the fixed K into the declared shape of every output. The exporter leaves it symbolic
    (``TopKscores_dim_1``): ONNX Runtime 1.32 infers 10 from the graph, 1.23 (JetPack's Python) reports
    -1, and the contract check needs K in the metadata to compare an edge detector with its cloud."""
    proto = onnx.load(str(path))
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims) >= 2:
            dims[1].Clear()
            dims[1].dim_value = k
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return Path(path)


def export_detector(detector: Detector, path: Path, check_images: np.ndarray) -> Path:
    """Export ``detector`` with its decoding to ``path``; check the contract and that ONNX Runtime
    agrees with torch on ``check_images`` (:func:`disagreement`)."""
    import torch

    from edgecloud_tools.toolchain.detection.nets import TOP_K, Decoded

    model = Decoded(detector).eval()
    declare_k(write_onnx(model, path, (2, 1, DET_SIZE, DET_SIZE), OUTPUTS), TOP_K)
    problems = contract_problems(path)
    if problems:
        raise RuntimeError(f"{path}: " + "; ".join(problems))
    backend = OrtBackend()
    backend.load(Path(path))
    try:
        got = backend.infer({INPUT_NAME: check_images})
    finally:
        backend.close()
    with torch.no_grad():
        want = dict(zip(OUTPUTS, (t.numpy() for t in model(torch.from_numpy(check_images)))))
    problem = disagreement(got, want)
    if problem:
        raise RuntimeError(f"{path}: ONNX Runtime disagrees with torch: {problem}")
    return Path(path)


def disagreement(got: dict[str, np.ndarray], want: dict[str, np.ndarray], score_atol: float = 1e-3,
                 box_atol: float = 0.05, sure: float = 0.1) -> str | None:
    """How two runtimes' answers on the same frames differ beyond float noise (None = they agree).

    Compared frame by frame as sets, not rank by rank: a peak is a cell equal to the max of its
    neighbours, and two neighbours that tie to within float noise can both be peaks in one runtime and
    one in the other. That adds or drops a score equal to its neighbour's, which shifts every later
    rank and lets one more or one fewer candidate into the top K. So every confident detection (score >
    ``sure``) must have a twin of the same class, score and box in the other answer, every other score
    must be within ``score_atol`` of one there, and only a score at the other's bottom, which its K cut
    off, may have none."""
    for frame in range(len(want[SCORES])):
        a = {k: got[k][frame] for k in OUTPUTS}
        b = {k: want[k][frame] for k in OUTPUTS}
        for one, other, side in ((a, b, "ONNX Runtime"), (b, a, "torch")):
            for i in range(len(one[SCORES])):
                score = one[SCORES][i]
                close = np.abs(other[SCORES] - score) <= score_atol
                if score > sure:
                    close &= (other[CLASSES] == one[CLASSES][i]) & np.all(
                        np.abs(other[BOXES] - one[BOXES][i]) <= box_atol, axis=1)
                if not close.any() and score > other[SCORES].min() + score_atol:
                    return (f"frame {frame}: {side}'s detection {i} (score {score:.6f}, class "
                            f"{one[CLASSES][i]}, box {np.round(one[BOXES][i], 3).tolist()}) has no twin")
    return None
