"""Input guards (docs/design.md §4): what a request must satisfy before a model sees it, beyond the
names, datatypes and shapes of its inputs.

- **Rows per request** are capped: by default at the model's fixed batch size, else at the rows whose
  inputs fill :data:`DEFAULT_BATCH_BYTES`, so one request cannot make the runtime allocate gigabytes.
- **Non-finite values** (NaN, ±Inf) in a floating-point input are refused, naming the tensor and the
  first bad row, unless the model card (``inputs[].allow_nonfinite``) or the config allows them: a dead
  or saturated sensor must not be answered with a confident label (an INT8 model saturates them into a
  strong logit).
- **Declared ranges** (card ``inputs[].range`` = [min, max]): a row with a value outside, or NaN, is
  never answered confidently at the edge; :meth:`InputContract.guard_confidence` gives it confidence 0,
  so it escalates like any unsure row.

The checks are vectorized: one ``np.isfinite`` over a tensor, then ``argmax`` of the bad mask for the
first bad row only when there is one. An input with a range is read once, by its minimum and maximum:
inside the range means finite as well (NaN and ±Inf fall outside any finite range), and the request
carries the names of such inputs so that :meth:`InputContract.guard_confidence` does not read them again
(measured on the agent, 2 cores: the two passes cost about 160 us of CPU per call, most of it the
re-reading).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgecloud.errors import InvalidInput, ModelLoadError
from edgecloud.protocol.datatypes import NUMPY_OF, wire_itemsize
from edgecloud.tensors import Header, TensorSpec, check_headers

#: input bytes one request may carry when neither the config nor a fixed batch size sets the row cap
DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
#: bytes a BYTES element is taken to hold when sizing the row cap
BYTES_ELEMENT_GUESS = 64
FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
_NUMERIC_KINDS = "iuf"


@dataclass(frozen=True, slots=True)
class InputGuard:
    """What one input's values may be: whether NaN and ±Inf are accepted, and the [min, max] range a
    confident edge answer needs (None: any)."""

    name: str
    allow_nonfinite: bool = False
    range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.range is not None:
            low, high = (float(v) for v in self.range)
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"range of input {self.name!r} must be two finite numbers [min, max] with "
                                 f"min <= max, not {list(self.range)}")
            object.__setattr__(self, "range", (low, high))


def default_max_rows(specs: Sequence[TensorSpec]) -> int:
    """The row cap sized to a model: its fixed batch size, else the rows whose inputs (dynamic
    dimensions taken as 1) fill DEFAULT_BATCH_BYTES."""
    fixed = [s.shape[0] for s in specs if s.shape and s.shape[0] > 0]
    if fixed:
        return min(fixed)
    row_bytes = sum(math.prod(max(d, 1) for d in s.row_shape)
                    * (wire_itemsize(s.datatype) or BYTES_ELEMENT_GUESS) for s in specs)
    return max(1, DEFAULT_BATCH_BYTES // max(row_bytes, 1))


def _first_nonfinite(array: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first NaN or ±Inf in ``array``, or None when every value is finite."""
    finite = np.isfinite(array)
    if finite.all():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(~finite)), array.shape))


def _within(array: np.ndarray, low: float, high: float) -> bool:
    """Whether every value of ``array`` lies in [low, high]; NaN fails both comparisons."""
    return bool(array.size == 0 or (array.min() >= low and array.max() <= high))


def _rows_outside(array: np.ndarray, low: float, high: float) -> np.ndarray | None:
    """A mask of the rows of ``array`` holding a value outside [low, high] (NaN included), or None."""
    if _within(array, low, high):
        return None
    flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    return ~((flat >= low) & (flat <= high)).all(axis=1)


