"""The outputs a client names in a ModelInferRequest, answered the same way by the agent and the gateway:
in the client's order, each shaped as Triton's classification extension asks, an unknown name refused
with the outputs there are."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from edgecloud.errors import InvalidInput, excerpt
from edgecloud.protocol.classification import class_count, top_k_strings
from edgecloud.protocol.codec import RequestedOutput

#: an output made only when a client names it (the agent's per-row ``edgecloud.*`` outputs)
Extra = Callable[[], np.ndarray]


def check_requested(model: str, requested: Sequence[RequestedOutput], names: Sequence[str]) -> None:
    """InvalidInput naming the model and its outputs when a client names one it does not have, or
    asks for a class count that is no whole number."""
    for out in requested:
        if out.name not in names:
            raise InvalidInput(f"model {model!r} has no output {excerpt(out.name)}; outputs are "
                               f"{list(names)}")
        class_count(out.name, out.parameters)


def select_outputs(model: str, requested: Sequence[RequestedOutput], outputs: Mapping[str, np.ndarray],
                   labels: Sequence[str] = (),
                   extras: Mapping[str, Extra] | None = None) -> dict[str, np.ndarray]:
    """The outputs the client named (all of ``outputs``, in their order, when it named none); one
    requested with ``classification`` = k comes back as the k best ``"score:index:label"`` strings."""
    if not requested:
        return dict(outputs)
    extras = extras or {}
    check_requested(model, requested, [*outputs, *extras])
    selected = {}
    for out in requested:
        value = outputs[out.name] if out.name in outputs else extras[out.name]()
        k = class_count(out.name, out.parameters)
        selected[out.name] = top_k_strings(value, k, labels, out.name) if k else value
    return selected
