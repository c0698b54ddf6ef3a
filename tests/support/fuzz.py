"""Hypothesis strategies for what a careless or hostile client sends: ModelInferRequests with wrong
names, datatypes, shapes (huge, negative, zero), byte lengths, lying BYTES prefixes, NaN and ±Inf,
typed contents out of range and parameters of the wrong type; and release envelopes and payloads
mutated key by key. Shared by the in-process fuzz tests of the core and the burst against an agent.

Runs are derandomized (the same examples every run, so CI is stable) and kept small.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.protocol.datatypes import DATATYPES

#: derandomized, no example database, no per-example deadline (a loaded CI machine is slow)
FUZZ = settings(max_examples=200, derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DIMS = st.one_of(st.sampled_from([-1, 0, 1, 2, 3, 32]), st.integers(-2**63, 2**63 - 1),
                 st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, -2**63]))
SPECIAL_FLOATS = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 1.5, 0.5])
TEXT = st.text(max_size=12)
#: a value of each InferParameter choice, and of none
PARAM_VALUES = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.integers(2**63, 2**64 - 1),
                         st.floats(allow_nan=True, allow_infinity=True), TEXT)
_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
           "fp32_contents", "fp64_contents", "bytes_contents")
_FIELD_VALUES = {
    "bool_contents": st.booleans(), "int_contents": st.integers(-2**31, 2**31 - 1),
    "int64_contents": st.integers(-2**63, 2**63 - 1), "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32, allow_nan=True, allow_infinity=True),
    "fp64_contents": st.floats(allow_nan=True, allow_infinity=True), "bytes_contents": st.binary(max_size=8),
}


def _set_param(target, key: str, value: Any) -> None:
    p = target[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if value >= 2**63:
            p.uint64_param = value
        else:
            p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


@st.composite
def bytes_payload(draw, count: int) -> bytes:
    """``count``-ish length-prefixed elements, then maybe cut, padded or given a lying prefix."""
    elements = draw(st.lists(st.binary(max_size=6), min_size=0, max_size=min(max(count, 0), 6) + 1))
    raw = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    mutation = draw(st.sampled_from(["none", "cut", "pad", "liar"]))
    if mutation == "cut" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif mutation == "pad":
        raw += draw(st.binary(min_size=1, max_size=6))
    elif mutation == "liar":
        raw = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "little") + raw
    return raw


def often(likely, *others):
    """``likely`` about three times in four, else one of ``others`` (a plain ``one_of`` would give
    each branch the same share, whatever their number)."""
    return st.integers(0, 99).flatmap(lambda n: likely if n < 75 else st.one_of(*others))


@st.composite
def raw_payload(draw, datatype: str, shape: list[int]) -> bytes:
    """Raw contents for a tensor: mostly of the size the shape needs (floats in [0, 1) with a few NaN,
    ±Inf or out-of-range values dropped in), else any few bytes."""
    count = int(np.prod(shape, dtype=object)) if all(0 <= d <= 4096 for d in shape) else -1
    if datatype == "BYTES":
        return draw(bytes_payload(count))
    exact = draw(often(st.just(True), st.just(False)))
    if datatype in ("FP32", "FP64", "FP16") and 0 <= count <= 4096 and exact:
        values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(count)
        for index in draw(st.lists(st.integers(0, max(count - 1, 0)), max_size=3)) if count else ():
            values[index] = draw(SPECIAL_FLOATS)
        dtype = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2"}[datatype]
        with np.errstate(over="ignore"):
            return values.astype(dtype).tobytes()
    return draw(st.binary(max_size=64))


@st.composite
def frame_shapes(draw) -> list[int]:
    """Mostly shapes the demo model takes ([N, 1, 32, 32]), else zero or too many rows, or anything."""
    rows = draw(often(st.integers(1, 3), st.sampled_from([0, 1025, 2**62])))
    return draw(often(st.just([rows, 1, 32, 32]), st.lists(DIMS, max_size=5)))


@st.composite
def infer_requests(draw, model: str, inputs: tuple[str, ...], outputs: tuple[str, ...],
                   others: tuple[str, ...] = ()) -> pb.ModelInferRequest:
    """A ModelInferRequest as a buggy or hostile client might send it to ``model`` (its ``inputs`` and
    ``outputs``), near enough to what it takes to reach past the first checks most of the time."""
    name = draw(often(st.just(model), st.sampled_from((model, *others)), TEXT))
    msg = pb.ModelInferRequest(model_name=name,
                               model_version=draw(often(st.just(""), st.sampled_from(["1", "7", "x"]))),
                               id=draw(st.sampled_from(["", "fuzz"])))
    typed = draw(st.integers(0, 4)) == 0
    for _ in range(draw(often(st.just(1), st.integers(0, 3)))):
        name = draw(often(st.sampled_from(inputs), TEXT))
        datatype = draw(often(st.just("FP32"), st.sampled_from(DATATYPES), TEXT))
        shape = draw(frame_shapes())
        tensor = msg.inputs.add(name=name, datatype=datatype, shape=shape)
        if typed:
            field = draw(st.sampled_from(_FIELDS))
            getattr(tensor.contents, field).extend(draw(st.lists(_FIELD_VALUES[field], max_size=8)))
        else:
            msg.raw_input_contents.append(draw(raw_payload(datatype, shape)))
    if not typed and draw(st.integers(0, 9)) == 0:
        msg.raw_input_contents.append(b"\x00")  # one entry too many
    for key in draw(st.lists(st.sampled_from(["edgecloud.escalate", "edgecloud.threshold", "edgecloud.x",
                                              "edgecloud.edge_summary", "edgecloud.deferred"]), max_size=3)):
        _set_param(msg.parameters, key, draw(st.one_of(PARAM_VALUES, st.sampled_from(
            ["auto", "always", "never", "{}", '{"rows": [0], "reason": "forced"}']))))
    for _ in range(draw(st.integers(0, 2))):
        out = msg.outputs.add(name=draw(often(st.sampled_from(outputs), TEXT)))
        if draw(st.booleans()):
            _set_param(out.parameters, "classification", draw(PARAM_VALUES))
    return msg


#: JSON values of every kind, nested a little
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
              st.floats(allow_nan=False, allow_infinity=False), TEXT),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(TEXT, children, max_size=3)),
    max_leaves=8)
#: times at the edges of the calendar and of RFC 3339, and some that are none
TIMES = st.one_of(st.sampled_from([
    "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "9999-12-31T23:59:59Z", "2025-13-01T00:00:00Z",
    "2025-06-01T12:00:00+99:00", "2025-06-01T12:00:00Z", "2020-01-01T00:00:00Z", "yesterday"]), TEXT)
NUMBERS = st.sampled_from([-1, 0, 2**63, 10**100, -1e308, 1e308, 0.5, 101, True])
_PATHS = (("schema",), ("model",), ("version",), ("publisher",), ("issued_at",), ("expires_at",),
          ("allow_downgrade",), ("labels",), ("rollout",), ("rollout", "percent"), ("rollout", "salt"),
          ("calibration",), ("calibration", "temperature"), ("calibration", "threshold"),
          ("calibration", "scores"), ("artifact",), ("artifact", "uri"), ("artifact", "sha256"),
          ("artifact", "size"), ("artifact", "format"), ("artifact", "target"))
_TIME_KEYS = {"issued_at", "expires_at"}
_NUMBER_KEYS = {"schema", "version", "percent", "temperature", "threshold", "size"}


@st.composite
def mutated_payloads(draw, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` (a release payload as JSON) with a few keys, nested ones too, removed or given a
    value of another type, a time at the edge of the calendar, or a number out of range."""
    data = json.loads(json.dumps(payload))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_PATHS))
        parent = data
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        key = path[-1]
        if draw(st.integers(0, 4)) == 0:
            parent.pop(key, None)
            continue
        fitting = TIMES if key in _TIME_KEYS else NUMBERS if key in _NUMBER_KEYS else JSON_VALUES
        parent[key] = draw(st.one_of(fitting, fitting, JSON_VALUES))
    return data
