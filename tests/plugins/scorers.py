"""A user's own confidence policy, named by dotted path in tests (e.g. for detection outputs)."""

from __future__ import annotations

import numpy as np


def mean_abs_logit(outputs):
    """Confidence = sigmoid of the mean absolute logit: a toy detection-style scorer."""
    logits = outputs["logits"]
    return 1.0 / (1.0 + np.exp(-np.abs(logits).mean(axis=1)))


NOT_CALLABLE = 3
