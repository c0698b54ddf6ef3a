"""numpy ⇄ KServe v2 wire format. Together with the servicer, the only code that touches protobuf.

Tensors travel in ``raw_input_contents`` / ``raw_output_contents`` (little-endian; BYTES elements
carry a 4-byte little-endian length prefix). Typed ``contents`` are accepted on input, as the
specification requires, but outputs are always raw: tritonclient reads nothing else.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.errors import InvalidInput, excerpt
from edgecloud.guards import InputContract
from edgecloud.protocol.datatypes import NUMPY_OF, kserve_datatype, wire_itemsize
from edgecloud.tensors import TensorSpec

ParamValue = Union[bool, int, float, str]
_INT64_MAX = 2**63 - 1
#: the most dimensions a tensor may have (numpy's limit on every supported version)
MAX_RANK = 32
_LENGTH_PREFIX = struct.Struct("<I")
# Which InferTensorContents field carries a datatype when a client sends typed contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output a client named in ``outputs``, with its parameters (e.g. ``classification``)."""

    name: str
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded ModelInferRequest."""

    model_name: str
    inputs: Mapping[str, np.ndarray]
    model_version: str = ""
    id: str = ""
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)
    outputs: tuple[RequestedOutput, ...] = ()
    #: inputs whose values the model's contract found inside their declared ranges when decoding
    in_range: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class InferResponse:
    """What a model answered: outputs in order, plus response parameters."""

    model_name: str
    outputs: Mapping[str, np.ndarray]
    model_version: str = ""
    id: str = ""
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What ModelMetadata answers for one model."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def metadata_to_pb(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    """ModelMetadata → ModelMetadataResponse."""
    def tensors(specs):
        return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
                for s in specs]
    return pb.ModelMetadataResponse(name=meta.name, versions=list(meta.versions), platform=meta.platform,
                                    inputs=tensors(meta.inputs), outputs=tensors(meta.outputs))


def config_type(datatype: str) -> str:
    """A KServe datatype's name in Triton's model configuration (``FP32`` → ``TYPE_FP32``)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def config_to_pb(meta: ModelMetadata) -> pb.ModelConfig:
    """The model configuration ModelMetadata implies: no batching declared by the server
    (``max_batch_size`` 0), so ``dims`` are the full shapes, the batch dimension as -1."""
    def of(kind, specs):
        return [kind(name=s.name, data_type=pb.DataType.Value(config_type(s.datatype)), dims=s.shape)
                for s in specs]
    return pb.ModelConfig(name=meta.name, platform=meta.platform, max_batch_size=0,
                          input=of(pb.ModelInput, meta.inputs), output=of(pb.ModelOutput, meta.outputs))


def metadata_from_pb(msg: pb.ModelMetadataResponse) -> ModelMetadata:
    """ModelMetadataResponse → ModelMetadata (e.g. a cloud model's, to check its contract)."""
    def specs(items):
        return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in items)
    return ModelMetadata(name=msg.name, versions=tuple(msg.versions), platform=msg.platform,
                         inputs=specs(msg.inputs), outputs=specs(msg.outputs))


# --- parameters -------------------------------------------------------------------------------

def params_from_pb(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    """InferParameter map → plain Python values."""
    out: dict[str, ParamValue] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(p, which)
    return out


def params_to_pb(target, values: Mapping[str, ParamValue]) -> None:
    """Write plain values into an InferParameter map field (bool before int: bool is an int)."""
    for key, value in values.items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, (int, np.integer)):
            if value > _INT64_MAX:
                p.uint64_param = int(value)
            else:
                p.int64_param = int(value)
        elif isinstance(value, (float, np.floating)):
            p.double_param = float(value)
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise TypeError(f"parameter {key!r}: unsupported type {type(value).__name__}")


# --- tensors ----------------------------------------------------------------------------------

