"""Shared fixtures: repository paths and the demo models."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ("tests.broker",)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
EDGE_INT8 = MODELS / "edge" / "inspection-edge-int8.onnx"
EDGE_V2_INT8 = MODELS / "edge" / "inspection-edge-v2-int8.onnx"
CLOUD_REPO = MODELS / "repository"


@pytest.fixture(scope="session")
def edge_model() -> Path:
    if not EDGE_INT8.exists():
        pytest.fail(f"demo edge model missing: {EDGE_INT8} (rebuild: edgecloud models build)")
    return EDGE_INT8


@pytest.fixture(scope="session")
def cloud_repository() -> Path:
    if not (CLOUD_REPO / "inspection").exists():
        pytest.fail(f"demo cloud repository missing: {CLOUD_REPO}")
    return CLOUD_REPO
