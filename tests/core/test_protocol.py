"""The wire protocol: fresh generated stubs, field numbers as tritonclient's, the tensor codec."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.errors import InvalidInput
from edgecloud.guards import InputContract
from edgecloud.protocol import codec, codegen
from edgecloud.protocol.codec import (
    InferRequest,
    decode_request,
    encode_request,
    params_from_pb,
    params_to_pb,
    tensor_from_raw,
    tensor_to_raw,
)
from edgecloud.tensors import TensorSpec

MESSAGES = ("ServerLiveRequest", "ServerLiveResponse", "ServerReadyResponse", "ModelReadyRequest",
            "ModelReadyResponse", "ServerMetadataResponse", "ModelMetadataRequest", "ModelMetadataResponse",
            "ModelInferRequest", "ModelInferResponse", "InferParameter", "InferTensorContents")


# Runs here and, unchanged, in a tritonclient subprocess (the two descriptor sets cannot share a process).
FIELDS_SRC = """
def _fields(descriptor):
    out = {}
    for f in descriptor.fields:
        out[f.name] = [f.number, f.type, f.is_repeated]
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            out[nested.name] = _fields(nested)
    return out
"""
_namespace: dict = {}
exec(FIELDS_SRC, _namespace)
_fields = _namespace["_fields"]


def test_generated_modules_are_fresh(tmp_path):
    written = codegen.generate(tmp_path)
    assert written, "codegen wrote nothing"
    for path in written:
        committed = codegen.OUT_DIR / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed; run python -m edgecloud.protocol.codegen"
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale against protos/; run python -m edgecloud.protocol.codegen")


def test_field_numbers_match_tritonclient():
    """tritonclient's bundled descriptors are the public spec: ours must agree field by field."""
    script = FIELDS_SRC + f"""
import json
from tritonclient.grpc import service_pb2 as pb
print(json.dumps({{m: _fields(getattr(pb, m).DESCRIPTOR) for m in {list(MESSAGES)!r}}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=codegen.ROOT)
    theirs = json.loads(proc.stdout)
    ours = json.loads(json.dumps({m: _fields(getattr(pb, m).DESCRIPTOR) for m in MESSAGES}))
    for message in MESSAGES:
        for name, spec in ours[message].items():
            assert theirs[message].get(name) == spec, (
                f"{message}.{name}: ours {spec}, tritonclient {theirs[message].get(name)}")
    assert set(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name) >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"}


@pytest.mark.parametrize("datatype,array", [
    ("BOOL", np.array([[True, False, True]])),
    ("UINT8", np.arange(6, dtype=np.uint8).reshape(2, 3)),
    ("UINT16", np.array([1, 65535], dtype=np.uint16)),
    ("UINT32", np.array([1, 2**32 - 1], dtype=np.uint32)),
    ("UINT64", np.array([1, 2**64 - 1], dtype=np.uint64)),
    ("INT8", np.array([-128, 127], dtype=np.int8)),
    ("INT16", np.array([-3, 3], dtype=np.int16)),
    ("INT32", np.array([[-(2**31), 2**31 - 1]], dtype=np.int32)),
    ("INT64", np.array([-(2**63), 2**63 - 1], dtype=np.int64)),
    ("FP16", np.array([0.5, -1.25, 65504], dtype=np.float16)),
    ("FP32", np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)),
    ("FP64", np.array([np.pi, -np.e])),
    ("BYTES", np.array([[b"ok", b""], ["cr\u00e4ck".encode(), b"\x00\xff"]], dtype=np.object_)),
])
def test_raw_roundtrip_every_datatype(datatype, array):
    got_type, raw = tensor_to_raw(array)
    assert got_type == datatype
    back = tensor_from_raw(raw, datatype, array.shape, "t")
    assert back.shape == array.shape
    assert back.dtype == array.dtype
    assert (back == array).all()


def test_bytes_elements_are_length_prefixed_little_endian():
    _, raw = tensor_to_raw(np.array([b"ab", b"xyz"], dtype=np.object_))
    assert raw == b"\x02\x00\x00\x00ab\x03\x00\x00\x00xyz"


def test_bf16_travels_as_two_byte_words():
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    _, raw = tensor_to_raw(values, "BF16")
    assert len(raw) == 6
    np.testing.assert_array_equal(tensor_from_raw(raw, "BF16", (3,), "t"), values)


def test_typed_contents_are_accepted_on_input():
    msg = pb.ModelInferRequest(model_name="m")
    t = msg.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    t.contents.fp32_contents.extend([1, 2, 3, 4])
    b = msg.inputs.add(name="s", datatype="BYTES", shape=[1])
    b.contents.bytes_contents.append(b"hi")
    i = msg.inputs.add(name="i", datatype="INT8", shape=[2])
    i.contents.int_contents.extend([-1, 5])
    req = decode_request(msg)
    np.testing.assert_array_equal(req.inputs["x"], np.array([[1, 2], [3, 4]], dtype=np.float32))
    assert req.inputs["s"].tolist() == [b"hi"]
    assert req.inputs["i"].dtype == np.int8 and req.inputs["i"].tolist() == [-1, 5]


@pytest.mark.parametrize("raw,shape,message", [
    (b"\x00" * 15, (2, 2), "15 bytes of raw data, shape [2, 2] of FP32 needs 16"),
    (b"\x00" * 17, (2, 2), "17 bytes"),
])
def test_raw_byte_size_mismatch_names_tensor(raw, shape, message):
    with pytest.raises(InvalidInput, match="'img'") as e:
        tensor_from_raw(raw, "FP32", shape, "img")
    assert message in str(e.value)


def test_bytes_truncated_and_count_mismatch():
    with pytest.raises(InvalidInput, match="declares 9 bytes"):
        tensor_from_raw(b"\x09\x00\x00\x00abc", "BYTES", (1,), "s")
    two = b"\x01\x00\x00\x00a\x01\x00\x00\x00b"
    with pytest.raises(InvalidInput, match="10 bytes cannot hold 3 BYTES elements"):
        tensor_from_raw(two, "BYTES", (3,), "s")
    with pytest.raises(InvalidInput, match="5 bytes follow the 1 BYTES element"):
        tensor_from_raw(two, "BYTES", (1,), "s")


def test_raw_count_must_match_inputs():
    msg = encode_request(InferRequest("m", {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}))
    del msg.raw_input_contents[1]
    with pytest.raises(InvalidInput, match="2 inputs but 1 raw_input_contents"):
        decode_request(msg)


def test_parameters_all_five_choices():
    msg = pb.ModelInferRequest()
    values = {"b": True, "i": -5, "s": "x", "d": 0.25, "u": 2**64 - 1}
    params_to_pb(msg.parameters, values)
    assert {k: msg.parameters[k].WhichOneof("parameter_choice") for k in values} == {
        "b": "bool_param", "i": "int64_param", "s": "string_param", "d": "double_param", "u": "uint64_param"}
    assert params_from_pb(msg.parameters) == values


# -- bounded decoding: the header first, then a bounded pass over the data ---------------------------------
IMAGE = TensorSpec("image", "FP32", (-1, 1, 32, 32))


def _bytes_request(model: str, count: int, element: bytes = b"ab", shape=None) -> pb.ModelInferRequest:
    """A request whose one BYTES input holds ``count`` elements of ``element``, all in one raw entry."""
    msg = pb.ModelInferRequest(model_name=model)
    msg.inputs.add(name="image", datatype="BYTES", shape=[count] if shape is None else shape)
    msg.raw_input_contents.append((len(element).to_bytes(4, "little") + element) * count)
    return msg


class _CountingPrefix:
    """Stands in for the codec's length-prefix reader, counting the prefixes the BYTES walk reads."""

    def __init__(self) -> None:
        self.reads = 0

    def unpack_from(self, buffer, offset=0):
        self.reads += 1
        return struct.unpack_from("<I", buffer, offset)


