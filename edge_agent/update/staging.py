"""Preparing a release for the second slot: the file this device can load (on a TensorRT device, an
engine built from an ONNX release; a plan only where it was built), and the self-test that proves a
loaded candidate keeps the serving contract and runs cleanly before it may be swapped in.

Everything here runs without a GPU: the engine build is a function passed in (TensorRT's builder on
a Jetson), so the decisions are testable anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.serving.slot import EdgeModel
from edgecloud.backends import backend_key_for
from edgecloud.backends.base import Backend, zeros_for
from edgecloud.engine.builder import installed_tensorrt_version
from edgecloud.engine.cache import EngineCache
from edgecloud.engine.sidecar import check_plan_target, device_model
from edgecloud.errors import ModelLoadError
from edgecloud.release import Artifact, Reason, ReleaseRejected
from edgecloud.tensors import contract_differences


# -- TensorRT decisions ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    """How this agent runs models: with TensorRT (its version and board) or not."""

    tensorrt: str | None
    device: str

    @classmethod
    def detect(cls, config: AgentConfig, served: Path) -> Runtime:
        device = device_model(config.backend.tensorrt.device_model_path)
        if backend_key_for(served, config.model.backend) != "tensorrt":
            return cls(None, device)
        return cls(installed_tensorrt_version() or "none", device)

    def check(self, artifact: Artifact) -> None:
        """Refuse a TensorRT plan built for another TensorRT release or board (or for any, without one)."""
        if artifact.target is None:
            return
        target = {"tensorrt": artifact.target.tensorrt, "device": artifact.target.device}
        try:
            check_plan_target(target, self.tensorrt or "none", self.device)
        except ModelLoadError as e:
            raise ReleaseRejected(Reason.WRONG_TARGET, str(e)) from None

    def servable(self, downloaded: Path, artifact: Artifact, engines: EngineCache,
                 build: Callable[[Path, Path], object]) -> Path:
        """The file to load: the download, or on a TensorRT device the engine built from an ONNX release
        (cached by ONNX sha256, TensorRT release and board)."""
        if self.tensorrt is None or artifact.format != "onnx":
            return downloaded
        return engines.get_or_build(downloaded, self.tensorrt, self.device, build)


# -- self-test --------------------------------------------------------------------------------------------
def contract_problems(serving: EdgeModel, candidate: EdgeModel | Backend) -> list[str]:
    """How the candidate's inputs and outputs differ from the serving contract, both ways."""
    problems: list[str] = []
    for kind, served, offered in (("input", serving.inputs, candidate.inputs),
                                  ("output", serving.outputs, candidate.outputs)):
        problems += contract_differences(served, offered, f"release {kind}")
        problems += contract_differences(offered, served, f"served {kind}")
    return problems


def check_contract(serving: EdgeModel, candidate: EdgeModel | Backend) -> None:
    """Refuse (``contract_mismatch``) a candidate whose inputs or outputs differ from the serving
    model's. Staging runs it on the opened backend, before the cascade settings are resolved: a
    renamed output is a changed contract, not a model that does not load."""
    problems = contract_problems(serving, candidate)
    if problems:
        raise ReleaseRejected(Reason.CONTRACT_MISMATCH, "; ".join(problems))


def _random_batch(model: EdgeModel, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    batch = zeros_for(model.inputs, rows)
    for name, zeros in batch.items():
        if zeros.dtype.kind == "f":
            batch[name] = rng.standard_normal(zeros.shape).astype(zeros.dtype)
        elif zeros.dtype.kind in "iub":
            batch[name] = rng.integers(0, 2, zeros.shape).astype(zeros.dtype)
    return batch


def _output_problems(model: EdgeModel, outputs: Mapping[str, Any], rows: int) -> list[str]:
    problems = []
    for spec in model.outputs:
        if spec.name not in outputs:
            problems.append(f"output {spec.name!r} missing")
            continue
        value = np.asarray(outputs[spec.name])
        batched = not spec.shape or spec.shape[0] >= 0 or (value.ndim and value.shape[0] == rows)
        if not (spec.shape_matches(value.shape) and batched):
            problems.append(f"output {spec.name!r} has shape {list(value.shape)} for {rows} rows, "
                            f"expected {list(spec.shape)}")
        elif value.dtype.kind in "fc" and not np.isfinite(value).all():
            problems.append(f"output {spec.name!r} is not finite")
    confidence = np.asarray(model.settings.policy(outputs), dtype=np.float64).reshape(-1)
    if confidence.shape != (rows,) or not np.isfinite(confidence).all():
        problems.append(f"confidence policy {model.settings.policy_name!r} gave {confidence.shape[0]} "
                        f"values (finite: {bool(np.isfinite(confidence).all())}) for {rows} rows")
    return problems


def self_test(candidate: EdgeModel, serving: EdgeModel, rows: int) -> None:
    """Refuse a candidate that breaks the serving contract or does not run cleanly."""
    check_contract(serving, candidate)
    for label, batch in (("zeros", zeros_for(candidate.inputs, rows)),
                         ("random", _random_batch(candidate, rows, np.random.default_rng(0)))):
        try:
            problems = _output_problems(candidate, candidate.backend.infer(batch), rows)
        except Exception as e:  # runtimes raise their own untyped errors
            problems = [f"run failed: {e}"]
        if problems:
            raise ReleaseRejected(Reason.UNLOADABLE,
                                  f"self-test on {rows} rows of {label}: {'; '.join(problems)}")
