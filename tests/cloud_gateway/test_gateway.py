"""The cloud gateway over real gRPC on loopback: repository layout and versions, answers equal to ONNX
Runtime's, bad input named, batching across callers, escalated rows kept once, tritonclient."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from cloud_gateway import Gateway, gateway_config
from cloud_gateway.hard_examples import HardExampleStore
from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.client import KServeClient
from edgecloud.protocol.codec import InferRequest, RequestedOutput, decode_response, encode_request
from edgecloud.protocol.parameters import AgentRequest, AgentResponse, CloudRequest, EdgeSummary
from tests.support.fleet import Scrape
from tests.support.onnx_models import linear_classifier
from tests.support.services import start_agent
from tests.support.triton import run_triton

LABELS = ["ok", "scratch", "spot", "crack"]
MAX_MESSAGE = 64 * 1024


def ort_logits(path, x: np.ndarray) -> np.ndarray:
    """The model's answer from ONNX Runtime itself, no gateway involved."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def repo(tmp_path):
    """clf versions 1 and 2 (with labels and a long batching window), an edge release that must not
    be served, and a directory without versions."""
    root = tmp_path / "repo"
    v1 = linear_classifier(root / "clf" / "1" / "model.onnx", seed=1)
    v2 = linear_classifier(root / "clf" / "2" / "model.onnx", seed=2)
    (root / "clf" / "config.toml").write_text(f"labels = {json.dumps(LABELS)}\nmax_queue_delay_us = 100000\n")
    linear_classifier(root / ".releases" / "clf" / "9" / "model.onnx", seed=9)
    (root / "notes" / "draft").mkdir(parents=True)
    return root, v1, v2


@pytest.fixture
def gateway(tmp_path, repo):
    config = gateway_config(repo[0], listen="127.0.0.1:0", store=tmp_path / "hard.db",
                            gateway={"max_message_bytes": MAX_MESSAGE})
    with Gateway(config) as gw:
        yield gw


@pytest.fixture
def client(gateway):
    with KServeClient(f"127.0.0.1:{gateway.port}") as c:
        yield c


@pytest.fixture
def x():
    return np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)


def summary(rows, reason="low_confidence"):
    return EdgeSummary(rows=rows, prediction=[r % 4 for r in rows], confidence=[0.1 + r / 100 for r in rows],
                       reason=reason).to_json()


def test_latest_version_by_default_and_each_version_on_request(client, repo, x):
    _, v1, v2 = repo
    latest = client.infer("clf", {"x": x})
    assert latest.model_version == "2"
    np.testing.assert_allclose(latest.outputs["logits"], ort_logits(v2, x), rtol=1e-5, atol=1e-6)
    first = client.infer("clf", {"x": x}, version="1")
    assert first.model_version == "1"
    np.testing.assert_allclose(first.outputs["logits"], ort_logits(v1, x), rtol=1e-5, atol=1e-6)


def test_metadata_readiness_and_health(gateway, client):
    meta = client.metadata("clf")
    assert meta.versions == ("1", "2") and meta.platform == "onnxruntime_onnx"
    assert [(s.name, s.datatype, s.shape) for s in meta.inputs] == [("x", "FP32", (-1, 8))]
    assert [(s.name, s.datatype, s.shape) for s in meta.outputs] == [("logits", "FP32", (-1, 4))]
    assert gateway.repository.names == ("clf",)  # .releases and a directory without versions: not served
    stub = client.stub
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="clf", version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="clf", version="9")).ready
    assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "edgecloud-cloud-gateway"
    assert client.serving()


def raw_request(datatype: str = "FP32", raw: bytes | None = None) -> pb.ModelInferRequest:
    """A hand-made request for clf, to send what no well-behaved client would."""
    msg = encode_request(InferRequest("clf", {"x": np.zeros((2, 8), dtype=np.float32)}))
    msg.inputs[0].datatype = datatype
    if raw is not None:
        msg.raw_input_contents[0] = raw
    return msg


