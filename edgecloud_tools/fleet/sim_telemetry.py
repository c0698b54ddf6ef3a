"""A simulated device's telemetry (docs/design.md §6, §11), drawn from a configurable truth per model
version: rows, escalations, audited rows and how many of them agree with the cloud, edge
latency, and the confidence histogram.

The truth file is JSON, ``{"<version>": {"audit_accuracy": 0.88, "escalation_rate": 0.06, "p95_ms": 2.0},
…}`` with an optional ``"*"`` entry for every version it does not name; a version it leaves out
altogether is served by a device that sends no ``quality`` (an older agent: "unknown", never agreement).

Noise is the field's: each device's own true audit agreement is drawn once per version around the
version's (``device_spread``, the standard deviation), and each interval's counts are binomial (and
Poisson for the rows) draws from it, so two devices on one good release never report the same share.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, ValidationError

from edgecloud.config import Section
from edgecloud.errors import ConfigError
from edgecloud.metrics.buckets import LATENCY_BUCKETS
from edgecloud.mqtt.payloads import Telemetry

#: the confidence histogram's 10 bins over [0, 1]; rows below the threshold (0.5) are the escalated ones
HIST_BINS = 10
HIST_EDGES = [round(i / HIST_BINS, 1) for i in range(HIST_BINS + 1)]
#: how escalated rows and confident rows spread over the bins below and above 0.5
_UNSURE_SHAPE = np.array([0.05, 0.1, 0.2, 0.3, 0.35])
_CONFIDENT_SHAPE = np.array([0.05, 0.07, 0.1, 0.18, 0.6])
#: z of the 95th percentile of a normal distribution (edge latency is drawn log-normal)
_Z95 = 1.6449
#: the escalated calls' latency: a cloud on the same LAN
ESCALATED_P50_MS = 25.0


class VersionTruth(Section):
    """What one version really does in the field."""

    audit_accuracy: float = Field(ge=0, le=1, description="share of audited (confident) rows the cloud "
                                                          "agrees with")
    escalation_rate: float = Field(ge=0, le=1, description="share of rows below the threshold")
    p95_ms: float = Field(gt=0, description="edge latency, 95th percentile")
    escalated_agreement: float = Field(0.6, ge=0, le=1, description="share of escalated rows the cloud "
                                                                    "answers as the edge did")


@dataclass(frozen=True)
class Truth:
    """Version → its truth; ``default`` for the versions not named (None: no quality for them)."""

    versions: dict[int, VersionTruth]
    default: VersionTruth | None = None

    def of(self, version: int | None) -> VersionTruth | None:
        return self.default if version is None else self.versions.get(version, self.default)

    @classmethod
    def from_dict(cls, data: Any, source: str = "truth") -> Truth:
        """Parse a truth mapping; ConfigError naming the key for anything wrong."""
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"{source}: a JSON object of version → truth, e.g. "
                              '{"2": {"audit_accuracy": 0.88, "escalation_rate": 0.06, "p95_ms": 2.0}}')
        versions: dict[int, VersionTruth] = {}
        default = None
        for key, value in data.items():
            if key != "*" and not (isinstance(key, str) and key.isdigit()):
                raise ConfigError(f"{source}: key {key!r} is not a version (an integer) or '*'")
            try:
                truth = VersionTruth.model_validate(value)
            except ValidationError as e:
                first = e.errors(include_url=False)[0]
                where = ".".join([key, *(str(p) for p in first["loc"])])
                raise ConfigError(f"{source}: {where}: {first['msg']}") from None
            if key == "*":
                default = truth
            else:
                versions[int(key)] = truth
        return cls(versions, default)

    @classmethod
    def read(cls, path: Path) -> Truth:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"--truth {path}: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(f"--truth {path}: not JSON: {e}") from None
        return cls.from_dict(data, f"--truth {path}")

    def to_dict(self) -> dict[str, Any]:
        out = {str(v): t.model_dump() for v, t in self.versions.items()}
        if self.default is not None:
            out["*"] = self.default.model_dump()
        return out


@dataclass(frozen=True)
class Interval:
    """One interval's figures of a device on one version."""

    rows: int
    escalated: int
    audited: int
    audit_agree: int
    escalated_agree: int
    confidence_hist: list[int]
    latency_counts: list[int]  # edge calls per LATENCY_BUCKETS bucket (+Inf last), not cumulative
    latency_sum_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


QUALITY_KEYS = ("rows", "escalated", "audited", "audit_agree", "escalated_agree")


def _lognormal_shares(p50_ms: float, p95_ms: float) -> np.ndarray:
    """Share of calls per latency bucket (+Inf last) of a log-normal with that median and p95."""
    sigma = max(math.log(p95_ms / p50_ms) / _Z95, 1e-6)
    cdf = [0.5 * (1 + math.erf((math.log(b * 1000) - math.log(p50_ms)) / (sigma * math.sqrt(2))))
           for b in LATENCY_BUCKETS]
    shares = np.diff([0.0, *cdf, 1.0])
    return np.clip(shares, 0, None) / np.clip(shares, 0, None).sum()


