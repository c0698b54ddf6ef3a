"""``edge-agent`` as a process: configuration errors, flags over the file, clean stop on SIGTERM."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from edge_agent.config import AgentConfig
from edgecloud.client import KServeClient
from edgecloud.config import build
from edgecloud.errors import ConfigError
from edgecloud_tools.rig.services import ServiceProcess
from tests.support.net import free_port
from tests.support.onnx_models import linear_classifier, reference_logits


def run_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_unknown_config_key_exits_2_naming_it(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[cascade]\nthreshhold = 0.4\n[agent]\nlisten = "nowhere"\n')
    proc = run_agent("--config", str(config), "--model", str(tmp_path / "m.onnx"))
    assert proc.returncode == 2
    assert "cascade.threshhold: unknown key" in proc.stderr
    assert "agent.listen" in proc.stderr


def test_bad_flag_value_and_missing_model(tmp_path):
    proc = run_agent("--model", str(tmp_path / "m.onnx"), "--threshold", "1.5")
    assert proc.returncode == 2 and "cascade.threshold" in proc.stderr
    proc = run_agent("--device-id", "x")
    assert proc.returncode == 2 and "model.path" in proc.stderr
    proc = run_agent("--model", str(tmp_path / "missing.onnx"), "--state-dir", str(tmp_path))
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    # refused while the configuration is read, before anything starts
    proc = run_agent("--model", str(tmp_path / "m.onnx"), "--metrics-listen", "unix:/tmp/metrics.sock")
    assert proc.returncode == 2 and "metrics.listen" in proc.stderr and "model_loaded" not in proc.stderr


def test_failure_after_listening_stops_what_started(tmp_path):
    """A missing trusted key is found after the gRPC server is up: the agent exits 2, freeing the port."""
    model, port = linear_classifier(tmp_path / "m.onnx"), free_port()
    proc = run_agent("--model", str(model), "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path),
                     "--mqtt", "127.0.0.1:1", "--fleet", "plant-1", "--trusted-key", str(tmp_path / "no.pub"))
    assert proc.returncode == 2 and "no.pub" in proc.stderr
    assert "event=server_started" in proc.stderr and "event=agent_stopped" in proc.stderr


def test_flags_override_file_and_sigterm_stops_cleanly(tmp_path):
    model = linear_classifier(tmp_path / "m.onnx")
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nlisten = "127.0.0.1:1"\nstate_dir = "{tmp_path}"\n'
                      f'[model]\npath = "{model}"\nname = "from-file"\n')
    agent = ServiceProcess("edge-agent", ["--config", str(config), "--listen", f"127.0.0.1:{port}",
                                          "--name", "from-flag"], port, tmp_path / "agent.log")
    with agent:
        x = np.ones((2, 8), dtype=np.float32)
        with KServeClient(f"127.0.0.1:{port}") as client:
            reply = client.infer("from-flag", {"x": x})
        np.testing.assert_allclose(reply.outputs["logits"], reference_logits(model, x), rtol=1e-5)
    assert agent.proc.returncode == 0
    assert "event=agent_stopped" in agent.log_path.read_text()


def test_the_cloud_target_may_name_every_replica_through_dns():
    config = build(AgentConfig, {"cloud": {"target": "dns:///cloud-gateway.edge.svc.cluster.local:9001"}})
    assert config.cloud.target == "dns:///cloud-gateway.edge.svc.cluster.local:9001"
    with pytest.raises(ConfigError, match=r"cloud\.target"):
        build(AgentConfig, {"cloud": {"target": "dns:gateway:9001"}})
    with pytest.raises(ConfigError, match=r"agent\.listen"):  # a name to call, not an address to bind
        build(AgentConfig, {"agent": {"listen": "dns:///localhost:8001"}})


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    model = linear_classifier(tmp_path / "m.onnx")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_agent("--model", str(model), "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path),
                         "--metrics-listen", "")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"edge-agent: configuration error: listen 127.0.0.1:{port}: "
                                            "cannot bind (address in use or not permitted)")
