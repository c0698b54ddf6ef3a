"""The gateway's artifact service: edge releases under ``<repo>/.releases/<name>/<version>/``.

Downloads stream a file in chunks from any offset (the first chunk names its size and sha256) so the
fleet resumes cut downloads; uploads from ``edgecloud fleet publish`` are verified against the size and
sha256 they announce and land atomically (temp file, fsync, rename). A published version is
immutable: the same file again is accepted, a different one refused. Names and versions that could
escape the directory are refused before any path is built.

Each release records the fleets it was published for (``fleets`` beside the file, one id a line;
publishing the same file for another fleet adds it). With client authentication a device downloads
only its own fleet's releases and only an operator uploads (``auth.py``); without it, as on a
loopback demo, anyone may do both.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from cloud_gateway.auth import Authenticator, AuthRefused, may_download
from edgecloud._generated.edgecloud.v1 import artifacts_pb2 as pb
from edgecloud._generated.edgecloud.v1 import artifacts_pb2_grpc as pb_grpc
from edgecloud.artifacts import CHUNK_BYTES, check_name
from edgecloud.backends import release_backends
from edgecloud.files import atomic_open, atomic_write, file_sha256
from edgecloud.mqtt.topics import check_id
from edgecloud.protocol.servicer import abort

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ArtifactService"].full_name
RELEASES_DIR = ".releases"
#: beside a release's file: the fleets it was published for
FLEETS_FILE = "fleets"
DEFAULT_MAX_UPLOAD_BYTES = 2_000_000_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def release_files() -> dict[str, str]:
    """Release format → its file's name in a version directory: its backend's in Triton's layout."""
    return {fmt: backend.repository_file for fmt, backend in release_backends().items()
            if backend.repository_file is not None}


class UploadRefused(Exception):
    """An upload the repository will not store; ``code`` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ReleaseStore:
    """The release directory: find files, hash them once, add them atomically."""

    def __init__(self, repo_root: Path) -> None:
        self.root = Path(repo_root) / RELEASES_DIR
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def version_dir(self, name: str, version: int) -> Path:
        """``<root>/<name>/<version>``; ValueError for a name that is not one safe directory level."""
        return self.root / check_name(name) / str(int(version))

    def find(self, name: str, version: int) -> Path | None:
        vdir = self.version_dir(name, version)
        for file_name in release_files().values():
            path = vdir / file_name
            # resolve: a symlink planted in the repository must not lead out of it
            if path.is_file() and path.resolve().is_relative_to(self.root.resolve()):
                return path
        return None

    def sha256(self, path: Path) -> str:
        """The file's sha256, computed once per (path, size, mtime): resumes must not rehash 1 GB."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._hashes.get(key)
        if cached is None:
            cached = file_sha256(path)
            with self._lock:
                self._hashes[key] = cached
        return cached

    def fleets(self, name: str, version: int) -> frozenset[str]:
        """The fleets a release was published for (none for a file placed by hand)."""
        path = self.version_dir(name, version) / FLEETS_FILE
        try:
            return frozenset(path.read_text().split())
        except FileNotFoundError:
            return frozenset()

    def _publish_for(self, name: str, version: int, fleet: str) -> None:
        fleets = self.fleets(name, version)
        if fleet and fleet not in fleets:
            text = "".join(f"{f}\n" for f in sorted(fleets | {fleet}))
            atomic_write(self.version_dir(name, version) / FLEETS_FILE, text.encode())

    def add(self, name: str, version: int, artifact_format: str, size: int, sha256: str,
            blocks: Iterable[bytes], max_bytes: int, fleet: str = "") -> tuple[Path, bool]:
        """Store the file streamed as ``blocks`` for ``fleet`` ("" = none); returns its path and whether
        it already existed."""
        file_names = release_files()
        if artifact_format not in file_names:
            raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                f"format {artifact_format!r} is not one of {sorted(file_names)}")
        if not _SHA256.match(sha256):
            raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT, "sha256 must be 64 lowercase hex digits")
        if size > max_bytes:
            raise UploadRefused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{size} bytes is over the upload limit of {max_bytes}")
        if fleet:
            check_id("fleet", fleet)  # ValueError: refused before any path is built
        existing = self.find(name, version)
        if existing is not None:
            if existing.stat().st_size == size and self.sha256(existing) == sha256:
                with self._lock:
                    self._publish_for(name, version, fleet)
                return existing, True
            raise UploadRefused(grpc.StatusCode.ALREADY_EXISTS,
                                f"{name} version {version} is already published with another file; "
                                "publish a new version")
        vdir = self.version_dir(name, version)
        vdir.mkdir(parents=True, exist_ok=True)
        final = vdir / file_names[artifact_format]
        digest, written = hashlib.sha256(), 0
        with atomic_open(final) as f:  # lands only once every check below has passed
            for block in blocks:
                written += len(block)
                if written > size:
                    raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"more data than the announced {size} bytes")
                digest.update(block)
                f.write(block)
            if written != size:
                raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"received {written} bytes, {size} were announced")
            if digest.hexdigest() != sha256:
                raise UploadRefused(grpc.StatusCode.DATA_LOSS,
                                    f"received data has sha256 {digest.hexdigest()}, {sha256} was announced")
        with self._lock:
            self._publish_for(name, version, fleet)
        return final, False


