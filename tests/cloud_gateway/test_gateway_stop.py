"""The gateway stops while a device that began a download has stopped reading it (a device killed or
frozen in the middle of an update): stop() returns, and no thread is left waiting on the stream."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from cloud_gateway import Gateway, gateway_config
from tests.support.onnx_models import linear_classifier

#: opens a download, reads its first chunk, says so, and then reads no more
STALLED_DEVICE = """
import sys, time, grpc
from edgecloud._generated.edgecloud.v1 import artifacts_pb2 as pb, artifacts_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1])
chunks = pb_grpc.ArtifactServiceStub(channel).Download(pb.DownloadRequest(name="clf", version=2))
next(chunks)
print("reading no more", flush=True)
time.sleep(120)
"""


def test_stop_returns_while_a_device_has_stopped_reading_its_download(tmp_path) -> None:
    linear_classifier(tmp_path / "repo" / "clf" / "1" / "model.onnx")
    release = tmp_path / "repo" / ".releases" / "clf" / "2" / "model.onnx"
    release.parent.mkdir(parents=True)
    release.write_bytes(os.urandom(64 * 1024 * 1024))  # far more than the transport buffers hold
    gateway = Gateway(gateway_config(tmp_path / "repo", listen="127.0.0.1:0")).start()
    devices = [subprocess.Popen([sys.executable, "-c", STALLED_DEVICE, f"127.0.0.1:{gateway.port}"],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for device in devices:
            assert device.stdout is not None and device.stdout.readline().strip() == "reading no more"
        stopper = threading.Thread(target=gateway.stop, kwargs={"grace": 0.5}, daemon=True)
        stopper.start()
        stopper.join(20)
        assert not stopper.is_alive(), "stop() is still waiting on the stalled downloads' threads"
    finally:
        for device in devices:
            device.kill()
            device.wait()
