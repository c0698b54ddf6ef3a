"""Still scenes are not re-sent (docs/design.md §10): per camera (``edgecloud.stream``), the thumbnail of
the last frame the cloud answered and that answer, so a nearly identical frame within the window reuses
the answer instead of escalating the same picture again.

Two frames count as the same scene when the mean absolute difference of their 16x16 grayscale
thumbnails (0-255) is under ``reuse_max_mad``: sensor noise and JPEG artefacts average out over a
thumbnail's pixels, a part moving into view does not. Streams are kept per served model and version
(another model's answer is no answer), at most :data:`MAX_STREAMS` of them, the least recently used
dropped first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

MAX_STREAMS = 1024


@dataclass(frozen=True, slots=True)
class _Answer:
    thumbnail: np.ndarray
    outputs: Mapping[str, np.ndarray]
    at: float


class StreamMemory:
    """The last cloud answer of each stream; thread-safe."""

    def __init__(self, window_s: float, max_mad: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_mad = max_mad
        self._clock = clock
        self._answers: OrderedDict[tuple[str, str, str], _Answer] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def reuse(self, key: tuple[str, str, str], thumbnail: np.ndarray) -> Mapping[str, np.ndarray] | None:
        """The outputs (one row each) of the stream's last cloud answer when ``thumbnail`` shows the
        same scene and that answer is younger than the window; None otherwise."""
        with self._lock:
            answer = self._answers.get(key)
            if answer is None or self._clock() - answer.at > self.window_s:
                return None
            self._answers.move_to_end(key)
        if float(np.abs(answer.thumbnail - thumbnail).mean()) >= self.max_mad:
            return None
        return answer.outputs

    def remember(self, key: tuple[str, str, str], thumbnail: np.ndarray,
                 outputs: Mapping[str, np.ndarray]) -> None:
        """Keep the cloud's answer (one row of each output) for the stream's frame ``thumbnail``."""
        rows = {name: np.array(values, copy=True) for name, values in outputs.items()}
        answer = _Answer(np.array(thumbnail, copy=True), rows, self._clock())
        with self._lock:
            self._answers[key] = answer
            self._answers.move_to_end(key)
            while len(self._answers) > MAX_STREAMS:
                self._answers.popitem(last=False)
