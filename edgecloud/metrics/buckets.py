"""The latency histogram's buckets, one set for the agent, the gateway and the fleet collector.

Latencies are histograms, not summaries: bucket counts add up across devices and replicas
(``histogram_quantile(0.99, sum by (le) (rate(…_bucket[5m])))``), quantiles do not. One set of
buckets serves the edge's milliseconds and the cloud's hundreds of milliseconds, so the agent's, the
gateway's and the collector's series can be compared and summed (docs/design.md §9).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate

from prometheus_client.core import HistogramMetricFamily

#: upper bounds (seconds) of the latency buckets, +Inf implied: fine from 0.5 ms (edge answers) to
#: 100s of ms (escalations over a WAN, the gateway's batching window), coarse up to 5 s
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


def bucket_of(seconds: float) -> int:
    """Index of the bucket a latency falls in (``len(LATENCY_BUCKETS)`` for +Inf): the first bound
    at or above it, as Prometheus' ``le`` says."""
    return bisect_left(LATENCY_BUCKETS, seconds)


def cumulative(counts: Iterable[int]) -> list[int]:
    """Per-bucket counts → the cumulative counts a histogram exposes (the last is every call)."""
    return list(accumulate(counts))


def add_latency(family: HistogramMetricFamily, labels: Sequence[str], counts: Sequence[int],
                sum_s: float) -> None:
    """One labelled histogram from cumulative ``counts`` (one per bound of LATENCY_BUCKETS, then +Inf)."""
    bounds = [*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"]
    family.add_metric(list(labels), list(zip(bounds, counts)), sum_s)
