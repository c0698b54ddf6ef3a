"""The agent under systemd's notify protocol, over a real unix datagram socket as NOTIFY_SOCKET."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import grpc
import numpy as np
import pytest

from edgecloud.client import KServeClient
from edgecloud_tools.rig.services import ServiceProcess
from tests.support.net import free_port
from tests.support.onnx_models import linear_classifier

BACKEND = "tests.plugins.backends:SlowOrtBackend"


class NotifySocket:
    """Collects sd_notify datagrams with the time each arrived."""

    def __init__(self) -> None:
        self.name = f"@edgecloud-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, assignment: str) -> list[float]:
        return [t for t, m in self.messages if assignment in m.split("\n")]

    def wait(self, assignment: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.times(assignment)
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no {assignment} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket():
    s = NotifySocket()
    yield s
    s.close()


def start(tmp_path, notify_socket, watchdog_usec: int | None = None) -> tuple[ServiceProcess, int]:
    model = linear_classifier(tmp_path / "m.onnx")
    delay = tmp_path / "delay"
    env = {"NOTIFY_SOCKET": notify_socket.name, "EDGECLOUD_TEST_DELAY_FILE": str(delay)}
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    port = free_port()
    agent = ServiceProcess("edge-agent", ["--model", str(model), "--backend", BACKEND, "--name", "m",
                                          "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path)],
                           port, tmp_path / "agent.log", env=env)
    return agent, port


def test_ready_after_warmup_then_stopping_and_drain_on_sigterm(tmp_path, notify_socket):
    agent, port = start(tmp_path, notify_socket)
    (tmp_path / "delay").write_text("1.5")  # warm-up and every call take 1.5 s
    t0 = time.monotonic()
    agent.start()
    ready = notify_socket.wait("READY=1")
    assert ready - t0 >= 1.5, "READY=1 came before the warm-up inference finished"
    log = agent.log_path.read_text()
    assert log.index("event=model_loaded") < log.index("event=agent_ready")
    assert any(m.startswith("READY=1\nSTATUS=serving m version 0") for _, m in notify_socket.messages)

    client = KServeClient(f"127.0.0.1:{port}")
    x = np.ones((1, 8), dtype=np.float32)
    result: dict = {}
    in_flight = threading.Thread(target=lambda: result.update(r=client.infer("m", {"x": x}, timeout=20)))
    in_flight.start()
    time.sleep(0.5)  # the call is inside the slow backend now
    agent.signal(15)
    notify_socket.wait("STOPPING=1", timeout=5)
    time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as refused:
        KServeClient(f"127.0.0.1:{port}").infer("m", {"x": x}, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    in_flight.join(timeout=20)
    assert "r" in result and result["r"].outputs["logits"].shape == (1, 4), "in-flight call was dropped"
    assert agent.proc.wait(20) == 0


def test_watchdog_pings_at_half_interval_and_stop_when_inference_hangs(tmp_path, notify_socket):
    agent, _ = start(tmp_path, notify_socket, watchdog_usec=1_000_000)
    with agent:
        notify_socket.wait("READY=1")
        time.sleep(2.6)
        pings = notify_socket.times("WATCHDOG=1")
        assert len(pings) >= 4, f"expected a ping every ~0.5 s, got {len(pings)}"
        gaps = np.diff(pings)
        assert 0.3 < float(np.median(gaps)) < 0.8
        (tmp_path / "delay").write_text("3600")  # the backend hangs from now on
        time.sleep(1.5)  # the probe's last run finished; a whole interval without progress
        stalled_at = len(notify_socket.times("WATCHDOG=1"))
        time.sleep(1.5)
        assert len(notify_socket.times("WATCHDOG=1")) == stalled_at, "pings went on while inference hung"
        assert "event=watchdog_stalled" in agent.log_path.read_text()
        (tmp_path / "delay").unlink()
        agent.proc.kill()
