"""The gateway takes encoded frames for a model whose preprocess says how (its card or its config.toml):
decoded with that preprocess off the event loop, and a bad frame refused naming its row."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.support.frames import CLOUD_PRE, cloud_answer, frames_cloud
from tests.support.images import encode, png_header, scene
from tests.support.onnx_models import image_classifier
from tests.support.services import Client


@pytest.fixture
def cloud(tmp_path):
    model = image_classifier(tmp_path / "cloud.onnx", size=(24, 24), seed=1)
    server = frames_cloud(tmp_path, model, "config")
    yield server, model
    server.stop()


def test_frames_straight_to_the_gateway(cloud):
    server, model = cloud
    client = Client(server.port)
    meta = client.metadata("cam")
    assert [(s.name, s.datatype, s.shape) for s in meta.inputs] == [
        ("image", "FP32", (-1, 1, 24, 24)), (CLOUD_PRE["frames"], "BYTES", (-1,))]
    data = [encode(scene(1, 480, 640), "JPEG"), encode(scene(2, 30, 40), "PNG")]
    r = client.infer("cam", {"frames": np.array(data, dtype=np.object_)})
    np.testing.assert_allclose(r.outputs["logits"], cloud_answer(model, data), rtol=1e-4, atol=1e-4)
    for bad in (b"", data[0][:300], png_header(50_000, 50_000)):
        with pytest.raises(grpc.RpcError) as caught:
            client.infer("cam", {"frames": np.array([data[1], bad], dtype=np.object_)})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "frame row 1" in caught.value.details()
    after = client.infer("cam", {"frames": np.array(data[:1], dtype=np.object_)})
    assert after.outputs["logits"].shape == (1, 4)
