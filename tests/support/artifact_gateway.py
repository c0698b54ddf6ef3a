"""An artifact-only gateway for download tests: stoppable, restartable on the same port, and able to
stall a download stream at a known chunk."""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc

from cloud_gateway.artifacts import ArtifactService, ArtifactServicer, ReleaseStore, add_artifact_service
from edgecloud.endpoint import Endpoint

CHUNK = 64 * 1024


class Cut(Exception):
    """Raised from a progress callback to cut a download."""


class StallingServicer(ArtifactServicer):
    """Holds every download stream open after ``stall_after`` chunks, so a test can stop the gateway
    at a known byte (gRPC may have sent a whole small file before a stop otherwise)."""

    def __init__(self, store: ReleaseStore, stall_after: int) -> None:
        super().__init__(store, chunk_bytes=CHUNK)
        self.stall_after = stall_after
        self.stalled, self.released = threading.Event(), threading.Event()

    def Download(self, request, context):  # noqa: N802
        for i, chunk in enumerate(super().Download(request, context)):
            if i == self.stall_after:
                self.stalled.set()
                self.released.wait(10)
                return  # stopped meanwhile: send nothing more
            yield chunk


class Gateway:
    """A gRPC server with only the artifact service; stoppable and restartable on the same port."""

    def __init__(self, repo: Path, tls=None, **options) -> None:
        self.repo, self.tls, self.options, self.port = repo, tls, options, 0
        self.server: grpc.Server | None = None
        self.stalling: StallingServicer | None = None

    def start(self, stall_after: int | None = None) -> Gateway:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        if stall_after is None:
            add_artifact_service(self.repo, chunk_bytes=CHUNK, **self.options)(self.server)
        else:
            self.stalling = StallingServicer(ReleaseStore(self.repo), stall_after)
            ArtifactService(self.stalling)(self.server)
        address = f"127.0.0.1:{self.port}"
        if self.tls:
            pair = (self.tls.key.read_bytes(), self.tls.cert.read_bytes())
            credentials = grpc.ssl_server_credentials([pair])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            stopped = self.server.stop(0)
            if self.stalling is not None:
                self.stalling.released.set()
                self.stalling = None
            stopped.wait()
            self.server = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    def uri(self, name: str, version: int) -> str:
        return f"grpc{'s' if self.tls else ''}://127.0.0.1:{self.port}/{name}/{version}"