class ArtifactServicer(pb_grpc.ArtifactServiceServicer):
    """Thin gRPC layer over :class:`ReleaseStore`; with an ``authenticator``, a device downloads only
    its own fleet's releases (the auth interceptor already keeps uploads to operators)."""

    def __init__(self, store: ReleaseStore, chunk_bytes: int = CHUNK_BYTES, allow_upload: bool = True,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 authenticator: Authenticator | None = None) -> None:
        self.store = store
        self.chunk_bytes = chunk_bytes
        self.allow_upload = allow_upload
        self.max_upload_bytes = max_upload_bytes
        self.authenticator = authenticator

    def Download(self, request: pb.DownloadRequest,  # noqa: N802 - gRPC method names
                 context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        try:
            path = self.store.find(request.name, request.version)
        except ValueError as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        if self.authenticator is not None:  # before NOT_FOUND: other fleets' versions stay unseen
            try:
                identity = self.authenticator.of_context(context)
                may_download(identity, request.name, request.version,
                             self.store.fleets(request.name, request.version))
            except AuthRefused as e:
                log.warning("event=artifact_download_refused name=%s version=%d code=%s reason=%r peer=%s",
                            request.name, request.version, e.code.name, str(e), context.peer())
                abort(context, e.code, str(e))
                return
        if path is None:
            abort(context, grpc.StatusCode.NOT_FOUND,
                          f"no release file for {request.name} version {request.version}")
            return
        size = path.stat().st_size
        if request.offset > size:
            abort(context, grpc.StatusCode.OUT_OF_RANGE,
                          f"offset {request.offset} is past the end ({size} bytes)")
            return
        sha256 = self.store.sha256(path)
        log.info("event=artifact_download name=%s version=%d offset=%d size=%d peer=%s", request.name,
                 request.version, request.offset, size, context.peer())
        with open(path, "rb") as f:
            f.seek(request.offset)
            pos = request.offset
            first = True
            while True:
                data = f.read(self.chunk_bytes)
                if not data and not first:
                    return
                yield pb.Chunk(offset=pos, data=data, total_size=size, sha256=sha256 if first else "")
                first = False
                pos += len(data)
                if not data:  # offset == size: one empty chunk carries size and sha256
                    return

    def Upload(self, request_iterator: Iterator[pb.UploadChunk],  # noqa: N802
               context: grpc.ServicerContext) -> pb.UploadResult:
        if not self.allow_upload:
            abort(context, grpc.StatusCode.PERMISSION_DENIED, "uploads are disabled on this gateway")
            return
        header = next(request_iterator, None)
        if header is None:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty upload")
            return
        blocks = itertools.chain([header.data], (chunk.data for chunk in request_iterator))
        try:
            path, existed = self.store.add(header.name, header.version, header.format, header.total_size,
                                           header.sha256, blocks, self.max_upload_bytes, header.fleet)
        except ValueError as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        except UploadRefused as e:
            log.warning("event=artifact_upload_refused name=%s version=%d code=%s reason=%r", header.name,
                        header.version, e.code.name, str(e))
            abort(context, e.code, str(e))
            return
        log.info("event=artifact_uploaded name=%s version=%d size=%d existed=%s fleet=%s path=%s",
                 header.name, header.version, header.total_size, existed, header.fleet or "none", path)
        return pb.UploadResult(name=header.name, version=header.version, size=header.total_size,
                               sha256=header.sha256, existed=existed)


@dataclass(frozen=True)
class ArtifactService:
    """``add(server)`` for :func:`edgecloud.protocol.server.start_server`'s ``extra_services``."""

    servicer: ArtifactServicer
    service_name: str = SERVICE_NAME

    def __call__(self, server: grpc.Server) -> None:
        pb_grpc.add_ArtifactServiceServicer_to_server(self.servicer, server)


def add_artifact_service(repo_root: Path, *, chunk_bytes: int = CHUNK_BYTES, allow_upload: bool = True,
                         max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                         authenticator: Authenticator | None = None) -> ArtifactService:
    """The artifact service over ``repo_root``'s release directory, ready to pass to start_server."""
    store = ReleaseStore(repo_root)
    return ArtifactService(ArtifactServicer(store, chunk_bytes, allow_upload, max_upload_bytes,
                                            authenticator))
