"""The REST codec: JSON and binary-data requests decode to what the gRPC codec gives, headers are
checked before data, and every client mistake is InvalidInput naming it."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgecloud.errors import InvalidInput
from edgecloud.guards import InputContract
from edgecloud.protocol.codec import InferResponse, tensor_to_raw
from edgecloud.protocol.rest_codec import decode_rest_request, encode_rest_response, split_body
from edgecloud.tensors import TensorSpec
from tests.support.fuzz import DIMS, FUZZ, JSON_VALUES

CONTRACT = InputContract("m", (TensorSpec("x", "FP32", (-1, 3)), TensorSpec("tag", "BYTES", (-1,))))


ONE_INPUT = InputContract("m", CONTRACT.inputs[:1])


def decode(document: dict, binary: bytes = b"", contract: InputContract = CONTRACT):
    return decode_rest_request(document, memoryview(binary), "m", "", contract)


def test_json_and_binary_inputs_decode_alike():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    tags = np.array([b"a", "é".encode()], dtype=np.object_)
    as_json = decode({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": x.tolist()},
                                 {"name": "tag", "datatype": "BYTES", "shape": [2], "data": ["a", "é"]}],
                      "parameters": {"edgecloud.threshold": 0.25, "binary_data_output": True}})
    raw_x, raw_tags = tensor_to_raw(x)[1], tensor_to_raw(tags)[1]
    head = json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": len(raw_x)}},
        {"name": "tag", "datatype": "BYTES", "shape": [2],
         "parameters": {"binary_data_size": len(raw_tags)}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True, "classification": 2}}]}).encode()
    document, binary = split_body(head + raw_x + raw_tags, str(len(head)))
    as_binary = decode_rest_request(document, binary, "m", "", CONTRACT)
    for request in (as_json, as_binary):
        np.testing.assert_array_equal(request.inputs["x"], x)
        assert request.inputs["tag"].tolist() == tags.tolist()
    assert as_json.parameters == {"edgecloud.threshold": 0.25}  # the extension's own keys are dropped
    assert [(o.name, dict(o.parameters)) for o in as_binary.outputs] == [("y", {"classification": 2})]


@pytest.mark.parametrize(("document", "binary", "message"), [
    ({"inputs": [{"name": "y", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}, b"", "'y'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2]}]}, b"", "2 values"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": ["a", "b", "c"]}]}, b"",
     "not FP32"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                  "parameters": {"binary_data_size": 12}}]}, b"\0" * 8, "does not fit"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                  "parameters": {"binary_data_size": 12}}]}, b"\0" * 16, "4 bytes of binary data follow"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": "1,3", "data": []}]}, b"", "list of integers"),
    ({"inputs": []}, b"", "non-empty 'inputs'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
      "parameters": {"p": [1]}}, b"", "parameter 'p'"),
])
def test_client_mistakes_are_invalid_input_naming_them(document, binary, message):
    with pytest.raises(InvalidInput, match=message):
        decode(document, binary, ONE_INPUT)


def test_numbers_out_of_range_and_a_header_beyond_the_body_are_refused():
    contract = InputContract("m", (TensorSpec("n", "INT8", (-1,)),))
    with pytest.raises(InvalidInput, match=r"outside the range of INT8"):
        decode_rest_request({"inputs": [{"name": "n", "datatype": "INT8", "shape": [2], "data": [1, 300]}]},
                            memoryview(b""), "m", "", contract)
    with pytest.raises(InvalidInput, match=r"beyond the range of FP32"):
        decode({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 1e300, 2]}]},
               contract=ONE_INPUT)
    with pytest.raises(InvalidInput, match="beyond the 2-byte body"):
        split_body(b"{}", "9")
    with pytest.raises(InvalidInput, match="not JSON"):
        split_body(b"{x", None)


def test_outputs_are_binary_only_when_asked():
    response = InferResponse("m", {"y": np.array([[1.5, 2.0]], dtype=np.float32),
                                   "s": np.array([b"edge"], dtype=np.object_)}, "3",
                             parameters={"edgecloud.escalated": np.bool_(False)})
    body, length = encode_rest_response(response, {"outputs": [{"name": "y",
                                                                "parameters": {"binary_data": True}}]})
    head = json.loads(body[:length])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(body[length:], dtype="<f4").tolist() == [1.5, 2.0]
    assert head["outputs"][1]["data"] == ["edge"] and head["parameters"] == {"edgecloud.escalated": False}
    body, length = encode_rest_response(response, {})
    assert length is None and json.loads(body)["outputs"][0]["data"] == [1.5, 2.0]
    body, length = encode_rest_response(response, {"parameters": {"binary_data_output": True}})
    (size,) = struct.unpack_from("<I", body, length + 8)  # y's 8 bytes, then s length-prefixed
    assert size == 4 and body[length + 12:] == b"edge"


@st.composite
def rest_requests(draw) -> tuple[dict, bytes]:
    """Mostly well-formed REST requests to CONTRACT, each piece sometimes something else entirely."""
    def tensor(name: str, datatype: str) -> dict:
        shape = draw(st.one_of(st.lists(DIMS, max_size=3), JSON_VALUES))
        body: dict = {"name": draw(st.one_of(st.just(name), JSON_VALUES)),
                      "datatype": draw(st.one_of(st.just(datatype), st.sampled_from(["BF16", "INT8", "X"]))),
                      "shape": shape}
        if draw(st.booleans()):
            body["parameters"] = {"binary_data_size": draw(st.one_of(st.integers(-4, 64), JSON_VALUES))}
        else:
            body["data"] = draw(st.one_of(st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=3)),
                                                   max_size=8), JSON_VALUES))
        return body
    inputs = [tensor("x", "FP32"), tensor("tag", "BYTES")]
    document = {"inputs": draw(st.one_of(st.just(inputs), JSON_VALUES)),
                "outputs": draw(st.one_of(st.just([{"name": "y", "parameters": {"binary_data": True}}]),
                                          JSON_VALUES)),
                "parameters": draw(st.one_of(st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=2),
                                             JSON_VALUES)),
                "id": draw(st.one_of(st.text(max_size=4), JSON_VALUES))}
    return document, draw(st.binary(max_size=64))


@FUZZ
@given(rest_requests())
def test_fuzzed_rest_requests_are_decoded_or_invalid_input(case):
    document, binary = case
    with contextlib.suppress(InvalidInput):
        request = decode(document, binary)
        assert set(request.inputs) == {"x", "tag"}
    body = json.dumps(document).encode() + binary
    with contextlib.suppress(InvalidInput):
        decode_rest_request(*split_body(body, str(len(body) - len(binary))), "m", "", CONTRACT)
