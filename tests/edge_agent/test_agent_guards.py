"""Input guards and bounded decoding on a real agent over gRPC: NaN frames refused, saturated frames
escalated, a BYTES bomb refused unparsed, and every client mistake an INVALID_ARGUMENT or NOT_FOUND
logged in one INFO line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
from onnx import TensorProto

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.protocol import codec
from edgecloud.protocol.codec import InferRequest, RequestedOutput, encode_request
from edgecloud.protocol.parameters import AgentResponse
from edgecloud_tools.toolchain.dataset import make_split
from tests.conftest import ROOT
from tests.support.onnx_models import linear_classifier
from tests.support.services import Client, GatewayCloud, start_agent
from tests.support.triton import run_triton

MODEL = "inspection-edge"


@pytest.fixture(scope="module")
def agent(tmp_path_factory, edge_model):
    with start_agent(tmp_path_factory.mktemp("guards"), edge_model) as running:
        yield running


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return make_split("test", 8)[0]


def _refusal(agent, msg: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        Client(agent.port).stub.ModelInfer(msg, timeout=30)
    return e.value.code(), e.value.details()


def test_a_nan_frame_from_tritonclient_is_invalid_argument_naming_tensor_and_row(agent, frames):
    result = run_triton("""
        def call(x):
            inp = grpcclient.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            try:
                res = client.infer(ARGS["model"], [inp])
                return "ok " + res.get_response().parameters["edgecloud.label"].string_param
            except InferenceServerException as e:
                return f"{e.status()}|{e.message()}"
        patch = np.array(ARGS["frames"], dtype=np.float32)
        one_nan = patch.copy()
        one_nan[2, 0, 3, 4] = np.nan
        emit({"nan": call(one_nan), "inf": call(np.full_like(patch, np.inf)), "clean": call(patch)})
    """, url=f"127.0.0.1:{agent.port}", model=MODEL, frames=frames[:3].round(4).tolist())
    assert result["nan"] == ("StatusCode.INVALID_ARGUMENT|model 'inspection-edge' input 'image': row 2 holds "
                             "nan at [2, 0, 3, 4]; NaN and ±Inf are refused unless the model card or the "
                             "config allows them (allow_nonfinite)")
    assert result["inf"].startswith("StatusCode.INVALID_ARGUMENT|model 'inspection-edge' input 'image': "
                                    "row 0 holds inf at [0, 0, 0, 0]")
    assert result["clean"].startswith("ok ")


def test_the_config_may_allow_non_finite_values(tmp_path, edge_model, frames):
    x = frames[:1].copy()
    x[0, 0, 0, 0] = np.nan
    with start_agent(tmp_path, edge_model, model={"allow_nonfinite": True}) as running:
        r = Client(running.port).infer(MODEL, {"image": x}, outputs=(AgentResponse.CONFIDENCE,))
    # the card's range still holds: NaN is outside [0, 1], so the row is never confident
    assert r.outputs[AgentResponse.CONFIDENCE].tolist() == [0.0]


def test_a_frame_outside_the_cards_range_escalates_with_confidence_zero(tmp_path, edge_model,
                                                                        cloud_repository, frames):
    cloud = GatewayCloud(tmp_path / "cloud", cloud_repository / "inspection" / "1" / "model.onnx",
                         "inspection").start()
    try:
        with start_agent(tmp_path / "edge", edge_model, cloud.port,
                         cloud={"model": "inspection", "max_per_s": 100000}) as running:
            client = Client(running.port)
            seen = client.infer(MODEL, {"image": frames}, outputs=(AgentResponse.CONFIDENCE,),
                                escalate="never")
            best = int(np.argmax(seen.outputs[AgentResponse.CONFIDENCE]))
            clean = frames[best:best + 1]
            saturated = clean.copy()
            saturated[0, 0, 10:12, 10:12] = 1.5  # a stuck, saturated sensor: finite, but out of range
            edge = client.infer(MODEL, {"image": clean})
            assert edge.parameters[AgentResponse.SOURCE] == "edge"
            assert edge.parameters[AgentResponse.CONFIDENCE] >= running.primary.slot.model.settings.threshold
            r = client.infer(MODEL, {"image": saturated}, outputs=("logits", AgentResponse.CONFIDENCE,
                                                                   AgentResponse.SOURCE))
    finally:
        cloud.stop()
    assert r.parameters[AgentResponse.CONFIDENCE] == 0.0
    assert r.parameters[AgentResponse.ESCALATED] is True and r.parameters[AgentResponse.SOURCE] == "cloud"
    assert r.outputs[AgentResponse.SOURCE].tolist() == [b"cloud"]
    assert [e.edge_confidence for e in cloud.stored()] == [0.0]


def test_a_bytes_bomb_to_a_missing_model_is_not_found_without_parsing(agent, monkeypatch):
    parsed = []
    real = codec._bytes_elements

    def spy(raw, count, name):
        parsed.append(count)
        return real(raw, count, name)

    monkeypatch.setattr(codec, "_bytes_elements", spy)
    count = 16_000_000 // 6  # 16 MB of 2-byte elements, each with its 4-byte prefix
    bomb = pb.ModelInferRequest(model_name="nope")
    bomb.inputs.add(name="image", datatype="BYTES", shape=[count])
    bomb.raw_input_contents.append(b"\x02\x00\x00\x00ab" * count)
    assert _refusal(agent, bomb) == (grpc.StatusCode.NOT_FOUND,
                                     "unknown model 'nope'; this agent serves 'inspection-edge'")
    bomb.model_name = MODEL
    code, details = _refusal(agent, bomb)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "datatype BYTES, expected FP32" in details
    assert parsed == []


def _image(shape, raw: bytes = b"", model: str = MODEL) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=model)
    msg.inputs.add(name="image", datatype="FP32", shape=shape)
    msg.raw_input_contents.append(raw)
    return msg


def test_client_mistakes_are_invalid_argument_logged_at_info_without_traceback(agent, frames, caplog):
    classify = encode_request(InferRequest(MODEL, {"image": frames[:1]},
                                           outputs=(RequestedOutput("logits", {"classification": "2"}),)))
    cases = {
        "zero rows": (_image([0, 1, 32, 32]), "the request holds no rows"),
        "dims overflowing int64": (_image([2**62, 1, 32, 32]),
                                   "4611686018427387904 rows in one request, at most 1024"),
        "over the row cap": (_image([1025, 1, 32, 32], bytes(1025 * 4096)),
                             "1025 rows in one request, at most 1024"),
        "negative dim": (_image([-1, 1, 32, 32]), "has a negative dimension"),
        "classification as a string": (classify, "parameter 'classification' must be a whole number"),
    }
    with caplog.at_level(logging.INFO, logger="edgecloud"):
        for what, (msg, message) in cases.items():
            code, details = _refusal(agent, msg)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, details)
            assert message in details, (what, details)
    refused = [r for r in caplog.records if "event=call_refused" in r.getMessage()]
    assert len(refused) == len(cases)
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in refused)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert Client(agent.port).infer(MODEL, {"image": frames}).outputs["logits"].shape == (8, 4)


def test_int8_typed_contents_out_of_range_are_invalid_argument(tmp_path):
    model = linear_classifier(tmp_path / "int8.onnx", input_type=TensorProto.INT8)
    with start_agent(tmp_path / "state", model) as running:
        msg = pb.ModelInferRequest(model_name="int8")
        tensor = msg.inputs.add(name="x", datatype="INT8", shape=[1, 8])
        tensor.contents.int_contents.extend([1, 2, 3, 1000, 5, 6, 7, 8])
        code, details = _refusal(running, msg)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "contents.int_contents holds values outside the range of INT8 [-128, 127]" in details
        del tensor.contents.int_contents[3]
        tensor.contents.int_contents.insert(3, -4)
        reply = Client(running.port).stub.ModelInfer(msg, timeout=10)
        assert reply.outputs[0].shape == [1, 4]


MEMORY_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from tests.support.services import Client, start_agent

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

with tempfile.TemporaryDirectory() as state:
    with start_agent(Path(state), Path(sys.argv[2]), model={"max_batch_rows": 4000}) as agent:
        client = Client(agent.port)
        small = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
        for _ in range(20):
            client.infer("inspection-edge", {"image": small})
        before = rss_mb()
        big = np.random.default_rng(1).random((4000, 1, 32, 32), dtype=np.float32)
        for _ in range(6):
            client.infer("inspection-edge", {"image": big}, timeout=120)
        del big
        for _ in range(20):
            client.infer("inspection-edge", {"image": small})
        print(json.dumps({"before": before, "after": rss_mb()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_comes_back_after_big_batches(edge_model):
    """Six batch-4000 calls took a default agent from 108 to 578 MB for good (ONNX Runtime's arena and
    glibc's sliding mmap threshold); now it ends close to where it started."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT), str(ROOT), str(edge_model)],
                          capture_output=True, text=True, timeout=300, check=True)
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rss["after"] - rss["before"] < 150, rss
