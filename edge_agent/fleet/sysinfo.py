"""System health for telemetry: CPU, memory and temperatures through psutil; on a Jetson the GPU load
and the INA3221 power rails through jetson-stats (its ``jtop`` service) where it is installed and
running, else read from sysfs.

Whatever a machine does not have is left out quietly: the same code runs on a Jetson, a PC and in CI,
where tests point ``root`` at a fake sysfs tree.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)
#: present on every Jetson (L4T); jtop is only tried there
TEGRA_RELEASE = "etc/nv_tegra_release"


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


class SysfsJetson:
    """GPU load and power rails read from a Jetson's sysfs under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def gpu_load(self) -> float | None:
        """GPU busy share 0..1 from ``/sys/devices/platform/gpu.0/load`` (per mille)."""
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

    def close(self) -> None:
        """Nothing held."""


class JtopJetson:
    """GPU load and power rails from jetson-stats: a started ``jtop`` client, whose service reads what
    the board offers on every JetPack (and keeps working where sysfs paths move between releases)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @classmethod
    def open(cls) -> JtopJetson | None:
        """A connected client, or None when jetson-stats is not installed or its service is not there."""
        try:
            from jtop import JtopException, jtop
        except ImportError:
            return None
        client = jtop()
        try:
            client.start()
        except (JtopException, OSError) as e:
            log.info("event=jtop_unavailable error=%r fallback=sysfs", str(e))
            return None
        return cls(client)

    def gpu_load(self) -> float | None:
        """The first GPU's load (jtop gives percent) as a share 0..1."""
        gpus: Mapping[str, Any] = self.client.gpu
        for gpu in gpus.values():
            load = gpu.get("status", {}).get("load")
            if load is not None:
                return round(float(load) / 100.0, 4)
        return None

    def power_rails(self) -> dict[str, float]:
        """Rail name → mW, the rails jtop reports online."""
        rails: Mapping[str, Any] = self.client.power.get("rail", {})
        return {name: round(float(rail["power"]), 1) for name, rail in rails.items()
                if rail.get("online", True) and rail.get("power") is not None}

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the service may be gone already; nothing to keep
            self.client.close()


class SystemMonitor:
    """Samples system health; ``root`` is ``/`` on a real machine (a fake tree in tests: only the
    Jetson sysfs readers look there).

    CPU usage is the busy share between two samples, so the first sample has none; keep one monitor
    for the life of the telemetry loop, and ``close`` it at the end (a jtop client holds a connection).
    """

    def __init__(self, root: Path = Path("/"), jetson: SysfsJetson | JtopJetson | None = None) -> None:
        self.root = Path(root)
        self._last_cpu: tuple[float, float] | None = None
        self._jetson = jetson

    def sample(self) -> dict[str, Any]:
        """One telemetry ``system`` object; keys whose source is absent are omitted."""
        jetson = self.jetson()
        out: dict[str, Any] = {}
        for key, value in (("cpu", self.cpu()), ("memory", self.memory()),
                           ("temperatures_c", self.temperatures()), ("gpu_load", jetson.gpu_load()),
                           ("power_mw", jetson.power_rails())):
            if value is not None and value != {}:
                out[key] = value
        return out

    def jetson(self) -> SysfsJetson | JtopJetson:
        """jtop on a Jetson where jetson-stats runs, else sysfs (chosen at the first sample)."""
        if self._jetson is None:
            on_jetson = self.root == Path("/") and (self.root / TEGRA_RELEASE).exists()
            self._jetson = (JtopJetson.open() if on_jetson else None) or SysfsJetson(self.root)
        return self._jetson

    def close(self) -> None:
        if self._jetson is not None:
            self._jetson.close()

    def cpu(self) -> dict[str, float] | None:
        """Load averages, core count, and busy share since the previous sample (0..1)."""
        out: dict[str, float] = {}
        with contextlib.suppress(OSError):
            out["load1"], out["load5"], out["load15"] = (round(v, 2) for v in psutil.getloadavg())
        cores = psutil.cpu_count()
        if cores:
            out["count"] = cores
        usage = self._cpu_usage()
        if usage is not None:
            out["usage"] = usage
        return out or None

    def _cpu_usage(self) -> float | None:
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        # guest time is already counted in user
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        previous, self._last_cpu = self._last_cpu, (total, idle)
        if previous is None or total <= previous[0]:
            return None
        return round(1.0 - (idle - previous[1]) / (total - previous[0]), 4)

    def memory(self) -> dict[str, int] | None:
        """Total, available and used (= total - available) bytes; shared with the GPU on a Jetson."""
        memory = psutil.virtual_memory()
        if not memory.total:
            return None
        return {"total_bytes": memory.total, "available_bytes": memory.available,
                "used_bytes": memory.total - memory.available}

    def temperatures(self) -> dict[str, float]:
        """Sensor → °C: a thermal zone or sensor chip by its name, ``name/label`` where a chip has
        several readings."""
        temps = {}
        with contextlib.suppress(AttributeError):  # psutil has no sensors on this platform
            for name, readings in psutil.sensors_temperatures().items():
                for i, reading in enumerate(readings):
                    key = name if len(readings) == 1 else f"{name}/{reading.label or i}"
                    temps[key] = round(reading.current, 1)
        return temps
