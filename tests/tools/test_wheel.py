"""The wheel is the product: built from the sources, installed (not editable) into a fresh venv, it runs
the demo and calibration from a directory that is not a checkout, on the models it carries, and writes
nothing into its own package. Offline: the build uses the test venv's setuptools, the venv reuses the
test venv's installed dependencies (a path in a ``.pth`` file) and the wheel installs with ``--no-deps``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from edgecloud_tools.rig.broker import mosquitto_path
from tests.conftest import ROOT

#: what a build reads; copied so that building leaves no build/ or egg-info in the checkout
SOURCES = ("pyproject.toml", "setup.py", "README.md", "edgecloud", "edge_agent", "cloud_gateway",
           "edgecloud_tools", "models", "protos")
DATA = ("edgecloud_tools/models/edge/inspection-edge-int8.onnx",
        "edgecloud_tools/models/edge/inspection-edge-int8.onnx.card.json",
        "edgecloud_tools/models/edge/inspection-edge-v2-int8.onnx.card.json",
        "edgecloud_tools/models/repository/inspection/1/model.onnx",
        "edgecloud/protos/inference/grpc_service.proto",
        "edgecloud/protos/schemas/model_card.schema.json",
        "edgecloud/protos/schemas/release.schema.json")


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    ignore = shutil.ignore_patterns("__pycache__", ".releases", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "-w", out, src, cwd=src)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    (path,) = out.glob("edgecloud-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel; its dependencies are the test venv's, found through a .pth line
    (a .pth inside that directory, such as the checkout's editable finder, is not run from there)."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                  cwd=root).stdout.strip()
    (Path(purelib) / "test-venv-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
               wheel, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def clean_env(installed: Path) -> dict[str, str]:
    """No checkout on the path, no models directory configured: only what the wheel carries."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGECLOUD_MODELS", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{installed / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


def test_the_wheel_carries_the_models_cards_protos_and_schemas(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(DATA) <= names, sorted(set(DATA) - names)
    assert not any("/.releases/" in n or n.startswith(("models/", "protos/", "tests/")) for n in names)


def test_an_installed_wheel_runs_the_demo_outside_a_checkout(installed: Path, tmp_path: Path) -> None:
    module = run(installed / "bin" / "python", "-c", "import edgecloud_tools as t; print(t.__file__)",
                 cwd=tmp_path, env=clean_env(installed)).stdout.strip()
    models = run(installed / "bin" / "edgecloud", "models", "path", cwd=tmp_path,
                 env=clean_env(installed)).stdout.strip()
    assert module.startswith(str(installed)) and models.startswith(str(installed)), (module, models)
    flags = [] if mosquitto_path() is not None else ["--no-update"]
    demo = run(installed / "bin" / "edgecloud", "demo", "--n", "20", "--wan-ms", "2", "--json",
               tmp_path / "summary.json", "--workdir", tmp_path / "work", *flags,
               cwd=tmp_path, env=clean_env(installed))
    assert demo.returncode == 0, demo.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images"] == 20 and summary["failed_requests"] == 0
    assert summary["accuracy"]["cascade"] >= 0.8
    if flags == []:
        assert summary["update"]["state"] == "active", summary["update"]
    assert not list(Path(models).rglob(".releases"))


def test_an_installed_wheel_runs_a_bench_stage_into_the_current_directory(installed: Path,
                                                                          tmp_path: Path) -> None:
    bench = run(installed / "bin" / "edgecloud", "bench", "--quick", "--only", "cold_start",
                "--no-peer-install", cwd=tmp_path, env=clean_env(installed))
    assert bench.returncode == 0, bench.stderr[-3000:]
    result = json.loads((tmp_path / "bench" / "results" / "bench.json").read_text())
    assert result["cold_start"]["starts"] and "error" not in result["cold_start"]


def test_an_installed_wheel_calibrates_but_never_writes_into_its_package(installed: Path,
                                                                         tmp_path: Path) -> None:
    edgecloud = installed / "bin" / "edgecloud"
    dry = run(edgecloud, "calibrate", "--n", "200", "--dry-run", cwd=tmp_path, env=clean_env(installed))
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "threshold" in dry.stdout
    refused = run(edgecloud, "calibrate", "--n", "200", cwd=tmp_path, env=clean_env(installed))
    assert refused.returncode == 2
    assert "installed package" in refused.stderr and "Traceback" not in refused.stderr
    packaged = run(installed / "bin" / "python", "-c",
                   "import edgecloud_tools.toolchain as t; print(t.packaged_models_dir())",
                   cwd=tmp_path, env=clean_env(installed)).stdout.strip()
    build = run(edgecloud, "models", "build", "--out", packaged, cwd=tmp_path, env=clean_env(installed))
    assert build.returncode == 2 and "installed package" in build.stderr, build.stderr[-2000:]
