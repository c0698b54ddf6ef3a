"""System health from a fake Jetson procfs/sysfs tree, a bare tree, and this machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edge_agent.fleet.sysinfo import SystemMonitor


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def jetson(tmp_path) -> Path:
    """The files a Jetson Orin on JetPack 6 exposes, with known values."""
    write(tmp_path, "proc/loadavg", "1.50 0.75 0.25 2/345 6789\n")
    write(tmp_path, "proc/stat", "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\n")
    write(tmp_path, "proc/meminfo", "MemTotal:       8000000 kB\nMemFree:        1000000 kB\n"
                                    "MemAvailable:   6000000 kB\n")
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "45500\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/type", "gpu-thermal\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/temp", "47250\n")
    write(tmp_path, "sys/class/thermal/thermal_zone2/type", "tj-thermal\n")  # no temp file: skipped
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


def test_reads_a_jetson(jetson):
    monitor = SystemMonitor(jetson)
    first = monitor.sample()
    assert first["cpu"]["load1"] == 1.5 and first["cpu"]["load15"] == 0.25
    assert "usage" not in first["cpu"]  # needs two samples
    assert first["memory"] == {"total_bytes": 8_192_000_000, "available_bytes": 6_144_000_000,
                               "used_bytes": 2_048_000_000}
    assert first["temperatures_c"] == {"cpu-thermal": 45.5, "gpu-thermal": 47.2}
    assert first["gpu_load"] == 0.523
    assert first["power_mw"] == {"VDD_GPU_SOC": 6000.0, "VDD_CPU_CV": 2000.0}

    # 300 more jiffies of which 100 idle: 2/3 busy
    write(jetson, "proc/stat", "cpu  200 0 200 900 0 0 0 0 0 0\n")
    assert monitor.sample()["cpu"]["usage"] == pytest.approx(0.6667, abs=1e-4)


def test_absent_sources_are_left_out_quietly(tmp_path):
    write(tmp_path, "proc/stat", "garbage\n")
    write(tmp_path, "proc/meminfo", "MemTotal: 1 kB\n")  # no MemAvailable
    write(tmp_path, "sys/devices/platform/gpu.0/load", "n/a\n")
    sample = SystemMonitor(tmp_path).sample()
    assert set(sample) <= {"cpu"}
    assert set(sample.get("cpu", {})) <= {"count"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc of a Linux host")
def test_reads_this_machine():
    monitor = SystemMonitor()
    monitor.sample()
    sample = monitor.sample()
    assert sample["memory"]["total_bytes"] > 0
    assert 0.0 <= sample["cpu"].get("usage", 0.0) <= 1.0