def _serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _bytes_elements(raw: bytes, count: int, name: str) -> np.ndarray:
    """Split ``raw`` into exactly ``count`` length-prefixed BYTES elements.

    ``count`` comes from the declared shape, already checked against the model, so the walk over the
    4-byte prefixes is bounded by it; it stops at the first prefix that the remaining bytes, or the
    elements still to come, cannot hold.
    """
    size = len(raw)
    if size < 4 * count:
        raise InvalidInput(f"input {excerpt(name)}: {size} bytes cannot hold {count} BYTES elements "
                           "(each has a 4-byte length prefix)")
    items = np.empty(count, dtype=np.object_)
    view, offset, unpack = memoryview(raw), 0, _LENGTH_PREFIX.unpack_from
    for i in range(count):
        (length,) = unpack(raw, offset)
        start, offset = offset + 4, offset + 4 + length
        if offset + 4 * (count - i - 1) > size:
            raise InvalidInput(f"input {excerpt(name)}: BYTES element {i} declares {length} bytes; "
                               f"{size - start} remain for it and {count - i - 1} more elements")
        items[i] = view[start:offset].tobytes()
    if offset != size:
        raise InvalidInput(f"input {excerpt(name)}: {size - offset} bytes follow the {count} BYTES "
                           "element(s) the shape holds")
    return items


