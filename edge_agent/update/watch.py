"""The watch window's measurements (docs/design.md §7): is the new model worse than the one it replaced?

Every model the updater serves runs behind a :class:`MeteredBackend`, which counts the model's own
calls and failures and keeps the run times of its last calls by batch size. Figures therefore belong
to one loaded model (not to a version string, which a downgrade can reuse) and measure the model
itself: gRPC, request decoding and the cloud are left out, and the cascade and its telemetry stats
stay untouched. Run times are compared like for like: a batch of 64 rows costs more than a batch of
one, so each model's median is kept per batch class (1, 2-3, 4-7, … rows: :func:`batch_class`) and
only classes both models served often enough are compared. A burst of larger batches after the swap
is then no regression, while a model slower on the same batches still is. :func:`regression` is the
verdict, and names the figures that decided it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from edge_agent.serving.slot import EdgeModel
from edgecloud.backends.base import Backend
from edgecloud.errors import InvalidInput
from edgecloud.release import RollbackReason
from edgecloud.tensors import TensorSpec

#: run times kept per model and batch class for its p50
WINDOW = 256
#: fewer calls than this on either side (of a batch class, for latency) say nothing about a regression
MIN_CALLS = 10
#: a p50 slower by less than this is scheduling noise, whatever the ratio (tiny models run in µs)
LATENCY_FLOOR_MS = 1.0


def batch_class(rows: int) -> int:
    """Batches whose run times compare: 1 row, 2-3, 4-7, 8-15, … (the bit length of ``rows``)."""
    return max(int(rows), 1).bit_length()


def class_rows(batch: int) -> str:
    """The rows a batch class holds, for a reason or a log line: ``1``, ``2-3``, ``64-127``."""
    low = 1 << (batch - 1)
    return str(low) if low == 1 else f"{low}-{2 * low - 1}"


@dataclass(frozen=True, slots=True)
class Latency:
    """One batch class of a model: how many run times are kept, and their median (ms)."""

    calls: int
    p50_ms: float


@dataclass(frozen=True, slots=True)
class Figures:
    """What a model did: calls, failed calls, and its run times per batch class."""

    calls: int
    errors: int
    latency: Mapping[int, Latency] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def summary(self) -> str:
        """``1:p50=0.320ms/800,64-127:p50=9.216ms/120`` (rows: median run time / calls kept)."""
        return ",".join(f"{class_rows(b)}:p50={lat.p50_ms:.3f}ms/{lat.calls}"
                        for b, lat in sorted(self.latency.items())) or "none"


class MeteredBackend(Backend):
    """Delegates to the real backend and meters ``infer``; warm-ups and probes are not counted."""

    key = "metered"

    def __init__(self, inner: Backend, window: int = WINDOW) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._calls = 0
        self._errors = 0
        self._window = window
        self._run_s: dict[int, deque[float]] = {}

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
        first = next(iter(inputs.values()), None)
        batch = batch_class(first.shape[0] if first is not None and first.ndim else 1)
        with self._lock:
            self._calls += 1
            self._run_s.setdefault(batch, deque(maxlen=self._window)).append(elapsed)
        return outputs

    def warmup(self, rows: int = 1) -> dict[str, np.ndarray]:
        return self.inner.warmup(rows)

    def close(self) -> None:
        self.inner.close()

    def figures(self) -> Figures:
        with self._lock:
            samples = {batch: list(times) for batch, times in self._run_s.items()}
            calls, errors = self._calls, self._errors
        return Figures(calls, errors, {batch: Latency(len(times), float(np.percentile(times, 50)) * 1000.0)
                                       for batch, times in samples.items()})


def metered(model: EdgeModel) -> EdgeModel:
    """``model`` with its backend metered (unchanged if it already is)."""
    if isinstance(model.backend, MeteredBackend):
        return model
    return replace(model, backend=MeteredBackend(model.backend))


def figures(model: EdgeModel) -> Figures:
    """The figures of a metered model (empty for one that is not)."""
    backend = model.backend
    return backend.figures() if isinstance(backend, MeteredBackend) else Figures(0, 0)


def regression(previous: Figures, new: Figures, max_error_rate: float, max_latency_factor: float,
               min_calls: int = MIN_CALLS) -> str | None:
    """Why the new model is worse (``error_rate: …`` / ``latency: …``, with the figures), or None.

    Errors: the new model's failure rate may exceed neither ``max_error_rate`` nor the previous model's
    own rate, whichever is higher; the new model needs ``min_calls`` calls for a verdict, the previous
    one as many for its rate to count. Latency, per batch class both models served ``min_calls``
    times: the new p50 may not exceed ``max_latency_factor`` times the previous model's, unless it is
    slower by less than ``LATENCY_FLOOR_MS``; the class slower by the largest factor is named.
    """
    if new.calls < min_calls:
        return None
    counted = previous.calls >= min_calls
    allowed = max(max_error_rate, previous.error_rate if counted else 0.0)
    if new.error_rate > allowed:
        before = f"{previous.errors} of {previous.calls}" if counted else "too few calls to count"
        return (f"{RollbackReason.ERROR_RATE.value}: {new.errors} of {new.calls} calls failed "
                f"({new.error_rate:.1%}); allowed {allowed:.1%} (previous model: {before})")
    worst: tuple[float, int, Latency, Latency] | None = None
    for batch, after in sorted(new.latency.items()):
        before_lat = previous.latency.get(batch)
        if before_lat is None or min(before_lat.calls, after.calls) < min_calls:
            continue
        if (after.p50_ms > max_latency_factor * before_lat.p50_ms
                and after.p50_ms - before_lat.p50_ms >= LATENCY_FLOOR_MS):
            factor = after.p50_ms / before_lat.p50_ms if before_lat.p50_ms > 0 else float("inf")
            if worst is None or factor > worst[0]:
                worst = (factor, batch, before_lat, after)
    if worst is None:
        return None
    factor, batch, before_lat, after = worst
    return (f"{RollbackReason.LATENCY.value}: p50 {after.p50_ms:.3f} ms vs {before_lat.p50_ms:.3f} ms of "
            f"the previous model on batches of {class_rows(batch)} rows, over {after.calls} and "
            f"{before_lat.calls} calls (x{factor:.1f}, allowed x{max_latency_factor:g})")
