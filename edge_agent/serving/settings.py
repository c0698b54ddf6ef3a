"""Where each setting of a served model comes from (docs/design.md §4), decided here and nowhere else:

    command-line flag > config file > release > model card > default

The first two reach this module merged: ``edge-agent`` lays its flags over the config file key by key
(:func:`edge_agent.cli.load_config`), so ``[cascade]`` holds the operator's word, and a value it leaves
unset (None) falls through to the release (the verified payload the model came with; none for the
configured model), then to the model card beside the file, then to the defaults below. A loaded model
keeps its release and card calibration, so a reload (SIGHUP) or a swap re-resolves its cascade under
the ``[cascade]`` values then in force, without reading a file again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.config import CascadeSection
from edgecloud.confidence import DEFAULT_BOX_FLOOR, ConfidencePolicy, DetectionOutputs, make_policy
from edgecloud.errors import ModelLoadError
from edgecloud.modelcard import served_name
from edgecloud.tensors import TensorSpec

DEFAULT_POLICY = "max_prob"
DEFAULT_DETECTION_POLICY = "box_mean"
DEFAULT_THRESHOLD = 0.5
DEFAULT_TEMPERATURE = 1.0
DEFAULT_SCORES = "logits"


def first_set(key: str, layers: Iterable[Mapping[str, Any]], default: Any) -> Any:
    """``key``'s value in the first layer that sets it (not None), else ``default``."""
    for layer in layers:
        if layer.get(key) is not None:
            return layer[key]
    return default


def calibration(document: Mapping[str, Any]) -> dict[str, Any]:
    """The cascade layer of a release payload or a model card: its ``calibration`` object."""
    return dict(document.get("calibration") or {})


@dataclass(frozen=True, slots=True)
class CascadeSettings:
    """Resolved escalation settings of one model (policy, calibration, threshold)."""

    policy_name: str
    threshold: float
    temperature: float
    score_output: str
    scores: str
    policy: ConfidencePolicy = field(compare=False, repr=False)
    #: a detector's outputs, from its card (None: not a detector)
    detection: DetectionOutputs | None = None

    @classmethod
    def resolve(cls, flags: CascadeSection, release: Mapping[str, Any], card: Mapping[str, Any],
                outputs: tuple[TensorSpec, ...],
                detection: DetectionOutputs | None = None) -> CascadeSettings:
        """Each value from the first that sets it: ``[cascade]`` (flags over file), the release's
        calibration, the card's, the default (for the score output: the model's first output, a
        detector's scores; for the policy: ``max_prob``, ``box_mean`` for a detector)."""
        layers = (flags.model_dump(), release, card)
        score_output = first_set("score_output", layers, outputs[0].name if detection is None else
                                 detection.scores)
        if score_output not in {o.name for o in outputs}:
            raise ModelLoadError(f"score output {score_output!r} is not an output of the model; "
                                 f"outputs are {[o.name for o in outputs]}")
        name = first_set("policy", layers, DEFAULT_POLICY if detection is None else DEFAULT_DETECTION_POLICY)
        scores = first_set("scores", layers, DEFAULT_SCORES)
        temperature = float(first_set("temperature", layers, DEFAULT_TEMPERATURE))
        floor = float(first_set("box_floor", layers, DEFAULT_BOX_FLOOR))
        try:
            policy = make_policy(name, score_output, scores, temperature, detection, floor)
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
        return cls(name, float(first_set("threshold", layers, DEFAULT_THRESHOLD)), temperature, score_output,
                   scores, policy, detection)


@dataclass(frozen=True, slots=True)
class Identity:
    """What a model is served as: name, version and labels."""

    name: str
    version: str
    labels: tuple[str, ...]

    @classmethod
    def resolve(cls, path: Path, configured_name: str | None, version: str | None,
                release: Mapping[str, Any], card: Mapping[str, Any]) -> Identity:
        """The name: the release's (a release names the model it updates, and the updater takes only
        releases for the served name) > ``[model] name`` > the card's > the file stem. The version: the
        release's (``version``) > the card's > 0 (docs/design.md §9). The labels: the release's > the
        card's."""
        name = release.get("model") or configured_name or served_name(path, card)
        labels = tuple(release.get("labels") or card.get("labels") or ())
        return cls(name, str(version or card.get("version", 0)), labels)
