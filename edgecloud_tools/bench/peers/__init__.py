"""The bench's peers: other servers on the same model and load, each in its own venv with pinned versions.

The peers' programs live in this package, not in the repository's ``bench/`` folder, so that
``edgecloud bench`` finds them from an installed distribution as well as from a checkout; they are never
imported by the bench itself (their packages are not in its environment): each runs by path with its own
venv's interpreter, and MLServer imports its runtime from the model folder the bench writes.

A venv is made on first use under ``$EDGECLOUD_BENCH_PEERS`` (default ``~/.cache/edgecloud/bench-peers``),
keyed by the pins and the Python version, and reused after; ONNX Runtime and numpy are pinned to the
versions the bench itself runs, so every server calls the same runtime. A peer that cannot be installed
is reported "not installed" with the reason, never a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from edgecloud_tools.rig.services import ServiceProcess

PEERS_ENV = "EDGECLOUD_BENCH_PEERS"
HERE = Path(__file__).resolve().parent
#: how long one peer's install may take
INSTALL_TIMEOUT_S = 900


@dataclass(frozen=True)
class Peer:
    """A peer server: its key, what the table calls it, and its own pins."""

    key: str
    title: str
    requirements: tuple[str, ...]

    def pins(self) -> tuple[str, ...]:
        return (*self.requirements, f"onnxruntime=={version('onnxruntime')}", f"numpy=={version('numpy')}")

    def venv(self, root: Path) -> Path:
        digest = hashlib.sha256("\n".join(self.pins()).encode()).hexdigest()[:10]
        return root / f"{self.key}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"


FASTAPI = Peer("fastapi", "FastAPI + uvicorn (JSON)", ("fastapi==0.165.0", "uvicorn[standard]==0.54.0"))
# MLServer 1.7.1 needs protobuf < 7, a FastAPI older than 0.116 (newer ones break its app) and a uvloop
# older than 0.22 (its inference workers die at start with newer ones).
MLSERVER = Peer("mlserver", "MLServer 1.7.1 (ONNX Runtime runtime)",
                ("mlserver==1.7.1", "protobuf==6.33.6", "fastapi==0.115.14", "uvloop==0.21.0"))


def venv_root() -> Path:
    return Path(os.environ.get(PEERS_ENV) or Path.home() / ".cache" / "edgecloud" / "bench-peers")


def peer_python(peer: Peer, root: Path, make: bool) -> tuple[Path | None, str]:
    """The interpreter of ``peer``'s venv and "installed", or None and why not; makes the venv when
    ``make`` and it is missing."""
    venv = peer.venv(root)
    python, stamp = venv / "bin" / "python", venv / ".installed"
    if stamp.exists() and python.exists():
        return python, "installed"
    if not make:
        return None, "not installed (quick mode and --no-peer-install make no venv; a full run does)"
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}.install.log"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True,
                       timeout=120)
        with open(log, "wb") as out:
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            *peer.pins()], check=True, stdout=out, stderr=subprocess.STDOUT,
                           timeout=INSTALL_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        shutil.rmtree(venv, ignore_errors=True)
        return None, f"not installed ({type(e).__name__}; pip's output is in {log})"
    stamp.write_text("\n".join(peer.pins()) + "\n")
    return python, "installed"


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def fastapi_server(python: Path, model: Path, port: int, log: Path) -> ServiceProcess:
    command = [str(python), str(HERE / "fastapi_peer.py"), "--model", str(model), "--port", str(port)]
    return ServiceProcess(FASTAPI.title, [], port, log, command=command,
                          ready=lambda: http_ready(f"http://127.0.0.1:{port}/health"))


def mlserver_server(python: Path, model: Path, name: str, ports: tuple[int, int, int], folder: Path,
                    max_batch_size: int = 0, max_batch_time_s: float = 0.0) -> ServiceProcess:
    """MLServer with its defaults (one inference worker process, metrics on) but for loopback and free
    ports; ``max_batch_size`` > 1 turns on its adaptive batching."""
    http, grpc_port, metrics = ports
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "mlserver_peer.py", folder / "mlserver_peer.py")
    (folder / "settings.json").write_text(json.dumps({
        "debug": False, "host": "127.0.0.1", "http_port": http, "grpc_port": grpc_port,
        "metrics_port": metrics, "metrics_dir": str(folder / ".metrics"),
        "environments_dir": str(folder / ".envs"), "model_repository_root": str(folder)}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": name, "implementation": "mlserver_peer.OnnxRuntimeModel",
        "parameters": {"uri": str(model)}, "max_batch_size": max_batch_size,
        "max_batch_time": max_batch_time_s}))
    command = [str(python.parent / "mlserver"), "start", str(folder)]
    return ServiceProcess(MLSERVER.title, [], grpc_port, folder / "mlserver.log", command=command,
                          ready=lambda: http_ready(f"http://127.0.0.1:{http}/v2/models/{name}/ready"))
