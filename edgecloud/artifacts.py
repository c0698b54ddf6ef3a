"""Moves a release's model file: resumable verified downloads, and uploads to the gateway
(docs/design.md §5).

Release URIs: ``grpc://HOST:PORT/<name>/<version>`` (``grpcs://`` with TLS) read the gateway's
ArtifactService chunk stream, ``https://…`` uses HTTP Range, ``file://…`` is only allowed under the
roots the caller names. The file grows as ``<dest>.part``, so a cut download resumes from that file's
size; when complete its size and sha256 are checked, it is fsynced and renamed onto ``<dest>``. A file
that turns out to be wrong (size, sha256) is deleted: resuming it would only repeat the mismatch.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import SplitResult, unquote, urlsplit

import grpc

from edgecloud._generated.edgecloud.v1 import artifacts_pb2 as pb
from edgecloud._generated.edgecloud.v1 import artifacts_pb2_grpc as pb_grpc
from edgecloud.endpoint import Endpoint
from edgecloud.files import file_sha256, replace
from edgecloud.release import DEFAULT_BUDGET_BYTES, NAME_PATTERN, Reason, ReleaseRejected, check_size

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
SCHEMES = ("grpc", "grpcs", "https", "file")

Progress = Callable[[int, int], None]  # (bytes on disk, total bytes)


def check_name(name: str) -> str:
    """A model name that is safe as one directory level; ValueError otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"model name {name!r} is invalid: use 1-128 of A-Z a-z 0-9 . _ - "
                         "starting with a letter or digit")
    return name


def _bad_uri(uri: str, why: str) -> ReleaseRejected:
    return ReleaseRejected(Reason.BAD_URI, f"{uri}: {why}")


@dataclass(frozen=True, slots=True)
class ArtifactURI:
    """A parsed release URI: gateway address + name/version, an https URL, or a local path."""

    scheme: str
    uri: str
    endpoint: Endpoint | None = None
    name: str = ""
    version: int = 0
    path: Path | None = None


def parse_uri(uri: str) -> ArtifactURI:
    """Parse and validate a release URI; ReleaseRejected(bad_uri) for anything that could escape."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _bad_uri(uri, f"scheme must be one of {SCHEMES}")
    if parts.query or parts.fragment:
        raise _bad_uri(uri, "query and fragment are not allowed")
    if scheme == "https":
        if not parts.hostname:
            raise _bad_uri(uri, "no host")
        return ArtifactURI(scheme, uri)
    if scheme == "file":
        return _parse_file_uri(uri, parts)
    return _parse_gateway_uri(uri, parts)


def _parse_file_uri(uri: str, parts: SplitResult) -> ArtifactURI:
    if parts.netloc not in ("", "localhost"):
        raise _bad_uri(uri, "a file URI names no host")
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise _bad_uri(uri, "a file URI needs an absolute path")
    return ArtifactURI("file", uri, path=Path(path))


def _parse_gateway_uri(uri: str, parts: SplitResult) -> ArtifactURI:
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or not port:
        raise _bad_uri(uri, "expected grpc://HOST:PORT/<name>/<version>")
    segments = parts.path.split("/")
    if len(segments) != 3 or segments[0] != "":
        raise _bad_uri(uri, "expected exactly /<name>/<version> after the address")
    name, version = segments[1], segments[2]
    if not NAME_PATTERN.match(name):
        raise _bad_uri(uri, f"model name {name!r} is not allowed")
    if not version.isdigit() or not version.isascii():
        raise _bad_uri(uri, f"version {version!r} is not a non-negative integer")
    return ArtifactURI(parts.scheme.lower(), uri, Endpoint(parts.hostname, port), name, int(version))


def gateway_uri(gateway: str, name: str, version: int, tls: bool = False) -> str:
    """The release URI of ``name``/``version`` on a gateway given as ``HOST:PORT``."""
    return f"{'grpcs' if tls else 'grpc'}://{gateway}/{check_name(name)}/{int(version)}"


@dataclass(frozen=True, slots=True)
class TransportTLS:
    """TLS for grpcs:// and https://: the server's CA and, for mutual TLS, this client's identity."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # override the name checked in the server's certificate

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert:
            context.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return context


