"""Client channels (``edgecloud.channel``): while a server is away they keep trying to reconnect about
once a second, instead of gRPC's default backoff that grows to minutes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from edgecloud.channel import open_channel
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
