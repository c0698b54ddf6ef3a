"""The gateway's KServe v2 REST: a stock ``tritonclient.http`` in its own process, the hard-example
store fed over REST as over gRPC, and the same client authentication (tokens, mutual TLS over HTTPS)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from cloud_gateway import Gateway, gateway_config
from cloud_gateway.auth import token_hash
from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.client import KServeClient
from edgecloud.protocol.codec import InferRequest, encode_request
from edgecloud.protocol.parameters import CloudRequest, EdgeSummary
from edgecloud_tools.certs import issue, make_ca
from tests.support.onnx_models import linear_classifier
from tests.support.triton import run_triton

SERVER_NAME = "gateway.test"


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    linear_classifier(root / "clf" / "1" / "model.onnx", seed=1)
    linear_classifier(root / "clf" / "2" / "model.onnx", seed=2)
    return root


def _body(x: np.ndarray, **params) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "parameters": params}


def _call(url: str, body: dict | None = None, headers: dict | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, dict | None]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            text = answer.read()
            return answer.status, json.loads(text) if text else None
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, json.loads(text) if text else None


def test_tritonclient_http_against_the_gateway_and_escalations_stored(tmp_path, repo):
    config = gateway_config(repo, listen="127.0.0.1:0", store=tmp_path / "hard.db",
                            rest={"listen": "127.0.0.1:0"})
    x = np.random.default_rng(5).standard_normal((2, 8)).astype(np.float32)  # the rows escalated
    summary = EdgeSummary(rows=(0, 2), prediction=(1, 1), confidence=(0.2, 0.3), reason="low_confidence")
    with Gateway(config) as gw:
        got = run_triton("""
            x = np.array(ARGS["x"], dtype=np.float32)
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            v1 = client.infer("clf", [inp], model_version="1")
            latest = client.infer("clf", [inp], request_id="req-9", parameters=ARGS["params"])
            try:
                client.infer("nope", [inp])
                missing = None
            except InferenceServerException as e:
                missing = [e.status(), e.message()]
            emit({"meta": client.get_model_metadata("clf"), "ready": client.is_server_ready(),
                  "v1": v1.as_numpy("logits").tolist(), "latest": latest.get_response()["model_version"],
                  "id": latest.get_response().get("id"), "missing": missing,
                  "stats": client.get_inference_statistics()["model_stats"]})
        """, http=True, url=f"127.0.0.1:{gw.rest_port}", x=x.tolist(),
            params={CloudRequest.REQUEST_ID: "req-9", CloudRequest.DEVICE_ID: "press-3",
                    CloudRequest.EDGE_SUMMARY: summary.to_json()})
        with KServeClient(f"127.0.0.1:{gw.port}") as client:
            over_grpc = client.infer("clf", {"x": x}, version="1").outputs["logits"]
        examples = list(gw.store.examples())
    assert got["ready"] and got["meta"]["versions"] == ["1", "2"]
    np.testing.assert_allclose(got["v1"], over_grpc, rtol=1e-6)
    assert got["latest"] == "2" and got["id"] == "req-9"
    assert got["missing"][0] == "404" and "'nope'" in got["missing"][1]
    assert {s["version"]: s["inference_count"] for s in got["stats"]} == {"1": 2, "2": 2}
    assert sorted((e.request_id, e.row, e.device) for e in examples) == [("req-9", 0, "press-3"),
                                                                        ("req-9", 2, "press-3")]


def test_rest_needs_the_same_token_as_grpc_and_health_needs_none(tmp_path, repo):
    token = "token-of-press-7"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token_hash(token)} press-7\n")
    config = gateway_config(repo, listen="127.0.0.1:0", store=tmp_path / "hard.db",
                            auth={"tokens_file": str(tokens)}, rest={"listen": "127.0.0.1:0"})
    x = np.ones((1, 8), dtype=np.float32)
    summary = EdgeSummary(rows=(0,), reason="audit").to_json()
    with Gateway(config) as gw:
        base = f"http://127.0.0.1:{gw.rest_port}"
        assert _call(base + "/v2/health/ready")[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for path, body in (("/v2/models/clf", None), ("/v2/models/clf/infer", _body(x))):
                status, answer = _call(base + path, body, headers)
                assert status == 401 and "bearer token" in answer["error"]
        status, answer = _call(base + "/v2/models/clf/infer",
                               _body(x, **{CloudRequest.EDGE_SUMMARY: summary, CloudRequest.REQUEST_ID: "r1",
                                           CloudRequest.DEVICE_ID: "someone-else"}),
                               {"Authorization": f"Bearer {token}"})
        assert status == 200 and answer["outputs"][0]["shape"] == [1, 4]
        assert [e.device for e in gw.store.examples()] == ["press-7"]  # the token's, as over gRPC
        with KServeClient(f"127.0.0.1:{gw.port}") as client:  # streaming is guarded as well
            replies = client.stub.ModelStreamInfer(iter([encode_request(InferRequest("clf", {"x": x}))]))
            with pytest.raises(grpc.RpcError) as err:
                list(replies)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", f"Bearer {token}"),)
            (reply,) = client.stub.ModelStreamInfer(iter([encode_request(InferRequest("clf", {"x": x}))]),
                                                    metadata=good)
            assert isinstance(reply, pb.ModelStreamInferResponse) and not reply.error_message


def test_rest_over_https_with_mutual_tls_names_the_certificate_cn(tmp_path, repo):
    make_ca(tmp_path, "test-ca")
    issue(tmp_path, tmp_path / "server", SERVER_NAME, hosts=["127.0.0.1"])
    issue(tmp_path, tmp_path / "device", "press-9", client=True)
    config = gateway_config(repo, listen="127.0.0.1:0", store=tmp_path / "hard.db",
                            tls={"cert": str(tmp_path / "server.pem"), "key": str(tmp_path / "server.key"),
                                 "client_ca": str(tmp_path / "ca.pem")},
                            rest={"listen": "127.0.0.1:0"})
    x = np.ones((1, 8), dtype=np.float32)
    summary = EdgeSummary(rows=(0,), reason="audit").to_json()
    with Gateway(config) as gw:
        url = f"https://127.0.0.1:{gw.rest_port}/v2/models/clf/infer"
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        context.load_cert_chain(tmp_path / "device.pem", tmp_path / "device.key")
        status, answer = _call(url, _body(x, **{CloudRequest.EDGE_SUMMARY: summary,
                                                CloudRequest.REQUEST_ID: "r1"}), context=context)
        assert status == 200 and answer["model_version"] == "2"
        assert [e.device for e in gw.store.examples()] == ["press-9"]
        anonymous = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _call(url, _body(x), context=anonymous)
