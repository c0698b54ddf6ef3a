"""The served edge model: a loaded backend plus what the cascade needs to know about it, and the
slot that lets an update swap it atomically while calls are in flight."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, CascadeSection
from edge_agent.serving.settings import CascadeSettings, Identity, calibration
from edgecloud.backends import backend_key_for, open_backend
from edgecloud.backends.base import Backend
from edgecloud.confidence import DetectionOutputs
from edgecloud.errors import ModelLoadError
from edgecloud.guards import InputContract
from edgecloud.modelcard import (
    card_detection,
    card_preprocess,
    check_detection_outputs,
    input_guards,
    read_card,
)
from edgecloud.preprocess import Preprocess
from edgecloud.tensors import TensorSpec

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class EdgeModel:
    """A loaded, warmed-up edge model and its serving contract."""

    name: str
    version: str
    path: Path
    backend: Backend = field(repr=False)
    settings: CascadeSettings
    #: what a request must satisfy (inputs, guards from the card and ``[model]``, the row cap)
    contract: InputContract = field(repr=False)
    labels: tuple[str, ...] = ()
    #: how encoded frames become its input (the model card's ``preprocess``; None: tensors only)
    preprocess: Preprocess | None = None
    #: calibration from the release and the model card, kept so a reload can re-resolve settings
    release_calibration: Mapping[str, Any] = field(default_factory=dict, repr=False)
    card_calibration: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def detection(self) -> DetectionOutputs | None:
        """A detector's outputs and score threshold (its card's ``detection``; None: not a detector)."""
        return self.settings.detection

    def reconfigured(self, flags: CascadeSection) -> EdgeModel:
        """This model with cascade settings re-resolved from new config values (SIGHUP)."""
        settings = CascadeSettings.resolve(flags, self.release_calibration, self.card_calibration,
                                           self.outputs, self.detection)
        return replace(self, settings=settings)

    def as_detector(self, detection: DetectionOutputs, flags: CascadeSection) -> EdgeModel:
        """This model read as the detector ``detection`` describes (a release travels without its card,
        so a swapped-in model keeps the detection outputs of the one it replaces), unless its outputs
        do not fit them (logged; it stays as it is)."""
        try:
            check_detection_outputs(detection, self.outputs, f"model {self.name!r}")
            settings = CascadeSettings.resolve(flags, self.release_calibration, self.card_calibration,
                                               self.outputs, detection)
        except ModelLoadError as e:
            log.warning("event=detection_outputs_dropped name=%s version=%s error=%r", self.name,
                        self.version, str(e))
            return self
        return replace(self, settings=settings)

    def with_preprocess(self, preprocess: Preprocess) -> EdgeModel:
        """This model taking encoded frames as ``preprocess`` says; ModelLoadError if they do not fit."""
        preprocess.check_fits(self.inputs, self.name)
        contract = replace(self.contract, frames=(preprocess.frames, preprocess.input))
        return replace(self, preprocess=preprocess, contract=contract)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.backend.inputs

    @property
    def served_inputs(self) -> tuple[TensorSpec, ...]:
        """The inputs ModelMetadata lists: the model's, then its frames input (docs/design.md §10)."""
        return self.inputs if self.preprocess is None else (*self.inputs, self.preprocess.frames_spec)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.backend.outputs


