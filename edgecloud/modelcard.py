"""Model cards: the JSON beside a model file (``<file>.card.json``) that says what the model is, how its
cascade is calibrated and how it scored on held-out data (docs/design.md §10).

The committed JSON Schema (``protos/schemas/model_card.schema.json``) is the contract; this module
checks a card lightly at load time (required keys and their types) so the runtime needs no
``jsonschema``; tests validate against the full schema.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgecloud.clock import now_text
from edgecloud.confidence.probability import SCORE_KINDS
from edgecloud.errors import ModelLoadError
from edgecloud.files import atomic_write, file_sha256
from edgecloud.guards import InputGuard
from edgecloud.preprocess import Preprocess
from edgecloud.tensors import TensorSpec

CARD_SUFFIX = ".card.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ModelCardError(ModelLoadError):
    """A model card is unreadable or malformed; the message names the card and the key."""


def card_path(model_path: Path) -> Path:
    """Where the card of ``model_path`` lives: the same name plus ``.card.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + CARD_SUFFIX)


def read_card(model_path: Path) -> dict[str, Any]:
    """The card beside ``model_path`` as plain JSON, or {} when there is none.

    Lenient on purpose: the runtime takes what a card offers (name, labels, calibration) from cards
    that other toolchains wrote too; ``ModelCard.load`` is the strict reader.
    """
    path = card_path(model_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelCardError(f"model card {path} is unreadable: {e}") from e
    if not isinstance(data, dict):
        raise ModelCardError(f"model card {path} is not a JSON object")
    return data


def served_name(model_path: Path, card: Mapping[str, Any] | None = None) -> str:
    """The name a model is served under by default: its card's name, else the file's stem.

    ``card``: the card as :func:`read_card` gave it, for a caller that has read it already.
    """
    card = read_card(model_path) if card is None else card
    return card.get("name") or Path(model_path).stem


def _need(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ModelCardError(f"{where}: missing key {key!r}")
    value = data[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ModelCardError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


@dataclass(frozen=True, slots=True)
class CardCalibration:
    """The cascade settings a model ships with: policy, temperature, threshold, score output, scores."""

    policy: str
    temperature: float
    threshold: float
    score_output: str
    scores: str = "logits"

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ModelCardError(f"calibration.temperature must be > 0, not {self.temperature}")
        if not 0 <= self.threshold <= 1:
            raise ModelCardError(f"calibration.threshold must be within [0, 1], not {self.threshold}")
        if self.scores not in SCORE_KINDS:
            raise ModelCardError(f"calibration.scores must be one of {SCORE_KINDS}, not {self.scores!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "temperature": self.temperature, "threshold": self.threshold,
                "score_output": self.score_output, "scores": self.scores}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "calibration") -> CardCalibration:
        return cls(_need(data, "policy", str, where), float(_need(data, "temperature", (int, float), where)),
                   float(_need(data, "threshold", (int, float), where)),
                   _need(data, "score_output", str, where), _need(data, "scores", str, where))


def _specs(data: Mapping[str, Any], key: str, where: str) -> tuple[TensorSpec, ...]:
    specs = []
    for i, item in enumerate(_need(data, key, list, where)):
        at = f"{where}: {key}[{i}]"
        if not isinstance(item, Mapping):
            raise ModelCardError(f"{at} is not an object")
        try:
            specs.append(TensorSpec(_need(item, "name", str, at), _need(item, "datatype", str, at),
                                    tuple(_need(item, "shape", list, at))))
        except (TypeError, ValueError) as e:
            raise ModelCardError(f"{at}: {e}") from None
    return tuple(specs)


def input_guards(card: Mapping[str, Any], where: str = "model card") -> tuple[InputGuard, ...]:
    """The guards a card's ``inputs`` entries declare (``allow_nonfinite``, ``range``): one per input
    that declares either; ModelCardError naming the key when one is malformed."""
    guards = []
    items = card.get("inputs") or ()
    for i, item in enumerate(items if isinstance(items, list) else ()):
        if not isinstance(item, Mapping) or not ({"allow_nonfinite", "range"} & set(item)):
            continue
        at = f"{where}: inputs[{i}]"
        allow = item.get("allow_nonfinite", False)
        if not isinstance(allow, bool):
            raise ModelCardError(f"{at}: 'allow_nonfinite' must be true or false")
        bounds = item.get("range")
        if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds)):
            raise ModelCardError(f"{at}: 'range' must be [min, max], two numbers")
        try:
            guards.append(InputGuard(_need(item, "name", str, at), allow,
                                     None if bounds is None else (bounds[0], bounds[1])))
        except ValueError as e:
            raise ModelCardError(f"{at}: {e}") from None
    return tuple(guards)


def card_preprocess(card: Mapping[str, Any], where: str = "model card") -> Preprocess | None:
    """The card's ``preprocess`` (docs/design.md §10), or None when it declares none; ModelCardError
    naming the key when it is malformed."""
    data = card.get("preprocess")
    if data is None:
        return None
    try:
        return Preprocess.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'preprocess'}: {err['msg']}"
                             for err in e.errors())
        raise ModelCardError(f"{where}: preprocess: {problems}") from None