@dataclass
class DeviceDraws:
    """One device's random figures: its own agreement per version, and each interval's counts."""

    rng: np.random.Generator
    spread: float
    rows_per_s: float
    audit_rate: float
    _agreement: dict[int, float] = field(default_factory=dict)

    def agreement(self, version: int, truth: VersionTruth) -> float:
        """This device's true audit agreement on ``version``, drawn once around the version's."""
        if version not in self._agreement:
            drawn = self.rng.normal(truth.audit_accuracy, self.spread) if self.spread > 0 else \
                truth.audit_accuracy
            self._agreement[version] = float(min(1.0, max(0.0, drawn)))
        return self._agreement[version]

    def interval(self, version: int, truth: VersionTruth, seconds: float) -> Interval:
        rng = self.rng
        rows = int(rng.poisson(self.rows_per_s * seconds))
        escalated = int(rng.binomial(rows, truth.escalation_rate))
        audited = int(rng.binomial(rows - escalated, self.audit_rate))
        audit_agree = int(rng.binomial(audited, self.agreement(version, truth)))
        escalated_agree = int(rng.binomial(escalated, truth.escalated_agreement))
        unsure = rng.multinomial(escalated, _UNSURE_SHAPE)
        sure = rng.multinomial(rows - escalated, _CONFIDENT_SHAPE)
        hist = [int(n) for n in (*unsure, *sure)]
        p50 = truth.p95_ms * 0.6
        edge_calls = rows - escalated
        counts = rng.multinomial(edge_calls, _lognormal_shares(p50, truth.p95_ms))
        jitter = float(rng.normal(1.0, 0.05)) if edge_calls else 1.0
        return Interval(rows, escalated, audited, audit_agree, escalated_agree, hist,
                        [int(n) for n in counts], edge_calls * p50 / 1000,
                        *((round(p50 * jitter, 3), round(truth.p95_ms * jitter, 3),
                           round(truth.p95_ms * 1.4 * jitter, 3)) if edge_calls else (None, None, None)))


#: what a version the truth does not name does (its telemetry then carries no quality)
NEUTRAL = VersionTruth(audit_accuracy=0.9, escalation_rate=0.05, p95_ms=2.0)
_NO_LATENCY = {"p50": None, "p95": None, "p99": None}


@dataclass
class DeviceTelemetry:
    """One device's telemetry messages: counters and latency buckets since the simulation started, the
    rest over the interval, and ``quality`` for the active version (interval counts and totals since it
    became active)."""

    device: str
    model: str
    draws: DeviceDraws
    truth: Truth
    seq: int = 0
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("requests", "rows", "escalated", "cloud_answers", "audited"), 0))
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum_s: float = 0.0
    escalated_calls: int = 0
    quality_version: int | None = None
    quality_totals: dict[str, int] = field(default_factory=dict)

    def message(self, version: int, seconds: float) -> dict[str, Any]:
        """The next telemetry body for ``seconds`` served on ``version``."""
        truth = self.truth.of(version)
        figures = self.draws.interval(version, truth or NEUTRAL, seconds)
        c = self.counters
        c["requests"] += figures.rows
        c["rows"] += figures.rows
        c["escalated"] += figures.escalated
        c["cloud_answers"] += figures.escalated
        c["audited"] += figures.audited
        self.buckets = [a + b for a, b in zip(self.buckets, figures.latency_counts)]
        self.latency_sum_s += figures.latency_sum_s
        self.escalated_calls += figures.escalated
        cumulative = np.cumsum(self.buckets).tolist()
        escalated_from = bisect_left(LATENCY_BUCKETS, ESCALATED_P50_MS / 1000)  # every one takes ~p50
        escalated_counts = [0] * escalated_from + [self.escalated_calls] * (len(cumulative) - escalated_from)
        counters = {**c, "degraded": 0, "rate_limited": 0, "in_flight_limited": 0, "errors": 0}
        latency = {"edge": {"p50": figures.p50_ms, "p95": figures.p95_ms, "p99": figures.p99_ms},
                   "escalated": _NO_LATENCY if not figures.escalated else {
                       "p50": ESCALATED_P50_MS, "p95": ESCALATED_P50_MS * 1.6, "p99": ESCALATED_P50_MS * 2}}
        rate = figures.escalated / figures.rows if figures.rows else None
        hist = {"edges": HIST_EDGES, "counts": figures.confidence_hist}
        shared = {"counters": counters, "latency_ms": latency, "escalation_rate": rate,
                  "confidence_histogram": hist, "spool_depth": 0, "circuit_state": "closed"}
        quality = self._quality(version, figures) if truth is not None else None
        body = Telemetry(
            device=self.device, seq=self.seq, model=self.model, model_version=version,
            latency_buckets={"le": list(LATENCY_BUCKETS),
                             "edge": {"counts": cumulative, "sum_s": round(self.latency_sum_s, 6)},
                             "escalated": {"counts": escalated_counts, "sum_s": round(
                                 self.escalated_calls * ESCALATED_P50_MS / 1000, 6)}},
            system={"cpu_percent": None, "memory_used_bytes": None, "memory_total_bytes": None,
                    "temperatures_c": {}, "gpu_load_percent": None},
            models=({"name": self.model, "model_version": version, "ready": True, "quality": quality,
                     **shared},),
            **shared).to_dict()
        self.seq += 1
        return body

    def _quality(self, version: int, figures: Interval) -> dict[str, Any]:
        """``models[].quality``: this interval's counts and the totals since ``version`` became active."""
        if version != self.quality_version:
            self.quality_version, self.quality_totals = version, dict.fromkeys(QUALITY_KEYS, 0)
        interval = {key: getattr(figures, key) for key in QUALITY_KEYS}
        for key, n in interval.items():
            self.quality_totals[key] += n
        return {"version": version, **interval, "confidence_hist": figures.confidence_hist,
                "totals": dict(self.quality_totals)}
