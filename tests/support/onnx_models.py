"""Tiny ONNX classifiers built by hand, so tests control every weight and need no training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save_graph(graph, path: Path, card: dict | None = None) -> Path:
    """``graph`` as a checked ONNX model (opset 17, IR 8, what every supported runtime loads) at
    ``path``, with ``card`` beside it when given."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    if card is not None:
        path.with_name(path.name + ".card.json").write_text(json.dumps(card))
    return path

def linear_classifier(path: Path, features: int = 8, classes: int = 4, seed: int = 0, scale: float = 1.0,
                      input_name: str = "x", output_name: str = "logits",
                      card: dict | None = None, input_type: int = TensorProto.FLOAT) -> Path:
    """logits = (x @ W + b) * scale for x [N, features]; dynamic batch, opset 17, IR 8.

    ``input_type`` is the ONNX element type of x (cast to float first when it is another);
    ``card`` (if given) is written beside the model as ``<file>.card.json``.
    """
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((features, classes)) * scale).astype(np.float32)
    b = (rng.standard_normal(classes) * 0.1 * scale).astype(np.float32)
    cast = [] if input_type == TensorProto.FLOAT else [
        helper.make_node("Cast", [input_name], ["x_float"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        [*cast, helper.make_node("MatMul", ["x_float" if cast else input_name, "W"], ["xw"]),
         helper.make_node("Add", ["xw", "B"], [output_name])],
        "linear",
        [helper.make_tensor_value_info(input_name, input_type, ["N", features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    return save_graph(graph, path, card)


def spread_classifier(path: Path, hidden: int = 256, spread: int = 16, card: dict | None = None) -> Path:
    """A classifier with the contract of :func:`linear_classifier` (x [N, 8] → logits [N, 4]) whose work
    per row is ``spread`` rows of a ``hidden``-wide MLP, averaged: its run time grows with the batch
    size like a real model's, and ``spread`` makes it as slow per row as a test needs."""
    rng = np.random.default_rng(hidden + spread)
    weights = {"W0": rng.standard_normal((8, hidden)) * 0.3, "W1": rng.standard_normal((hidden, hidden)) / 16,
               "W2": rng.standard_normal((hidden, 4)) * 0.1}
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x", "axis1"], ["x1"]),
         helper.make_node("Expand", ["x1", "spread"], ["rows"]),
         helper.make_node("MatMul", ["rows", "W0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"]),
         helper.make_node("MatMul", ["r0", "W1"], ["h1"]),
         helper.make_node("ReduceMean", ["h1"], ["mean"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["mean", "W2"], ["logits"])],
        "spread",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "axis1"),
                     numpy_helper.from_array(np.array([1, spread, 1], np.int64), "spread"),
                     *(numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items())])
    return save_graph(graph, path, card)


def reference_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's own answer, computed straight from its weights (no server involved)."""
    model = onnx.load(str(path))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return x.astype(np.float32) @ weights["W"] + weights["B"]


def image_classifier(path: Path, size: tuple[int, int] = (16, 16), channels: int = 1, classes: int = 4,
                     seed: int = 0, scale: float = 0.05, input_name: str = "image", layout: str = "NCHW",
                     card: dict | None = None, echo: bool = False) -> Path:
    """logits = flatten(x) @ W + b for x [N, C, H, W] (``layout`` NCHW) or [N, H, W, C] FP32; dynamic
    batch, opset 17, IR 8; :func:`reference_logits` of ``x.reshape(N, -1)`` is its answer. With
    ``echo``, a second output ``seen`` is x itself: what the model was given."""
    h, w = size
    features = channels * h * w
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((features, classes)) * scale).astype(np.float32)
    bias = (rng.standard_normal(classes) * scale).astype(np.float32)
    shape = ["N", channels, h, w] if layout == "NCHW" else ["N", h, w, channels]
    seen = [helper.make_node("Identity", [input_name], ["seen"])] if echo else []
    graph = helper.make_graph(
        [helper.make_node("Flatten", [input_name], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["logits"]),
         *seen],
        "image_linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
         *([helper.make_tensor_value_info("seen", TensorProto.FLOAT, shape)] if echo else [])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")])
    return save_graph(graph, path, card)