@dataclass(frozen=True)
class ModelCard:
    """A model card; ``load``/``save`` address it by the model's path, not the card's."""

    name: str
    version: int
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    calibration: CardCalibration
    metrics: Mapping[str, Any]
    size: int
    sha256: str
    created_at: str
    source: Mapping[str, Any]
    #: the labelled set, cloud model and target the calibration was chosen with (None: not recorded)
    calibrated_on: Mapping[str, Any] | None = field(default=None)
    #: what the inputs' values may be (written into their ``inputs`` entries)
    guards: tuple[InputGuard, ...] = ()
    #: how encoded frames become the model's input (None: it takes tensors only)
    preprocess: Preprocess | None = None

    @classmethod
    def describe(cls, model_path: Path, **fields: Any) -> ModelCard:
        """A new card for ``model_path``: its size, sha256 and the time now, plus ``fields``."""
        return cls(size=os.path.getsize(model_path), sha256=file_sha256(model_path), created_at=now_text(),
                   **fields)

    @classmethod
    def load(cls, model_path: Path) -> ModelCard | None:
        """The card beside ``model_path``, or None when it has none; ModelCardError if malformed."""
        path = card_path(model_path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ModelCardError(f"model card {path} is unreadable: {e}") from e
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ModelCardError(f"model card {path} is not JSON: {e}") from e
        return cls.from_dict(data, where=f"model card {path}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "model card") -> ModelCard:
        """Parse a card's JSON object, checking required keys and their types."""
        if not isinstance(data, Mapping):
            raise ModelCardError(f"{where} is not a JSON object")
        version = _need(data, "version", int, where)
        sha256 = _need(data, "sha256", str, where)
        if version < 0:
            raise ModelCardError(f"{where}: version must be >= 0, not {version}")
        if not _SHA256.match(sha256):
            raise ModelCardError(f"{where}: sha256 must be 64 lowercase hex digits")
        labels = _need(data, "labels", list, where)
        if not all(isinstance(label, str) for label in labels):
            raise ModelCardError(f"{where}: labels must be strings")
        calibrated_on = _need(data, "calibrated_on", Mapping, where) if "calibrated_on" in data else None
        return cls(
            name=_need(data, "name", str, where), version=version, task=_need(data, "task", str, where),
            inputs=_specs(data, "inputs", where), outputs=_specs(data, "outputs", where),
            labels=tuple(labels),
            calibration=CardCalibration.from_dict(_need(data, "calibration", Mapping, where),
                                                  f"{where}: calibration"),
            metrics=dict(_need(data, "metrics", Mapping, where)), size=_need(data, "size", int, where),
            sha256=sha256, created_at=_need(data, "created_at", str, where),
            source=dict(_need(data, "source", Mapping, where)),
            calibrated_on=None if calibrated_on is None else dict(calibrated_on),
            guards=input_guards(data, where), preprocess=card_preprocess(data, where))

    def to_dict(self) -> dict[str, Any]:
        guards = {g.name: g for g in self.guards}
        out: dict[str, Any] = {
            "name": self.name, "version": self.version, "task": self.task,
            "inputs": [_spec_dict(s, guards.get(s.name)) for s in self.inputs],
            "outputs": [_spec_dict(s) for s in self.outputs],
            "labels": list(self.labels), "calibration": self.calibration.to_dict(),
        }
        if self.calibrated_on is not None:
            out["calibrated_on"] = dict(self.calibrated_on)
        if self.preprocess is not None:
            out["preprocess"] = self.preprocess.model_dump(mode="json")
        out.update(metrics=dict(self.metrics), size=self.size, sha256=self.sha256,
                   created_at=self.created_at, source=dict(self.source))
        return out

    def save(self, model_path: Path) -> Path:
        """Write the card beside ``model_path`` atomically; return its path."""
        path = card_path(model_path)
        atomic_write(path, (json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n").encode())
        return path

    def file_problems(self, model_path: Path) -> list[str]:
        """How the file at ``model_path`` differs from what this card says (size, sha256)."""
        size, sha256 = os.path.getsize(model_path), file_sha256(model_path)
        problems = []
        if size != self.size:
            problems.append(f"{model_path}: {size} bytes, card says {self.size}")
        if sha256 != self.sha256:
            problems.append(f"{model_path}: sha256 {sha256}, card says {self.sha256}")
        return problems

    def with_calibration(self, calibration: CardCalibration,
                         calibrated_on: Mapping[str, Any] | None = None) -> ModelCard:
        """This card with new calibration (and the set it was chosen on)."""
        return replace(self, calibration=calibration, calibrated_on=calibrated_on)


def _spec_dict(spec: TensorSpec, guard: InputGuard | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}
    if guard is not None and guard.allow_nonfinite:
        out["allow_nonfinite"] = True
    if guard is not None and guard.range is not None:
        out["range"] = list(guard.range)
    return out
