"""Triton's classification extension: an output requested with ``classification`` = k comes back as
BYTES ``"score:index[:label]"`` strings, the k best per row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PARAMETER = "classification"


def top_k_strings(scores: np.ndarray, k: int, labels: Sequence[str] = ()) -> np.ndarray:
    """BYTES [N, k] of the k highest scores per row, best first, as Triton formats them."""
    flat = scores.reshape(scores.shape[0], -1)
    k = max(1, min(int(k), flat.shape[1]))
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
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
