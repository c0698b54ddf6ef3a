"""Who may call the gateway, what it may do, and who it records as the device: bearer tokens, mutual
TLS, both at once (they must agree), operator and device roles, and each fleet's releases."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from cloud_gateway import Gateway, gateway_config
from cloud_gateway.auth import token_hash
from edgecloud._generated.edgecloud.v1 import artifacts_pb2 as artifacts_pb
from edgecloud._generated.edgecloud.v1 import artifacts_pb2_grpc as artifacts_grpc
from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.artifacts import TransportTLS, download, upload
from edgecloud.client import KServeClient
from edgecloud.endpoint import Endpoint
from edgecloud.errors import ConfigError
from edgecloud.files import file_sha256
from edgecloud.protocol.codec import InferRequest, encode_request
from edgecloud.protocol.parameters import CloudRequest, EdgeSummary
from edgecloud.release import Reason, ReleaseRejected
from edgecloud_tools import cli
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


# --- scoped identities: roles, fleets, one identity per call ------------------------------------

OPERATOR = "ops-alice"
TOKENS = {"press-1": "token-of-press-1", "press-2": "token-of-press-2", OPERATOR: "token-of-ops"}


@pytest.fixture
def fleet_pki(tmp_path) -> Path:
    """Made by ``edgecloud certs``: a CA, the gateway's certificate for 127.0.0.1, devices press-1
    (fleet plant-a), press-2 (fleet plant-b) and press-3 (no fleet), and the operator's."""
    pki = tmp_path / "pki"
    for action, *rest in (("ca",), ("server", "--name", SERVER_NAME, "--host", "127.0.0.1"),
                          ("device", "--device-id", "press-1", "--fleet", "plant-a"),
                          ("device", "--device-id", "press-2", "--fleet", "plant-b"),
                          ("device", "--device-id", "press-3"), ("operator", "--name", OPERATOR)):
        assert cli.main(["certs", action, "--dir", str(pki), *rest]) == 0
    return pki


def identity_tls(pki: Path, who: str) -> TransportTLS:
    """TLS to the gateway as ``who``: a device id, or the operator."""
    prefix = pki / ("operators" if who == OPERATOR else "devices") / who
    return TransportTLS(ca=pki / "ca.pem", cert=prefix.with_suffix(".pem"), key=prefix.with_suffix(".key"))


def identity_channel(port: int, pki: Path, who: str) -> grpc.Channel:
    return grpc.secure_channel(f"127.0.0.1:{port}", identity_tls(pki, who).grpc_credentials())


def mtls_gateway(repo: Path, pki: Path, store: Path, **auth) -> Gateway:
    return Gateway(gateway_config(
        repo, listen="127.0.0.1:0", store=store, auth={"operators": [OPERATOR], **auth},
        tls={"cert": str(pki / f"{SERVER_NAME}.pem"), "key": str(pki / f"{SERVER_NAME}.key"),
             "client_ca": str(pki / "ca.pem")}))


def tokens_file(tmp_path: Path, fleets: dict[str, str]) -> Path:
    path = tmp_path / "tokens"
    path.write_text("".join(f"{token_hash(token)} {name} {fleets.get(name, '')}\n"
                            for name, token in TOKENS.items()))
    return path


def release_file(tmp_path: Path, seed: int) -> Path:
    return linear_classifier(tmp_path / "releases" / f"v{seed}.onnx", seed=seed)


def fetch(port: int, release: Path, version: int, tls: TransportTLS, dest: Path,
          token: str | None = None) -> Path:
    return download(f"grpcs://127.0.0.1:{port}/edge/{version}", dest, sha256=file_sha256(release),
                    size=release.stat().st_size, tls=tls, token=token)


