"""The health-only plaintext port kubelet probes (docs/design.md §9): it answers what the TLS port's
health says, without credentials, and serves nothing else."""

from __future__ import annotations

import socket

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_gateway import Gateway, gateway_config
from cloud_gateway.auth import token_hash
from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud._generated.inference import grpc_service_pb2_grpc as pb_grpc
from edgecloud.errors import ConfigError
from edgecloud.protocol.codec import InferRequest, encode_request
from edgecloud_tools.certs import issue, make_ca
from tests.support.onnx_models import linear_classifier


def test_the_health_port_answers_plaintext_beside_mutual_tls_and_nothing_else(tmp_path) -> None:
    linear_classifier(tmp_path / "repo" / "clf" / "1" / "model.onnx")
    make_ca(tmp_path / "ca", "test-ca")
    server = issue(tmp_path / "ca", tmp_path / "gw", "gateway.test", hosts=["gateway.test"])
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token_hash('t')} press-7\n")
    config = gateway_config(tmp_path / "repo", listen="0.0.0.0:0",
                            tls={"cert": str(server.cert), "key": str(server.key),
                                 "client_ca": str(tmp_path / "ca" / "ca.pem")},
                            auth={"tokens_file": str(tokens)}, health={"listen": "0.0.0.0:0"})
    with Gateway(config) as gw:
        assert gw.health_port is not None and gw.health_port.port not in (0, gw.port)
        with grpc.insecure_channel(f"127.0.0.1:{gw.health_port.port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for service in ("", "inference.GRPCInferenceService"):
                reply = check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            gw.server.set_serving(False)  # what stop() does first, while calls drain
            assert check(health_pb2.HealthCheckRequest(), timeout=5).status == (
                health_pb2.HealthCheckResponse.NOT_SERVING)
            gw.server.set_serving(True)
            request = encode_request(InferRequest("clf", {"x": np.ones((1, 8), np.float32)}))
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no inference in plaintext
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel, pytest.raises(grpc.RpcError):
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)


def test_the_health_port_is_host_and_port(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"health\.listen"):
        gateway_config(tmp_path, health={"listen": "unix:/run/health.sock"})
    with pytest.raises(ConfigError, match=r"health\.listen"):
        gateway_config(tmp_path, health={"listen": "nowhere"})


def test_a_health_port_in_use_is_a_config_error_and_nothing_keeps_running(tmp_path) -> None:
    linear_classifier(tmp_path / "repo" / "clf" / "1" / "model.onnx")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = Gateway(gateway_config(tmp_path / "repo", listen="127.0.0.1:0",
                                         health={"listen": f"127.0.0.1:{port}"}))
        with pytest.raises(ConfigError, match=rf"health\.listen 127\.0\.0\.1:{port}: cannot bind"):
            gateway.start()
        assert gateway.health_port is None
        with pytest.raises(grpc.RpcError), grpc.insecure_channel(f"127.0.0.1:{gateway.server.port}") as ch:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
