"""The agent speaks KServe v2 to a stock tritonclient in its own process, as a local app would."""

from __future__ import annotations

import numpy as np
import pytest

from edgecloud.protocol.parameters import AgentResponse
from tests.support.onnx_models import linear_classifier, reference_logits
from tests.support.services import start_agent
from tests.support.triton import run_triton

LABELS = ["ok", "scratch", "spot", "crack"]


@pytest.fixture
def agent(tmp_path):
    model = linear_classifier(tmp_path / "edge.onnx", card={"name": "clf", "version": 7, "labels": LABELS})
    agent = start_agent(tmp_path / "state", model)
    yield agent, model
    agent.stop()


def test_tritonclient_health_metadata_and_infer(agent):
    running, model = agent
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    result = run_triton("""
        x = np.array(ARGS["x"], dtype=np.float32)
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        meta = client.get_model_metadata("clf", as_json=True)
        res = client.infer("clf", [inp])
        resp = res.get_response(as_json=True)
        emit({"live": client.is_server_live(), "ready": client.is_server_ready(),
              "model_ready": client.is_model_ready("clf"), "meta": meta,
              "logits": res.as_numpy("logits").tolist(), "params": resp["parameters"],
              "version": resp["model_version"]})
    """, url=f"127.0.0.1:{running.port}", x=x.tolist())
    assert result["live"] and result["ready"] and result["model_ready"]
    meta = result["meta"]
    assert meta["name"] == "clf" and meta["versions"] == ["7"]
    assert [i["name"] for i in meta["inputs"]] == ["x"]
    assert [o["name"] for o in meta["outputs"]] == ["logits", AgentResponse.CONFIDENCE, AgentResponse.SOURCE]
    np.testing.assert_allclose(result["logits"], reference_logits(model, x), rtol=1e-5, atol=1e-5)
    params = result["params"]
    assert {key: list(value) for key, value in params.items()} == {  # each travels as its declared type
        key: [f"{key.choice}_param"] for key in AgentResponse}
    assert params[AgentResponse.SOURCE] == {"string_param": "edge"}
    assert params[AgentResponse.ESCALATED] == {"bool_param": False}
    assert params[AgentResponse.DEGRADED] == {"bool_param": False}
    assert params[AgentResponse.MODEL_VERSION] == {"string_param": "7"}
    assert int(params[AgentResponse.ESCALATED_ROWS]["int64_param"]) == 0
    top = int(np.argmax(reference_logits(model, x)[0]))
    assert params[AgentResponse.LABEL] == {"string_param": LABELS[top]}
    assert 0.0 < params[AgentResponse.CONFIDENCE]["double_param"] <= 1.0
    assert result["version"] == "7"


def test_tritonclient_classification_extension(agent):
    running, model = agent
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    result = run_triton("""
        x = np.array(ARGS["x"], dtype=np.float32)
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("clf", [inp], outputs=[grpcclient.InferRequestedOutput("logits", class_count=2)])
        emit({"top": [[v.decode() for v in row] for row in res.as_numpy("logits")]})
    """, url=f"127.0.0.1:{running.port}", x=x.tolist())
    logits = reference_logits(model, x)
    for row, entries in zip(logits, result["top"]):
        best = np.argsort(-row)[:2]
        assert [int(e.split(":")[1]) for e in entries] == best.tolist()
        assert [e.split(":")[2] for e in entries] == [LABELS[i] for i in best]
        np.testing.assert_allclose([float(e.split(":")[0]) for e in entries], row[best], rtol=1e-4)


def test_tritonclient_bad_input_is_invalid_argument_and_server_keeps_serving(agent):
    running, _ = agent
    result = run_triton("""
        def call(name, dtype, shape, model="clf"):
            arr = np.zeros(shape, dtype=dtype)
            inp = grpcclient.InferInput(name, list(shape), {np.float32: "FP32", np.int32: "INT32"}[dtype])
            inp.set_data_from_numpy(arr)
            try:
                client.infer(model, [inp])
                return "ok"
            except InferenceServerException as e:
                return f"{e.status()}|{e.message()}"
        emit({"name": call("y", np.float32, (1, 8)), "dtype": call("x", np.int32, (1, 8)),
              "shape": call("x", np.float32, (1, 9)), "model": call("x", np.float32, (1, 8), "nope"),
              "after": call("x", np.float32, (2, 8))})
    """, url=f"127.0.0.1:{running.port}")
    assert result["name"].startswith("StatusCode.INVALID_ARGUMENT") and "'y'" in result["name"]
    assert result["dtype"].startswith("StatusCode.INVALID_ARGUMENT") and "INT32" in result["dtype"]
    assert result["shape"].startswith("StatusCode.INVALID_ARGUMENT") and "[1, 9]" in result["shape"]
    assert result["model"].startswith("StatusCode.NOT_FOUND") and "'nope'" in result["model"]
    assert result["after"] == "ok"


def test_tritonclient_config_index_statistics_and_streaming(agent):
    running, _ = agent
    x = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    result = run_triton("""
        import queue
        x = np.array(ARGS["x"], dtype=np.float32)
        def tensor(name, value):
            inp = grpcclient.InferInput(name, list(value.shape), "FP32")
            inp.set_data_from_numpy(value)
            return inp
        answers = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("clf", [tensor("x", x)], request_id="a")
        client.async_stream_infer("clf", [tensor("y", x)], request_id="b")
        client.async_stream_infer("clf", [tensor("x", x[:1])], request_id="c")
        streamed = []
        for _ in range(3):
            result, error = answers.get(timeout=20)
            streamed.append({"error": str(error) if error else None,
                             "rows": None if result is None else len(result.as_numpy("logits"))})
        client.stop_stream()
        emit({"streamed": streamed,
              "extensions": client.get_server_metadata(as_json=True)["extensions"],
              "config": client.get_model_config("clf", as_json=True)["config"],
              "index": client.get_model_repository_index(as_json=True)["models"],
              "stats": client.get_inference_statistics("clf", as_json=True)["model_stats"],
              "all_stats": client.get_inference_statistics(as_json=True)["model_stats"]})
    """, url=f"127.0.0.1:{running.port}", x=x.tolist())
    streamed = result["streamed"]
    assert [s["rows"] for s in streamed] == [4, None, 1]  # answered in order; a refusal does not end it
    assert "INVALID_ARGUMENT" in streamed[1]["error"] and "'y'" in streamed[1]["error"]
    assert {"model_configuration", "statistics", "model_repository"} <= set(result["extensions"])
    config = result["config"]
    assert config["name"] == "clf"
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "8"]}]
    assert [o["name"] for o in config["output"]][:1] == ["logits"]
    assert result["index"] == [{"name": "clf", "version": "7", "state": "READY"}]
    (stats,) = result["stats"]
    assert stats["name"] == "clf" and stats["version"] == "7"
    assert int(stats["inference_count"]) == 5 and int(stats["execution_count"]) == 2
    assert int(stats["inference_stats"]["success"]["count"]) == 2
    assert int(stats["inference_stats"]["fail"]["count"]) == 1
    assert [s["name"] for s in result["all_stats"]] == ["clf"]