def test_only_an_operator_uploads_and_a_device_downloads_its_own_fleet_releases(tmp_path, repo, fleet_pki):
    v2, v3 = release_file(tmp_path, 2), release_file(tmp_path, 3)
    with mtls_gateway(repo, fleet_pki, tmp_path / "hard.db") as gw:
        endpoint = Endpoint("127.0.0.1", gw.port)
        device = identity_tls(fleet_pki, "press-1")
        with pytest.raises(grpc.RpcError) as err:  # a device squatting the next version
            upload(endpoint, v3, name="edge", version=3, fleet="plant-a", tls=device)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only an operator may upload releases; press-1 is a device" in err.value.details()
        operator = identity_tls(fleet_pki, OPERATOR)
        assert not upload(endpoint, v2, name="edge", version=2, fleet="plant-a", tls=operator).existed
        assert not upload(endpoint, v3, name="edge", version=3, fleet="plant-a", tls=operator).existed

        got = fetch(gw.port, v2, 2, device, tmp_path / "press-1" / "v2.onnx")
        assert got.read_bytes() == v2.read_bytes()  # its own fleet's release
        refusals = {"press-2": "edge version 2 is not published for fleet plant-b of device press-2",
                    "press-3": "device press-3 has no fleet"}
        for device, message in refusals.items():
            with pytest.raises(ReleaseRejected) as rejected:
                fetch(gw.port, v2, 2, identity_tls(fleet_pki, device), tmp_path / device / "v2.onnx")
            assert rejected.value.reason is Reason.DOWNLOAD_FAILED
            assert "PERMISSION_DENIED" in rejected.value.detail and message in rejected.value.detail
        with pytest.raises(ReleaseRejected, match="PERMISSION_DENIED"):  # not even whether it exists
            fetch(gw.port, v2, 9, identity_tls(fleet_pki, "press-2"), tmp_path / "press-2" / "v9.onnx")

        # the same file published for the second fleet too
        assert upload(endpoint, v2, name="edge", version=2, fleet="plant-b", tls=operator).existed
        fetch(gw.port, v2, 2, identity_tls(fleet_pki, "press-2"), tmp_path / "press-2" / "v2.onnx")
        fetch(gw.port, v3, 3, operator, tmp_path / "ops" / "v3.onnx")  # an operator reads every fleet's
        with KServeClient("tls", channel=identity_channel(gw.port, fleet_pki, "press-3")) as client:
            client.infer("clf", {"x": np.ones((1, 8), np.float32)}, params=ESCALATION)  # devices infer
        assert stored_devices(gw) == ["press-3"]


def test_a_certificate_and_a_token_must_name_the_same_device(tmp_path, repo, fleet_pki, x):
    tokens = tokens_file(tmp_path, {"press-1": "plant-a", "press-2": "plant-a"})
    with tokens.open("a") as f:
        f.write(f"{token_hash('press-1-in-plant-b')} press-1 plant-b\n")
    with mtls_gateway(repo, fleet_pki, tmp_path / "hard.db", tokens_file=str(tokens)) as gw, \
            KServeClient("tls", channel=identity_channel(gw.port, fleet_pki, "press-1")) as client:
        refusals = {TOKENS["press-2"]: "the certificate names press-1 of fleet plant-a, the token names "
                                       "press-2 of fleet plant-a",
                    "press-1-in-plant-b": "the certificate names press-1 of fleet plant-a, the token names "
                                          "press-1 of fleet plant-b"}
        for token, message in refusals.items():
            with pytest.raises(grpc.RpcError) as err:
                client.stub.ModelInfer(infer_request(x, ESCALATION), metadata=bearer(token))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == f"the certificate and the token name different devices ({message})"
        with pytest.raises(grpc.RpcError) as err:  # both are required when both are configured
            client.stub.ModelInfer(infer_request(x, ESCALATION))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        client.stub.ModelInfer(infer_request(x, ESCALATION), metadata=bearer(TOKENS["press-1"]))
        with pytest.raises(ReleaseRejected, match="UNAUTHENTICATED"):  # downloads too
            fetch(gw.port, release_file(tmp_path, 1), 1, identity_tls(fleet_pki, "press-1"),
                  tmp_path / "d.onnx", token=TOKENS["press-2"])
        assert stored_devices(gw) == ["press-1"]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize("credential", ["certificate", "token"])
