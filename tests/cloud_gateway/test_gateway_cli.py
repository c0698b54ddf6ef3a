"""``cloud-gateway`` as a process: configuration errors exit 2 naming the key, a model that does not
load exits 1, flags override the file, and SIGTERM stops it cleanly."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np

from cloud_gateway.hard_examples import HardExampleStore
from edgecloud.client import KServeClient
from edgecloud.protocol.parameters import CloudRequest, EdgeSummary
from edgecloud_tools.rig.services import ServiceProcess
from tests.support.net import free_port
from tests.support.onnx_models import linear_classifier, reference_logits


def run_gateway(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloud_gateway.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_bad_config_keys_exit_2_naming_them(tmp_path):
    linear_classifier(tmp_path / "repo" / "clf" / "1" / "model.onnx")
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nlisten_address = "0.0.0.0:9001"\n[store]\nmax_rows = 0\n')
    proc = run_gateway("--config", str(config), "--model-repository", str(tmp_path / "repo"))
    assert proc.returncode == 2, proc.stderr
    assert "gateway.listen_address: unknown key" in proc.stderr
    assert "store.max_rows" in proc.stderr

    (tmp_path / "repo" / "clf" / "1" / "model.onnx").write_bytes(b"garbage")
    proc = run_gateway("--model-repository", str(tmp_path / "repo"), "--listen", "127.0.0.1:0")
    assert proc.returncode == 1 and "model.onnx" in proc.stderr, proc.stderr


def test_flags_override_the_file_and_sigterm_stops_cleanly(tmp_path):
    model = linear_classifier(tmp_path / "repo" / "clf" / "3" / "model.onnx")
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\nlisten = "127.0.0.1:1"\nmodel_repository = "{tmp_path / "nowhere"}"\n'
                      '[model_defaults]\nmax_batch_size = 8\n')
    store = tmp_path / "state" / "hard.db"
    args = ["--config", str(config), "--listen", f"127.0.0.1:{port}",
            "--model-repository", str(tmp_path / "repo"), "--store", str(store)]
    gateway = ServiceProcess("cloud-gateway", args, port, tmp_path / "gateway.log")
    x = np.ones((2, 8), dtype=np.float32)
    with gateway, KServeClient(f"127.0.0.1:{port}") as client:
        assert client.serving()
        summary = EdgeSummary(rows=(3, 4), reason="audit").to_json()
        reply = client.infer("clf", {"x": x},
                             params={CloudRequest.REQUEST_ID: "r", CloudRequest.EDGE_SUMMARY: summary})
        np.testing.assert_allclose(reply.outputs["logits"], reference_logits(model, x), rtol=1e-5)
        assert reply.model_version == "3"
    assert gateway.proc.returncode == 0
    log = gateway.log_path.read_text()
    assert "event=gateway_ready" in log and "max_batch_size=8" in log and "event=gateway_stopped" in log
    with HardExampleStore(store) as kept:
        assert [(e.request_id, e.row, e.reason) for e in kept.examples()] == [("r", 3, "audit"),
                                                                               ("r", 4, "audit")]


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    linear_classifier(tmp_path / "repo" / "clf" / "1" / "model.onnx")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_gateway("--model-repository", str(tmp_path / "repo"), "--listen", f"127.0.0.1:{port}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"cloud-gateway: configuration error: listen 127.0.0.1:{port}: "
                                            "cannot bind (address in use or not permitted)")