def load_edge_model(config: AgentConfig, path: Path | None = None, version: str | None = None,
                    release: Mapping[str, Any] | None = None, flags: CascadeSection | None = None,
                    check: Callable[[Backend], None] | None = None) -> EdgeModel:
    """Load, check the budget, resolve settings and warm up the model at ``path`` (default: config).

    ``version`` and ``release``: the release it came with (its version and verified payload);
    ``flags``: the ``[cascade]`` values in force (default: the config's). See ``settings.py``.
    ``check`` sees the opened backend first (the updater's contract check); what it raises is raised.
    """
    path = Path(path or config.model.path or "")
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    size = path.stat().st_size
    if size > config.model.budget_bytes:
        raise ModelLoadError(f"model file {path} is {size} bytes, over the edge budget of "
                             f"{config.model.budget_bytes}")
    card = read_card(path)
    if config.model.preprocess:  # the config's keys over the card's (docs/design.md §10)
        card = {**card, "preprocess": {**(card.get("preprocess") or {}), **config.model.preprocess}}
    release = release or {}
    key = backend_key_for(path, config.model.backend)
    backend = open_backend(path, key, getattr(config.backend, key, None))
    try:
        if check is not None:
            check(backend)
        release_cal, card_cal = calibration(release), calibration(card)
        detection = card_detection(card, f"model card of {path}")
        if detection is not None:
            check_detection_outputs(detection, backend.outputs, f"model card of {path}")
        settings = CascadeSettings.resolve(config.cascade if flags is None else flags, release_cal, card_cal,
                                           backend.outputs, detection)
        served = Identity.resolve(path, config.model.name, version, release, card)
        guards = input_guards(card, f"model card of {path}")
        preprocess = card_preprocess(card, f"model card of {path}")
        if preprocess is not None:
            preprocess.check_fits(backend.inputs, served.name)
        contract = InputContract.build(served.name, backend.inputs, guards, config.model.allow_nonfinite,
                                       config.model.max_batch_rows,
                                       None if preprocess is None else (preprocess.frames, preprocess.input))
        backend.warmup(config.model.warmup_rows)
    except Exception:
        backend.close()
        raise
    model = EdgeModel(name=served.name, version=served.version, path=path, backend=backend, settings=settings,
                      contract=contract, labels=served.labels, preprocess=preprocess,
                      release_calibration=release_cal, card_calibration=card_cal)
    log.info("event=model_loaded name=%s version=%s path=%s policy=%s threshold=%.4f temperature=%.4f",
             model.name, model.version, path, settings.policy_name, settings.threshold,
             settings.temperature)
    return model


class ModelSlot:
    """Holds the active model and the ``[cascade]`` flags it is served with; readers take a reference,
    a swap replaces it atomically.

    A call keeps the model it started with, so a swap never fails an in-flight request; the old
    model is closed only by whoever retires it (the updater keeps it as the rollback slot). The flags
    live here, not in each model, so that a reload (SIGHUP) holds for every model swapped in later,
    a rollback included.
    """

    def __init__(self, model: EdgeModel, flags: CascadeSection) -> None:
        self._model = model
        self._flags = flags
        self._lock = threading.Lock()
        self._on_swap: list[Callable[[EdgeModel], None]] = []

    def on_swap(self, callback: Callable[[EdgeModel], None]) -> None:
        """Call ``callback(new)`` at each swap, just before ``new`` serves (under the swap's lock, so it
        must be quick): whatever is kept per version starts before the new version answers a call."""
        self._on_swap.append(callback)

    @property
    def model(self) -> EdgeModel:
        return self._model

    @property
    def flags(self) -> CascadeSection:
        return self._flags

    def swap(self, model: EdgeModel) -> EdgeModel:
        """Make ``model`` active, under the current flags, and return the one it replaced. A model that
        comes without a preprocess (a release travels without its card) keeps the frames input of the
        one it replaces, so the cameras feeding it go on working (docs/design.md §10), unless its input
        no longer fits them (logged)."""
        with self._lock:
            old, new = self._model, model.reconfigured(self._flags)
            if new.detection is None and old.detection is not None:
                new = new.as_detector(old.detection, self._flags)
            if new.preprocess is None and old.preprocess is not None:
                try:
                    new = new.with_preprocess(old.preprocess)
                except ModelLoadError as e:
                    log.warning("event=frames_input_dropped name=%s version=%s error=%r", new.name,
                                new.version, str(e))
            for callback in self._on_swap:
                callback(new)
            self._model = new
        log.info("event=model_swapped name=%s from_version=%s to_version=%s", model.name, old.version,
                 model.version)
        return old

    def reconfigure(self, flags: CascadeSection) -> None:
        """Serve the active model, and every later one, under new flags; ModelLoadError if they do not
        fit the model (nothing changes then)."""
        with self._lock:
            self._model = self._model.reconfigured(flags)
            self._flags = flags
