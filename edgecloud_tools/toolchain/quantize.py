"""INT8 the way TensorRT takes it: a QDQ ONNX graph from ONNX Runtime's static quantization, and a
checker for the rules TensorRT 10 enforces on such a graph (docs/design.md §11).

TensorRT reads scales from the Q/DQ nodes (explicit quantization, no calibration table) and only
accepts symmetric INT8: every zero point 0 and of type int8. Weights are quantized per output
channel. Biases stay FP32, because TensorRT's DequantizeLinear rejects the int32 biases ONNX Runtime
would otherwise write ("only activation types allowed as input to this layer"). Q/DQ pairs go on the
inputs of weighted layers only, as NVIDIA recommends: TensorRT then fuses Conv+ReLU and moves the
next layer's quantization over the pooling, where a Q/DQ pair on every output would block fusions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from edgecloud_tools.toolchain.export import INPUT_NAME, MAX_IR_VERSION, OPSET, cap_ir_version

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: ops whose input 1 is a weight that TensorRT wants quantized per output channel
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class ImageBatches(CalibrationDataReader):
    """Feeds calibration images to ONNX Runtime's calibrator in batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 64, input_name: str = INPUT_NAME) -> None:
        self._batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        self._input_name = input_name
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self._input_name: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray) -> Path:
    """Write the symmetric per-channel QDQ INT8 version of ``fp32_path`` to ``int8_path``."""
    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgecloud-quant-") as tmp:
        # ONNX Runtime's recommended pre-pass: shape inference and graph clean-up before calibration
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(int8_path), ImageBatches(calibration_images),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            per_channel=True, calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=list(WEIGHTED_OPS),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                           "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS)})
    model = _drop_unused_opsets(cap_ir_version(onnx.load(str(int8_path))))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(int8_path))
    return int8_path


def _drop_unused_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep only the opset imports the graph uses: the pre-pass declares every domain ONNX Runtime
    knows (com.microsoft, ai.onnx.training, …), which older parsers need not see."""
    used = {node.domain for node in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _output_channels(node: onnx.NodeProto, weight: np.ndarray) -> int:
    if node.op_type == "Conv":
        return weight.shape[0]
    if node.op_type == "ConvTranspose":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return weight.shape[1] * group
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return weight.shape[0] if trans_b else weight.shape[1]
    return weight.shape[-1]  # MatMul with a constant B [K, N]


def format_problems(model: onnx.ModelProto) -> list[str]:
    """What breaks the format rules ONNX Runtime 1.23 and TensorRT 10.3 need: IR, opset, standard ops."""
    problems = []
    if model.ir_version > MAX_IR_VERSION:
        problems.append(f"IR version {model.ir_version} > {MAX_IR_VERSION}")
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > OPSET:
            problems.append(f"opset {opset.version} > {OPSET}")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name!r}: {node.domain}.{node.op_type} is not a standard ONNX op")
    return problems


def _qdq_problems(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[str]:
    where = f"{node.op_type} {node.name!r}"
    problems = []
    zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero_point is None:
        if node.op_type == "QuantizeLinear":
            problems.append(f"{where}: no zero point, so it quantizes to uint8; TensorRT needs int8")
    elif zero_point not in constants:
        problems.append(f"{where}: zero point {zero_point!r} is not a constant")
    else:
        zp = constants[zero_point]
        if zp.dtype != np.int8:
            problems.append(f"{where}: zero point is {zp.dtype}, TensorRT needs int8")
        if np.any(zp != 0):
            problems.append(f"{where}: zero point is not 0 (asymmetric); TensorRT needs symmetric INT8")
    if node.op_type == "DequantizeLinear" and node.input[0] in constants:
        dtype = constants[node.input[0]].dtype
        if dtype != np.int8:
            problems.append(f"{where}: dequantizes a {dtype} constant (e.g. an int32 bias); "
                            "TensorRT dequantizes int8 only")
    return problems


def _weight_problems(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                     constants: dict[str, np.ndarray]) -> list[str]:
    where = f"{node.op_type} {node.name!r}"
    if len(node.input) < 2:
        return []
    dq = producers.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        # MatMul between two activations has no weight; a constant one must be quantized
        return [f"{where}: weight {node.input[1]!r} is not quantized"] \
            if node.op_type != "MatMul" or node.input[1] in constants else []
    weight, scale = constants.get(dq.input[0]), constants.get(dq.input[1])
    if weight is None or scale is None:
        return [f"{where}: weight quantization is not constant"]
    channels = _output_channels(node, weight)
    if scale.ndim != 1 or scale.size != channels:
        return [f"{where}: weights quantized per tensor (scale shape {list(scale.shape)}); "
                f"per-channel needs {channels} scales"]
    return []


def check_tensorrt_ready(path: Path) -> list[str]:
    """What would stop TensorRT 10.3 from building this QDQ INT8 ONNX file as intended ([] = ready).

    Checks: opset ≤ 17 and IR ≤ 10; standard ONNX ops only; every Q/DQ zero point int8 and 0; no
    dequantized int32 constants (biases); Conv/Gemm (and constant-weight MatMul) weights come from
    a per-channel DequantizeLinear.
    """
    model = onnx.load(str(path))
    graph = model.graph
    constants = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    problems = format_problems(model)
    if not any(node.op_type in QDQ_OPS for node in graph.node):
        problems.append("no QuantizeLinear/DequantizeLinear nodes: the graph is not quantized")
    for node in graph.node:
        if node.op_type in QDQ_OPS:
            problems += _qdq_problems(node, constants)
        elif node.op_type in WEIGHTED_OPS:
            problems += _weight_problems(node, producers, constants)
    return problems
