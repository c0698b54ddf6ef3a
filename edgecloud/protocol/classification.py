"""Triton's classification extension: an output requested with ``classification`` = k comes back as
BYTES ``"score:index[:label]"`` strings, the k best per row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgecloud.errors import InvalidInput, excerpt

PARAMETER = "classification"


def class_count(output: str, parameters: Mapping[str, object]) -> int:
    """The k a client asked for on ``output`` (0: none); InvalidInput unless it is a whole number >= 0."""
    k = parameters.get(PARAMETER, 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InvalidInput(f"output {excerpt(output)}: parameter {PARAMETER!r} must be a whole number of "
                           f"classes (int64), not {excerpt(k)}")
    return k


def top_k_strings(scores: np.ndarray, k: int, labels: Sequence[str] = (), output: str = "") -> np.ndarray:
    """BYTES [N, k] of the k highest scores per row, best first, as Triton formats them; InvalidInput
    for an output that holds no scores (BYTES)."""
    if scores.dtype.kind not in "biuf":
        raise InvalidInput(f"output {excerpt(output)} holds no numeric scores: it cannot be classified")
    flat = scores.reshape(scores.shape[0], -1)
    k = max(1, min(int(k), flat.shape[1]))
    order = np.argsort(-flat.astype(np.float64), axis=1, kind="stable")[:, :k]  # unsigned and bool too
    rows = []
    for r, idx in enumerate(order):
        row = []
        for i in idx:
            text = f"{float(flat[r, i]):f}:{int(i)}"
            if i < len(labels):
                text += f":{labels[i]}"
            row.append(text.encode())
        rows.append(row)
    return np.array(rows, dtype=np.object_)
