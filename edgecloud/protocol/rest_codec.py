"""numpy ⇄ KServe v2 REST (JSON), with Triton's binary-data extension: the REST twin of the codec
(docs/design.md §2).

A request body is JSON, or, with the ``Inference-Header-Content-Length: N`` header, N bytes of JSON
followed by the raw tensors of the inputs whose parameters give ``binary_data_size``, in input order
(fixed-size datatypes little-endian, BYTES elements 4-byte length-prefixed, as in gRPC's
``raw_input_contents``). Outputs travel as binary when the request asks (an output's
``binary_data: true``, or ``binary_data_output: true`` for those not named), else as JSON ``data``.
As with gRPC, every header is checked against the model's contract before any data is read.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from edgecloud.errors import InvalidInput, excerpt
from edgecloud.guards import InputContract
from edgecloud.protocol.codec import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ParamValue,
    RequestedOutput,
    config_type,
    element_count,
    tensor_from_raw,
    tensor_to_raw,
)
from edgecloud.protocol.datatypes import NUMPY_OF
from edgecloud.protocol.statistics import ModelFigures

#: the header that splits a body into its JSON part and its binary tensors
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data"
BINARY_OUTPUTS = "binary_data_output"
_PARAM_TYPES = (bool, int, float, str)


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _params(value: Any, what: str) -> dict[str, ParamValue]:
    params = _object(value if value is not None else {}, f"{what} parameters")
    for key, item in params.items():
        if not isinstance(item, _PARAM_TYPES):
            raise InvalidInput(f"{what} parameter {excerpt(key)}: a bool, number or string, "
                               f"not {type(item).__name__}")
    return params


def _header(tensor: Any) -> tuple[str, str, tuple[int, ...], dict[str, ParamValue]]:
    tensor = _object(tensor, "each input")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidInput("each input needs a string 'name' and 'datatype'")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input {excerpt(name)}: 'shape' must be a list of integers")
    return name, datatype, tuple(shape), _params(tensor.get("parameters"), f"input {excerpt(name)}")


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) → an array of ``shape``, in the datatype's range."""
    count = element_count(datatype, shape, name)
    if datatype == "BF16":
        raise InvalidInput(f"input {excerpt(name)}: BF16 travels as binary data only")
    if not isinstance(data, list):
        raise InvalidInput(f"input {excerpt(name)}: 'data' must be a list (or send binary data)")
    dtype = NUMPY_OF[datatype]
    try:
        if datatype == "BYTES":
            flat = np.array(data, dtype=np.object_).reshape(-1)
            if not all(isinstance(v, str) for v in flat):
                raise InvalidInput(f"input {excerpt(name)}: BYTES data must be strings")
            array = np.array([v.encode("utf-8") for v in flat], dtype=np.object_)
        else:
            wide = np.array(data)
            if wide.dtype.kind not in ("b" if datatype == "BOOL" else "biuf" if dtype.kind == "f" else "biu"):
                raise InvalidInput(f"input {excerpt(name)}: data holds {wide.dtype.kind!r} values, not "
                                   f"{datatype}")
            if dtype.kind in "iu" and wide.size:
                info = np.iinfo(dtype)
                if wide.min() < info.min or wide.max() > info.max:
                    raise InvalidInput(f"input {excerpt(name)}: data holds values outside the range of "
                                       f"{datatype} [{info.min}, {info.max}]")
            with np.errstate(over="ignore"):
                array = wide.astype(dtype).reshape(-1)
            if dtype.kind == "f" and np.any(np.isfinite(wide) & ~np.isfinite(array.reshape(wide.shape))):
                raise InvalidInput(f"input {excerpt(name)}: data holds values beyond the range of "
                                   f"{datatype}")
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidInput(f"input {excerpt(name)}: unreadable data ({e})") from None
    if array.size != count:
        raise InvalidInput(f"input {excerpt(name)}: {array.size} values in data, shape {list(shape)} "
                           f"needs {count}")
    return array.reshape(shape)


