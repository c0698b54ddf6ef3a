"""One gateway in front of another: ``platform = "remote"`` forwards to any KServe v2 server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from cloud_gateway import Gateway, gateway_config
from edgecloud.client import KServeClient
from edgecloud.errors import ConfigError, ModelLoadError
from edgecloud.protocol.parameters import CloudRequest, EdgeSummary
from tests.support.onnx_models import linear_classifier, reference_logits
from tests.support.services import GatewayCloud


@pytest.fixture
def backend_gateway(tmp_path):
    model = linear_classifier(tmp_path / "full.onnx", seed=4)
    cloud = GatewayCloud(tmp_path / "backend", model, "full").start()
    yield cloud, model
    cloud.stop()


def front_repo(tmp_path, port: int, model: str = "full"):
    repo = tmp_path / "front-repo"
    (repo / "inspection").mkdir(parents=True)
    (repo / "inspection" / "config.toml").write_text(
        f'platform = "remote"\n[backend.remote]\ntarget = "127.0.0.1:{port}"\nmodel = "{model}"\n')
    return repo


def test_front_gateway_forwards_and_keeps_its_own_store(tmp_path, backend_gateway):
    cloud, model = backend_gateway
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    config = gateway_config(front_repo(tmp_path, cloud.port), listen="127.0.0.1:0",
                            store=tmp_path / "front.db")
    with Gateway(config) as front, KServeClient(f"127.0.0.1:{front.port}") as client:
        meta = client.metadata("inspection")
        assert meta.platform == "remote" and [i.name for i in meta.inputs] == ["x"]
        summary = EdgeSummary(rows=(0, 1), prediction=(0, 1), confidence=(0.2, 0.3), reason="low_confidence")
        reply = client.infer("inspection", {"x": x[:2]}, request_id="r-1",
                             params={CloudRequest.REQUEST_ID: "r-1", CloudRequest.DEVICE_ID: "d1",
                                     CloudRequest.EDGE_SUMMARY: summary.to_json()})
        np.testing.assert_allclose(reply.outputs["logits"], reference_logits(model, x[:2]), rtol=1e-5,
                                   atol=1e-5)
        assert front.store.count() == 2  # the front stores hard examples; the back only computes
    assert cloud.stored() == []

    with Gateway(config) as front, KServeClient(f"127.0.0.1:{front.port}") as client:
        cloud.stop()
        with pytest.raises(grpc.RpcError) as e:
            client.infer("inspection", {"x": x})
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "127.0.0.1" in e.value.details()


def test_remote_model_misconfigured(tmp_path, backend_gateway):
    cloud, _ = backend_gateway
    with pytest.raises(ModelLoadError, match=r"'nope'.*NOT_FOUND"):
        Gateway(gateway_config(front_repo(tmp_path, cloud.port, "nope"), listen="127.0.0.1:0")).start()
    repo = tmp_path / "r2"
    (repo / "m").mkdir(parents=True)
    (repo / "m" / "config.toml").write_text('platform = "remote"\n[backend.remote]\ntarget = "10.1.2.3:9"\n'
                                            'model = "m"\n')
    with pytest.raises(ConfigError, match="plaintext is only allowed on loopback"):
        Gateway(gateway_config(repo, listen="127.0.0.1:0")).start()