def call(client: KServeClient, model: str, inputs: dict, version: str = "", outputs=(), params=None):
    try:
        client.infer(model, inputs, outputs=outputs, version=version, params=params)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_bad_requests_are_refused_naming_the_problem_and_serving_goes_on(client, repo, x):
    cases = {
        "wrong name": (("clf", {"y": x}), grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'y'"),
        "wrong dtype": (("clf", {"x": x.astype(np.float64)}), grpc.StatusCode.INVALID_ARGUMENT,
                        "input 'x': datatype FP64, expected FP32"),
        "wrong shape": (("clf", {"x": x[:, :7]}), grpc.StatusCode.INVALID_ARGUMENT,
                        "shape [5, 7], expected [-1, 8]"),
        "unknown model": (("nope", {"x": x}), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        "unknown version": (("clf", {"x": x}, "7"), grpc.StatusCode.NOT_FOUND, "no version '7'"),
        "unknown output": (("clf", {"x": x}, "", ("probs",)), grpc.StatusCode.INVALID_ARGUMENT,
                           "no output 'probs'"),
        "oversized": (("clf", {"x": np.zeros((4096, 8), np.float32)}), grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "larger than max"),
        "bad summary": (("clf", {"x": x}, "", (), {CloudRequest.EDGE_SUMMARY: summary([0, 1])}),
                        grpc.StatusCode.INVALID_ARGUMENT, "names 2 rows, the request carries 5"),
    }
    for what, (args, code, message) in cases.items():
        got_code, details = call(client, *args)
        assert (got_code, what) == (code, what), details
        assert message in details, (what, details)
    for what, msg, message in [
        ("raw byte length", raw_request(raw=b"\0" * 60), "60 bytes of raw data"),
        ("datatype name", raw_request(datatype="FLOAT"), "unknown datatype 'FLOAT'"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            client.stub.ModelInfer(msg)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details(), what
    np.testing.assert_allclose(client.infer("clf", {"x": x}).outputs["logits"], ort_logits(repo[2], x),
                               rtol=1e-5, atol=1e-6)


def test_requested_outputs_with_the_classification_extension(client, repo, x):
    assert list(client.infer("clf", {"x": x}, outputs=("logits",)).outputs) == ["logits"]
    msg = encode_request(InferRequest("clf", {"x": x},
                                      outputs=(RequestedOutput("logits", {"classification": 2}),)))
    top2 = decode_response(client.stub.ModelInfer(msg)).outputs["logits"]
    expected = ort_logits(repo[2], x)
    assert top2.shape == (5, 2)
    for row, scores in zip(top2, expected):
        score, index, label = row[0].decode().split(":")
        assert int(index) == int(scores.argmax()) and label == LABELS[int(index)]
        assert float(score) == pytest.approx(float(scores.max()), abs=1e-5)


def test_concurrent_callers_share_batches_and_get_their_own_rows(gateway, client, repo):
    callers = 16
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((1 + c % 3, 8)).astype(np.float32) for c in range(callers)]
    start = threading.Barrier(callers)

    def one(x):
        start.wait()
        return client.infer("clf", {"x": x}).outputs["logits"]

    with ThreadPoolExecutor(callers) as pool:
        answers = list(pool.map(one, inputs))
    for x, logits in zip(inputs, answers):
        np.testing.assert_allclose(logits, ort_logits(repo[2], x), rtol=1e-5, atol=1e-6)
    stats = gateway.repository.get("clf").batcher.stats()
    assert stats.requests == callers and stats.rows == sum(len(x) for x in inputs)
    assert stats.batches <= callers // 2, f"requests were not merged: {stats}"


def test_escalated_rows_are_stored_once_and_exported(tmp_path, gateway, client, repo, x, caplog):
    caplog.set_level(logging.DEBUG, logger="cloud_gateway")
    escalation = {CloudRequest.REQUEST_ID: "req-1", CloudRequest.DEVICE_ID: "line-4",
                  CloudRequest.EDGE_MODEL_VERSION: "3", CloudRequest.EDGE_SUMMARY: summary([0, 2, 5, 6, 9])}
    client.infer("clf", {"x": x}, params=escalation)
    client.infer("clf", {"x": x}, params={**escalation, CloudRequest.DEFERRED: True})  # a spool replay
    audit = {CloudRequest.REQUEST_ID: "req-2", CloudRequest.DEVICE_ID: "line-5",
             CloudRequest.EDGE_SUMMARY: summary([4], "audit")}
    client.infer("clf", {"x": x[:1]}, params=audit)
    client.infer("clf", {"x": x}, request_id="plain")  # an ordinary call: not a hard example

    lines = [r for r in caplog.records if "event=escalation" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.INFO] * 3
    assert "request_id=req-1 device=line-4 model=clf version=2 rows=5 stored=5 reason=low_confidence " \
           "deferred=False" in lines[0].getMessage()
    assert "stored=0" in lines[1].getMessage() and "deferred=True" in lines[1].getMessage()
    plain = [r for r in caplog.records if "request_id=plain" in r.getMessage()]
    assert [r.levelno for r in plain] == [logging.DEBUG]

    out = tmp_path / "train.npz"
    with HardExampleStore(gateway.config.store.path) as store:
        assert store.export(out) == 6
    data = np.load(out)
    keys = list(zip(data["request_id"], data["row"]))
    assert keys == [("req-1", r) for r in (0, 2, 5, 6, 9)] + [("req-2", 4)]
    sent = np.concatenate([x, x[:1]])
    np.testing.assert_array_equal(data["x"], sent)
    cloud = ort_logits(repo[2], sent)
    np.testing.assert_allclose(data["cloud.logits"], cloud, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(data["cloud_prediction"], cloud.argmax(axis=1))
    assert data["edge_prediction"].tolist() == [0, 2, 1, 2, 1, 0]
    assert data["device"].tolist() == ["line-4"] * 5 + ["line-5"]
    assert data["reason"].tolist() == ["low_confidence"] * 5 + ["audit"]
    assert data["deferred"].tolist() == [False] * 6 and data["cloud_model_version"].tolist() == ["2"] * 6


def test_an_edge_agent_escalating_to_the_gateway(tmp_path, gateway, repo, x):
    edge = linear_classifier(tmp_path / "edge.onnx", seed=5, card={"name": "clf", "version": 4})
    with start_agent(tmp_path / "agent", edge, gateway.port, agent={"device_id": "press-3"}) as agent, \
            KServeClient(f"127.0.0.1:{agent.port}") as c:
        reply = c.infer("clf", {"x": x}, params={AgentRequest.ESCALATE: "always"}, request_id="case-9")
    np.testing.assert_allclose(reply.outputs["logits"], ort_logits(repo[2], x), rtol=1e-4, atol=1e-5)
    assert reply.parameters[AgentResponse.SOURCE] == "cloud"
    stored = list(gateway.store.examples())
    assert [(e.request_id, e.row, e.device, e.edge_model_version, e.reason) for e in stored] == [
        ("case-9", r, "press-3", "4", "forced") for r in range(5)]
    np.testing.assert_array_equal(np.stack([e.edge_prediction for e in stored]),
                                  ort_logits(edge, x).argmax(axis=1))


def test_devices_numbering_alike_and_a_reused_request_id_keep_every_row(tmp_path):
    """Two devices whose apps both number their frames frame-0..49, then an app that sends 50 images
    under one id: 100 rows and 50 rows stored, the reuse counted on /metrics."""
    linear_classifier(tmp_path / "cloud" / "clf" / "1" / "model.onnx", seed=1)
    config = gateway_config(tmp_path / "cloud", listen="127.0.0.1:0", store=tmp_path / "hard.db",
                            metrics={"listen": "127.0.0.1:0"})
    edge = linear_classifier(tmp_path / "edge.onnx", seed=5, card={"name": "clf", "version": 4})
    images = np.random.default_rng(7).standard_normal((3, 50, 1, 8)).astype(np.float32)
    always = {AgentRequest.ESCALATE: "always"}
    with Gateway(config) as gw:
        for index, device in enumerate(("press-1", "press-2")):
            with start_agent(tmp_path / device, edge, gw.port, agent={"device_id": device},
                             cloud={"deadline_ms": 5000}) as agent, \
                    KServeClient(f"127.0.0.1:{agent.port}") as c:
                for i in range(50):
                    assert c.infer("clf", {"x": images[index, i]}, params=always,
                                   request_id=f"frame-{i}").parameters[AgentResponse.SOURCE] == "cloud"
                if device == "press-2":
                    for image in images[2]:
                        c.infer("clf", {"x": image}, params=always, request_id="frame")
        stored = list(gw.store.examples())
        reused = Scrape(gw.metrics.port).value("edgecloud_gateway_reused_request_ids_total")
    by_device = Counter((e.device, e.request_id == "frame") for e in stored)
    assert by_device == {("press-1", False): 50, ("press-2", False): 50, ("press-2", True): 50}
    assert reused == 49
    frames = [e.inputs["x"] for e in stored if e.request_id == "frame"]
    np.testing.assert_array_equal(np.stack(frames), images[2][:, 0])


def test_added_latency_delays_answers(tmp_path, repo, x):
    config = gateway_config(repo[0], listen="127.0.0.1:0", gateway={"added_latency_ms": 150})
    with Gateway(config) as gw, KServeClient(f"127.0.0.1:{gw.port}") as c:
        c.infer("clf", {"x": x})
        started = time.perf_counter()
        c.infer("clf", {"x": x})
        assert time.perf_counter() - started >= 0.15


TRITON_SCRIPT = """
x = np.array(ARGS["x"], dtype=np.float32)
inp = grpcclient.InferInput("x", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
meta = client.get_model_metadata("clf", as_json=True)
result = client.infer("clf", [inp], model_version="1")
try:
    client.infer("nope", [inp])
    missing = None
except InferenceServerException as e:
    missing = [e.status(), e.message()]
emit({"live": client.is_server_live(), "ready": client.is_server_ready(),
      "model_ready": client.is_model_ready("clf"), "meta": meta,
      "logits": result.as_numpy("logits").tolist(), "version": result.get_response().model_version,
      "missing": missing})
"""


def test_tritonclient_against_the_gateway(gateway, repo, x):
    got = run_triton(TRITON_SCRIPT, url=f"127.0.0.1:{gateway.port}", x=x.tolist())
    assert got["live"] and got["ready"] and got["model_ready"]
    assert got["meta"]["versions"] == ["1", "2"]
    assert got["meta"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "8"]}]
    assert got["version"] == "1"
    np.testing.assert_allclose(np.array(got["logits"]), ort_logits(repo[1], x), rtol=1e-5, atol=1e-6)
    assert got["missing"][0] == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in got["missing"][1]


def test_tritonclient_streaming_index_statistics_and_config_at_the_gateway(gateway, repo, x):
    got = run_triton("""
        import queue
        x = np.array(ARGS["x"], dtype=np.float32)
        def tensor(name):
            inp = grpcclient.InferInput(name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return inp
        answers = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("clf", [tensor("x")], model_version="1")
        client.async_stream_infer("nope", [tensor("x")])
        client.async_stream_infer("clf", [tensor("x")])
        streamed = []
        for _ in range(3):
            result, error = answers.get(timeout=20)
            streamed.append([str(error) if error else None,
                             None if result is None else result.get_response().model_version])
        client.stop_stream()
        emit({"streamed": streamed, "index": client.get_model_repository_index(as_json=True)["models"],
              "stats": client.get_inference_statistics("clf", as_json=True)["model_stats"],
              "config": client.get_model_config("clf", "1", as_json=True)["config"]})
    """, url=f"127.0.0.1:{gateway.port}", x=x.tolist())
    assert got["streamed"][0] == [None, "1"] and got["streamed"][2] == [None, "2"]
    assert "NOT_FOUND" in got["streamed"][1][0] and "'nope'" in got["streamed"][1][0]
    assert got["index"] == [{"name": "clf", "version": v, "state": "READY"} for v in ("1", "2")]
    stats = {s["version"]: s for s in got["stats"]}
    assert int(stats["1"]["inference_count"]) == 5 and int(stats["2"]["inference_count"]) == 5
    assert got["config"]["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "8"]}]
