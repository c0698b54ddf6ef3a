"""Counters and latency samples of the cascade, read by telemetry, metrics and the demo summary."""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from math import isnan

import numpy as np

from edgecloud.metrics.buckets import LATENCY_BUCKETS, bucket_of, cumulative

CONFIDENCE_EDGES = tuple(i / 10 for i in range(11))
_LAST_BIN = len(CONFIDENCE_EDGES) - 2


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRecord:
    """One answered call, as the cascade saw it (by keyword: its counts are all ints, easy to swap)."""

    rows: int
    escalated_rows: int
    cloud_rows: int
    degraded_rows: int
    rate_limited_rows: int
    in_flight_limited_rows: int
    reused_rows: int = 0
    latency_s: float
    confidences: Sequence[float]


PATHS = ("edge", "escalated")


def confidence_bins(confidences: Sequence[float]) -> list[int]:
    """The histogram bin of each confidence (a NaN falls in none; one below 0 or above 1 in the first
    or last)."""
    return [min(max(bisect_right(CONFIDENCE_EDGES, c) - 1, 0), _LAST_BIN)
            for c in confidences if not isnan(c)]


class Stats:
    """Thread-safe running totals plus the last ``window`` latencies of edge and escalated calls.

    ``snapshot()`` covers the agent's life (for /metrics and summaries); ``interval()`` covers the calls
    since its previous call (for telemetry, whose latencies and histogram are per interval). Both carry
    the latency buckets since start (``latency_buckets``), which a histogram exposes and which add up
    across devices.
    """

    def __init__(self, window: int = 4096) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.rows = 0
        self.escalated = 0
        self.cloud_answers = 0
        self.degraded = 0
        self.rate_limited = 0
        self.in_flight_limited = 0
        self.errors = 0
        self.audited = 0
        self.reused = 0
        self.upstream_bytes = 0
        self.histogram = [0] * (_LAST_BIN + 1)
        self._latency: dict[str, deque[float]] = {path: deque(maxlen=window) for path in PATHS}
        self._latency_count = dict.fromkeys(PATHS, 0)
        self._latency_sum = dict.fromkeys(PATHS, 0.0)
        self._buckets = {path: [0] * (len(LATENCY_BUCKETS) + 1) for path in PATHS}
        self._mark = self._interval_mark()

    def record(self, call: CallRecord, bins: Sequence[int] | None = None) -> None:
        """Count one call: integer counters and a bisect per row, no numpy on the hot path (``bins``:
        the histogram bins of its confidences, when the caller found them already)."""
        self.add(call, confidence_bins(call.confidences) if bins is None else bins)

    def add(self, call: CallRecord, bins: Sequence[int]) -> None:
        """:meth:`record` with the histogram bins of its confidences already found."""
        with self._lock:
            self.requests += 1
            self.rows += call.rows
            self.escalated += call.escalated_rows
            self.cloud_answers += call.cloud_rows
            self.degraded += call.degraded_rows
            self.rate_limited += call.rate_limited_rows
            self.in_flight_limited += call.in_flight_limited_rows
            self.reused += call.reused_rows
            for b in bins:
                self.histogram[b] += 1
            # a call that waited for the cloud; background escalations and reused answers did not
            path = "escalated" if call.cloud_rows or call.degraded_rows else "edge"
            self._latency[path].append(call.latency_s)
            self._latency_count[path] += 1
            self._latency_sum[path] += call.latency_s
            self._buckets[path][bucket_of(call.latency_s)] += 1

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def audit(self) -> None:
        with self._lock:
            self.audited += 1

    def upstream(self, size: int) -> None:
        """Count the input bytes of one request sent to the cloud."""
        with self._lock:
            self.upstream_bytes += size

    @staticmethod
    def _percentiles(samples: Sequence[float]) -> dict[str, float | None]:
        if not samples:
            return {"p50": None, "p95": None, "p99": None}
        ms = np.asarray(samples) * 1000.0
        return {f"p{q}": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99)}

    def _counters(self) -> dict[str, int]:
        return {"requests": self.requests, "rows": self.rows, "escalated": self.escalated,
                "cloud_answers": self.cloud_answers, "degraded": self.degraded,
                "rate_limited": self.rate_limited, "in_flight_limited": self.in_flight_limited,
                "errors": self.errors, "audited": self.audited, "reused": self.reused,
                "upstream_bytes": self.upstream_bytes}

    def _latency_buckets(self) -> dict:
        """Cumulative bucket counts and the sum of latencies, per path, since start."""
        return {"le": list(LATENCY_BUCKETS),
                **{path: {"counts": cumulative(self._buckets[path]), "sum_s": self._latency_sum[path]}
                   for path in PATHS}}

    def _interval_mark(self) -> tuple[dict[str, int], int, int, list[int]]:
        return dict(self._latency_count), self.rows, self.escalated, list(self.histogram)

    def snapshot(self) -> dict:
        """A consistent copy of every figure (latency percentiles in milliseconds over the window;
        ``latency_buckets`` over every call since start, sums in seconds)."""
        with self._lock:
            return {
                "counters": self._counters(),
                "latency_ms": {path: self._percentiles(self._latency[path]) for path in PATHS},
                "latency_buckets": self._latency_buckets(),
                "escalation_rate": self.escalated / self.rows if self.rows else 0.0,
                "confidence_histogram": {"edges": list(CONFIDENCE_EDGES),
                                         "counts": list(self.histogram)},
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
                "latency_buckets": self._latency_buckets(),
                "escalation_rate": (self.escalated - escalated) / new_rows if new_rows else None,
                "confidence_histogram": {"edges": list(CONFIDENCE_EDGES),
                                         "counts": [now - then for now, then in
                                                    zip(self.histogram, histogram)]},
            }