def test_fleet_publish_uploads_with_an_operator_credential(tmp_path, repo, fleet_pki, broker, credential,
                                                           monkeypatch, capsys):
    """``edgecloud fleet publish`` with the operator's certificate (--gateway-cert/--gateway-key) or
    token ($EDGECLOUD_GATEWAY_TOKEN); a device's credential is refused."""
    keys = tmp_path / "keys" / "release"
    assert cli.main(["keygen", "--out", str(keys)]) == 0
    model = release_file(tmp_path, 4)
    if credential == "certificate":
        gateway = mtls_gateway(repo, fleet_pki, tmp_path / "hard.db")
        tls_args = {who: ["--gateway-ca", str(fleet_pki / "ca.pem"),
                          "--gateway-cert", str(identity_tls(fleet_pki, who).cert),
                          "--gateway-key", str(identity_tls(fleet_pki, who).key)]
                    for who in ("press-1", OPERATOR)}
    else:
        gateway = Gateway(gateway_config(repo, listen="127.0.0.1:0", auth={
            "tokens_file": str(tokens_file(tmp_path, {"press-1": "plant-1"})), "operators": [OPERATOR]}))
        tls_args = {"press-1": [], OPERATOR: []}
    with gateway as gw:
        def publish(who: str, version: int) -> int:
            monkeypatch.setenv("EDGECLOUD_GATEWAY_TOKEN", TOKENS[who] if credential == "token" else "")
            return cli.main(["fleet", "publish", "--model", str(model), "--name", "edge", "--version",
                             str(version), "--key", f"{keys}.key", "--group", "line-a", "--gateway",
                             f"127.0.0.1:{gw.port}", *tls_args[who], "--mqtt", f"127.0.0.1:{broker.port}",
                             "--fleet", "plant-1"])

        capsys.readouterr()
        assert publish("press-1", 4) == 1
        assert "PERMISSION_DENIED: only an operator may upload releases" in capsys.readouterr().err
        assert publish(OPERATOR, 4) == 0, capsys.readouterr().err
        assert gw.repository is not None
        assert (repo / ".releases" / "edge" / "4" / "fleets").read_text() == "plant-1\n"


def test_a_refused_download_sends_not_one_chunk(tmp_path, repo, fleet_pki, caplog):
    """grpc.aio's abort only sets the status of a synchronous handler: the refusal must also stop it
    (it read and logged the download it refused)."""
    caplog.set_level(logging.INFO, logger="cloud_gateway")
    v2 = release_file(tmp_path, 2)
    with mtls_gateway(repo, fleet_pki, tmp_path / "hard.db") as gw:
        operator = identity_tls(fleet_pki, OPERATOR)
        assert not upload(Endpoint("127.0.0.1", gw.port), v2, name="edge", version=2, fleet="plant-a",
                          tls=operator).existed
        channel = identity_channel(gw.port, fleet_pki, "press-2")  # fleet plant-b
        stub = artifacts_grpc.ArtifactServiceStub(channel)
        received = []
        with pytest.raises(grpc.RpcError) as refused:
            for chunk in stub.Download(artifacts_pb.DownloadRequest(name="edge", version=2), timeout=10):
                received.append(len(chunk.data))
        channel.close()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert received == []
    assert "event=artifact_download_refused" in caplog.text
    assert "event=artifact_download " not in caplog.text


def test_a_refused_upload_stores_nothing(tmp_path, repo, fleet_pki):
    """The operator's certificate with a device's token is refused, and the handler does not run on."""
    v2 = release_file(tmp_path, 2)
    tokens = tokens_file(tmp_path, {"press-1": "plant-a"})
    with mtls_gateway(repo, fleet_pki, tmp_path / "hard.db", tokens_file=str(tokens)) as gw:
        endpoint = Endpoint("127.0.0.1", gw.port)
        operator = identity_tls(fleet_pki, OPERATOR)
        with pytest.raises(grpc.RpcError) as refused:
            upload(endpoint, v2, name="edge", version=2, fleet="plant-a", tls=operator,
                   token=TOKENS["press-1"])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not upload(endpoint, v2, name="edge", version=2, fleet="plant-a", tls=operator,
                          token=TOKENS[OPERATOR]).existed
