"""Counters and latency samples of the cascade, read by telemetry, metrics and the demo summary."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

CONFIDENCE_EDGES = tuple(i / 10 for i in range(11))


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One answered call, as the cascade saw it."""

    rows: int
    escalated_rows: int
    cloud_rows: int
    degraded_rows: int
    rate_limited_rows: int
    latency_s: float
    confidences: np.ndarray


class Stats:
    """Thread-safe running totals plus the last ``window`` latencies of edge and escalated calls."""

    def __init__(self, window: int = 4096) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.rows = 0
        self.escalated = 0
        self.cloud_answers = 0
        self.degraded = 0
        self.rate_limited = 0
        self.errors = 0
        self.audited = 0
        self.histogram = np.zeros(len(CONFIDENCE_EDGES) - 1, dtype=np.int64)
        self._edge_latency: deque[float] = deque(maxlen=window)
        self._escalated_latency: deque[float] = deque(maxlen=window)

    def record(self, call: CallRecord) -> None:
        counts, _ = np.histogram(np.clip(call.confidences, 0.0, 1.0), bins=CONFIDENCE_EDGES)
        with self._lock:
            self.requests += 1
            self.rows += call.rows
            self.escalated += call.escalated_rows
            self.cloud_answers += call.cloud_rows
            self.degraded += call.degraded_rows
            self.rate_limited += call.rate_limited_rows
            self.histogram += counts
            (self._escalated_latency if call.escalated_rows else self._edge_latency).append(call.latency_s)

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def audit(self) -> None:
        with self._lock:
            self.audited += 1

    @staticmethod
    def _percentiles(samples: deque[float]) -> dict[str, float | None]:
        if not samples:
            return {"p50": None, "p95": None, "p99": None}
        ms = np.asarray(samples) * 1000.0
        return {f"p{q}": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99)}

    def snapshot(self) -> dict:
        """A consistent copy of every figure (latencies in milliseconds)."""
        with self._lock:
            return {
                "counters": {"requests": self.requests, "rows": self.rows, "escalated": self.escalated,
                             "cloud_answers": self.cloud_answers, "degraded": self.degraded,
                             "rate_limited": self.rate_limited, "errors": self.errors,
                             "audited": self.audited},
                "latency_ms": {"edge": self._percentiles(self._edge_latency),
                               "escalated": self._percentiles(self._escalated_latency)},
                "escalation_rate": self.escalated / self.rows if self.rows else 0.0,
                "confidence_histogram": {"edges": list(CONFIDENCE_EDGES),
                                         "counts": self.histogram.tolist()},
            }
