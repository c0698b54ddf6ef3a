"""The one small interface every inference backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgecloud.config import Section
from edgecloud.tensors import TensorSpec


class Backend(ABC):
    """Loads one model file and runs it. Inputs and outputs are read from the model, never assumed.

    Heavy runtime imports happen in ``load`` so that a missing runtime raises BackendUnavailable with
    an install hint instead of breaking imports elsewhere: importing the class stays cheap, and the
    registry reads the declarations below to know which files, releases and config sections are whose.
    A backend is created with its validated ``config_model`` section when the config has one.
    """

    #: registry key, also the name of its ``[backend.<key>]`` config section
    key: ClassVar[str]
    #: KServe ``platform`` string reported in ModelMetadata.
    platform: ClassVar[str]
    #: file suffixes (lower case) it serves when no backend is named; the first one names its release files
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: ``artifact.format`` of its signed releases; None: a fleet cannot ship it
    release_format: ClassVar[str | None] = None
    #: its files run only where they were built, so a release of them names that ``artifact.target``
    plan_target: ClassVar[bool] = False
    #: its file's name in a version directory of a Triton-layout repository; None: its model is elsewhere
    repository_file: ClassVar[str | None] = None
    #: the model of its ``[backend.<key>]`` section; the empty Section for a backend without options
    config_model: ClassVar[type[Section]] = Section

    @abstractmethod
    def load(self, path: Path) -> None:
        """Load ``path``; raise ModelLoadError (or BackendUnavailable) on failure."""

    @property
    @abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs, in the model's order."""

    @property
    @abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]:
        """The model's outputs, in the model's order."""

    @abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; ``inputs`` are already validated against ``self.inputs``."""

    @abstractmethod
    def close(self) -> None:
        """Release the runtime's resources; safe to call twice."""

    def warmup(self, rows: int = 1) -> dict[str, np.ndarray]:
        """Run once on zeros so the slow first run never lands on a real request."""
        return self.infer(zeros_for(self.inputs, rows))


def zeros_for(specs: tuple[TensorSpec, ...], rows: int) -> dict[str, np.ndarray]:
    """A zero batch of ``rows`` rows for ``specs`` (dynamic non-batch dimensions become 1)."""
    from edgecloud.protocol.datatypes import NUMPY_OF

    out = {}
    for spec in specs:
        shape = [rows] + [d if d > 0 else 1 for d in spec.row_shape]
        out[spec.name] = np.zeros(shape, dtype=NUMPY_OF[spec.datatype])
    return out
