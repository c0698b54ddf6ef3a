"""The servers the bench measures, as child processes on loopback: the edge agent, the cloud gateway and
the echo floor, with their memory read from /proc (a service's worker processes included).

Each runs with its defaults but for what the bench must set: free ports, a state directory, quieter logs
and, for the stages that need one, the cloud it escalates to.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from edgecloud.endpoint import free_loopback_port
from edgecloud_tools.rig.services import ServiceProcess
from edgecloud_tools.toolchain import CLOUD_NAME

_PAGE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children…), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (0 for a process that is gone)."""
    total = 0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) that ``pid`` and its descendants have used so far."""
    ticks = 0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / _CLOCK_TICKS


class RssSampler:
    """Samples a service's resident memory every ``interval_s`` while in a ``with`` block."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.before = rss_bytes(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stop(service: ServiceProcess) -> None:
    """Stop ``service`` and any of its worker processes that outlived it (by their ids)."""
    if service.proc is None:
        return
    workers = descendants(service.proc.pid)
    service.stop()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def agent(workdir: Path, model: Path, name: str, *, cloud: int | None = None,
          env: dict[str, str] | None = None, config: Path | None = None,
          device_id: str | None = None, metrics_port: int | None = None) -> ServiceProcess:
    """The edge agent on ``model``; with ``cloud`` (a port on 127.0.0.1) it escalates there, with no
    escalation rate limit in the way (``--max-per-s``), so every row that wants the cloud asks it.
    ``config`` is a TOML file under the flags, for what has no flag."""
    port = free_loopback_port()
    flags = ["--model", str(model), "--listen", f"127.0.0.1:{port}", "--state-dir", str(workdir / name),
             "--device-id", device_id or f"bench-{name}", "--log-level", "WARNING",
             "--metrics-listen", f"127.0.0.1:{metrics_port or free_loopback_port()}"]
    if config is not None:
        flags += ["--config", str(config)]
    if cloud is not None:
        flags += ["--cloud", f"127.0.0.1:{cloud}", "--cloud-model", CLOUD_NAME, "--max-per-s", "100000"]
    return ServiceProcess("edge-agent", flags, port, workdir / f"{name}.log", env=env)


def gateway(workdir: Path, repository: Path, name: str, *, batching: bool = True,
            store: bool = False, config: Path | None = None,
            ready: Callable[[], bool] | None = None) -> ServiceProcess:
    """The cloud gateway on a copy of ``repository``; without ``batching`` the cloud model's
    ``max_batch_size`` is 0 (each request runs alone), else the gateway's defaults. ``config`` is a
    TOML file under the flags (TLS, auth); ``ready`` replaces the plaintext health check."""
    repo = workdir / f"{name}-repository"
    shutil.copytree(repository, repo, ignore=shutil.ignore_patterns(".releases"))
    if not batching:
        (repo / CLOUD_NAME / "config.toml").write_text("max_batch_size = 0\n")
    port = free_loopback_port()
    flags = ["--model-repository", str(repo), "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"]
    if store:
        flags += ["--store", str(workdir / f"{name}-hard-examples.db")]
    if config is not None:
        flags += ["--config", str(config)]
    return ServiceProcess("cloud-gateway", flags, port, workdir / f"{name}.log", ready=ready)


def echo(workdir: Path, models: Mapping[str, Path] | None = None) -> ServiceProcess:
    """The KServe v2 echo and the bare gRPC echo (:mod:`edgecloud_tools.bench.echo`), with ``models``
    (name → file) served bare beside them."""
    port = free_loopback_port()
    command = [sys.executable, "-m", "edgecloud_tools.bench.echo", "--port", str(port)]
    for name, path in (models or {}).items():
        command += ["--model", f"{name}={path}"]
    return ServiceProcess("echo", [], port, workdir / "echo.log", command=command)

