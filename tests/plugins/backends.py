"""Backends of the tests' own: one a user names by dotted path, one a test adds to the registry.

``SlowOrtBackend``: every call can be slowed or hung from outside. The delay in seconds is read, per
call, from the file named by $EDGECLOUD_TEST_DELAY_FILE, so a test can make a running agent's inference
hang (watchdog) or take a while (drain on SIGTERM).

``GatedOrtBackend``: every run passes :data:`GATE`, which a test closes to hold runs back (services
started in the test's own process) and which records the first input of every run, so a test can
tell which requests the model saw.

``ScaleBackend``: registered by nothing; a test puts it in the registry to show that a backend is one
module plus one registry line.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydantic import Field

from edgecloud.backends.base import Backend
from edgecloud.backends.ort_session import OrtBackend
from edgecloud.config import Section
from edgecloud.tensors import TensorSpec


class SlowOrtBackend(OrtBackend):
    def infer(self, inputs):
        path = Path(os.environ.get("EDGECLOUD_TEST_DELAY_FILE", "/nonexistent"))
        if path.exists():
            time.sleep(float(path.read_text() or 0))
        return super().infer(inputs)


class RunGate:
    """Open until ``close()``; then every run waits at it until ``open()``. ``runs`` holds the first
    input of every run that passed, ``waiting`` counts the runs held now."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.runs: list[np.ndarray] = []
        self.waiting = 0
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.runs.clear()
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def pass_through(self, first: np.ndarray) -> None:
        with self._lock:
            self.waiting += 1
        self._open.wait(30)
        with self._lock:
            self.waiting -= 1
            self.runs.append(np.array(first))


GATE = RunGate()


class GatedOrtBackend(OrtBackend):
    def infer(self, inputs):
        GATE.pass_through(next(iter(inputs.values())))
        return super().infer(inputs)


class ScaleConfig(Section):
    """``[backend.scale]``."""

    factor: float = Field(1.0, description="what the input is multiplied by")


class ScaleBackend(Backend):
    """``y = factor * x``; a ``.scale`` file holds the width of ``x``."""

    key = "scale"
    platform = "scale_numpy"
    suffixes = (".scale",)
    release_format = "scale"
    repository_file = "model.scale"
    config_model = ScaleConfig

    def __init__(self, config: ScaleConfig | None = None) -> None:
        self.config = config or ScaleConfig()
        self._width = 0

    def load(self, path: Path) -> None:
        self._width = int(Path(path).read_text())

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", "FP32", (-1, self._width)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("y", "FP32", (-1, self._width)),)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": (inputs["x"] * self.config.factor).astype(np.float32)}

    def close(self) -> None:
        self._width = 0
