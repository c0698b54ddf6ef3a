"""Artifact transfer: the gateway's ArtifactService and the device-side download over real gRPC on
loopback (resume after the gateway stops mid-way, verification, escapes, uploads, TLS, reflection),
https with Range resume, and file:// under allowed roots."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cloud_gateway.artifacts import (
    SERVICE_NAME,
    add_artifact_service,
)
from edgecloud._generated.edgecloud.v1 import artifacts_pb2 as pb
from edgecloud._generated.edgecloud.v1 import artifacts_pb2_grpc as pb_grpc
from edgecloud.artifacts import TransportTLS, download, parse_uri, upload
from edgecloud.endpoint import Endpoint
from edgecloud.errors import ModelNotFound
from edgecloud.files import file_sha256
from edgecloud.protocol.server import start_server
from edgecloud.release import Reason, ReleaseRejected
from tests.support.artifact_gateway import CHUNK, Cut, Gateway


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def gateway_factory(repo: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(stall_after: int | None = None, **kwargs) -> Gateway:
        gateway = Gateway(repo, **kwargs).start(stall_after)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def release_file(repo: Path, name: str, version: int, size: int, suffix: str = "onnx") -> tuple[Path, str]:
    path = repo / ".releases" / name / str(version) / f"model.{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path, file_sha256(path)


def reason_of(call: Callable[[], object]) -> ReleaseRejected:
    with pytest.raises(ReleaseRejected) as info:
        call()
    return info.value


def test_download_resumes_after_the_gateway_stops_mid_way(gateway_factory, repo, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cloud_gateway.artifacts")
    source, sha = release_file(repo, "inspection", 3, 1024 * 1024)
    gateway = gateway_factory(stall_after=5)
    dest = tmp_path / "slot" / "model.onnx"
    stalling = gateway.stalling
    assert stalling is not None
    stopper = threading.Thread(target=lambda: stalling.stalled.wait(10) and gateway.stop())
    stopper.start()  # the gateway goes down after sending 5 chunks
    error = reason_of(lambda: download(gateway.uri("inspection", 3), dest, sha256=sha,
                                       size=source.stat().st_size))
    stopper.join(10)
    assert error.reason is Reason.DOWNLOAD_FAILED
    part = dest.with_name("model.onnx.part")
    kept = part.stat().st_size
    assert kept == 5 * CHUNK and not dest.exists()

    gateway.start()  # same port
    seen: list[int] = []
    download(gateway.uri("inspection", 3), dest, sha256=sha, size=source.stat().st_size,
             progress=lambda done, total: seen.append(done))
    assert seen[0] == kept + min(CHUNK, source.stat().st_size - kept)  # continued, not from zero
    assert f"offset={kept} " in caplog.text  # the gateway was asked for the rest only
    assert dest.read_bytes() == source.read_bytes() and not part.exists()


def test_wrong_sha256_or_size_deletes_the_partial_file(gateway_factory, repo, tmp_path) -> None:
    _, sha = release_file(repo, "m", 1, 300_000)
    gateway = gateway_factory()
    dest = tmp_path / "m.onnx"
    error = reason_of(lambda: download(gateway.uri("m", 1), dest, sha256="0" * 64, size=300_000))
    assert error.reason is Reason.SHA256_MISMATCH
    error = reason_of(lambda: download(gateway.uri("m", 1), dest, sha256=sha, size=299_999))
    assert error.reason is Reason.SIZE_MISMATCH
    assert not dest.exists() and not dest.with_name("m.onnx.part").exists()
    # a partial file that is wrong (not what the source holds) fails the final hash and is dropped
    dest.with_name("m.onnx.part").write_bytes(b"x" * 1000)
    error = reason_of(lambda: download(gateway.uri("m", 1), dest, sha256=sha, size=300_000))
    assert error.reason is Reason.SHA256_MISMATCH and not dest.with_name("m.onnx.part").exists()
    download(gateway.uri("m", 1), dest, sha256=sha, size=300_000)  # and the next try succeeds
    assert file_sha256(dest) == sha


def test_budget_is_checked_before_any_byte(gateway_factory, repo, tmp_path) -> None:
    _, sha = release_file(repo, "m", 1, 1000)
    gateway = gateway_factory()
    error = reason_of(lambda: download(gateway.uri("m", 1), tmp_path / "x", sha256=sha, size=1000,
                                       budget=999))
    assert error.reason is Reason.TOO_LARGE and not (tmp_path / "x.part").exists()


def test_missing_release_is_a_retryable_download_failure(gateway_factory, tmp_path) -> None:
    gateway = gateway_factory()
    error = reason_of(lambda: download(gateway.uri("m", 9), tmp_path / "x", sha256="0" * 64, size=10))
    assert error.reason is Reason.DOWNLOAD_FAILED and "NOT_FOUND" in str(error)


@pytest.mark.parametrize("uri", [
    "grpc://h:1/../etc/3", "grpc://h:1/a/b/3", "grpc://h:1/m/x", "grpc://h:1/m/-1", "grpc://h/m/1",
    "grpc://h:1/m/1?x=1", "grpc://h:1/%2e%2e/1", "grpc://h:1/m/1/", "http://h/m.onnx", "ftp://h/m",
    "file://otherhost/m.onnx", "file:relative.onnx", "s3://bucket/m",
])
def test_uris_that_could_escape_are_refused(uri: str) -> None:
    assert reason_of(lambda: parse_uri(uri)).reason is Reason.BAD_URI


def test_gateway_refuses_names_that_escape(gateway_factory, repo, tmp_path) -> None:
    gateway = gateway_factory()
    secret = repo / "secret.onnx"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(b"not for devices")
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb_grpc.ArtifactServiceStub(channel)
        for name in ("..", "../secret", "", "a/b", ".releases"):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Download(pb.DownloadRequest(name=name, version=1), timeout=5))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        header = pb.UploadChunk(name="../../escape", version=1, format="onnx", total_size=1,
                                sha256=hashlib.sha256(b"x").hexdigest(), data=b"x")
        with pytest.raises(grpc.RpcError) as info:
            stub.Upload(iter([header]), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not list(tmp_path.rglob("escape*"))
    # a symlink planted in the repository does not lead out of it
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"outside")
    link = repo / ".releases" / "m" / "1" / "model.onnx"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    error = reason_of(lambda: download(gateway.uri("m", 1), tmp_path / "y", sha256=file_sha256(outside),
                                       size=7))
    assert "NOT_FOUND" in str(error)


def test_upload_is_verified_atomic_and_immutable(gateway_factory, repo, tmp_path) -> None:
    gateway = gateway_factory()
    model = tmp_path / "edge.onnx"
    model.write_bytes(os.urandom(200_000))
    first = upload(gateway.endpoint, model, name="inspection", version=5)
    stored = repo / ".releases" / "inspection" / "5" / "model.onnx"
    assert not first.existed and first.sha256 == file_sha256(model)
    assert stored.read_bytes() == model.read_bytes()
    assert upload(gateway.endpoint, model, name="inspection", version=5).existed  # publishing twice is fine
    other = tmp_path / "other.onnx"
    other.write_bytes(os.urandom(1000))
    with pytest.raises(grpc.RpcError) as info:
        upload(gateway.endpoint, other, name="inspection", version=5)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as info:  # announced hash differs from the data: nothing stored
        upload(gateway.endpoint, other, name="inspection", version=6, sha256="0" * 64)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert list((repo / ".releases" / "inspection" / "6").iterdir()) == []
    plan = upload(gateway.endpoint, other, name="inspection", version=7, artifact_format="tensorrt-plan")
    assert (repo / ".releases" / "inspection" / "7" / "model.plan").stat().st_size == plan.size == 1000
    download(gateway.uri("inspection", 7), tmp_path / "got.plan", sha256=plan.sha256, size=plan.size)


def test_uploads_can_be_disabled(gateway_factory, tmp_path) -> None:
    gateway = gateway_factory(allow_upload=False)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"m")
    with pytest.raises(grpc.RpcError) as info:
        upload(gateway.endpoint, model, name="m", version=1)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpcs_download_checks_the_gateway_certificate(gateway_factory, repo, tmp_path, tls_files) -> None:
    _, sha = release_file(repo, "m", 2, 100_000)
    gateway = gateway_factory(tls=tls_files)
    download(gateway.uri("m", 2), tmp_path / "ok", sha256=sha, size=100_000,
             tls=TransportTLS(ca=tls_files.ca))
    error = reason_of(lambda: download(gateway.uri("m", 2), tmp_path / "bad", sha256=sha, size=100_000,
                                       tls=TransportTLS(ca=tls_files.other_ca), timeout_s=3))
    assert error.reason is Reason.DOWNLOAD_FAILED and "UNAVAILABLE" in str(error)


class _NoModels:
    """An InferenceHost without models: enough to host the artifact service in start_server."""

    server_name, server_version = "test", "0"

    def is_live(self) -> bool:
        return True

    def is_ready(self) -> bool:
        return True

    def model_ready(self, name: str, version: str) -> bool:
        return False

    def model_metadata(self, name: str, version: str):
        raise ModelNotFound(name)

    def input_contract(self, name: str, version: str):
        raise ModelNotFound(name)

    def model_index(self) -> tuple[tuple[str, str], ...]:
        return ()

    def infer(self, request, peer):
        raise ModelNotFound(request.model_name)


def test_service_plugs_into_start_server_with_reflection(repo, tmp_path) -> None:
    _, sha = release_file(repo, "m", 1, 5000)
    add = add_artifact_service(repo)
    assert add.service_name == SERVICE_NAME == "edgecloud.v1.ArtifactService"
    running = start_server(_NoModels(), Endpoint("127.0.0.1", 0), extra_services=[add])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            assert SERVICE_NAME in ProtoReflectionDescriptorDatabase(channel).get_services()
        download(f"grpc://127.0.0.1:{running.port}/m/1", tmp_path / "m.onnx", sha256=sha, size=5000)
    finally:
        running.stop(0)


# -- https ----------------------------------------------------------------------------------------------
class _RangeServer(ThreadingHTTPServer):
    data = b""
    honour_range = True
    ranges: list[str | None]


class _RangeHandler(BaseHTTPRequestHandler):
    server: _RangeServer

    def do_GET(self) -> None:
        wanted = self.headers.get("Range")
        self.server.ranges.append(wanted)
        data, start = self.server.data, 0
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and self.server.honour_range:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_server(tls_files) -> Iterator[_RangeServer]:
    server = _RangeServer(("127.0.0.1", 0), _RangeHandler)
    server.ranges = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("honour_range", [True, False])
def test_https_download_resumes_with_range(https_server, tls_files, tmp_path, honour_range) -> None:
    https_server.data = os.urandom(3 * 1024 * 1024)
    https_server.honour_range = honour_range
    sha, size = hashlib.sha256(https_server.data).hexdigest(), len(https_server.data)
    uri = f"https://127.0.0.1:{https_server.server_address[1]}/models/m.onnx"
    dest, tls = tmp_path / "m.onnx", TransportTLS(ca=tls_files.ca)

    def cut(done: int, total: int) -> None:
        raise Cut

    with pytest.raises(Cut):
        download(uri, dest, sha256=sha, size=size, tls=tls, progress=cut)
    kept = dest.with_name("m.onnx.part").stat().st_size
    assert kept > 0
    download(uri, dest, sha256=sha, size=size, tls=tls)
    assert https_server.ranges == [None, f"bytes={kept}-"]
    assert dest.read_bytes() == https_server.data  # a server that ignores Range makes us start over


# -- file -----------------------------------------------------------------------------------------------
def test_file_uris_only_under_allowed_roots(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "media", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    inside, outside = root / "m.onnx", elsewhere / "m.onnx"
    for path in (inside, outside):
        path.write_bytes(b"model bytes")
    sha = file_sha256(inside)
    download(inside.as_uri(), tmp_path / "a.onnx", sha256=sha, size=11, allowed_roots=[root])
    assert (tmp_path / "a.onnx").read_bytes() == b"model bytes"
    (root / "link.onnx").symlink_to(outside)
    for uri, roots in [(outside.as_uri(), [root]), (inside.as_uri(), []),
                       ((root / "link.onnx").as_uri(), [root]),
                       (f"file://{root}/../elsewhere/m.onnx", [root])]:
        error = reason_of(lambda u=uri, r=roots: download(u, tmp_path / "b.onnx", sha256=sha, size=11,
                                                          allowed_roots=r))
        assert error.reason is Reason.BAD_URI, uri
    assert not (tmp_path / "b.onnx").exists()