@dataclass(frozen=True, slots=True)
class InputContract:
    """What a request to one model must satisfy: its inputs, their guards, and the row cap (None: no
    cap). A host gives it before a request is decoded, so a bad one is refused unparsed."""

    model: str
    inputs: tuple[TensorSpec, ...]
    guards: Mapping[str, InputGuard] = field(default_factory=dict)
    max_rows: int | None = None
    #: (frames input, the input it feeds) when the model takes encoded frames (docs/design.md §10)
    frames: tuple[str, str] | None = None

    @classmethod
    def build(cls, model: str, inputs: tuple[TensorSpec, ...], guards: Sequence[InputGuard] = (),
              allow_nonfinite: bool | None = None, max_rows: int | None = None,
              frames: tuple[str, str] | None = None) -> InputContract:
        """The contract of a loaded model: ``guards`` from its card, ``allow_nonfinite`` (when set)
        over every input's, ``max_rows`` (None: sized to the model, :func:`default_max_rows`) and the
        frames input its preprocess declares. ModelLoadError when a guard names no input of the model,
        or a range a non-numeric one."""
        specs = {s.name: s for s in inputs}
        table = {}
        for guard in guards:
            spec = specs.get(guard.name)
            if spec is None:
                raise ModelLoadError(f"model {model!r}: the card guards input {guard.name!r}, which the "
                                     f"model does not have (inputs are {sorted(specs)})")
            if guard.range is not None and NUMPY_OF[spec.datatype].kind not in _NUMERIC_KINDS:
                raise ModelLoadError(f"model {model!r}: input {guard.name!r} is {spec.datatype}; a range "
                                     "needs a numeric input")
            table[guard.name] = guard
        if allow_nonfinite is not None:
            table = {name: InputGuard(name, allow_nonfinite, table[name].range if name in table else None)
                     for name in specs}
        return cls(model, inputs, table, default_max_rows(inputs) if max_rows is None else max_rows, frames)

    def expected(self, names: Collection[str]) -> tuple[TensorSpec, ...]:
        """The inputs a request naming ``names`` must carry: the model's, with the frames input in place
        of the one it feeds when the request names the frames input."""
        if self.frames is None or self.frames[0] not in names:
            return self.inputs
        frames, fed = self.frames
        return (*(s for s in self.inputs if s.name != fed), TensorSpec(frames, "BYTES", (-1,)))

    def check_headers(self, headers: Mapping[str, Header]) -> int:
        """Names, datatypes, shapes and the row cap, from the tensors' headers alone; the batch size."""
        rows = check_headers(self.expected(headers), headers, self.model)
        if self.max_rows is not None and rows > self.max_rows:
            raise InvalidInput(f"model {self.model!r}: {rows} rows in one request, at most {self.max_rows}; "
                               "split the batch")
        return rows

    def check_values(self, inputs: Mapping[str, np.ndarray]) -> frozenset[str]:
        """InvalidInput naming the tensor and the first bad row when a floating-point input holds NaN or
        ±Inf that its guard does not allow; else the names of the inputs found inside their ranges
        (for :meth:`guard_confidence`)."""
        in_range = []
        for spec in self.inputs:
            if spec.name not in inputs:
                continue
            guard = self.guards.get(spec.name)
            array = inputs[spec.name]
            if guard is not None and guard.range is not None and _within(array, *guard.range):
                in_range.append(spec.name)  # finite as well
                continue
            if spec.datatype not in FLOAT_DATATYPES or (guard is not None and guard.allow_nonfinite):
                continue
            index = _first_nonfinite(array)
            if index is not None:
                row = index[0] if index else 0
                raise InvalidInput(f"model {self.model!r} input {spec.name!r}: row {row} holds "
                                   f"{array[index]} at {list(index)}; NaN and ±Inf are refused unless "
                                   "the model card or the config allows them (allow_nonfinite)")
        return frozenset(in_range)

    def guard_confidence(self, inputs: Mapping[str, np.ndarray], confidence: np.ndarray,
                         in_range: Collection[str] = ()) -> np.ndarray:
        """``confidence`` with 0 for every row holding a value outside its input's declared range, so
        that the edge never answers such a row confidently; inputs named in ``in_range`` were found
        inside theirs already (:meth:`check_values`)."""
        outside = None
        for guard in self.guards.values():
            if guard.range is None or guard.name in in_range:
                continue
            rows = _rows_outside(inputs[guard.name], *guard.range)
            if rows is not None:
                outside = rows if outside is None else outside | rows
        if outside is None or not outside.any():
            return confidence
        guarded = np.array(confidence, copy=True)
        guarded[outside] = 0.0
        return guarded
