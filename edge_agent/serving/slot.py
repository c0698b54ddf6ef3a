"""The served edge model: a loaded backend plus what the cascade needs to know about it, and the
slot that lets an update swap it atomically while calls are in flight."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, CascadeSection
from edgecloud.backends import backend_key_for, open_backend
from edgecloud.backends.base import Backend
from edgecloud.confidence import ConfidencePolicy, make_policy
from edgecloud.errors import ModelLoadError
from edgecloud.modelcard import read_card
from edgecloud.tensors import TensorSpec

log = logging.getLogger(__name__)

DEFAULT_POLICY = "max_prob"
DEFAULT_THRESHOLD = 0.5
DEFAULT_TEMPERATURE = 1.0
DEFAULT_SCORES = "logits"


@dataclass(frozen=True, slots=True)
class CascadeSettings:
    """Resolved escalation settings of one model (policy, calibration, threshold)."""

    policy_name: str
    threshold: float
    temperature: float
    score_output: str
    scores: str
    policy: ConfidencePolicy = field(compare=False, repr=False)

    @classmethod
    def resolve(cls, flags: CascadeSection, release: Mapping[str, Any], card: Mapping[str, Any],
                outputs: tuple[TensorSpec, ...]) -> CascadeSettings:
        """Each value from the first that sets it: config/flags, release, card, default."""
        def pick(key: str, default: Any) -> Any:
            for source in (flags.model_dump(), release, card):
                if source.get(key) is not None:
                    return source[key]
            return default

        score_output = pick("score_output", outputs[0].name)
        if score_output not in {o.name for o in outputs}:
            raise ModelLoadError(f"score output {score_output!r} is not an output of the model; "
                                 f"outputs are {[o.name for o in outputs]}")
        name = pick("policy", DEFAULT_POLICY)
        scores = pick("scores", DEFAULT_SCORES)
        temperature = float(pick("temperature", DEFAULT_TEMPERATURE))
        try:
            policy = make_policy(name, score_output, scores, temperature)
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
        return cls(name, float(pick("threshold", DEFAULT_THRESHOLD)), temperature, score_output,
                   scores, policy)


@dataclass(frozen=True, slots=True)
class EdgeModel:
    """A loaded, warmed-up edge model and its serving contract."""

    name: str
    version: str
    path: Path
    backend: Backend = field(repr=False)
    settings: CascadeSettings
    labels: tuple[str, ...] = ()
    #: calibration from the release and the model card, kept so a reload can re-resolve settings
    release_calibration: Mapping[str, Any] = field(default_factory=dict, repr=False)
    card_calibration: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def reconfigured(self, flags: CascadeSection) -> EdgeModel:
        """This model with cascade settings re-resolved from new config values (SIGHUP)."""
        settings = CascadeSettings.resolve(flags, self.release_calibration, self.card_calibration,
                                           self.outputs)
        return replace(self, settings=settings)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.backend.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.backend.outputs


def load_edge_model(config: AgentConfig, path: Path | None = None, version: str | None = None,
                    release: Mapping[str, Any] | None = None) -> EdgeModel:
    """Load, check the budget, resolve settings and warm up the model at ``path`` (default: config)."""
    path = Path(path or config.model.path or "")
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    size = path.stat().st_size
    if size > config.model.budget_bytes:
        raise ModelLoadError(f"model file {path} is {size} bytes, over the edge budget of "
                             f"{config.model.budget_bytes}")
    card = read_card(path)
    key = backend_key_for(path, config.model.backend)
    backend = open_backend(path, key, getattr(config.backend, key, None))
    try:
        release_cal = dict((release or {}).get("calibration") or {})
        card_cal = dict(card.get("calibration") or {})
        settings = CascadeSettings.resolve(config.cascade, release_cal, card_cal, backend.outputs)
        backend.warmup(config.model.warmup_rows)
    except Exception:
        backend.close()
        raise
    labels = tuple((release or {}).get("labels") or card.get("labels") or ())
    name = config.model.name or card.get("name") or path.stem
    model = EdgeModel(name=name, version=str(version or card.get("version", 0)), path=path,
                      backend=backend, settings=settings, labels=labels,
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

    @property
    def model(self) -> EdgeModel:
        return self._model

    @property
    def flags(self) -> CascadeSection:
        return self._flags

    def swap(self, model: EdgeModel) -> EdgeModel:
        """Make ``model`` active, under the current flags, and return the one it replaced."""
        with self._lock:
            old, self._model = self._model, model.reconfigured(self._flags)
        log.info("event=model_swapped name=%s from_version=%s to_version=%s", model.name, old.version,
                 model.version)
        return old

    def reconfigure(self, flags: CascadeSection) -> None:
        """Serve the active model, and every later one, under new flags; ModelLoadError if they do not
        fit the model (nothing changes then)."""
        with self._lock:
            self._model = self._model.reconfigured(flags)
            self._flags = flags
