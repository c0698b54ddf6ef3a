"""Model cards: the JSON beside a model file (``<file>.card.json``) that says what the model is, how its
cascade is calibrated and how it scored on held-out data (docs/design.md §10).

The committed JSON Schema (``protos/schemas/model_card.schema.json``) is the contract; at load time
the card is parsed into its typed model by pydantic (required keys, strict types, the calibration's
ranges), so the runtime needs no ``jsonschema``; tests validate against the full schema.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from edgecloud.clock import now_text
from edgecloud.confidence.detection import DetectionOutputs
from edgecloud.confidence.probability import SCORE_KINDS
from edgecloud.errors import ModelLoadError
from edgecloud.files import atomic_write, file_sha256
from edgecloud.guards import InputGuard
from edgecloud.jsontypes import Int, Number, Str
from edgecloud.preprocess import Preprocess
from edgecloud.tensors import TensorSpec

CARD_SUFFIX = ".card.json"
#: the task of a card whose ``detection`` section names the detector's outputs (docs/design.md §10)
DETECTION_TASK = "detection"
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


def _complaint(error: ValidationError, where: str) -> str:
    """The first of pydantic's complaints about a card, naming the key."""
    first = error.errors(include_url=False)[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return f"{where}: missing key {key!r}"
    if first["type"].endswith("_type"):
        return f"{where}: {key!r} has the wrong type ({type(first['input']).__name__})"
    return f"{where}: {key}: {first['msg'].removeprefix('Value error, ')}"


@dataclass(frozen=True, slots=True)
class CardCalibration:
    """The cascade settings a model ships with: policy, temperature, threshold, score output, scores."""

    policy: Str
    temperature: Number
    threshold: Number
    score_output: Str
    scores: Str = "logits"

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
        if not isinstance(item.get("name"), str):
            raise ModelCardError(f"{at}: 'name' must be a string")
        try:
            guards.append(InputGuard(item["name"], allow,
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


_DETECTION = TypeAdapter(DetectionOutputs)


def card_detection(card: Mapping[str, Any], where: str = "model card") -> DetectionOutputs | None:
    """The outputs a detection card's ``detection`` section names (docs/design.md §10), None for a card
    of another task; ModelCardError naming the key when the section is missing or malformed."""
    if card.get("task") != DETECTION_TASK:
        if "detection" in card:
            raise ModelCardError(f"{where}: 'detection' is only for task {DETECTION_TASK!r}, "
                                 f"not {card.get('task')!r}")
        return None
    if "detection" not in card:
        raise ModelCardError(f"{where}: missing key 'detection' (task {DETECTION_TASK!r})")
    try:
        return _DETECTION.validate_python(card["detection"])
    except ValidationError as e:
        raise ModelCardError(_complaint(e, f"{where}: detection")) from None


def check_detection_outputs(detection: DetectionOutputs, outputs: tuple[TensorSpec, ...],
                            where: str = "model card") -> None:
    """ModelCardError naming the key when ``detection`` names an output the model lacks, or one of
    another datatype than boxes FP32, scores FP32, classes INT64."""
    kinds = {o.name: o.datatype for o in outputs}
    for key, name, datatype in (("boxes", detection.boxes, "FP32"), ("scores", detection.scores, "FP32"),
                                ("classes", detection.classes, "INT64")):
        if name not in kinds:
            raise ModelCardError(f"{where}: detection.{key}: {name!r} is not an output of the model; "
                                 f"outputs are {list(kinds)}")
        if kinds[name] != datatype:
            raise ModelCardError(f"{where}: detection.{key}: output {name!r} is {kinds[name]}, "
                                 f"expected {datatype}")


@dataclass(frozen=True)
class ModelCard:
    """A model card; ``load``/``save`` address it by the model's path, not the card's."""

    name: Str
    version: Annotated[Int, Field(ge=0)]
    task: Str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[Str, ...]
    calibration: CardCalibration
    metrics: Mapping[str, Any]
    size: Int
    sha256: Annotated[Str, Field(pattern=_SHA256.pattern)]
    created_at: Str
    source: Mapping[str, Any]
    #: the labelled set, cloud model and target the calibration was chosen with (None: not recorded)
    calibrated_on: Mapping[str, Any] | None = field(default=None)
    #: what the inputs' values may be (written into their ``inputs`` entries)
    guards: tuple[InputGuard, ...] = ()
    #: how encoded frames become the model's input (None: it takes tensors only)
    preprocess: Preprocess | None = None
    #: a detector's outputs and score threshold (task "detection"; None for another task)
    detection: DetectionOutputs | None = None

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
        """Parse a card's JSON object into its typed model; ModelCardError naming the key otherwise."""
        if not isinstance(data, Mapping):
            raise ModelCardError(f"{where} is not a JSON object")
        try:
            # guards are read from the inputs, preprocess by its own model
            card = _CARD.validate_python({**data, "guards": (), "preprocess": None, "detection": None})
        except ValidationError as e:
            raise ModelCardError(_complaint(e, where)) from None
        except ModelCardError as e:  # the calibration's own ranges
            raise ModelCardError(f"{where}: {e}") from None
        detection = card_detection(data, where)
        if detection is not None:
            check_detection_outputs(detection, card.outputs, where)
        return replace(card, guards=input_guards(data, where), preprocess=card_preprocess(data, where),
                       detection=detection)

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
        if self.detection is not None:
            out["detection"] = self.detection.to_dict()
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


_CARD = TypeAdapter(ModelCard)
