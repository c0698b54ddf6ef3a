"""Model cards: the committed ones validate against the committed schema and match their files; the
loader reads, writes and rejects cards as the runtime needs."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from edgecloud.modelcard import CardCalibration, ModelCard, ModelCardError, card_path
from edgecloud.tensors import TensorSpec
from edgecloud_tools.toolchain.dataset import LABELS
from tests.conftest import MODELS, ROOT

SCHEMA = json.loads((ROOT / "protos" / "schemas" / "model_card.schema.json").read_text())
EDGE = MODELS / "edge"
#: every shipped model: path → (served name, version)
SHIPPED = {
    EDGE / "inspection-edge-int8.onnx": ("inspection-edge", 1),
    EDGE / "inspection-edge-fp32.onnx": ("inspection-edge", 1),
    EDGE / "inspection-edge-v2-int8.onnx": ("inspection-edge", 2),
    MODELS / "repository" / "inspection" / "1" / "model.onnx": ("inspection", 1),
}
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("model", sorted(SHIPPED), ids=lambda p: str(p.relative_to(MODELS)))
def test_shipped_cards_validate_and_match_their_files(model: Path) -> None:
    data = json.loads(card_path(model).read_text())
    VALIDATOR.validate(data)
    card = ModelCard.load(model)
    assert card is not None
    assert card.file_problems(model) == []
    assert card.size == model.stat().st_size
    assert (card.name, card.version) == SHIPPED[model]
    assert card.labels == LABELS
    assert card.to_dict() == data  # the loader loses nothing
    assert [(s.name, s.datatype, s.shape) for s in card.inputs] == [("image", "FP32", (-1, 1, 32, 32))]
    assert [(s.name, s.datatype, s.shape) for s in card.outputs] == [("logits", "FP32", (-1, 4))]
    assert card.calibration.score_output == "logits"


def _card(model: Path, **changes) -> ModelCard:
    fields = dict(name="m", version=3, task="classification",
                  inputs=(TensorSpec("x", "FP32", (-1, 8)),),
                  outputs=(TensorSpec("logits", "FP32", (-1, 4)),),
                  labels=LABELS, calibration=CardCalibration("max_prob", 1.5, 0.7, "logits"),
                  metrics={"split": "test", "n": 10, "accuracy": 0.9}, source={"tool": "test"})
    fields.update(changes)
    return ModelCard.describe(model, **fields)


def test_round_trip_and_missing_card(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not really a model")
    assert ModelCard.load(model) is None
    card = _card(model)
    assert card.save(model) == tmp_path / "m.onnx.card.json"
    VALIDATOR.validate(json.loads(card_path(model).read_text()))
    assert ModelCard.load(model) == card
    assert card.size == len(b"not really a model") and card.file_problems(model) == []
    model.write_bytes(b"another model")
    assert len(card.file_problems(model)) == 2


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("sha256"), "missing key 'sha256'"),
    (lambda d: d.update(version="1"), "'version' has the wrong type"),
    (lambda d: d.update(version=True), "'version' has the wrong type"),
    (lambda d: d["calibration"].update(threshold=1.5), "threshold must be within"),
    (lambda d: d["calibration"].update(scores="odds"), "scores must be one of"),
    (lambda d: d["inputs"][0].update(datatype="FLOAT"), "unknown datatype"),
])
def test_malformed_cards_are_rejected_by_loader_and_schema(tmp_path: Path, change, message: str) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    data = _card(model).to_dict()
    change(data)
    card_path(model).write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match=message):
        ModelCard.load(model)
    assert not VALIDATOR.is_valid(data)


def test_schema_rejects_a_local_time_and_unknown_keys(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    data = _card(model).to_dict()
    VALIDATOR.validate(data)
    assert not VALIDATOR.is_valid({**data, "created_at": "2026-01-01T10:00:00+02:00"})
    assert not VALIDATOR.is_valid({**data, "metrics": {**data["metrics"], "acc": 0.9}})
    assert not VALIDATOR.is_valid({**data, "sha256": "ABC"})


def test_unreadable_card_is_a_model_load_error(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    card_path(model).write_text("{not json")
    with pytest.raises(ModelCardError, match="not JSON"):
        ModelCard.load(model)
