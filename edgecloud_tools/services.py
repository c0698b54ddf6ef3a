"""Runs edgecloud's services as child processes, as they run in production: for the demo and tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from edgecloud.client import KServeClient

#: service name → module run with ``python -m``
MODULES = {"edge-agent": "edge_agent.cli", "cloud-gateway": "cloud_gateway.cli"}


class ServiceProcess:
    """One service in a child process, logging to a file; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, name: str, args: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.args, self.port, self.log_path = name, args, port, Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        """Start and wait until the gRPC health check says SERVING (or the process dies)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen([sys.executable, "-m", MODULES[self.name], *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        with KServeClient(f"127.0.0.1:{self.port}") as client:
            while not client.wait_serving(timeout=1.0):
                timeout -= 1.0
                if self.proc.poll() is not None or timeout <= 0:
                    self.stop()
                    raise RuntimeError(f"{self.name} did not start; its log {self.log_path} ends:\n"
                                       + self.log_tail())
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
