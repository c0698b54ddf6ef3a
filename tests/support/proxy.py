"""A slow cloud for tests: a KServe v2 proxy that holds every call until the test lets go, then passes
it to a real gateway, so "answered before the cloud replied" needs no clock."""

from __future__ import annotations

import threading

from edgecloud.client import KServeClient
from edgecloud.endpoint import parse_endpoint
from edgecloud.protocol.server import start_server


class HeldProxy:
    """Serves on a free loopback port; ``arrived`` is released once per call that reached it."""

    server_name, server_version = "held-proxy", "1"

    def __init__(self, upstream_port: int) -> None:
        self.upstream = KServeClient(f"127.0.0.1:{upstream_port}")
        self.arrived = threading.Semaphore(0)
        self.let_go = threading.Event()
        self.server = start_server(self, parse_endpoint("127.0.0.1:0"))
        self.port = self.server.port

    def is_live(self) -> bool:
        return True

    def is_ready(self) -> bool:
        return True

    def model_ready(self, name: str, version: str) -> bool:
        return True

    def model_metadata(self, name: str, version: str):
        return self.upstream.metadata(name, version)

    def input_contract(self, name: str, version: str):
        return None  # the gateway behind checks the request

    def model_index(self) -> tuple[tuple[str, str], ...]:
        return ()

    def infer(self, request, peer):
        self.arrived.release()
        self.let_go.wait(60)
        return self.upstream.send(request, timeout=30)

    def close(self) -> None:
        self.let_go.set()
        self.server.stop(0)
        self.upstream.close()
