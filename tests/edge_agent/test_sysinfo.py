"""System health: CPU, memory and temperatures through psutil (its readings stood in for known values,
and this machine's own), a Jetson's GPU load and power rails from a fake sysfs tree and from a
jetson-stats client of known values."""

from __future__ import annotations

import sys
from collections import namedtuple
from pathlib import Path
from typing import ClassVar

import psutil
import pytest

from edge_agent.fleet.sysinfo import JtopJetson, SysfsJetson, SystemMonitor

CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")
Memory = namedtuple("Memory", "total available percent used free")
Reading = namedtuple("Reading", "label current high critical")


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def jetson(tmp_path) -> Path:
    """The GPU and power files a Jetson Orin on JetPack 6 exposes, with known values."""
    write(tmp_path, "sys/devices/platform/gpu.0/load", "523\n")
    rails = "sys/class/hwmon/hwmon1"
    write(tmp_path, f"{rails}/name", "ina3221\n")
    write(tmp_path, f"{rails}/in1_label", "VDD_GPU_SOC\n")
    write(tmp_path, f"{rails}/in1_input", "5000\n")
    write(tmp_path, f"{rails}/curr1_input", "1200\n")
    write(tmp_path, f"{rails}/in2_label", "VDD_CPU_CV\n")
    write(tmp_path, f"{rails}/in2_input", "5000\n")
    write(tmp_path, f"{rails}/curr2_input", "400\n")
    write(tmp_path, f"{rails}/in3_label", "VIN_SYS_5V0\n")  # no readings: skipped
    write(tmp_path, "sys/class/hwmon/hwmon0/name", "tmp451\n")  # another sensor chip: ignored
    write(tmp_path, "sys/class/hwmon/hwmon0/in1_label", "ignored\n")
    return tmp_path


@pytest.fixture
def readings(monkeypatch):
    """psutil answering known values; ``times`` is what cpu_times gives next."""
    times = [CpuTimes(100, 0, 100, 800, 0, 0, 0, 0, 5, 0)]
    monkeypatch.setattr(psutil, "getloadavg", lambda: (1.5, 0.75, 0.25))
    monkeypatch.setattr(psutil, "cpu_count", lambda: 6)
    monkeypatch.setattr(psutil, "cpu_times", lambda: times[-1])
    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: Memory(8_192_000_000, 6_144_000_000, 25.0, 1_000_000_000, 0))
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {
        "cpu-thermal": [Reading("", 45.5, None, None)], "gpu-thermal": [Reading("", 47.25, None, None)],
        "nvme": [Reading("Composite", 38.0, 80.0, 85.0), Reading("", 40.0, None, None)]})
    return times


def test_reads_a_jetson(jetson, readings):
    monitor = SystemMonitor(jetson)
    first = monitor.sample()
    assert first["cpu"] == {"load1": 1.5, "load5": 0.75, "load15": 0.25, "count": 6}  # usage: two samples
    assert first["memory"] == {"total_bytes": 8_192_000_000, "available_bytes": 6_144_000_000,
                               "used_bytes": 2_048_000_000}
    assert first["temperatures_c"] == {"cpu-thermal": 45.5, "gpu-thermal": 47.2, "nvme/Composite": 38.0,
                                       "nvme/1": 40.0}
    assert first["gpu_load"] == 0.523
    assert first["power_mw"] == {"VDD_GPU_SOC": 6000.0, "VDD_CPU_CV": 2000.0}

    # 300 more jiffies of which 100 idle: 2/3 busy (guest time is inside user already)
    readings.append(CpuTimes(200, 0, 200, 900, 0, 0, 0, 0, 50, 0))
    assert monitor.sample()["cpu"]["usage"] == pytest.approx(0.6667, abs=1e-4)


def test_absent_sources_are_left_out_quietly(tmp_path, readings, monkeypatch):
    write(tmp_path, "sys/devices/platform/gpu.0/load", "n/a\n")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(0, 0, 0.0, 0, 0))
    monkeypatch.delattr(psutil, "sensors_temperatures")  # as on a platform without sensors
    sample = SystemMonitor(tmp_path).sample()
    assert set(sample) == {"cpu"}


class FakeJtop:
    """What jetson-stats' client gives (jtop: ``gpu`` per GPU with load in percent, ``power`` rails)."""

    gpu: ClassVar[dict] = {"gpu": {"type": "integrated", "freq": {"governor": "nvhost_podgov"},
                                   "status": {"railgate": False, "3d_scaling": True, "load": 52.3}}}
    power: ClassVar[dict] = {
        "rail": {"VDD_GPU_SOC": {"online": True, "type": "INA3221", "volt": 5000, "curr": 1200, "power": 6e3},
                 "VDD_CPU_CV": {"online": True, "volt": 5000, "curr": 400, "power": 2000, "avg": 2100},
                 "VIN_SYS_5V0": {"online": False, "power": 0}},
        "tot": {"power": 8000, "avg": 8000}}

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_jetson_stats_readings_take_the_place_of_sysfs(tmp_path, readings):
    client = FakeJtop()
    monitor = SystemMonitor(tmp_path, jetson=JtopJetson(client))
    sample = monitor.sample()
    assert sample["gpu_load"] == 0.523
    assert sample["power_mw"] == {"VDD_GPU_SOC": 6000.0, "VDD_CPU_CV": 2000.0}  # offline rails left out
    monitor.close()
    assert client.closed


def test_without_jetson_stats_a_jetson_reads_sysfs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jtop", None)  # not installed: the import fails
    assert JtopJetson.open() is None
    assert isinstance(SystemMonitor(tmp_path).jetson(), SysfsJetson)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a Linux host")
def test_reads_this_machine():
    monitor = SystemMonitor()
    monitor.sample()
    sample = monitor.sample()
    assert 0 < sample["memory"]["available_bytes"] <= sample["memory"]["total_bytes"]
    assert sample["memory"]["total_bytes"] == psutil.virtual_memory().total
    assert sample["cpu"]["count"] == psutil.cpu_count()
    assert 0.0 <= sample["cpu"].get("usage", 0.0) <= 1.0
    monitor.close()
