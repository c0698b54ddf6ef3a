"""What a confidence policy is: outputs of a batch in, one confidence per row out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np


class ConfidencePolicy(Protocol):
    """Maps a batch's model outputs to a confidence per row, higher = surer.

    A row wants the cloud when its confidence is strictly below the threshold. A user's own policy
    (for detection outputs, say) is any callable with this signature, named by a dotted path
    ``package.module:function`` in the config.
    """

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray: ...
