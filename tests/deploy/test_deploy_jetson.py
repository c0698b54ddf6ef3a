"""deploy/jetson without a Jetson: scripts pass bash -n and shellcheck, install.sh renders everything into
a temporary prefix in its dry run (idempotent, --uninstall), the unit it renders passes
``systemd-analyze verify``, and the example config and trtexec wrapper say what they should."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig
from edgecloud.config import build, read_toml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "jetson"
INSTALL = DEPLOY / "install.sh"
BUILD = DEPLOY / "build_engine.sh"
SCRIPTS = [INSTALL, BUILD]


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True,
                            timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(path)
    return parser


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script):
    run("bash", "-n", script)
    assert script.stat().st_mode & 0o111


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    run("shellcheck", script)


def test_dry_run_renders_into_the_prefix(tmp_path):
    prefix = tmp_path / "root"
    out = run(INSTALL, "--dry-run", "--prefix", prefix).stdout
    rendered = prefix / "etc/systemd/system/edge-agent.service"
    service = unit(rendered)["Service"]
    assert service["ExecStart"] == (f"{prefix}/opt/edge-agent/venv/bin/edge-agent "
                                    f"--config {prefix}/etc/edge-agent/agent.toml")
    assert (prefix / "etc/systemd/system/edge-agent-clocks.service").exists()
    assert (prefix / "etc/edge-agent/agent.toml").read_text() == (DEPLOY / "agent.toml").read_text()
    assert (prefix / "var/lib/edge-agent/models").is_dir()
    commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert any(c.startswith("useradd --system") and "--groups video" in c and c.endswith(" edgeagent")
               for c in commands)
    assert f"python3 -m venv --system-site-packages {prefix}/opt/edge-agent/venv" in commands
    (pip,) = [c for c in commands if " -m pip install " in c]
    assert pip.endswith("[jetson]") and "tensorrt" not in pip
    assert "systemctl enable edge-agent.service" in commands
    assert not any("edge-agent-clocks" in c for c in commands)  # only with --with-clocks


def test_install_is_idempotent_and_keeps_the_operators_config(tmp_path):
    prefix = tmp_path / "root"
    run(INSTALL, "--dry-run", "--prefix", prefix)
    config = prefix / "etc/edge-agent/agent.toml"
    config.write_text('[agent]\ndevice_id = "line7"\n')
    rendered = prefix / "etc/systemd/system/edge-agent.service"
    before = rendered.read_text()
    out = run(INSTALL, "--dry-run", "--prefix", prefix, "--with-clocks").stdout
    assert "keeping the existing /etc/edge-agent/agent.toml" in out
    assert config.read_text() == '[agent]\ndevice_id = "line7"\n'
    assert rendered.read_text() == before
    assert "+ systemctl enable edge-agent-clocks.service" in out


def test_uninstall_removes_service_and_venv_keeps_config_and_state(tmp_path):
    prefix = tmp_path / "root"
    run(INSTALL, "--dry-run", "--prefix", prefix)
    out = run(INSTALL, "--uninstall", "--dry-run", "--prefix", prefix).stdout
    assert "+ systemctl disable --now edge-agent.service edge-agent-clocks.service" in out
    assert not (prefix / "etc/systemd/system/edge-agent.service").exists()
    assert not (prefix / "opt/edge-agent").exists()
    assert (prefix / "etc/edge-agent/agent.toml").exists() and (prefix / "var/lib/edge-agent").is_dir()


def test_bad_usage_exits_2(tmp_path):
    assert run(INSTALL, "--dry-run", check=False).returncode == 2  # would write to /
    assert run(INSTALL, "--bogus", check=False).returncode == 2
    assert run(BUILD, "m.onnx", "m.plan", "--dry-run", check=False).returncode == 2  # no --input


def test_service_unit_contract():
    service = unit(DEPLOY / "edge-agent.service")
    s = service["Service"]
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure",
        "TimeoutStartSec": "600", "StateDirectory": "edge-agent", "ConfigurationDirectory": "edge-agent",
        "User": "edgeagent", "SupplementaryGroups": "video", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "ExecStart": "/opt/edge-agent/venv/bin/edge-agent --config /etc/edge-agent/agent.toml",
    }
    assert {k: s.get(k) for k in expected} == expected
    assert "PrivateDevices" not in s  # the GPU's device nodes must stay visible
    assert service["Install"]["WantedBy"] == "multi-user.target"


def test_clocks_unit_is_a_oneshot_before_the_agent():
    text = (DEPLOY / "edge-agent-clocks.service").read_text()
    clocks = unit(DEPLOY / "edge-agent-clocks.service")
    assert clocks["Service"]["Type"] == "oneshot" and clocks["Unit"]["Before"] == "edge-agent.service"
    assert "ExecStart=/usr/sbin/nvpmodel -m 0\nExecStart=/usr/bin/jetson_clocks\n" in text


def _systemd_analyze_usable(tmp_path: Path) -> bool:
    if shutil.which("systemd-analyze") is None:
        return False
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    return run("systemd-analyze", "verify", probe, check=False).returncode == 0


def _rendered_unit(tmp_path: Path) -> Path:
    """The unit install.sh's dry run renders, with a stand-in ExecStart (verify wants it to exist)."""
    prefix = tmp_path / "root"
    run(INSTALL, "--dry-run", "--prefix", prefix)
    executable = prefix / "opt/edge-agent/venv/bin/edge-agent"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    return prefix / "etc/systemd/system/edge-agent.service"


