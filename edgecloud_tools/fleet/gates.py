"""Judging a wave against its gates (docs/design.md §12): pure figures in, a verdict out.

Each side of the comparison is a cohort: the devices on the new version, and the devices still on the
previous one over the same period (the control, so that a change in what the line sees is not blamed
on the model). A cohort's audit agreement is a ratio of sums over devices, Σ agree / Σ audited.

Why a device-level (cluster-robust) standard error: rows of one device are not independent (one camera,
one lighting, one product mix), so a device's agreement sits around its own level and the spread of the
cohort's figure comes from how many *devices* it has more than from how many rows. A plain
two-proportion z-test treats every row as independent and, with thousands of rows from a handful of
devices, halts a good release on device-to-device noise. The ratio estimator's sandwich variance,
``Σ (a_i - p n_i)² / (Σ n_i)² · m / (m - 1)`` over the m devices (CR1 small-sample factor), grows with
that spread and shrinks only as devices are added; it is floored by the binomial variance
``p (1 - p) / Σ n_i``, so a cohort whose few devices happen to agree exactly is not taken as certain.
The test is one-sided: a wave halts only when the new version is worse than the control by more than
the margin at the configured confidence; fewer audited rows (or devices) than :data:`MIN_AUDITED_ROWS`
on a side means wait, never pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import NormalDist, median
from typing import Literal

from edgecloud.release import DEFAULT_CONFIDENCE, Gates

#: audited rows a cohort needs before its agreement is compared
MIN_AUDITED_ROWS = 200
#: rows a cohort needs before its escalation rate is compared
MIN_ROWS = 200
#: devices a cohort needs for a device-level variance
MIN_COHORT_DEVICES = 2

Outcome = Literal["wait", "pass", "fail"]


@dataclass
class Counts:
    """One device's rows on one version over a period (sums of telemetry interval counts)."""

    rows: int = 0
    escalated: int = 0
    audited: int = 0
    audit_agree: int = 0

    def add(self, other: Counts) -> None:
        self.rows += other.rows
        self.escalated += other.escalated
        self.audited += other.audited
        self.audit_agree += other.audit_agree


@dataclass(frozen=True)
class Share:
    """A cohort's ratio of sums with its device-level variance."""

    value: float
    variance: float
    numerator: int
    denominator: int
    devices: int

    @classmethod
    def of(cls, pairs: Iterable[tuple[int, int]]) -> Share | None:
        """From per-device (numerator, denominator); None without any denominator."""
        items = [(a, n) for a, n in pairs if n > 0]
        total_a, total_n, m = sum(a for a, _ in items), sum(n for _, n in items), len(items)
        if total_n == 0:
            return None
        p = total_a / total_n
        binomial = p * (1 - p) / total_n
        if m < 2:
            return cls(p, binomial, total_a, total_n, m)
        robust = sum((a - p * n) ** 2 for a, n in items) / total_n ** 2 * m / (m - 1)
        return cls(p, max(robust, binomial), total_a, total_n, m)


def excess_z(high: Share, low: Share, scale: float = 1.0, offset: float = 0.0) -> float:
    """z of ``high.value > scale * low.value + offset`` (standard error from both sides' variance)."""
    se = math.sqrt(high.variance + scale ** 2 * low.variance)
    gap = high.value - (scale * low.value + offset)
    if se == 0:
        return math.inf if gap > 0 else -math.inf if gap < 0 else 0.0
    return gap / se


