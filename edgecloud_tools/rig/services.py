"""Runs edgecloud's services as child processes, as they run in production: for the demo, the bench and
tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgecloud.client import KServeClient

#: service name → module run with ``python -m``
MODULES = {"edge-agent": "edge_agent.cli", "cloud-gateway": "cloud_gateway.cli"}


def grpc_serving(port: int) -> bool:
    """True when the gRPC health check on 127.0.0.1:``port`` says SERVING."""
    with KServeClient(f"127.0.0.1:{port}") as client:
        return client.serving(timeout=1.0)


class ServiceProcess:
    """One service in a child process, logging to a file; ``stop()`` sends SIGTERM and waits.

    ``command`` replaces ``python -m <the service's module> args`` (for servers that are not edgecloud's,
    e.g. the bench's peers) and ``ready`` the gRPC health check that ``start()`` waits for.
    """

    def __init__(self, name: str, args: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None, *, command: list[str] | None = None,
                 ready: Callable[[], bool] | None = None) -> None:
        self.name, self.args, self.port, self.log_path = name, args, port, Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.command = command or [sys.executable, "-m", MODULES[name], *args]
        self.ready = ready or (lambda: grpc_serving(port))
        self.proc: subprocess.Popen | None = None
        #: seconds from the start of the process until ``ready`` first held
        self.startup_s: float | None = None

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        """Start and wait until ``ready`` holds (or the process dies, or ``timeout`` passes)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        started = time.monotonic()
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() - started > timeout:
                self.stop()
                raise RuntimeError(f"{self.name} did not start; its log {self.log_path} ends:\n"
                                   + self.log_tail())
            time.sleep(0.05)
        self.startup_s = time.monotonic() - started
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def write_toml(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """The flat ``[section] key = value`` TOML the services' configs need (JSON strings, numbers,
    booleans and lists are valid TOML values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Whether ``predicate`` holds within ``timeout_s`` seconds, asked every ``interval_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