def test_systemd_analyze_verifies_the_rendered_unit(tmp_path):
    if not _systemd_analyze_usable(tmp_path):
        pytest.skip("systemd-analyze is missing or cannot verify units here")
    rendered = _rendered_unit(tmp_path)
    result = run("systemd-analyze", "verify", rendered, check=False)
    # verify exits 0 even for unknown keys or bad values, so any message about our unit is a failure
    assert result.returncode == 0 and rendered.name not in result.stdout + result.stderr, result.stderr


def test_systemd_analyze_security_scores_the_unit_at_most_3(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = run("systemd-analyze", "security", "--offline=yes", _rendered_unit(tmp_path), check=False)
    score = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d+)", result.stdout)
    if score is None:
        pytest.skip(f"systemd-analyze cannot score a unit file offline here (needs systemd >= 250): "
                    f"{result.stderr}")
    assert float(score[1]) <= 3.0, result.stdout


# The GPU's device nodes, after NVIDIA's list for Jetson containers: JetPack 5 and JetPack 6 names.
GPU_NODES = {"/dev/nvhost-ctrl", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-gpu", "/dev/nvhost-as-gpu",
             "/dev/nvgpu/igpu0/ctrl", "/dev/nvgpu/igpu0/channel", "/dev/nvgpu/igpu0/as", "/dev/nvmap",
             "/dev/host1x-fence", "/dev/nvhost-nvdla0"}


def test_the_sandbox_keeps_what_cuda_and_tensorrt_need():
    text = (DEPLOY / "edge-agent.service").read_text()
    s = unit(DEPLOY / "edge-agent.service")["Service"]
    allowed = dict(re.findall(r"^DeviceAllow=(\S+) (\w+)$", text, re.MULTILINE))
    assert s["DevicePolicy"] == "closed" and set(allowed) >= GPU_NODES, GPU_NODES - set(allowed)
    assert set(allowed.values()) == {"rw"}
    # CUDA JIT-compiles and TensorRT generates code; video-group nodes; the driver reads /proc files
    for key in ("MemoryDenyWriteExecute", "PrivateUsers", "ProcSubset", "PrivateDevices"):
        assert key not in s, key
    assert s["SupplementaryGroups"] == "video"
    assert "CUDA_CACHE_PATH=/var/lib/edge-agent/cuda-cache" in text  # ProtectHome hides ~/.nv
    assert s["CapabilityBoundingSet"] == "" and s["SystemCallErrorNumber"] == "EPERM"


def test_example_config_for_a_jetson():
    config = read_toml(DEPLOY / "agent.toml")
    build(AgentConfig, config, "deploy/jetson/agent.toml")  # the agent accepts it as it is
    assert set(config) == {"agent", "model", "cloud", "cascade", "mqtt", "fleet"}
    assert {"device_id", "listen"} <= set(config["agent"])
    assert config["agent"]["listen"].startswith("127.0.0.1:")
    assert config["model"]["backend"] == "tensorrt"
    path = Path(config["model"]["path"])
    assert path.parent == Path("/var/lib/edge-agent/models") and path.suffix == ".plan"
    assert {"target", "model", "tls"} <= set(config["cloud"])
    assert {"ca", "cert", "key"} <= set(config["cloud"]["tls"])
    # calibration is left to the release and the model card: a value here would override every release
    assert not {"policy", "threshold", "temperature"} & set(config["cascade"])
    assert config["mqtt"]["port"] == 8883 and {"ca", "cert", "key"} <= set(config["mqtt"]["tls"])
    assert config["fleet"]["trusted_keys"]
    assert config["cloud"]["deadline_ms"] > 0


def test_build_engine_wraps_trtexec():
    out = run(BUILD, "models/edge.onnx", "/var/lib/edge-agent/models/edge.plan", "--input", "image",
              "--row-shape", "3x64x64", "--max-batch", "16", "--dla", "--dry-run").stdout.split()
    assert out == ["/usr/src/tensorrt/bin/trtexec", "--onnx=models/edge.onnx",
                   "--saveEngine=/var/lib/edge-agent/models/edge.plan", "--int8", "--fp16",
                   "--minShapes=image:1x3x64x64", "--optShapes=image:1x3x64x64",
                   "--maxShapes=image:16x3x64x64", "--memPoolSize=workspace:1024M", "--useDLACore=0",
                   "--allowGPUFallback"]
    typed = run(BUILD, "m.onnx", "m.plan", "--input", "x", "--row-shape", "8", "--strongly-typed",
                "--dry-run").stdout.split()
    assert "--stronglyTyped" in typed and "--int8" not in typed


def test_readme_walks_from_a_fresh_jetpack_to_a_serving_agent():
    text = (DEPLOY / "README.md").read_text()
    for step in ("install.sh", "edgecloud engine build", "systemctl start edge-agent", "journalctl",
                 "tritonclient", "systemctl reload edge-agent"):
        assert step in text, step