def _channel(endpoint: Endpoint, tls: TransportTLS | None) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 4 * CHUNK_BYTES + 1024)]
    if tls is None:
        return grpc.insecure_channel(endpoint.grpc_target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(endpoint.grpc_target, tls.grpc_credentials(), options=options)


def _metadata(token: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {token}")] if token else None


class _PartFile:
    """The growing ``.part`` file: refuses chunks out of order or past the expected size."""

    def __init__(self, out: BinaryIO, size: int, progress: Progress | None) -> None:
        self.out, self.size, self.progress = out, size, progress
        self.pos = out.seek(0, os.SEEK_END)

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.pos:
            raise ReleaseRejected(Reason.DOWNLOAD_FAILED, f"chunk at offset {offset}, expected {self.pos}")
        if self.pos + len(data) > self.size:
            raise ReleaseRejected(Reason.SIZE_MISMATCH,
                                  f"source has more than the release's {self.size} bytes")
        self.out.write(data)
        self.pos += len(data)
        if self.progress is not None:
            self.progress(self.pos, self.size)

    def restart(self) -> None:
        """The source ignored the resume offset: start the file over."""
        self.out.seek(0)
        self.out.truncate()
        self.pos = 0


def download(uri: str, dest: Path, *, sha256: str, size: int, budget: int = DEFAULT_BUDGET_BYTES,
             allowed_roots: Sequence[Path] = (), tls: TransportTLS | None = None, token: str | None = None,
             progress: Progress | None = None, timeout_s: float = 600.0) -> Path:
    """Fetch ``uri`` to ``dest`` (resuming ``dest.part``), verify, fsync and rename; returns ``dest``.

    Raises ReleaseRejected: ``download_failed`` when the transfer broke (the partial file stays for a
    resume: call again), ``bad_uri``, ``too_large``, ``size_mismatch`` or ``sha256_mismatch``
    otherwise. ``progress(done, total)`` is called after every chunk; ``timeout_s`` bounds the transfer.
    """
    check_size(size, budget)
    target = parse_uri(uri)
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(part, "ab") as out:
            writer = _PartFile(out, size, progress)
            if writer.pos > size:
                writer.restart()
            if writer.pos < size:
                resumed_from = writer.pos
                fetch = _FETCHERS[target.scheme]
                fetch(target, writer, sha256=sha256, tls=tls, token=token, allowed_roots=allowed_roots,
                      deadline=time.monotonic() + timeout_s)
                log.info("event=artifact_fetched uri=%s resumed_from=%d bytes=%d", uri, resumed_from,
                         writer.pos - resumed_from)
            out.flush()
            os.fsync(out.fileno())
        _verify(part, sha256, size)
    except ReleaseRejected as e:
        if e.reason is not Reason.DOWNLOAD_FAILED:
            part.unlink(missing_ok=True)
        raise
    replace(part, dest)
    return dest


def _verify(part: Path, sha256: str, size: int) -> None:
    actual_size = part.stat().st_size
    if actual_size < size:
        raise ReleaseRejected(Reason.DOWNLOAD_FAILED, f"source ended after {actual_size} of {size} bytes")
    actual = file_sha256(part)
    if actual != sha256:
        raise ReleaseRejected(Reason.SHA256_MISMATCH, f"file has sha256 {actual}, the release says {sha256}")


def _fetch_grpc(target: ArtifactURI, writer: _PartFile, *, sha256: str, tls: TransportTLS | None,
                token: str | None, deadline: float, **_: object) -> None:
    assert target.endpoint is not None
    if target.scheme == "grpcs" and tls is None:
        tls = TransportTLS()  # system CAs
    request = pb.DownloadRequest(name=target.name, version=target.version, offset=writer.pos)
    with _channel(target.endpoint, tls if target.scheme == "grpcs" else None) as channel:
        stub = pb_grpc.ArtifactServiceStub(channel)
        try:
            first = True
            for chunk in stub.Download(request, timeout=max(deadline - time.monotonic(), 0.001),
                                       metadata=_metadata(token)):
                if first:
                    _check_source(target.uri, chunk.total_size, chunk.sha256, writer.size, sha256)
                    first = False
                writer.write(chunk.offset, chunk.data)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ReleaseRejected(Reason.BAD_URI, f"{target.uri}: {e.details()}") from None
            if code == grpc.StatusCode.OUT_OF_RANGE:
                raise ReleaseRejected(Reason.SIZE_MISMATCH, f"{target.uri}: {e.details()}") from None
            detail = f"{target.uri}: {code.name}: {e.details()} (at byte {writer.pos})"
            raise ReleaseRejected(Reason.DOWNLOAD_FAILED, detail) from None


def _check_source(uri: str, total_size: int, source_sha: str, size: int, sha256: str) -> None:
    """The gateway names its file's size and hash up front: stop early when they are not the release's."""
    if total_size != size:
        raise ReleaseRejected(Reason.SIZE_MISMATCH, f"{uri} has {total_size} bytes, the release says {size}")
    if source_sha and source_sha != sha256:
        raise ReleaseRejected(Reason.SHA256_MISMATCH,
                              f"{uri} has sha256 {source_sha}, the release says {sha256}")


def _fetch_https(target: ArtifactURI, writer: _PartFile, *, tls: TransportTLS | None, token: str | None,
                 deadline: float, **_: object) -> None:
    headers = {"Range": f"bytes={writer.pos}-"} if writer.pos else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    context = (tls or TransportTLS()).ssl_context()
    try:
        request = urllib.request.Request(target.uri, headers=headers)
        with urllib.request.urlopen(request, timeout=max(deadline - time.monotonic(), 0.001),
                                    context=context) as response:
            if writer.pos and response.status != 206:
                writer.restart()
            while block := response.read(CHUNK_BYTES):
                writer.write(writer.pos, block)
                if time.monotonic() > deadline:
                    raise ReleaseRejected(Reason.DOWNLOAD_FAILED,
                                          f"{target.uri}: timed out at byte {writer.pos}")
    except urllib.error.HTTPError as e:
        if e.code == 416:
            detail = f"{target.uri}: shorter than {writer.pos} bytes"
            raise ReleaseRejected(Reason.SIZE_MISMATCH, detail) from None
        raise ReleaseRejected(Reason.DOWNLOAD_FAILED, f"{target.uri}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ReleaseRejected(Reason.DOWNLOAD_FAILED, f"{target.uri}: {e} (at byte {writer.pos})") from None


def _fetch_file(target: ArtifactURI, writer: _PartFile, *, allowed_roots: Sequence[Path],
                **_: object) -> None:
    assert target.path is not None
    path = target.path.resolve()  # follows symlinks: a link out of the roots is caught below
    roots = [Path(root).resolve() for root in allowed_roots]
    if not any(path.is_relative_to(root) for root in roots):
        raise _bad_uri(target.uri, f"{path} is outside the allowed roots {[str(r) for r in roots]}")
    try:
        with open(path, "rb") as src:
            src.seek(writer.pos)
            while block := src.read(CHUNK_BYTES):
                writer.write(writer.pos, block)
    except FileNotFoundError:
        raise _bad_uri(target.uri, "no such file") from None
    except OSError as e:
        raise ReleaseRejected(Reason.DOWNLOAD_FAILED, f"{target.uri}: {e}") from None


_FETCHERS = {"grpc": _fetch_grpc, "grpcs": _fetch_grpc, "https": _fetch_https, "file": _fetch_file}


@dataclass(frozen=True, slots=True)
class Uploaded:
    """What the gateway stored; ``existed`` when the identical file was already there."""

    name: str
    version: int
    size: int
    sha256: str
    existed: bool


def upload(gateway: Endpoint, path: Path, *, name: str, version: int, artifact_format: str = "onnx",
           fleet: str = "", sha256: str | None = None, tls: TransportTLS | None = None,
           token: str | None = None, timeout_s: float = 600.0) -> Uploaded:
    """Stream ``path`` into the gateway's release repository as ``name``/``version`` for ``fleet``
    (whose devices may then download it).

    The gateway checks size and sha256 and stores the file atomically; raises RpcError as gRPC does
    (callers turn it into their own message). A gateway with client authentication takes uploads
    from an operator identity only: ``tls`` with the operator's certificate, or its ``token``.
    """
    check_name(name)
    path = Path(path)
    size = path.stat().st_size
    sha256 = sha256 or file_sha256(path)

    def chunks() -> Iterator[pb.UploadChunk]:
        header = pb.UploadChunk(name=name, version=version, format=artifact_format,
                                total_size=size, sha256=sha256, fleet=fleet)
        with open(path, "rb") as f:
            block = f.read(CHUNK_BYTES)
            header.data = block
            yield header
            while block := f.read(CHUNK_BYTES):
                yield pb.UploadChunk(data=block)

    with _channel(gateway, tls) as channel:
        result = pb_grpc.ArtifactServiceStub(channel).Upload(chunks(), timeout=timeout_s,
                                                             metadata=_metadata(token))
    log.info("event=artifact_uploaded gateway=%s name=%s version=%d size=%d existed=%s", gateway, name,
             version, result.size, result.existed)
    return Uploaded(result.name, result.version, result.size, result.sha256, result.existed)