def element_count(datatype: str, shape: Sequence[int], name: str) -> int:
    """The elements of a tensor of ``shape``, in Python integers (no overflow); InvalidInput for an
    unknown datatype, a negative dimension, or a shape no array could have."""
    if datatype not in NUMPY_OF:
        raise InvalidInput(f"input {excerpt(name)}: unknown datatype {excerpt(datatype)}")
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {excerpt(name)}: {len(shape)} dimensions, at most {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {excerpt(name)}: negative dimension in shape {list(shape)}")
    if math.prod(d for d in shape if d) * NUMPY_OF[datatype].itemsize > _INT64_MAX:
        raise InvalidInput(f"input {excerpt(name)}: shape {list(shape)} is larger than any array can be")
    return math.prod(shape)


def tensor_to_raw(array: np.ndarray, datatype: str | None = None) -> tuple[str, bytes]:
    """Encode an array for ``raw_*_contents``; returns its KServe datatype and the bytes."""
    datatype = datatype or kserve_datatype(array.dtype)
    if datatype == "BYTES":
        return datatype, _serialize_bytes(array)
    if datatype == "BF16":
        bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        return datatype, rounded.tobytes()
    return datatype, np.ascontiguousarray(array, dtype=NUMPY_OF[datatype].newbyteorder("<")).tobytes()


def tensor_from_raw(raw: bytes, datatype: str, shape: Sequence[int], name: str) -> np.ndarray:
    """Decode ``raw`` bytes into an array of ``shape``, checking the byte size first (zero-copy for
    fixed-size datatypes: the array is a read-only view of ``raw``)."""
    count = element_count(datatype, shape, name)
    if datatype == "BYTES":
        return _bytes_elements(raw, count, name).reshape(shape)
    expected = count * wire_itemsize(datatype)
    if len(raw) != expected:
        raise InvalidInput(f"input {excerpt(name)}: {len(raw)} bytes of raw data, shape {list(shape)} of "
                           f"{datatype} needs {expected}")
    if datatype == "BF16":
        words = np.frombuffer(raw, dtype="<u2").astype("<u4") << 16
        return words.view("<f4").astype(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=NUMPY_OF[datatype].newbyteorder("<")).astype(
        NUMPY_OF[datatype], copy=False).reshape(shape)


def _tensor_from_contents(tensor, shape: Sequence[int]) -> np.ndarray:
    count = element_count(tensor.datatype, shape, tensor.name)
    field_name = _CONTENTS_FIELD.get(tensor.datatype)
    if field_name is None:
        raise InvalidInput(f"input {excerpt(tensor.name)}: {tensor.datatype} cannot travel in typed "
                           "contents; send it in raw_input_contents")
    values = getattr(tensor.contents, field_name)
    if len(values) != count:
        raise InvalidInput(f"input {excerpt(tensor.name)}: {len(values)} values in contents.{field_name}, "
                           f"shape {list(shape)} needs {count}")
    dtype = NUMPY_OF[tensor.datatype]
    if dtype.kind not in "iu":
        return np.array(values, dtype=dtype).reshape(shape)
    # int_contents and uint_contents carry 32-bit values for every narrower integer type too
    wide = np.array(values, dtype=np.int64 if dtype.kind == "i" else np.uint64)
    info = np.iinfo(dtype)
    if wide.size and (wide.min() < info.min or wide.max() > info.max):
        raise InvalidInput(f"input {excerpt(tensor.name)}: contents.{field_name} holds values outside "
                           f"the range of {tensor.datatype} [{info.min}, {info.max}]")
    return wide.astype(dtype).reshape(shape)


# --- requests and responses -------------------------------------------------------------------

def decode_request(msg: pb.ModelInferRequest, contract: InputContract | None = None) -> InferRequest:
    """ModelInferRequest → InferRequest, checking byte sizes and element counts.

    With the ``contract`` of the model it is for, every tensor's header (name, datatype, shape, the row
    cap) is checked before any of its data is read, and the decoded values against the input guards.
    """
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInput(f"{len(msg.inputs)} inputs but {len(raw)} raw_input_contents entries")
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for tensor in msg.inputs:
        if tensor.name in headers:
            raise InvalidInput(f"input {excerpt(tensor.name)} appears twice")
        headers[tensor.name] = (tensor.datatype, tuple(tensor.shape))
    if contract is not None:
        contract.check_headers(headers)
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(msg.inputs):
        datatype, shape = headers[tensor.name]
        if raw:
            inputs[tensor.name] = tensor_from_raw(raw[i], datatype, shape, tensor.name)
        else:
            inputs[tensor.name] = _tensor_from_contents(tensor, shape)
    in_range = contract.check_values(inputs) if contract is not None else frozenset()
    outputs = tuple(RequestedOutput(o.name, params_from_pb(o.parameters)) for o in msg.outputs)
    return InferRequest(model_name=msg.model_name, model_version=msg.model_version, id=msg.id,
                        inputs=inputs, parameters=params_from_pb(msg.parameters), outputs=outputs,
                        in_range=in_range)


def encode_request(req: InferRequest) -> pb.ModelInferRequest:
    """InferRequest → ModelInferRequest with raw inputs (used by the agent's cloud client)."""
    msg = pb.ModelInferRequest(model_name=req.model_name, model_version=req.model_version, id=req.id)
    params_to_pb(msg.parameters, req.parameters)
    for name, array in req.inputs.items():
        datatype, data = tensor_to_raw(array)
        msg.inputs.add(name=name, datatype=datatype, shape=array.shape)
        msg.raw_input_contents.append(data)
    for out in req.outputs:
        params_to_pb(msg.outputs.add(name=out.name).parameters, out.parameters)
    return msg


def encode_response(resp: InferResponse, datatypes: Mapping[str, str] | None = None) -> pb.ModelInferResponse:
    """InferResponse → ModelInferResponse; ``datatypes`` overrides e.g. BF16 outputs."""
    msg = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version,
                                id=resp.id)
    params_to_pb(msg.parameters, resp.parameters)
    for name, array in resp.outputs.items():
        datatype, data = tensor_to_raw(array, (datatypes or {}).get(name))
        msg.outputs.add(name=name, datatype=datatype, shape=array.shape)
        msg.raw_output_contents.append(data)
    return msg


def decode_response(msg: pb.ModelInferResponse) -> InferResponse:
    """ModelInferResponse → InferResponse (raw or typed outputs)."""
    raw = msg.raw_output_contents
    outputs = {}
    for i, tensor in enumerate(msg.outputs):
        shape = tuple(tensor.shape)
        if raw:
            outputs[tensor.name] = tensor_from_raw(raw[i], tensor.datatype, shape, tensor.name)
        else:
            outputs[tensor.name] = _tensor_from_contents(tensor, shape)
    return InferResponse(model_name=msg.model_name, model_version=msg.model_version, id=msg.id,
                         outputs=outputs, parameters=params_from_pb(msg.parameters))


def request_to_bytes(req: InferRequest) -> bytes:
    """Serialize a request for storage (the agent's spool keeps cases as wire bytes)."""
    return encode_request(req).SerializeToString()


def request_from_bytes(data: bytes) -> InferRequest:
    """Inverse of request_to_bytes; a corrupt file raises InvalidInput."""
    msg = pb.ModelInferRequest()
    try:
        msg.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError
        raise InvalidInput(f"corrupt stored request: {e}") from e
    return decode_request(msg)
