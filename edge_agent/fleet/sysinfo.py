"""System health for telemetry, read from procfs and sysfs (no jtop, no tegrastats).

CPU load and usage, memory, thermal zones, and on a Jetson the GPU load and the INA3221 power rails.
Whatever a machine does not have is left out quietly: the same code runs on a Jetson, a PC and in CI,
where tests point ``root`` at a fake tree.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _number(path: Path) -> float | None:
    text = _read(path)
    try:
        return float(text) if text else None
    except ValueError:
        return None


class SystemMonitor:
    """Samples system health under ``root`` (``/`` on a real machine).

    CPU usage is the busy share between two samples, so the first sample has none; keep one monitor
    for the life of the telemetry loop.
    """

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)
        self._last_cpu: tuple[int, int] | None = None

    def sample(self) -> dict[str, Any]:
        """One telemetry ``system`` object; keys whose source is absent are omitted."""
        out: dict[str, Any] = {}
        for key, value in (("cpu", self.cpu()), ("memory", self.memory()),
                           ("temperatures_c", self.temperatures()), ("gpu_load", self.gpu_load()),
                           ("power_mw", self.power_rails())):
            if value is not None and value != {}:
                out[key] = value
        return out

    def cpu(self) -> dict[str, float] | None:
        """Load averages, core count, and busy share since the previous sample (0..1)."""
        out: dict[str, float] = {}
        load = _read(self.root / "proc/loadavg")
        if load:
            with contextlib.suppress(ValueError):
                out["load1"], out["load5"], out["load15"] = (float(v) for v in load.split()[:3])
        cores = os.cpu_count()
        if cores:
            out["count"] = cores
        usage = self._cpu_usage()
        if usage is not None:
            out["usage"] = usage
        return out or None

    def _cpu_usage(self) -> float | None:
        stat = _read(self.root / "proc/stat")
        if not stat or not stat.startswith("cpu "):
            return None
        try:
            fields = [int(v) for v in stat.splitlines()[0].split()[1:]]
        except ValueError:
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # guest time is already counted in user
        previous, self._last_cpu = self._last_cpu, (total, idle)
        if previous is None or total <= previous[0]:
            return None
        return round(1.0 - (idle - previous[1]) / (total - previous[0]), 4)

    def memory(self) -> dict[str, int] | None:
        """Total, available and used bytes from ``/proc/meminfo`` (shared with the GPU on a Jetson)."""
        text = _read(self.root / "proc/meminfo")
        if not text:
            return None
        kib = {}
        for line in text.splitlines():
            match = re.match(r"(\w+):\s+(\d+)", line)
            if match:
                kib[match.group(1)] = int(match.group(2))
        if "MemTotal" not in kib or "MemAvailable" not in kib:
            return None
        total, available = kib["MemTotal"] * 1024, kib["MemAvailable"] * 1024
        return {"total_bytes": total, "available_bytes": available, "used_bytes": total - available}

    def temperatures(self) -> dict[str, float]:
        """Thermal zone type → °C, from millidegrees in ``/sys/class/thermal/thermal_zone*/temp``."""
        temps = {}
        for zone in sorted((self.root / "sys/class/thermal").glob("thermal_zone*")):
            name, value = _read(zone / "type"), _number(zone / "temp")
            if name and value is not None:
                temps[name] = round(value / 1000.0, 1)
        return temps

    def gpu_load(self) -> float | None:
        """Jetson GPU busy share 0..1 from ``/sys/devices/platform/gpu.0/load`` (per mille)."""
        value = _number(self.root / "sys/devices/platform/gpu.0/load")
        return None if value is None else round(value / 1000.0, 4)

    def power_rails(self) -> dict[str, float]:
        """Rail label → mW from the INA3221 monitors: ``in<N>_input`` (mV) × ``curr<N>_input`` (mA)."""
        rails = {}
        for hwmon in sorted((self.root / "sys/class/hwmon").glob("hwmon*")):
            if _read(hwmon / "name") != "ina3221":
                continue
            for label_file in sorted(hwmon.glob("in*_label")):
                channel = label_file.name[2:-len("_label")]
                label = _read(label_file)
                millivolts = _number(hwmon / f"in{channel}_input")
                milliamps = _number(hwmon / f"curr{channel}_input")
                if label and millivolts is not None and milliamps is not None:
                    rails[label] = round(millivolts * milliamps / 1000.0, 1)
        return rails
