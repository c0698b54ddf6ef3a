"""sd_notify over a real unix datagram socket standing in for systemd's NOTIFY_SOCKET, and a watchdog
whose pings stop when inference hangs."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.systemd import InferenceProbe, Watchdog, notify, watchdog_interval


class NotifySocket:
    """What systemd listens on: a bound unix datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def receive(self, timeout: float = 1.0) -> str | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        except TimeoutError:
            return None

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        """Every datagram that arrives within ``seconds``, with its arrival time."""
        end, got = time.monotonic() + seconds, []
        while (left := end - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                got.append((time.monotonic(), message))
        return got


@pytest.fixture
def systemd() -> Iterator[tuple[NotifySocket, dict[str, str]]]:
    with tempfile.TemporaryDirectory(prefix="sd") as d:  # short: unix socket paths max out at 107 bytes
        path = str(Path(d) / "notify")
        listener = NotifySocket(path)
        yield listener, {"NOTIFY_SOCKET": path}
        listener.sock.close()


def test_notify_sends_one_datagram(systemd):
    listener, env = systemd
    assert notify("READY=1", "STATUS=serving edge model v3", env=env)
    assert listener.receive() == "READY=1\nSTATUS=serving edge model v3"
    assert notify("STOPPING=1", env=env)
    assert listener.receive() == "STOPPING=1"


def test_notify_to_the_abstract_namespace():
    name = f"edgecloud-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = NotifySocket("\0" + name)
    try:
        assert notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert listener.receive() == "READY=1"
    finally:
        listener.sock.close()


def test_notify_outside_systemd_is_a_quiet_no(tmp_path):
    assert notify("READY=1", env={}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_watchdog_interval_from_the_environment():
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    for env in ({}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "soon"}):
        assert watchdog_interval(env) is None


def test_pings_at_half_the_interval_while_progress_advances(systemd):
    listener, env = systemd
    counter = iter(range(10**6))
    watchdog = Watchdog(0.2, lambda: next(counter), send=lambda *a: notify(*a, env=env))
    with watchdog:
        pings = listener.collect(0.75)
    assert all(message == "WATCHDOG=1" for _, message in pings)
    gaps = np.diff([t for t, _ in pings])
    assert 5 <= len(pings) <= 9, pings
    assert 0.07 <= float(np.median(gaps)) <= 0.15
    assert watchdog.pings >= len(pings)
    watchdog.stop()  # twice is fine


class HangingBackend:
    """An inference backend that answers until told to hang, then blocks like a stuck GPU call."""

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.release = threading.Event()

    def infer(self, inputs):
        if self.hang.is_set():
            self.release.wait()
        return {"logits": np.zeros((1, 3), np.float32)}


def test_pings_stop_when_inference_hangs_and_resume_when_it_recovers(systemd):
    listener, env = systemd
    backend = HangingBackend()
    probe = InferenceProbe(lambda: backend.infer({"x": np.zeros((1, 4), np.float32)}), period_s=0.02).start()
    watchdog = Watchdog(0.2, probe.progress, send=lambda *a: notify(*a, env=env)).start()
    try:
        assert len(listener.collect(0.5)) >= 3  # serving: pings flow
        backend.hang.set()
        # the allowance runs out: the last change is seen within a tick, then one interval passes
        listener.collect(0.6)
        assert listener.collect(0.5) == []  # hung: no more pings, so systemd's timeout would fire
        backend.release.set()
        backend.hang.clear()
        assert listener.collect(0.5), "pings resume once inference progresses again"
    finally:
        backend.release.set()
        watchdog.stop()
        probe.stop()


def test_probe_counts_only_successful_runs():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) % 2:
            raise RuntimeError("transient")

    probe = InferenceProbe(flaky, period_s=0.005).start()
    deadline = time.monotonic() + 2
    while probe.progress() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    probe.stop()
    assert probe.progress() >= 3 and len(calls) >= 2 * probe.progress() - 1


def test_broken_progress_source_stops_the_pings(systemd):
    listener, env = systemd

    def progress():
        raise RuntimeError("probe state unreadable")

    with Watchdog(0.2, progress, send=lambda *a: notify(*a, env=env)):
        pings = listener.collect(0.6)
    assert len(pings) <= 3  # only within the first interval's allowance
