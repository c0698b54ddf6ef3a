"""Latency figures the bench reports, from per-call milliseconds: percentiles, mean, and a compact CDF for
the plots."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

#: the quantiles (in %) the CDF keeps: enough points for a plot, none of the raw samples
CDF_QUANTILES = (*range(0, 100), 99.5, 99.9, 100)


def latency_summary(latency_ms: np.ndarray) -> dict:
    """p50, p99, mean and max of the answered calls (NaN entries, calls that failed, are left out)."""
    ms = np.asarray(latency_ms, dtype=float)
    ms = ms[~np.isnan(ms)]
    if not ms.size:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    p50, p99 = np.percentile(ms, [50, 99])
    return {"n": int(ms.size), "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3),
            "mean_ms": round(float(ms.mean()), 3), "max_ms": round(float(ms.max()), 3)}


def cdf(latency_ms: np.ndarray) -> list[list[float]]:
    """``[[quantile %, ms], …]`` at :data:`CDF_QUANTILES`; empty without answered calls."""
    ms = np.asarray(latency_ms, dtype=float)
    ms = ms[~np.isnan(ms)]
    if not ms.size:
        return []
    values = np.percentile(ms, CDF_QUANTILES)
    return [[float(q), round(float(v), 4)] for q, v in zip(CDF_QUANTILES, values)]


def timed_calls(fn: Callable[[], object], calls: int, warmup: int = 20) -> np.ndarray:
    """Milliseconds per call of ``fn`` over ``calls`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter()
        fn()
        samples[i] = time.perf_counter() - started
    return samples * 1000.0


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline`` to 3 significant places, or None when either is missing or the baseline 0."""
    if value is None or not baseline:
        return None
    return float(f"{value / baseline:.3g}")