@pytest.fixture
def prefixes(monkeypatch) -> _CountingPrefix:
    counter = _CountingPrefix()
    monkeypatch.setattr(codec, "_LENGTH_PREFIX", counter)
    return counter


def test_headers_are_judged_before_any_data_is_read(prefixes) -> None:
    contract = InputContract.build("m", (IMAGE,))
    with pytest.raises(InvalidInput, match="datatype BYTES, expected FP32"):
        decode_request(_bytes_request("m", 100_000), contract)
    assert prefixes.reads == 0


def test_bytes_walk_is_bounded_by_the_declared_shape(prefixes) -> None:
    msg = _bytes_request("m", 100_000, shape=[3])
    with pytest.raises(InvalidInput, match="follow the 3 BYTES element"):
        decode_request(msg)
    assert prefixes.reads == 3
    prefixes.reads = 0
    oversized = _bytes_request("m", 3, element=b"x" * 1000, shape=[1000])  # 3 elements cannot be 1000
    with pytest.raises(InvalidInput, match="cannot hold 1000 BYTES elements"):
        decode_request(oversized)
    assert prefixes.reads == 0
    liar = pb.ModelInferRequest(model_name="m")
    liar.inputs.add(name="s", datatype="BYTES", shape=[3])
    liar.raw_input_contents.append(b"\xff\xff\xff\x7f" + b"\x00" * 20)  # claims 2 GiB
    with pytest.raises(InvalidInput, match="BYTES element 0 declares 2147483647 bytes"):
        decode_request(liar)
    assert prefixes.reads == 1


