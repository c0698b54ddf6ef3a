"""Per-model inference statistics in the shape of Triton's ModelStatistics extension, kept by the
servicer's core so every front (gRPC unary and streaming, REST) counts the same calls once
(docs/design.md §2).

Counted per (model, version) the call was answered by: requests that succeeded and failed with their
total time, rows inferred (``inference_count``) and calls run (``execution_count``; the gateway's
dynamic batcher runs fewer batches, which its own ``/metrics`` count), the time of the last one, and
the latency buckets of the successful ones (the gateway's ``/metrics`` histogram).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field

from edgecloud.metrics.buckets import LATENCY_BUCKETS, bucket_of


@dataclass(slots=True)
class ModelFigures:
    """One model version's totals since the service started."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    #: milliseconds since the epoch, 0 before the first call
    last_inference_ms: int = 0
    #: successful calls per bucket of LATENCY_BUCKETS (the last: +Inf), not cumulative
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


class InferenceStatistics:
    """Thread-safe totals per (model, version)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._figures: dict[tuple[str, str], ModelFigures] = {}

    def _figures_of(self, key: tuple[str, str]) -> ModelFigures:
        """The figures of ``key``, made on its first call only (under the lock)."""
        figures = self._figures.get(key)
        if figures is None:
            figures = self._figures[key] = ModelFigures()
        return figures

    def success(self, name: str, version: str, rows: int, elapsed_ns: int) -> None:
        with self._lock:
            figures = self._figures_of((name, version))
            figures.success_count += 1
            figures.success_ns += elapsed_ns
            figures.inference_count += rows
            figures.execution_count += 1
            figures.last_inference_ms = time.time_ns() // 1_000_000
            figures.latency_buckets[bucket_of(elapsed_ns / 1e9)] += 1

    def failure(self, name: str, version: str, elapsed_ns: int) -> None:
        with self._lock:
            figures = self._figures_of((name, version))
            figures.fail_count += 1
            figures.fail_ns += elapsed_ns

    def of(self, name: str, version: str) -> ModelFigures:
        """A copy of one model version's figures (zeros before its first call)."""
        with self._lock:
            figures = self._figures.get((name, version))
            return (dataclasses.replace(figures, latency_buckets=list(figures.latency_buckets)) if figures
                    else ModelFigures())
