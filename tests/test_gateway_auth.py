"""Who may call the gateway and who it records as the device: bearer tokens and mutual TLS."""

from __future__ import annotations

import datetime
import json
import logging

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud_gateway import Gateway, gateway_config
from cloud_gateway.auth import token_hash
from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.client import KServeClient
from edgecloud.errors import ConfigError
from edgecloud.protocol.codec import InferRequest, encode_request
from tests.support.onnx_models import linear_classifier

SERVER_NAME = "gateway.test"
ESCALATION = {"edgecloud.request_id": "r-1", "edgecloud.device_id": "someone-else",
              "edgecloud.edge_summary": json.dumps({"rows": [0], "reason": "low_confidence"})}


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

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, dns: str | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def pki(tmp_path):
    """A CA, the gateway's certificate, and one device certificate (CN = its device id)."""
    ca_key, server_key, device_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    files = {"ca.pem": _pem(ca), "server.key": _pem(server_key), "device.key": _pem(device_key),
             "server.pem": _pem(_cert(SERVER_NAME, server_key, "test-ca", ca_key, dns=SERVER_NAME)),
             "device.pem": _pem(_cert("press-9", device_key, "test-ca", ca_key))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
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
