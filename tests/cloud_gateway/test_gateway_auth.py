"""Who may call the gateway and who it records as the device: bearer tokens and mutual TLS."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest

from cloud_gateway import Gateway, gateway_config
from cloud_gateway.auth import token_hash
from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.client import KServeClient
from edgecloud.errors import ConfigError
from edgecloud.protocol.codec import InferRequest, encode_request
from edgecloud.protocol.parameters import CloudRequest, EdgeSummary
from edgecloud_tools.certs import issue, make_ca
from tests.support.onnx_models import linear_classifier

SERVER_NAME = "gateway.test"
ESCALATION = {CloudRequest.REQUEST_ID: "r-1", CloudRequest.DEVICE_ID: "someone-else",
              CloudRequest.EDGE_SUMMARY: EdgeSummary(rows=(0,), reason="low_confidence").to_json()}


@pytest.fixture
def repo(tmp_path):
    linear_classifier(tmp_path / "repo" / "clf" / "1" / "model.onnx")
    return tmp_path / "repo"


@pytest.fixture
def x():
    return np.ones((1, 8), dtype=np.float32)


def stored_devices(gateway: Gateway) -> list[str]:
    return [e.device for e in gateway.store.examples()]


def test_tokens_required_and_the_token_names_the_device(tmp_path, repo, x, caplog):
    token = "s3cret-token-of-press-7"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# device tokens\n{token_hash(token)} press-7\n{token_hash('other')} press-8\n")
    config = gateway_config(repo, listen="127.0.0.1:0", store=tmp_path / "hard.db",
                            auth={"tokens_file": str(tokens)})
    caplog.set_level(logging.DEBUG)
    with Gateway(config) as gw, KServeClient(f"127.0.0.1:{gw.port}") as client:
        calls = [(client.stub.ModelMetadata, pb.ModelMetadataRequest(name="clf")),
                 (client.stub.ModelInfer, infer_request(x))]
        # no token, an unknown one, and the right one without "Bearer "
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", token),)]:
            for rpc, request in calls:
                with pytest.raises(grpc.RpcError) as err:
                    rpc(request, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in err.value.details()
        assert client.serving()  # health checks need no token (load balancer probes)
        good = (("authorization", f"Bearer {token}"),)
        reply = client.stub.ModelInfer(infer_request(x, ESCALATION), metadata=good)
        assert reply.model_name == "clf"
        assert stored_devices(gw) == ["press-7"]  # the token's device, not the claimed one
    assert token not in caplog.text
    assert "event=device_id_mismatch device=press-7 claimed=someone-else" in caplog.text


def infer_request(x: np.ndarray, params: dict | None = None) -> pb.ModelInferRequest:
    return encode_request(InferRequest("clf", {"x": x}, parameters=params or {}))


def test_bad_tokens_file_is_a_config_error_naming_the_key(tmp_path, repo):
    tokens = tmp_path / "tokens"
    tokens.write_text("not-a-hash press-7\n")
    config = gateway_config(repo, listen="127.0.0.1:0", auth={"tokens_file": str(tokens)})
    with pytest.raises(ConfigError, match=r"auth.tokens_file: .*tokens:1"):
        Gateway(config).start()


# --- mutual TLS -------------------------------------------------------------------------------

@pytest.fixture
def pki(tmp_path):
    """A CA, the gateway's certificate, and one device certificate (CN = its device id)."""
    make_ca(tmp_path, "test-ca")
    issue(tmp_path, tmp_path / "server", SERVER_NAME, hosts=[SERVER_NAME])
    issue(tmp_path, tmp_path / "device", "press-9", client=True)
    return tmp_path


def _channel(port: int, pki, with_cert: bool) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "device.key").read_bytes() if with_cert else None,
        certificate_chain=(pki / "device.pem").read_bytes() if with_cert else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                               options=[("grpc.ssl_target_name_override", SERVER_NAME)])


def test_mutual_tls_device_id_is_the_certificate_cn(tmp_path, repo, pki, x):
    config = gateway_config(repo, listen="127.0.0.1:0", store=tmp_path / "hard.db",
                            tls={"cert": str(pki / "server.pem"), "key": str(pki / "server.key"),
                                 "client_ca": str(pki / "ca.pem")})
    with Gateway(config) as gw:
        with KServeClient("tls", channel=_channel(gw.port, pki, with_cert=True)) as client:
            reply = client.infer("clf", {"x": x}, params=ESCALATION)
        assert reply.outputs["logits"].shape == (1, 4)
        assert stored_devices(gw) == ["press-9"]
        with KServeClient("tls", channel=_channel(gw.port, pki, with_cert=False)) as anonymous, \
                pytest.raises(grpc.RpcError) as err:
            anonymous.infer("clf", {"x": x}, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake itself fails


def test_tls_files_are_checked_at_start(tmp_path, repo, pki):
    config = gateway_config(repo, listen="127.0.0.1:0", tls={"cert": str(pki / "server.pem"),
                                                             "key": str(pki / "missing.key")})
    with pytest.raises(ConfigError, match=r"tls\.key: .*missing\.key does not exist"):
        Gateway(config).start()
