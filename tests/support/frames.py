"""A frames-taking cloud for tests: a real gateway serving a model as "cam" with its own preprocess (from
its card or its config.toml), and what that model answers for given frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgecloud.preprocess import Preprocess, decode_frames
from tests.support.onnx_models import reference_logits
from tests.support.services import GatewayCloud

#: the cloud looks at more pixels than the edge, normalized its own way
CLOUD_PRE = {"input": "image", "frames": "frames", "color": "gray", "size": [24, 24], "mean": [0.5],
             "std": [0.25]}


def frames_cloud(tmp_path: Path, model: Path, source: str = "card") -> GatewayCloud:
    """A started gateway serving ``model`` as "cam" with CLOUD_PRE, from its card or its config.toml."""
    cloud = GatewayCloud(tmp_path / "cloud", model, "cam")
    if source == "card":
        card = cloud.repository / "cam" / "1" / "model.onnx.card.json"
        card.write_text(json.dumps({"name": "cam", "preprocess": CLOUD_PRE}))
    else:
        lines = [f"{k} = {json.dumps(v)}" for k, v in CLOUD_PRE.items()]
        (cloud.repository / "cam" / "config.toml").write_text("[preprocess]\n" + "\n".join(lines) + "\n")
    return cloud.start()


def cloud_tensor(data: list[bytes]) -> np.ndarray:
    """The tensor the cloud model must be given for ``data``: the frames through CLOUD_PRE."""
    spec = Preprocess.model_validate(CLOUD_PRE)
    return decode_frames(np.array(data, dtype=np.object_), spec, "FP32").tensor


def cloud_answer(cloud_model: Path, data: list[bytes]) -> np.ndarray:
    """What the cloud model gives for frames it decoded with its own preprocess."""
    return reference_logits(cloud_model, cloud_tensor(data).reshape(len(data), -1))
