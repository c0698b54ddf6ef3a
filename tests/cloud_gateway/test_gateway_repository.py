"""Reading the model repository: layout, per-model config over the defaults, and refusals that name
the file and key."""

from __future__ import annotations

import asyncio

import numpy as np
import onnx
import pytest

from cloud_gateway.config import ModelConfig
from cloud_gateway.repository import ModelRepository
from edgecloud.config import build
from edgecloud.errors import ConfigError, ModelLoadError, ModelNotFound
from tests.support.onnx_models import linear_classifier


def load(root, **defaults) -> ModelRepository:
    return ModelRepository.load(root, build(ModelConfig, defaults))


def fixed_batch_model(path, rows: int = 1):
    """A classifier whose batch dimension is fixed: it cannot take merged batches."""
    linear_classifier(path)
    model = onnx.load(str(path))
    for tensor in (*model.graph.input, *model.graph.output):
        tensor.type.tensor_type.shape.dim[0].dim_value = rows
    onnx.save(model, str(path))
    return path


def test_layout_versions_and_what_is_skipped(tmp_path):
    linear_classifier(tmp_path / "clf" / "1" / "model.onnx")
    linear_classifier(tmp_path / "clf" / "10" / "model.onnx")
    linear_classifier(tmp_path / "clf" / "latest" / "model.onnx")  # not an integer: skipped
    (tmp_path / "clf" / "11").mkdir()  # no model file: skipped
    linear_classifier(tmp_path / ".releases" / "edge" / "3" / "model.onnx")  # download only
    repo = load(tmp_path)
    try:
        assert repo.names == ("clf",)
        assert repo.versions("clf") == (1, 10)
        assert repo.get("clf").version == 10  # highest integer, not the last in name order
        assert repo.get("clf", "1").version == 1
        with pytest.raises(ModelNotFound, match=r"no version '11'; versions are \['1', '10'\]"):
            repo.get("clf", "11")
        with pytest.raises(ModelNotFound, match="unknown model 'edge'"):
            repo.get("edge")
    finally:
        repo.close()


def test_model_config_overrides_the_defaults(tmp_path):
    linear_classifier(tmp_path / "solo" / "1" / "model.onnx")
    (tmp_path / "solo" / "config.toml").write_text(
        "max_batch_size = 0\n[backend.onnxruntime]\nintra_op_threads = 1\n")
    linear_classifier(tmp_path / "batched" / "1" / "model.onnx")
    (tmp_path / "batched" / "config.toml").write_text("max_batch_size = 4\n")
    fixed_batch_model(tmp_path / "fixed" / "1" / "model.onnx")
    repo = load(tmp_path, max_queue_delay_us=7, backend={"onnxruntime": {"inter_op_threads": 2}})
    try:
        solo, batched, fixed = repo.get("solo"), repo.get("batched"), repo.get("fixed")
        assert solo.batcher is None and fixed.batcher is None
        assert solo.backend.config.intra_op_threads == 1 and solo.backend.config.inter_op_threads == 2
        assert (batched.batcher.max_batch_size, batched.config.max_queue_delay_us) == (4, 7)
        x = np.ones((1, 8), dtype=np.float32)
        assert asyncio.run(fixed.run({"x": x}))["logits"].shape == (1, 4)
        assert asyncio.run(solo.run({"x": np.ones((6, 8), dtype=np.float32)}))["logits"].shape == (6, 4)
    finally:
        repo.close()


def test_refusals_name_the_file_and_key(tmp_path):
    linear_classifier(tmp_path / "clf" / "1" / "model.onnx")
    config = tmp_path / "clf" / "config.toml"
    config.write_text("max_batch = 8\nmax_queue_delay_us = -1\n")
    with pytest.raises(ConfigError) as err:
        load(tmp_path)
    assert str(config) in str(err.value)
    assert "max_batch: unknown key" in str(err.value) and "max_queue_delay_us" in str(err.value)

    config.write_text('platform = "remote"\n')
    with pytest.raises(ConfigError, match=r"platform 'remote' needs \[backend.remote\]"):
        load(tmp_path)

    config.unlink()
    (tmp_path / "clf" / "2").mkdir()
    (tmp_path / "clf" / "2" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelLoadError, match=r"clf/2/model\.onnx"):
        load(tmp_path)


def test_missing_or_empty_repository(tmp_path):
    with pytest.raises(ConfigError, match=r"gateway\.model_repository: .* is not a directory"):
        load(tmp_path / "nowhere")
    (tmp_path / ".releases" / "edge" / "1").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"gateway\.model_repository: .* holds no model"):
        load(tmp_path)


def test_a_users_backend_named_by_dotted_path_gets_its_own_section(tmp_path):
    user = "tests.plugins.backends:SlowOrtBackend"
    linear_classifier(tmp_path / "clf" / "1" / "model.onnx")
    config = tmp_path / "clf" / "config.toml"
    config.write_text(f'platform = "{user}"\n[backend."{user}"]\nintra_op_threads = 1\n')
    repo = load(tmp_path)
    try:
        backend = repo.get("clf").backend
        assert type(backend).__name__ == "SlowOrtBackend" and backend.config.intra_op_threads == 1
    finally:
        repo.close()
    config.write_text(f'platform = "{user}"\n[backend."{user}"]\nintra_op = 1\n')
    with pytest.raises(ConfigError, match=rf"backend\.{user}\.intra_op: unknown key"):
        load(tmp_path)
