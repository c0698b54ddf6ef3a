"""The watch window's measurements (docs/design.md §7): is the new model worse than the one it replaced?

Every model the updater serves runs behind a :class:`MeteredBackend`, which counts the model's own
calls and failures and keeps the run times of its last calls. Figures therefore belong to one loaded
model (not to a version string, which a downgrade can reuse) and measure the model itself: gRPC,
request decoding and the cloud are left out, so the old and the new model compare like for like, and
the cascade and its telemetry stats stay untouched. :func:`regression` is the verdict.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from edge_agent.serving.slot import EdgeModel
from edgecloud.backends.base import Backend
from edgecloud.errors import InvalidInput
from edgecloud.release import RollbackReason
from edgecloud.tensors import TensorSpec

#: run times kept per model for its p50
WINDOW = 1024
#: fewer calls than this on either side say nothing about a regression
MIN_CALLS = 10
#: a p50 slower by less than this is scheduling noise, whatever the ratio (tiny models run in µs)
LATENCY_FLOOR_MS = 1.0


@dataclass(frozen=True, slots=True)
class Figures:
    """What a model did: calls, failed calls, median run time of the kept calls (ms)."""

    calls: int
    errors: int
    p50_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


class MeteredBackend(Backend):
    """Delegates to the real backend and meters ``infer``; warm-ups and probes are not counted."""

    key = "metered"

    def __init__(self, inner: Backend, window: int = WINDOW) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._calls = 0
        self._errors = 0
        self._run_s: deque[float] = deque(maxlen=window)

    @property
    def platform(self) -> str:  # type: ignore[override]
        return self.inner.platform

    def load(self, path) -> None:
        self.inner.load(path)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.inner.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.inner.outputs

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        try:
            outputs = self.inner.infer(inputs)
        except InvalidInput:  # the request's fault, not the model's
            raise
        except Exception:
            with self._lock:
                self._calls += 1
                self._errors += 1
            raise
        elapsed = time.perf_counter() - started
        with self._lock:
            self._calls += 1
            self._run_s.append(elapsed)
        return outputs

    def warmup(self, rows: int = 1) -> dict[str, np.ndarray]:
        return self.inner.warmup(rows)

    def close(self) -> None:
        self.inner.close()

    def figures(self) -> Figures:
        with self._lock:
            samples = list(self._run_s)
            calls, errors = self._calls, self._errors
        p50 = float(np.percentile(samples, 50)) * 1000.0 if samples else None
        return Figures(calls, errors, p50)


def metered(model: EdgeModel) -> EdgeModel:
    """``model`` with its backend metered (unchanged if it already is)."""
    if isinstance(model.backend, MeteredBackend):
        return model
    return replace(model, backend=MeteredBackend(model.backend))


def figures(model: EdgeModel) -> Figures:
    """The figures of a metered model (empty for one that is not)."""
    backend = model.backend
    return backend.figures() if isinstance(backend, MeteredBackend) else Figures(0, 0, None)


def regression(previous: Figures, new: Figures, max_error_rate: float, max_latency_factor: float,
               min_calls: int = MIN_CALLS) -> str | None:
    """Why the new model is worse (``error_rate: …`` / ``latency: …``), or None.

    Errors: the new model's failure rate may exceed neither ``max_error_rate`` nor the previous model's
    own rate, whichever is higher. Latency: its p50 may not exceed ``max_latency_factor`` times the
    previous model's, unless it is slower by less than ``LATENCY_FLOOR_MS``. Each side needs
    ``min_calls`` calls to count; with fewer there is no verdict.
    """
    if new.calls < min_calls:
        return None
    baseline = previous.error_rate if previous.calls >= min_calls else 0.0
    allowed = max(max_error_rate, baseline)
    if new.error_rate > allowed:
        return (f"{RollbackReason.ERROR_RATE.value}: {new.errors} of {new.calls} calls failed "
                f"({new.error_rate:.1%}); "
                f"allowed {allowed:.1%}")
    if (previous.calls >= min_calls and previous.p50_ms and new.p50_ms is not None
            and new.p50_ms > max_latency_factor * previous.p50_ms
            and new.p50_ms - previous.p50_ms >= LATENCY_FLOOR_MS):
        return (f"{RollbackReason.LATENCY.value}: p50 {new.p50_ms:.3f} ms vs {previous.p50_ms:.3f} ms "
                f"of the previous model "
                f"(x{new.p50_ms / previous.p50_ms:.1f}, allowed x{max_latency_factor:g})")
    return None
