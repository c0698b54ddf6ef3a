"""Tensor specs: the name, KServe datatype and shape of a model input or output."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edgecloud.errors import InvalidInput, excerpt
from edgecloud.protocol.datatypes import DATATYPES, kserve_datatype


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output; ``-1`` in ``shape`` is a dimension of any size (dim 0: the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor {self.name!r}: unknown datatype {self.datatype!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one row (everything after the batch dimension)."""
        return self.shape[1:]

    def shape_matches(self, shape: Sequence[int]) -> bool:
        """True when ``shape`` fits this spec (same rank, fixed dimensions equal)."""
        return len(shape) == len(self.shape) and all(
            want < 0 or want == got for want, got in zip(self.shape, shape)
        )

    def check_header(self, datatype: str, shape: Sequence[int], model: str = "") -> None:
        """Raise InvalidInput naming the tensor when a tensor of ``datatype`` and ``shape`` does not fit
        this spec; it reads the header only, so a request is judged before any of its data is parsed."""
        where = f"model {model!r} input {self.name!r}" if model else f"input {self.name!r}"
        if datatype not in DATATYPES:
            raise InvalidInput(f"{where}: unknown datatype {excerpt(datatype)}, expected {self.datatype}")
        if datatype != self.datatype and not (self.datatype == "BF16" and datatype == "FP32"):
            raise InvalidInput(f"{where}: datatype {datatype}, expected {self.datatype}")
        if len(shape) != len(self.shape):
            raise InvalidInput(f"{where}: {len(shape)} dimensions, expected {len(self.shape)} "
                               f"({list(self.shape)}, -1 = any size)")
        if any(d < 0 for d in shape):
            raise InvalidInput(f"{where}: shape {list(shape)} has a negative dimension")
        if not self.shape_matches(shape):
            raise InvalidInput(f"{where}: shape {list(shape)}, expected {list(self.shape)} "
                               "(-1 = any size)")

    def check(self, array: np.ndarray, model: str = "") -> None:
        """Raise InvalidInput naming the tensor when ``array`` does not fit this spec."""
        self.check_header(kserve_datatype(array.dtype), array.shape, model)


#: a tensor's header: its KServe datatype and shape
Header = tuple[str, Sequence[int]]


def check_headers(specs: Sequence[TensorSpec], headers: Mapping[str, Header], model: str = "") -> int:
    """Validate the headers of a full input set against ``specs`` and return the batch size (rows of
    dim 0); a request without rows is refused, since nothing can answer it.

    A set of headers that passed is remembered (a client sends the same shapes call after call), so
    the hot path pays one lookup instead of the walk; a refusal is never remembered."""
    key = (tuple(specs), tuple((name, datatype, tuple(shape)) for name, (datatype, shape) in headers.items()),
           model)
    return _checked_headers(*key)


@lru_cache(maxsize=1024)
def _checked_headers(specs: tuple[TensorSpec, ...], headers: tuple[tuple[str, str, tuple[int, ...]], ...],
                     model: str) -> int:
    return _check_headers(specs, {name: (datatype, shape) for name, datatype, shape in headers}, model)


def _check_headers(specs: Sequence[TensorSpec], headers: Mapping[str, Header], model: str) -> int:
    names = {s.name for s in specs}
    unknown = sorted(set(headers) - names)
    if unknown:
        raise InvalidInput(f"model {model!r}: unknown input {excerpt(unknown[0])}; inputs are "
                           f"{sorted(names)}")
    missing = sorted(names - set(headers))
    if missing:
        raise InvalidInput(f"model {model!r}: missing input {missing[0]!r}")
    rows = set()
    for spec in specs:
        datatype, shape = headers[spec.name]
        spec.check_header(datatype, shape, model)
        if len(shape):
            rows.add(shape[0])
    if len(rows) > 1:
        raise InvalidInput(f"model {model!r}: inputs disagree on the batch size: {sorted(rows)}")
    batch = rows.pop() if rows else 1
    if batch == 0:
        raise InvalidInput(f"model {model!r}: the request holds no rows (dim 0 is 0)")
    return batch


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray], model: str = "") -> int:
    """Validate a full input set against ``specs`` and return the batch size (rows of dim 0)."""
    return check_headers(specs, {name: (kserve_datatype(a.dtype), a.shape) for name, a in inputs.items()},
                         model)


def contract_differences(expected: Sequence[TensorSpec], actual: Sequence[TensorSpec],
                         what: str) -> list[str]:
    """How ``actual`` differs from ``expected`` in names, datatypes and per-row shapes (dim 0 aside).

    A dynamic dimension (-1) on either side matches any size. Used for the cloud model's contract
    and for a new release's, so both speak of differences the same way.
    """
    problems = []
    have = {s.name: s for s in actual}
    for spec in expected:
        other = have.get(spec.name)
        if other is None:
            problems.append(f"{what} {spec.name!r} is missing (has {sorted(have)})")
            continue
        if other.datatype != spec.datatype:
            problems.append(f"{what} {spec.name!r}: datatype {other.datatype}, expected {spec.datatype}")
        rows_match = len(other.row_shape) == len(spec.row_shape) and all(
            a < 0 or b < 0 or a == b for a, b in zip(spec.row_shape, other.row_shape))
        if not rows_match:
            problems.append(f"{what} {spec.name!r}: per-row shape {list(other.row_shape)}, "
                            f"expected {list(spec.row_shape)}")
    return problems