@pytest.mark.parametrize(("shape", "message"), [
    ([2**30, 2**30], "shape \\[1073741824, 1073741824\\] of FP32 needs 4611686018427387904"),  # no int64 wrap
    ([2**32, 2**32], "larger than any array can be"),
    ([0, 2**62], "larger than any array can be"),
    ([2, -3], "negative dimension"),
    ([1] * 40, "40 dimensions, at most 32"),
])
def test_element_counts_never_overflow(shape, message) -> None:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="FP32", shape=shape)
    msg.raw_input_contents.append(b"")
    with pytest.raises(InvalidInput, match=message):
        decode_request(msg)


@pytest.mark.parametrize(("datatype", "field", "values", "message"), [
    ("INT8", "int_contents", [1, 1000], "outside the range of INT8 \\[-128, 127\\]"),
    ("INT16", "int_contents", [-40000], "outside the range of INT16"),
    ("UINT8", "uint_contents", [256], "outside the range of UINT8"),
])
def test_typed_contents_out_of_range_are_refused(datatype, field, values, message) -> None:
    msg = pb.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="x", datatype=datatype, shape=[len(values)])
    getattr(tensor.contents, field).extend(values)
    with pytest.raises(InvalidInput, match=message):
        decode_request(msg)


def test_a_contract_refuses_zero_rows_and_non_finite_values_after_decoding() -> None:
    contract = InputContract.build("m", (IMAGE,))
    empty = encode_request(InferRequest("m", {"image": np.zeros((0, 1, 32, 32), np.float32)}))
    with pytest.raises(InvalidInput, match="holds no rows"):
        decode_request(empty, contract)
    frames = np.zeros((2, 1, 32, 32), np.float32)
    frames[1, 0, 5, 5] = np.nan
    with pytest.raises(InvalidInput, match="model 'm' input 'image': row 1 holds nan at \\[1, 0, 5, 5\\]"):
        decode_request(encode_request(InferRequest("m", {"image": frames})), contract)
    assert decode_request(encode_request(InferRequest("m", {"image": frames})))  # no contract, no guard
