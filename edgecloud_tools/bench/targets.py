"""The targets the bench checks, each a figure against its baseline from the same run: met, not met, or
n/a (a peer not installed, a stage not run)."""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Any

from edgecloud_tools.rig.stats import ratio

OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


@dataclass(frozen=True)
class Goal:
    """One target: ``figure / baseline`` (or, when not ``relative``, the figure itself) ``op`` ``limit``."""

    name: str
    figure: float | None
    baseline: float | None
    op: str
    limit: float
    unit: str  # of the figure and its baseline: ms, /s, bytes, calls
    relative: bool = True

    @property
    def value(self) -> float | None:
        return ratio(self.figure, self.baseline) if self.relative else self.figure

    @property
    def met(self) -> bool | None:
        return None if self.value is None else OPS[self.op](self.value, self.limit)

    def as_dict(self) -> dict:
        return {**asdict(self), "value": self.value, "met": self.met}


def get(data: Any, *keys: str) -> Any:
    """``data[k1][k2]…``, or None when any step is missing."""
    for key in keys:
        if not isinstance(data, dict) or data.get(key) is None:
            return None
        data = data[key]
    return data


def _sum(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def _min(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else min(values)


def goals(r: dict) -> list[Goal]:
    agent, floors = r.get("agent", {}), r.get("floors", {})
    peers, gateway = r.get("peers", {}), r.get("gateway", {})
    slow, casc = r.get("slow_cloud", {}), get(r, "cascade", "modes")
    open3 = get(agent, "open", "3")
    alone, beside = get(slow, "edge_only_alone"), get(slow, "edge_only_beside_escalations")
    agent16 = get(agent, "closed", "16", "per_s")
    gw64 = get(gateway, "batching", "closed", "64", "per_s")
    floor1 = _sum(get(floors, "in_process", "edge INT8", "batch1", "p50_ms"),
                  get(floors, "echo", "kserve", "1", "p50_ms"))
    floor64 = _min(get(floors, "echo", "kserve", "64", "per_s"),
                   get(floors, "in_process", "cloud FP32", "rows_per_s"))
    return [
        Goal("agent p50 at batch 1 <= 1.25x (in-process backend + KServe v2 echo)",
             get(agent, "closed", "1", "p50_ms"), floor1, "<=", 1.25, "ms"),
        Goal("agent calls/s at 16 clients >= 3x FastAPI", agent16,
             get(peers, "fastapi", "closed", "16", "per_s"), ">=", 3.0, "/s"),
        Goal("agent calls/s at 16 clients >= 1.5x MLServer", agent16,
             get(peers, "mlserver", "closed", "16", "per_s"), ">=", 1.5, "/s"),
        Goal("250 ms cloud, 16 escalating clients: edge-only p50 <= 1.5x alone",
             get(beside, "p50_ms"), get(alone, "p50_ms"), "<=", 1.5, "ms"),
        Goal("250 ms cloud, 16 escalating clients: edge-only p99 <= 3x alone",
             get(beside, "p99_ms"), get(alone, "p99_ms"), "<=", 3.0, "ms"),
        Goal("open loop at 3x capacity: answered p99 <= 10x unloaded p99",
             get(open3, "p99_ms"), get(agent, "closed", "1", "p99_ms"), "<=", 10.0, "ms"),
        Goal("open loop at 3x capacity: errors other than RESOURCE_EXHAUSTED",
             get(open3, "other_errors"), None, "==", 0, "calls", relative=False),
        Goal("open loop at 3x capacity: RSS peak <= 1.5x RSS before",
             get(open3, "rss_peak_bytes"), get(open3, "rss_before_bytes"), "<=", 1.5, "bytes"),
        Goal("gateway at 64 streams >= 1.5x MLServer adaptive batching", gw64,
             get(gateway, "mlserver_adaptive", "closed", "64", "per_s"), ">=", 1.5, "/s"),
        Goal("gateway at 64 streams >= 0.8x min(KServe v2 echo at 64, cloud model in process)", gw64,
             floor64, ">=", 0.8, "/s"),
        Goal("cascade mean latency <= 0.35x cloud-only (30 ms WAN)", get(casc, "cascade", "mean_ms"),
             get(casc, "cloud only", "mean_ms"), "<=", 0.35, "ms"),
    ]
