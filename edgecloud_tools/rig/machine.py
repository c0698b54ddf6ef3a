"""The facts of the machine a run measures on, written beside its figures so a reader can weigh them."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path


def machine(client_procs: int) -> dict:
    with open("/proc/meminfo") as f:
        total_kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    gpu = "a GPU (not used)" if Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") else "no GPU"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(total_kib / 2**20, 1), "gpu": gpu,
            "python": platform.python_version(), "onnxruntime": version("onnxruntime"),
            "grpcio": version("grpcio"), "tritonclient": version("tritonclient"),
            "platform": platform.platform(), "commit": commit, "client_procs": client_procs,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
