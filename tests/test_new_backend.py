"""A new backend is one module plus one registry line: with ``ScaleBackend`` (tests/plugins/backends.py)
added to the registry and nothing else, its files are found by suffix and in the gateway's repository,
its releases are valid, published, stored and refused like any other, and its ``[backend.scale]``
section is validated by its own config model in the agent's and the gateway's configuration."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest

from cloud_gateway.artifacts import ReleaseStore
from cloud_gateway.config import ModelConfig
from cloud_gateway.repository import ModelRepository
from edge_agent.config import AgentConfig
from edge_agent.serving.slot import load_edge_model
from edgecloud import backends
from edgecloud.config import build
from edgecloud.errors import ConfigError
from edgecloud.release import Artifact, PlanTarget, ReleaseRejected
from edgecloud_tools.fleet.publish import ReleaseRequest, build_release
from tests.plugins.backends import ScaleBackend, ScaleConfig

SHA = "0" * 64


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(backends.REGISTRY, "scale", "tests.plugins.backends:ScaleBackend")


def scale_file(path: Path, width: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(width))
    return path


def test_files_are_found_by_suffix_and_in_the_repository(tmp_path: Path) -> None:
    assert backends.backend_key_for(Path("m.scale")) == "scale"
    assert backends.repository_files()[-1] == "model.scale"
    scale_file(tmp_path / "doubled" / "1" / "model.scale")
    (tmp_path / "doubled" / "config.toml").write_text("[backend.scale]\nfactor = 2.0\n")
    repo = ModelRepository.load(tmp_path, build(ModelConfig, {}))
    try:
        model = repo.get("doubled")
        assert isinstance(model.backend, ScaleBackend) and repo.metadata("doubled").platform == "scale_numpy"
        np.testing.assert_allclose(asyncio.run(model.run({"x": np.ones((2, 3), np.float32)}))["y"], 2.0)
    finally:
        repo.close()
    (tmp_path / "doubled" / "config.toml").write_text("[backend.scale]\nfactr = 2.0\n")
    with pytest.raises(ConfigError, match=r"config\.toml: backend\.scale\.factr: unknown key"):
        ModelRepository.load(tmp_path, build(ModelConfig, {}))


def test_the_agent_serves_it_with_its_section(tmp_path: Path) -> None:
    config = build(AgentConfig, {"model": {"path": str(scale_file(tmp_path / "m.scale"))},
                                 "backend": {"scale": {"factor": 3.0}}})
    assert config.backend.scale == ScaleConfig(factor=3.0)
    model = load_edge_model(config)
    try:
        assert isinstance(model.backend, ScaleBackend) and model.backend.config.factor == 3.0
    finally:
        model.backend.close()
    with pytest.raises(ConfigError, match=r"backend\.scale\.factor: Input should be a valid number"):
        build(AgentConfig, {"backend": {"scale": {"factor": "big"}}})


def test_its_releases_are_valid_published_and_stored(tmp_path: Path) -> None:
    assert Artifact("https://cdn/m.scale", SHA, 1, "scale").format == "scale"
    with pytest.raises(ReleaseRejected, match=r"artifact\.target is required for a tensorrt-plan, and only"):
        Artifact("https://cdn/m.scale", SHA, 1, "scale", PlanTarget("10.3.0", "orin"))
    with pytest.raises(ReleaseRejected, match=r"'torch' is not one of \('onnx', 'tensorrt-plan', 'scale'\)"):
        Artifact("https://cdn/m.pt", SHA, 1, "torch")

    model = scale_file(tmp_path / "edge.scale")
    request = ReleaseRequest(model=model, name="edge", version=2, key=tmp_path / "unused.key", fleet="f",
                             group="g", uri=model.as_uri())
    _, payload = build_release(request)
    assert payload.artifact.format == "scale"
    assert backends.release_backends()["scale"].suffixes[0] == ".scale"  # the agent's slot file suffix

    data = model.read_bytes()
    path, existed = ReleaseStore(tmp_path / "repo").add("edge", 2, "scale", len(data),
                                                        hashlib.sha256(data).hexdigest(), [data], 1000)
    assert path.name == "model.scale" and not existed
    assert ReleaseStore(tmp_path / "repo").find("edge", 2) == path
