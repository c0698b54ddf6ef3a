"""A short burst of fuzzed requests over real gRPC and REST at an agent (with a gateway behind it) and
at the gateway itself: every answer is a result, INVALID_ARGUMENT or NOT_FOUND (400 or 404 over
REST), never INTERNAL, and nothing is logged above INFO or with a traceback."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecloud.protocol.codec import params_from_pb
from tests.support.fuzz import FUZZ, infer_requests
from tests.support.services import Client, GatewayCloud, start_agent

EDGE, CLOUD = "inspection-edge", "inspection"
OUTPUTS = ("logits", "edgecloud.confidence", "edgecloud.source")
CLIENT_MISTAKES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, edge_model, cloud_repository):
    workdir = tmp_path_factory.mktemp("fuzz")
    cloud = GatewayCloud(workdir / "cloud", cloud_repository / CLOUD / "1" / "model.onnx", CLOUD,
                         rest={"listen": "127.0.0.1:0"}).start()
    try:
        with start_agent(workdir / "edge", edge_model, cloud.port, rest={"listen": "127.0.0.1:0"},
                         cloud={"model": CLOUD, "max_per_s": 100000}) as agent:
            yield {"agent": Client(agent.port), "gateway": Client(cloud.port),
                   "agent_rest": agent.rest_port, "gateway_rest": cloud.gateway.rest_port}
    finally:
        cloud.stop()


@pytest.fixture
def records():
    handler = _Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler.records
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.parametrize("target", ["agent", "gateway"])
def test_fuzzed_requests_over_grpc_are_answered_or_refused_as_client_mistakes(servers, records, target):
    client = servers[target]
    model, other = (EDGE, CLOUD) if target == "agent" else (CLOUD, EDGE)
    seen: dict[str, int] = {}

    @settings(FUZZ, max_examples=150)
    @given(infer_requests(model, ("image",), OUTPUTS, (other,)))
    def burst(msg):
        try:
            client.stub.ModelInfer(msg, timeout=30)
            seen["OK"] = seen.get("OK", 0) + 1
        except grpc.RpcError as e:
            seen[e.code().name] = seen.get(e.code().name, 0) + 1
            assert e.code() in CLIENT_MISTAKES, (e.code(), e.details(), msg)

    burst()
    assert seen.get("INVALID_ARGUMENT") and seen.get("NOT_FOUND"), seen
    # whether the derandomized burst drew a valid request depends on the strategies' draw: a plain one
    # after it shows the server still answers
    rows = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    assert client.infer(model, {"image": rows}).outputs, "no answer after the burst"
    loud = [r for r in records if r.levelno > logging.INFO or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


def _rest_body(msg) -> tuple[bytes, int]:
    """The same request as a REST body: raw contents as binary data, typed contents as JSON data."""
    inputs, chunks = [], []
    for i, tensor in enumerate(msg.inputs):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if i < len(msg.raw_input_contents):
            entry["parameters"] = {"binary_data_size": len(msg.raw_input_contents[i])}
            chunks.append(msg.raw_input_contents[i])
        else:
            values = next((list(v) for _, v in tensor.contents.ListFields()), [])
            entry["data"] = [v.decode("latin-1") if isinstance(v, bytes) else v for v in values]
        inputs.append(entry)
    chunks += msg.raw_input_contents[len(msg.inputs):]
    head = json.dumps({"id": msg.id, "inputs": inputs, "parameters": params_from_pb(msg.parameters),
                       "outputs": [{"name": o.name, "parameters": params_from_pb(o.parameters)}
                                   for o in msg.outputs]}).encode()
    return head + b"".join(chunks), len(head)


@pytest.mark.parametrize("target", ["agent", "gateway"])
def test_fuzzed_requests_over_rest_are_answered_or_refused_as_client_mistakes(servers, records, target):
    port = servers[f"{target}_rest"]
    model, other = (EDGE, CLOUD) if target == "agent" else (CLOUD, EDGE)
    seen: dict[int, int] = {}

    @settings(FUZZ, max_examples=100)
    @given(infer_requests(model, ("image",), OUTPUTS, (other,)))
    def burst(msg):
        body, length = _rest_body(msg)
        name = urllib.parse.quote(msg.model_name, safe="")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{name}/infer", data=body,
                                         headers={"Inference-Header-Content-Length": str(length)})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status = answer.status
        except urllib.error.HTTPError as e:
            status = e.code
            assert status in (400, 404), (status, e.read(), msg)
        seen[status] = seen.get(status, 0) + 1

    burst()
    assert seen.get(400) and seen.get(404), seen
    loud = [r for r in records if r.levelno > logging.INFO or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


@pytest.mark.parametrize("target", ["agent", "gateway"])
def test_bytes_that_are_no_message_are_refused_as_invalid_argument(servers, records, target):
    """Undecodable bytes (a string field that is not UTF-8, a truncated varint…) are the client's
    mistake: INVALID_ARGUMENT from every method, never INTERNAL, and nothing logged loudly."""
    channel = servers[target].channel
    calls = [channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
             for method in ("ModelInfer", "ModelMetadata", "ModelReady")]

    @settings(FUZZ, max_examples=60)
    @given(st.binary(min_size=1, max_size=64))
    def burst(garbage):
        for call in calls:
            try:
                call(garbage, timeout=10)
            except grpc.RpcError as e:
                assert e.code() in CLIENT_MISTAKES, (e.code(), e.details(), garbage)

    burst()
    with pytest.raises(grpc.RpcError) as refused:
        calls[0](b"\x0a\x02\xff\xfe", timeout=10)  # model_name: two bytes that are not UTF-8
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in refused.value.details()
    loud = [r for r in records if r.levelno > logging.INFO or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
