"""Tiny ONNX detectors built by hand: boxes, scores and classes computed deterministically from the
pixels, with a fixed K, so tests know every output without training (docs/design.md §10).

The image [N, 1, H, W] (values 0-1) is cut into a grid of ``grid`` x ``grid`` cells, K = grid²; cell
k's score is ``clip(gain * mean(cell) + bias, 0, 1)``, its class ``floor(score * 2.999) % classes``, its
box the cell's own pixels shrunk by ``score`` pixels on each side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tests.support.onnx_models import save_graph

LABELS = ["scratch", "spot", "crack"]
OUTPUTS = ("boxes", "scores", "classes")


def detection_card(name: str = "line", score_threshold: float = 0.5, outputs: tuple[str, str, str] = OUTPUTS,
                   size: tuple[int, int] = (16, 16), **extra) -> dict:
    """A detection card (the lenient form the runtime reads) taking gray frames of ``size``."""
    return {"name": name, "version": 1, "task": "detection", "labels": LABELS,
            "detection": {**dict(zip(("boxes", "scores", "classes"), outputs)),
                          "score_threshold": score_threshold},
            "preprocess": {"input": "image", "frames": "frames", "color": "gray", "size": list(size)},
            **extra}


def grid_detector(path: Path, size: tuple[int, int] = (16, 16), grid: int = 4, gain: float = 1.6,
                  bias: float = -0.2, classes: int = 3, outputs: tuple[str, str, str] = OUTPUTS,
                  card: dict | None = None) -> Path:
    """A detector of K = grid² boxes per frame (see the module); dynamic batch, opset 17, IR 8."""
    h, w = size
    ch, cw = h // grid, w // grid
    k = grid * grid
    cells = np.array([[c * cw, r * ch, (c + 1) * cw, (r + 1) * ch] for r in range(grid) for c in range(grid)],
                     dtype=np.float32)
    boxes_name, scores_name, classes_name = outputs
    consts = {"c_gain": np.float32(gain), "c_bias": np.float32(bias), "c_zero": np.float32(0),
              "c_one": np.float32(1), "c_steps": np.float32(2.999), "c_classes": np.int64(classes),
              "c_flat": np.array([0, k], np.int64), "c_cells": cells[None],
              "c_shrink": np.array([1, 1, -1, -1], np.float32), "c_last": np.array([-1], np.int64)}
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[ch, cw], strides=[ch, cw]),
        helper.make_node("Reshape", ["pooled", "c_flat"], ["means"]),
        helper.make_node("Mul", ["means", "c_gain"], ["scaled"]),
        helper.make_node("Add", ["scaled", "c_bias"], ["raw"]),
        helper.make_node("Clip", ["raw", "c_zero", "c_one"], [scores_name]),
        helper.make_node("Mul", [scores_name, "c_steps"], ["steps_of"]),
        helper.make_node("Floor", ["steps_of"], ["floored"]),
        helper.make_node("Cast", ["floored"], ["class_index"], to=TensorProto.INT64),
        helper.make_node("Mod", ["class_index", "c_classes"], [classes_name]),
        helper.make_node("Unsqueeze", [scores_name, "c_last"], ["score_col"]),
        helper.make_node("Mul", ["score_col", "c_shrink"], ["offsets"]),
        helper.make_node("Add", ["c_cells", "offsets"], [boxes_name]),
    ]
    graph = helper.make_graph(
        nodes, "grid_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, h, w])],
        [helper.make_tensor_value_info(boxes_name, TensorProto.FLOAT, ["N", k, 4]),
         helper.make_tensor_value_info(scores_name, TensorProto.FLOAT, ["N", k]),
         helper.make_tensor_value_info(classes_name, TensorProto.INT64, ["N", k])],
        initializer=[numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items()])
    return save_graph(graph, path, card)


def run_detector(path: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    """The detector's own outputs for ``image`` [N, 1, H, W], from ONNX Runtime on one thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": image.astype(np.float32)})))
