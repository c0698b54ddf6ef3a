"""The agent's KServe v2 REST, driven by a stock ``tritonclient.http`` in its own process: the same
answers, parameters, refusals and admission gate as over gRPC."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

from edgecloud.errors import ConfigError
from edgecloud.protocol.parameters import AgentRequest, AgentResponse
from tests.support.onnx_models import linear_classifier, reference_logits
from tests.support.services import start_agent
from tests.support.triton import run_triton

LABELS = ["ok", "scratch", "spot", "crack"]


@pytest.fixture
def agent(tmp_path):
    model = linear_classifier(tmp_path / "edge.onnx", card={"name": "clf", "version": 7, "labels": LABELS})
    agent = start_agent(tmp_path / "state", model, rest={"listen": "127.0.0.1:0"})
    yield agent, model
    agent.stop()


def test_tritonclient_http_health_metadata_and_infer_binary_and_json(agent):
    running, model = agent
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    result = run_triton("""
        x = np.array(ARGS["x"], dtype=np.float32)
        def infer(binary, outputs=None, **kw):
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            return client.infer("clf", [inp], outputs=outputs, **kw)
        binary = infer(True)
        plain = infer(False, outputs=[httpclient.InferRequestedOutput("logits", binary_data=False),
                                      httpclient.InferRequestedOutput("edgecloud.source", binary_data=False)],
                      parameters={"edgecloud.escalate": "never", "edgecloud.threshold": 0.9})
        top = infer(True, outputs=[httpclient.InferRequestedOutput("logits", class_count=2)])
        emit({"live": client.is_server_live(), "ready": client.is_server_ready(),
              "model_ready": client.is_model_ready("clf"), "missing_ready": client.is_model_ready("nope"),
              "meta": client.get_model_metadata("clf"), "server": client.get_server_metadata(),
              "binary": binary.as_numpy("logits").tolist(), "params": binary.get_response()["parameters"],
              "plain": plain.as_numpy("logits").tolist(), "plain_response": plain.get_response(),
              "sources": plain.as_numpy("edgecloud.source").tolist(),  # JSON: strings
              "top": [[v.decode() for v in row] for row in top.as_numpy("logits")],
              "config": client.get_model_config("clf"),
              "index": client.get_model_repository_index(),
              "stats": client.get_inference_statistics("clf")["model_stats"]})
    """, http=True, url=f"127.0.0.1:{running.rest_port}", x=x.tolist())
    assert result["live"] and result["ready"] and result["model_ready"] and not result["missing_ready"]
    assert result["meta"]["versions"] == ["7"]
    assert [o["name"] for o in result["meta"]["outputs"]] == ["logits", AgentResponse.CONFIDENCE,
                                                              AgentResponse.SOURCE]
    assert result["server"]["name"] == "edgecloud-edge-agent"
    expected = reference_logits(model, x)
    np.testing.assert_allclose(result["binary"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result["plain"], expected, rtol=1e-5, atol=1e-5)
    params = result["params"]
    assert params[AgentResponse.SOURCE] == "edge" and params[AgentResponse.ESCALATED] is False
    assert params[AgentResponse.MODEL_VERSION] == "7"
    assert params[AgentResponse.LABEL] == LABELS[int(np.argmax(expected[0]))]
    assert 0.0 < params[AgentResponse.CONFIDENCE] <= 1.0
    assert result["sources"] == ["edge"] * 5
    assert all("data" in o for o in result["plain_response"]["outputs"])  # JSON, as asked
    best = np.argsort(-expected, axis=1)[:, :2]
    assert [[int(e.split(":")[1]) for e in row] for row in result["top"]] == best.tolist()
    assert result["config"]["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 8]}]
    assert result["index"] == [{"name": "clf", "version": "7", "state": "READY"}]
    (stats,) = result["stats"]
    assert stats["inference_count"] == 15 and stats["execution_count"] == 3


def test_tritonclient_http_refusals_name_the_problem_with_the_grpc_status_mapped(agent):
    running, _ = agent
    result = run_triton("""
        def call(name, dtype, shape, model="clf", parameters=None):
            inp = httpclient.InferInput(name, list(shape), {np.float32: "FP32", np.int32: "INT32"}[dtype])
            inp.set_data_from_numpy(np.zeros(shape, dtype=dtype))
            try:
                client.infer(model, [inp], parameters=parameters)
                return "ok"
            except InferenceServerException as e:
                return f"{e.status()}|{e.message()}"
        emit({"name": call("y", np.float32, (1, 8)), "dtype": call("x", np.int32, (1, 8)),
              "model": call("x", np.float32, (1, 8), "nope"),
              "param": call("x", np.float32, (1, 8), parameters={"edgecloud.escalate": "sometimes"}),
              "after": call("x", np.float32, (2, 8))})
    """, http=True, url=f"127.0.0.1:{running.rest_port}")
    assert result["name"].startswith("400|") and "'y'" in result["name"]
    assert result["dtype"].startswith("400|") and "INT32" in result["dtype"]
    assert result["model"].startswith("404|") and "'nope'" in result["model"]
    assert result["param"].startswith("400|") and AgentRequest.ESCALATE in result["param"]
    assert result["after"] == "ok"


def _post(port: int, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_rest_shares_the_grpc_admission_gate_and_answers_429_beyond_it(tmp_path):
    model = linear_classifier(tmp_path / "edge.onnx", card={"name": "clf", "version": 1})
    with start_agent(tmp_path / "state", model, rest={"listen": "127.0.0.1:0"},
                     admission={"max_in_flight": 1, "max_queue": 0}) as agent:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}]}
        assert _post(agent.rest_port, "/v2/models/clf/infer", body)[0] == 200
        with agent.server.admission.admitted():  # the one slot, as a gRPC call in flight holds it
            status, answer = _post(agent.rest_port, "/v2/models/clf/infer", body)
        assert status == 429 and "agent busy" in answer["error"]
        assert agent.server.admission.figures().shed == 1
        bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [1.0] * 7}]}
        status, answer = _post(agent.rest_port, "/v2/models/clf/infer", bad)
        assert status == 400 and "7 values" in answer["error"]


def test_rest_off_loopback_without_tls_is_refused(tmp_path):
    model = linear_classifier(tmp_path / "edge.onnx")
    with pytest.raises(ConfigError, match=r"rest.listen .*plaintext HTTP"):
        start_agent(tmp_path / "state", model, rest={"listen": "0.0.0.0:0"})


def test_repository_index_takes_ready_and_a_body_that_is_not_json_is_400(agent):
    running, _ = agent
    assert _post(running.rest_port, "/v2/repository/index", {"ready": True}) == (
        200, [{"name": "clf", "version": "7", "state": "READY"}])
    request = urllib.request.Request(f"http://127.0.0.1:{running.rest_port}/v2/repository/index",
                                     data=b"{not json")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400 and "not JSON" in json.loads(err.value.read())["error"]


def test_a_rest_port_in_use_is_a_config_error_and_frees_the_grpc_port(tmp_path):
    model = linear_classifier(tmp_path / "edge.onnx")
    with socket.socket() as taken, socket.socket() as probe:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        with pytest.raises(ConfigError, match=r"rest.listen 127.0.0.1:\d+: cannot bind"):
            start_agent(tmp_path / "state", model, agent={"listen": f"127.0.0.1:{port}"},
                        rest={"listen": f"127.0.0.1:{taken.getsockname()[1]}"})
    with start_agent(tmp_path / "again", model, agent={"listen": f"127.0.0.1:{port}"}) as agent:
        assert agent.port == port
