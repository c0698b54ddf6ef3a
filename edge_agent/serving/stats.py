"""Counters and latency samples of the cascade, read by telemetry, metrics and the demo summary."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE_EDGES = tuple(i / 10 for i in range(11))


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRecord:
    """One answered call, as the cascade saw it (by keyword: its counts are all ints, easy to swap)."""

    rows: int
    escalated_rows: int
    cloud_rows: int
    degraded_rows: int
    rate_limited_rows: int
    latency_s: float
    confidences: np.ndarray


PATHS = ("edge", "escalated")


class Stats:
    """Thread-safe running totals plus the last ``window`` latencies of edge and escalated calls.

    ``snapshot()`` covers the agent's life (for /metrics and summaries); ``interval()`` covers the calls
    since its previous call (for telemetry, whose latencies and histogram are per interval).
    """

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
        self._latency: dict[str, deque[float]] = {path: deque(maxlen=window) for path in PATHS}
        self._latency_count = dict.fromkeys(PATHS, 0)
        self._latency_sum = dict.fromkeys(PATHS, 0.0)
        self._mark = self._interval_mark()

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
            path = "escalated" if call.escalated_rows else "edge"
            self._latency[path].append(call.latency_s)
            self._latency_count[path] += 1
            self._latency_sum[path] += call.latency_s

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def audit(self) -> None:
        with self._lock:
            self.audited += 1

    @staticmethod
    def _percentiles(samples: Sequence[float]) -> dict[str, float | None]:
        if not samples:
            return {"p50": None, "p95": None, "p99": None}
        ms = np.asarray(samples) * 1000.0
        return {f"p{q}": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99)}

    def _counters(self) -> dict[str, int]:
        return {"requests": self.requests, "rows": self.rows, "escalated": self.escalated,
                "cloud_answers": self.cloud_answers, "degraded": self.degraded,
                "rate_limited": self.rate_limited, "errors": self.errors, "audited": self.audited}

    def _interval_mark(self) -> tuple[dict[str, int], int, int, np.ndarray]:
        return dict(self._latency_count), self.rows, self.escalated, self.histogram.copy()

    def snapshot(self) -> dict:
        """A consistent copy of every figure (latency percentiles in milliseconds over the window;
        ``latency_totals`` count and sum, in seconds, every call since start)."""
        with self._lock:
            return {
                "counters": self._counters(),
                "latency_ms": {path: self._percentiles(self._latency[path]) for path in PATHS},
                "latency_totals": {path: {"count": self._latency_count[path],
                                          "sum_s": self._latency_sum[path]} for path in PATHS},
                "escalation_rate": self.escalated / self.rows if self.rows else 0.0,
                "confidence_histogram": {"edges": list(CONFIDENCE_EDGES),
                                         "counts": self.histogram.tolist()},
            }

    def interval(self) -> dict:
        """Counters since start, and latency percentiles (of at most ``window`` calls per path),
        escalated share of rows (None without rows) and confidence histogram of the calls since the
        previous ``interval()``; one reader (telemetry) owns the interval."""
        with self._lock:
            (counts, rows, escalated, histogram), self._mark = self._mark, self._interval_mark()
            latency = {}
            for path in PATHS:
                new = min(self._latency_count[path] - counts[path], len(self._latency[path]))
                latency[path] = self._percentiles(list(self._latency[path])[-new:] if new else [])
            new_rows = self.rows - rows
            return {
                "counters": self._counters(),
                "latency_ms": latency,
                "escalation_rate": (self.escalated - escalated) / new_rows if new_rows else None,
                "confidence_histogram": {"edges": list(CONFIDENCE_EDGES),
                                         "counts": (self.histogram - histogram).tolist()},
            }