@dataclass(frozen=True)
class Cohorts:
    """What a wave is judged on: per device, counts on the new version and on the control; devices
    that took the new version and those for which it failed; edge latency p95 per device per side."""

    new: dict[str, Counts] = field(default_factory=dict)
    control: dict[str, Counts] = field(default_factory=dict)
    active: int = 0  # devices active on the new version now
    took: int = 0
    failed: int = 0
    p95_new: tuple[float, ...] = ()
    p95_control: tuple[float, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """The outcome and why: the gate that decided (or that waits), and every figure computed."""

    outcome: Outcome
    reason: str
    figures: dict[str, float | int | str]


def _agreement(side: dict[str, Counts]) -> Share | None:
    return Share.of((c.audit_agree, c.audited) for c in side.values())


def _escalation(side: dict[str, Counts]) -> Share | None:
    return Share.of((c.escalated, c.rows) for c in side.values())


def _enough(share: Share | None, rows: int) -> bool:
    return share is not None and share.denominator >= rows and share.devices >= MIN_COHORT_DEVICES


#: a gate's finding: None when it holds, else ("wait" | "fail", why)
Finding = tuple[Outcome, str] | None
Figures = dict[str, float | int | str]


def _failed_share(gates: Gates, cohorts: Cohorts, figures: Figures) -> Finding:
    if gates.max_failed_share is None or not cohorts.took:
        return None
    share = cohorts.failed / cohorts.took
    figures["failed_share"] = round(share, 4)
    if share > gates.max_failed_share:
        return "fail", (f"max_failed_share: {cohorts.failed} of {cohorts.took} failed or rolled back "
                        f"({share:.1%} > {gates.max_failed_share:.1%})")
    return None


def _compare(name: str, gate: str, limit: float, cohorts: Cohorts, baseline: dict[str, Share],
             critical: float, figures: Figures) -> Finding:
    """The one-sided test of one share (``agree`` or ``escalation``) between the cohorts."""
    measure, rows = (_agreement, MIN_AUDITED_ROWS) if name == "agree" else (_escalation, MIN_ROWS)
    new, control = measure(cohorts.new), measure(cohorts.control)
    if not _enough(control, rows):
        control = baseline.get(name)
        figures[f"{name}_control_from"] = "baseline" if control is not None else "none"
    for side, share in (("new", new), ("control", control)):
        if share is not None:
            figures[f"{name}_{side}"] = round(share.value, 4)
            figures[f"{name}_{side}_rows"] = share.denominator
            figures[f"{name}_{side}_devices"] = share.devices
    if new is None or control is None or not _enough(new, rows):
        return "wait", (f"{gate}: {0 if new is None else new.denominator} rows on "
                        f"{0 if new is None else new.devices} devices of the new version, "
                        f"{0 if control is None else control.denominator} of the control "
                        f"(need {rows} on {MIN_COHORT_DEVICES}+ devices each)")
    # agreement is worse when the control's is above the new version's by more than the drop;
    # escalation when the new version's is above the control's by more than the relative rise
    z = excess_z(control, new, 1.0, limit) if name == "agree" else excess_z(new, control, 1.0 + limit)
    figures[f"{name}_z"] = round(z, 3)
    if z <= critical:
        return None
    what = "audit agreement" if name == "agree" else "escalation rate"
    return "fail", (f"{gate}: {what} {new.value:.1%} on the new version against {control.value:.1%} on "
                    f"the control (limit {limit:g}, z={z:.2f} > {critical:.2f})")


def _latency(gates: Gates, cohorts: Cohorts, figures: Figures) -> Finding:
    if gates.max_p95_ratio is None:
        return None
    if len(cohorts.p95_new) < MIN_COHORT_DEVICES or not cohorts.p95_control:
        return "wait", (f"max_p95_ratio: edge latency from {len(cohorts.p95_new)} new and "
                        f"{len(cohorts.p95_control)} control devices")
    new, control = median(cohorts.p95_new), median(cohorts.p95_control)
    ratio = new / max(control, 1e-9)
    figures["p95_ratio"] = round(ratio, 3)
    if ratio > gates.max_p95_ratio:
        return "fail", (f"max_p95_ratio: edge p95 {new:.1f} ms against {control:.1f} ms "
                        f"(x{ratio:.2f} > x{gates.max_p95_ratio:g})")
    return None


def figure_pairs(figures: Figures) -> str:
    """Figures as ``key=value`` pairs, for a log line or a table cell."""
    return " ".join(f"{k}={v}" for k, v in figures.items())


def judge(gates: Gates, cohorts: Cohorts, baseline: dict[str, Share] | None = None) -> Verdict:
    """Judge a soaked wave: the first gate that fails halts it; any gate still short of data makes it
    wait; else it passes. ``baseline`` (by ``agree``/``escalation``) stands in for a control side with
    no devices left (the last wave), taken from the wave that passed before."""
    confidence = gates.confidence if gates.confidence is not None else DEFAULT_CONFIDENCE
    critical = NormalDist().inv_cdf(confidence)
    figures: Figures = {"devices": cohorts.active, "took": cohorts.took, "failed": cohorts.failed,
                        "confidence": confidence}
    need = gates.min_devices or 1
    if cohorts.active < need:
        return Verdict("wait", f"min_devices: {cohorts.active} of {need} active on the new version", figures)
    findings = [_failed_share(gates, cohorts, figures)]
    for name, gate, limit in (("agree", "max_agree_drop", gates.max_agree_drop),
                              ("escalation", "max_escalation_rise", gates.max_escalation_rise)):
        if limit is not None:
            findings.append(_compare(name, gate, limit, cohorts, baseline or {}, critical, figures))
    findings.append(_latency(gates, cohorts, figures))
    failed = [why for f in findings if f is not None for outcome, why in [f] if outcome == "fail"]
    if failed:
        return Verdict("fail", failed[0], figures)
    waits = [why for f in findings if f is not None for _, why in [f]]
    if waits:
        return Verdict("wait", "; ".join(waits), figures)
    return Verdict("pass", "every gate held", figures)


def control_baseline(cohorts: Cohorts) -> dict[str, Share]:
    """The control side's shares with enough data to stand in for a later wave's empty control."""
    out = {}
    for name, share, rows in (("agree", _agreement(cohorts.control), MIN_AUDITED_ROWS),
                              ("escalation", _escalation(cohorts.control), MIN_ROWS)):
        if share is not None and _enough(share, rows):
            out[name] = share
    return out
