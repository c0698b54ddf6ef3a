"""Requested outputs as both services answer them: the client's order, Triton's classification
extension, extras made only when named, and an unknown name refused with the outputs there are."""

from __future__ import annotations

import numpy as np
import pytest

from edgecloud.errors import InvalidInput
from edgecloud.protocol.codec import RequestedOutput
from edgecloud.protocol.outputs import select_outputs

OUTPUTS = {"logits": np.array([[0.1, 2.0, 0.5], [3.0, 0.0, 1.0]], dtype=np.float32),
           "embedding": np.zeros((2, 4), dtype=np.float32)}


def test_all_outputs_in_their_order_when_none_is_named() -> None:
    assert list(select_outputs("m", (), OUTPUTS)) == ["logits", "embedding"]


def test_named_outputs_in_the_clients_order_with_the_classification_extension() -> None:
    requested = (RequestedOutput("embedding"), RequestedOutput("logits", {"classification": 2}))
    selected = select_outputs("m", requested, OUTPUTS, labels=("ok", "scratch", "spot"))
    assert list(selected) == ["embedding", "logits"]
    assert selected["logits"].tolist() == [[b"2.000000:1:scratch", b"0.500000:2:spot"],
                                           [b"3.000000:0:ok", b"1.000000:2:spot"]]


def test_extras_are_made_only_when_named() -> None:
    made = []

    def source() -> np.ndarray:
        made.append(1)
        return np.array([b"edge", b"cloud"], dtype=np.object_)

    extras = {"edgecloud.source": source}
    select_outputs("m", (RequestedOutput("logits"),), OUTPUTS, extras=extras)
    assert not made
    selected = select_outputs("m", (RequestedOutput("edgecloud.source"),), OUTPUTS, extras=extras)
    assert selected["edgecloud.source"].tolist() == [b"edge", b"cloud"] and made == [1]


def test_an_unknown_output_names_the_model_and_its_outputs() -> None:
    with pytest.raises(InvalidInput, match=r"model 'm' has no output 'prob'; outputs are "
                                           r"\['logits', 'embedding', 'edgecloud.source'\]"):
        select_outputs("m", (RequestedOutput("prob"),), OUTPUTS,
                       extras={"edgecloud.source": lambda: np.array([])})


@pytest.mark.parametrize("k", ["2", -1, True, 2.0])
def test_a_class_count_that_is_no_whole_number_is_refused(k) -> None:
    with pytest.raises(InvalidInput, match="'logits': parameter 'classification' must be a whole number"):
        select_outputs("m", (RequestedOutput("logits", {"classification": k}),), OUTPUTS)


def test_only_numeric_outputs_can_be_classified() -> None:
    extras = {"edgecloud.source": lambda: np.array([b"edge", b"cloud"], dtype=np.object_)}
    with pytest.raises(InvalidInput, match=r"'edgecloud\.source' holds no numeric scores"):
        select_outputs("m", (RequestedOutput("edgecloud.source", {"classification": 1}),), OUTPUTS,
                       extras=extras)
    unsigned = {"votes": np.array([[1, 7, 3]], dtype=np.uint8)}
    top = select_outputs("m", (RequestedOutput("votes", {"classification": 1}),), unsigned)["votes"]
    assert top.tolist() == [[b"7.000000:1"]]
