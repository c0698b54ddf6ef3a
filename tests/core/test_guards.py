"""Input guards: the row cap, non-finite values and declared ranges, from the card and the config."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgecloud.errors import InvalidInput, ModelLoadError
from edgecloud.guards import DEFAULT_BATCH_BYTES, InputContract, InputGuard, default_max_rows
from edgecloud.modelcard import ModelCard, ModelCardError, card_path, input_guards
from edgecloud.tensors import TensorSpec
from tests.conftest import EDGE_INT8, ROOT

SCHEMA = json.loads((ROOT / "protos" / "schemas" / "model_card.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
IMAGE = TensorSpec("image", "FP32", (-1, 1, 32, 32))
COUNT = TensorSpec("count", "INT64", (-1, 1))


def test_non_finite_values_are_refused_naming_the_tensor_and_first_bad_row() -> None:
    contract = InputContract.build("m", (IMAGE, COUNT))
    frames = np.zeros((5, 1, 32, 32), dtype=np.float32)
    frames[3, 0, 4, 7] = np.inf
    frames[4, 0, 0, 0] = np.nan
    counts = np.zeros((5, 1), dtype=np.int64)
    with pytest.raises(InvalidInput) as e:
        contract.check_values({"image": frames, "count": counts})
    assert "model 'm' input 'image': row 3 holds inf at [3, 0, 4, 7]" in str(e.value)
    contract.check_values({"image": np.zeros((5, 1, 32, 32), np.float32), "count": counts})


@pytest.mark.parametrize("datatype", ["FP16", "FP64", "BF16"])
def test_every_floating_point_datatype_is_guarded(datatype: str) -> None:
    spec = TensorSpec("x", datatype, (-1, 2))
    values = np.array([[1, 2], [-np.inf, 0]], dtype=np.float16 if datatype == "FP16" else np.float64)
    with pytest.raises(InvalidInput, match="row 1 holds -inf"):
        InputContract.build("m", (spec,)).check_values({"x": values})


def test_the_card_or_the_config_may_allow_non_finite_values() -> None:
    nan = {"image": np.full((2, 1, 32, 32), np.nan, dtype=np.float32)}
    InputContract.build("m", (IMAGE,), [InputGuard("image", allow_nonfinite=True)]).check_values(nan)
    InputContract.build("m", (IMAGE,), allow_nonfinite=True).check_values(nan)
    # the config's word wins over the card's, both ways
    strict = InputContract.build("m", (IMAGE,), [InputGuard("image", allow_nonfinite=True)],
                                 allow_nonfinite=False)
    with pytest.raises(InvalidInput, match="row 0 holds nan"):
        strict.check_values(nan)


def test_rows_outside_a_declared_range_get_confidence_zero() -> None:
    contract = InputContract.build("m", (IMAGE,), [InputGuard("image", allow_nonfinite=True, range=(0, 1))])
    frames = np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32)
    frames[1, 0, 0, 0] = 1.5          # a saturated pixel
    frames[3, 0, 9, 9] = np.nan       # allowed through, but never confident
    confidence = np.array([0.9, 0.99, 0.8, 0.95], dtype=np.float32)
    guarded = contract.guard_confidence({"image": frames}, confidence)
    np.testing.assert_array_equal(guarded, np.array([0.9, 0.0, 0.8, 0.0], dtype=np.float32))
    assert confidence[1] > 0 and confidence[3] > 0  # the caller's array is left alone
    inside = np.clip(frames, 0, 1)
    inside[3] = 0.5
    assert contract.guard_confidence({"image": inside}, confidence) is confidence


def test_an_input_inside_its_range_is_read_once() -> None:
    """check_values names the inputs it found inside their ranges, and guard_confidence takes its word
    for them; an input with NaN or ±Inf is outside any range, so it is still refused."""
    contract = InputContract.build("m", (IMAGE, COUNT), [InputGuard("image", range=(0, 1))])
    counts = np.zeros((2, 1), dtype=np.int64)
    inside = np.full((2, 1, 32, 32), 0.5, dtype=np.float32)
    assert contract.check_values({"image": inside, "count": counts}) == frozenset({"image"})
    outside = inside.copy()
    outside[1, 0, 0, 0] = 2.0
    assert contract.check_values({"image": outside, "count": counts}) == frozenset()
    confidence = np.array([0.9, 0.9], dtype=np.float32)
    np.testing.assert_array_equal(contract.guard_confidence({"image": outside}, confidence),
                                  np.array([0.9, 0.0], dtype=np.float32))
    # the word of check_values, as a request carries it, spares the second reading
    assert contract.guard_confidence({"image": outside}, confidence, frozenset({"image"})) is confidence
    for bad in (np.nan, np.inf, -np.inf):
        frames = inside.copy()
        frames[1, 0, 3, 3] = bad
        with pytest.raises(InvalidInput, match=f"row 1 holds {bad}"):
            contract.check_values({"image": frames, "count": counts})


def test_row_cap_is_sized_to_the_model_unless_configured() -> None:
    assert default_max_rows((IMAGE,)) == DEFAULT_BATCH_BYTES // (32 * 32 * 4) == 1024
    assert default_max_rows((TensorSpec("x", "FP32", (8, 3)),)) == 8  # a fixed batch size is the cap
    assert InputContract.build("m", (IMAGE,), max_rows=4000).max_rows == 4000
    contract = InputContract.build("m", (IMAGE,))
    assert contract.check_headers({"image": ("FP32", (1024, 1, 32, 32))}) == 1024
    with pytest.raises(InvalidInput, match="1025 rows in one request, at most 1024"):
        contract.check_headers({"image": ("FP32", (1025, 1, 32, 32))})
    with pytest.raises(InvalidInput, match="holds no rows"):
        contract.check_headers({"image": ("FP32", (0, 1, 32, 32))})


def test_guards_must_fit_the_model() -> None:
    with pytest.raises(ModelLoadError, match="guards input 'pixels', which the model does not have"):
        InputContract.build("m", (IMAGE,), [InputGuard("pixels", range=(0, 1))])
    with pytest.raises(ModelLoadError, match="is BYTES; a range needs a numeric input"):
        InputContract.build("m", (TensorSpec("s", "BYTES", (-1,)),), [InputGuard("s", range=(0, 1))])
    with pytest.raises(ValueError, match="min <= max"):
        InputGuard("x", range=(1, 0))


def test_the_demo_card_declares_its_pixel_range() -> None:
    card = ModelCard.load(EDGE_INT8)
    assert card.guards == (InputGuard("image", range=(0.0, 1.0)),)


def test_card_guards_round_trip_and_validate(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    data = json.loads(card_path(EDGE_INT8).read_text())
    data["inputs"][0].update(allow_nonfinite=True, range=[-1.5, 2])
    VALIDATOR.validate(data)
    card = ModelCard.from_dict(data)
    assert card.guards == (InputGuard("image", True, (-1.5, 2.0)),)
    assert card.to_dict()["inputs"][0] == data["inputs"][0]


@pytest.mark.parametrize(("entry", "message", "schema_refuses"), [
    ({"range": [0]}, "'range' must be \\[min, max\\]", True),
    ({"range": [0, "1"]}, "'range' must be \\[min, max\\]", True),
    ({"allow_nonfinite": "yes"}, "'allow_nonfinite' must be true or false", True),
    ({"range": [2, 1]}, "min <= max", False),  # beyond what a JSON Schema can say
])
def test_malformed_guards_are_refused(entry: dict, message: str, schema_refuses: bool) -> None:
    data = json.loads(card_path(EDGE_INT8).read_text())
    data["inputs"][0] = {k: v for k, v in data["inputs"][0].items() if k != "range"} | entry
    with pytest.raises(ModelCardError, match=message):
        input_guards(data)
    assert VALIDATOR.is_valid(data) is not schema_refuses


def test_only_inputs_take_guards() -> None:
    data = json.loads(card_path(EDGE_INT8).read_text())
    VALIDATOR.validate(data)
    assert not VALIDATOR.is_valid({**data, "outputs": [{**data["outputs"][0], "range": [0, 1]}]})
    assert not VALIDATOR.is_valid({**data, "inputs": [{**data["inputs"][0], "limits": [0, 1]}]})
