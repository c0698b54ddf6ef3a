"""Client channels (``edgecloud.channel``): while a server is away they keep trying to reconnect about
once a second, instead of gRPC's default backoff that grows to minutes; a ``dns:///`` target is
balanced over every address of the name."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgecloud.channel import ClientTLS, open_channel
from edgecloud.endpoint import free_loopback_port
from edgecloud.errors import ConfigError
from edgecloud.protocol.server import ServerTLS
from edgecloud_tools.certs import issue, make_ca
from tests.support.dns import TinyDNS
from tests.support.net import wait_for

ATTEMPTS = 7  # the default backoff (1 s, x1.6) makes the 7th try ~26 s after the first


class RefusingServer:
    """A TCP port that accepts and drops every connection (a gateway that is not there yet), and
    notes when each try came."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.tries: list[float] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            self.tries.append(time.monotonic())
            connection.close()

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def refusing() -> Iterator[RefusingServer]:
    server = RefusingServer()
    yield server
    server.close()


def test_a_channel_retries_its_connection_at_the_capped_interval(refusing: RefusingServer) -> None:
    channel = open_channel(f"127.0.0.1:{refusing.port}")
    channel.subscribe(lambda _state: None, try_to_connect=True)
    try:
        assert wait_for(lambda: len(refusing.tries) >= ATTEMPTS, timeout=12), refusing.tries
    finally:
        channel.close()
    gaps = [b - a for a, b in zip(refusing.tries, refusing.tries[1:])]
    assert max(gaps[:ATTEMPTS - 1]) < 2.0, gaps  # 1 s cap, ±20 % jitter; the default reaches 4.2 s by now


def test_a_dns_target_spreads_calls_over_every_address_of_the_name(tmp_path: Path) -> None:
    """``dns:///`` over a headless Service gives one address per pod; the channel's round_robin calls
    them all. Two TLS servers on the same port of 127.0.0.1 and 127.0.0.2 stand for two pods (one says
    SERVING, the other NOT_SERVING, so each answer tells who gave it), named gw.test by a DNS server
    of the test's own."""
    make_ca(tmp_path / "ca", "test-ca")
    pair = issue(tmp_path / "ca", tmp_path / "gw", "gw.test", hosts=["gw.test"])
    tls = ServerTLS(pair.cert, pair.key)
    port = free_loopback_port()
    servers = []
    for address, status in (("127.0.0.1", health_pb2.HealthCheckResponse.SERVING),
                            ("127.0.0.2", health_pb2.HealthCheckResponse.NOT_SERVING)):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("", status)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        assert server.add_secure_port(f"{address}:{port}", tls.credentials()) == port
        server.start()
        servers.append(server)
    dns = TinyDNS({"gw.test": ["127.0.0.1", "127.0.0.2"]})
    channel = open_channel(f"dns://127.0.0.1:{dns.port}/gw.test:{port}",
                           ClientTLS(ca=tmp_path / "ca" / "ca.pem"))
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        answers = [stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status for _ in range(20)]
    finally:
        channel.close()
        dns.close()
        for server in servers:
            server.stop(0)
    # both in turn (the first calls may all go to the one connected first); pick_first keeps to one
    assert min(answers.count(health_pb2.HealthCheckResponse.SERVING),
               answers.count(health_pb2.HealthCheckResponse.NOT_SERVING)) >= 5, answers


@pytest.mark.parametrize("target", ["dns:gw:9001", "dns:///gw", "dns:///unix:/run/x.sock"])
def test_bad_dns_targets_are_config_errors(target: str) -> None:
    with pytest.raises(ConfigError, match="target"):
        open_channel(target)