def split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON part of a body and the binary data after it."""
    view = memoryview(body)
    if header_length is None:
        size = len(body)
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, not {excerpt(header_length)}") from None
        if not 0 <= size <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {size} is beyond the {len(body)}-byte body")
    try:
        document = json.loads(bytes(view[:size]))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"the request is not JSON: {e}") from None
    return _object(document, "the request"), view[size:]


def decode_rest_request(document: dict, binary: memoryview, model: str, version: str,
                        contract: InputContract | None = None) -> InferRequest:
    """A REST inference request → InferRequest: headers checked against ``contract`` first, then
    the data read from JSON or from ``binary``, then the values checked."""
    tensors = document.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise InvalidInput("the request needs a non-empty 'inputs' list")
    headers = [_header(t) for t in tensors]
    names = [h[0] for h in headers]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InvalidInput(f"input {excerpt(twice)} appears twice")
    if contract is not None:
        contract.check_headers({name: (datatype, shape) for name, datatype, shape, _ in headers})
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor, (name, datatype, shape, params) in zip(tensors, headers):
        size = params.get(BINARY_SIZE)
        if size is None:
            inputs[name] = _from_json(tensor.get("data"), datatype, shape, name)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise InvalidInput(f"input {excerpt(name)}: {BINARY_SIZE} {size!r} does not fit the "
                               f"{len(binary) - offset} binary bytes left")
        inputs[name] = tensor_from_raw(binary[offset:offset + size].tobytes(), datatype, shape, name)
        offset += size
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the inputs that claim any")
    in_range = contract.check_values(inputs) if contract is not None else frozenset()
    outputs = []
    for entry in document.get("outputs") or ():
        item = _object(entry, "each requested output")
        if not isinstance(item.get("name"), str):
            raise InvalidInput("each requested output needs a string 'name'")
        params = _params(item.get("parameters"), f"output {excerpt(item['name'])}")
        outputs.append(RequestedOutput(item["name"], {k: v for k, v in params.items() if k != BINARY_OUTPUT}))
    params = _params(document.get("parameters"), "request")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    return InferRequest(model_name=model, model_version=version, id=request_id, inputs=inputs,
                        parameters={k: v for k, v in params.items() if k != BINARY_OUTPUTS},
                        outputs=tuple(outputs), in_range=in_range)


def binary_outputs(document: dict) -> tuple[bool, dict[str, bool]]:
    """Whether outputs not named travel as binary, and each named output's choice."""
    default = (document.get("parameters") or {}).get(BINARY_OUTPUTS, False) is True
    named = {o["name"]: (o.get("parameters") or {}).get(BINARY_OUTPUT, default) is True
             for o in document.get("outputs") or () if isinstance(o, dict) and isinstance(o.get("name"), str)}
    return default, named


def _plain(value: ParamValue) -> ParamValue:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


def _json_data(array: np.ndarray, datatype: str) -> list:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)) for v in flat]
    return flat.tolist()


def encode_rest_response(response: InferResponse, document: dict) -> tuple[bytes, int | None]:
    """The body of an answer, and the length of its JSON part when binary tensors follow it."""
    default, named = binary_outputs(document)
    tensors, chunks = [], []
    for name, array in response.outputs.items():
        datatype, raw = tensor_to_raw(array)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if named.get(name, default):
            tensor["parameters"] = {BINARY_SIZE: len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = _json_data(array, datatype)
        tensors.append(tensor)
    head = {"model_name": response.model_name, "model_version": response.model_version,
            "outputs": tensors}
    if response.id:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = {k: _plain(v) for k, v in response.parameters.items()}
    header = json.dumps(head).encode()
    return (header + b"".join(chunks), len(header)) if chunks else (header, None)


def metadata_json(meta: ModelMetadata) -> dict:
    def tensors(specs):
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]
    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}


def config_json(meta: ModelMetadata) -> dict:
    """Triton's JSON model configuration, the one :func:`edgecloud.protocol.codec.config_to_pb` gives."""
    def tensors(specs):
        return [{"name": s.name, "data_type": config_type(s.datatype), "dims": list(s.shape)} for s in specs]
    return {"name": meta.name, "platform": meta.platform, "max_batch_size": 0,
            "input": tensors(meta.inputs), "output": tensors(meta.outputs)}


def statistics_json(name: str, version: str, f: ModelFigures) -> dict:
    def duration(count: int = 0, ns: int = 0) -> dict:
        return {"count": count, "ns": ns}
    return {"name": name, "version": version, "last_inference": f.last_inference_ms,
            "inference_count": f.inference_count, "execution_count": f.execution_count,
            "inference_stats": {"success": duration(f.success_count, f.success_ns),
                                "fail": duration(f.fail_count, f.fail_ns), "queue": duration(),
                                "compute_input": duration(),
                                "compute_infer": duration(f.success_count, f.success_ns),
                                "compute_output": duration()},
            "batch_stats": []}

