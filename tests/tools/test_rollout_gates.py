"""Gate statistics (edgecloud_tools.fleet.gates): a clearly bad version halts, a good one with realistic
per-device noise does not, too little data waits (and never passes), and each gate names itself and
its figures when it fails."""

from __future__ import annotations

import random

import pytest

from edgecloud.release import Gates
from edgecloud_tools.fleet.gates import MIN_AUDITED_ROWS, Cohorts, Counts, Share, control_baseline, judge

GATES = Gates(soak_s=60, min_devices=5, max_agree_drop=0.03, max_failed_share=0.2)


def cohort(rng: random.Random, devices: int, agreement: float, spread: float, audited: int,
           prefix: str) -> dict[str, Counts]:
    """Devices whose own agreement is drawn around ``agreement`` (sd ``spread``: cameras differ), each
    with about ``audited`` audited rows drawn from its own level."""
    out = {}
    for i in range(devices):
        level = min(1.0, max(0.0, rng.gauss(agreement, spread)))
        n = max(1, int(rng.gauss(audited, audited / 4)))
        agree = sum(rng.random() < level for _ in range(n))
        out[f"{prefix}-{i}"] = Counts(rows=n * 20, escalated=n, audited=n, audit_agree=agree)
    return out


def test_a_clearly_worse_version_halts_naming_the_gate_and_figures() -> None:
    rng = random.Random(1)
    new, control = cohort(rng, 10, 0.45, 0.05, 60, "new"), cohort(rng, 30, 0.9, 0.03, 60, "old")
    cohorts = Cohorts(new=new, control=control, active=10, took=10)
    verdict = judge(GATES, cohorts)
    assert verdict.outcome == "fail"
    assert verdict.reason.startswith("max_agree_drop: audit agreement")
    assert verdict.figures["agree_new"] < 0.55 and verdict.figures["agree_control"] > 0.85
    assert verdict.figures["agree_z"] > 5


def test_a_good_version_with_per_device_noise_is_not_halted() -> None:
    """Both sides drawn from the same fleet (devices differ by 4 points around 90%): over 300 wave
    judgements, not one false halt; the same data judged row by row, as if every row were independent,
    would halt far more often (device spread counted as evidence)."""
    rng = random.Random(7)
    halts = naive_halts = 0
    for _ in range(300):
        new, control = cohort(rng, 6, 0.9, 0.04, 150, "new"), cohort(rng, 20, 0.9, 0.04, 150, "old")
        verdict = judge(Gates(max_agree_drop=0.01), Cohorts(new=new, control=control, active=6, took=6))
        assert verdict.outcome in ("pass", "fail")
        halts += verdict.outcome == "fail"
        naive = [Share.of((c.audit_agree, c.audited) for c in side.values()) for side in (new, control)]
        pooled = [Share(s.value, s.value * (1 - s.value) / s.denominator, s.numerator, s.denominator, 1)
                  for s in naive if s is not None]
        gap = pooled[1].value - pooled[0].value - 0.01
        naive_halts += gap / (pooled[0].variance + pooled[1].variance) ** 0.5 > 1.645
    assert halts <= 6  # one-sided at 0.95 with a 1-point margin: well under 5% (3 with this seed)
    assert naive_halts > 2 * max(halts, 6)  # 21 with this seed


def test_a_drop_smaller_than_the_allowed_one_passes() -> None:
    rng = random.Random(3)
    new, control = cohort(rng, 20, 0.88, 0.02, 200, "new"), cohort(rng, 20, 0.9, 0.02, 200, "old")
    cohorts = Cohorts(new=new, control=control, active=20, took=20)
    verdict = judge(Gates(max_agree_drop=0.05), cohorts)
    assert verdict.outcome == "pass", verdict.reason


@pytest.mark.parametrize("new_rows", [0, 40])
def test_too_few_audited_rows_waits_and_never_passes(new_rows: int) -> None:
    rng = random.Random(5)
    new = {f"new-{i}": Counts(rows=100, escalated=5, audited=new_rows // 4, audit_agree=new_rows // 8)
           for i in range(4)}
    cohorts = Cohorts(new=new, control=cohort(rng, 20, 0.9, 0.02, 100, "old"), active=5, took=5)
    verdict = judge(GATES, cohorts)
    assert verdict.outcome == "wait"
    assert "max_agree_drop" in verdict.reason and f"need {MIN_AUDITED_ROWS}" in verdict.reason


def test_min_devices_waits_before_anything_is_judged() -> None:
    verdict = judge(GATES, Cohorts(active=2, took=9, failed=9))
    assert verdict.outcome == "wait" and verdict.reason.startswith("min_devices: 2 of 5")


def test_failed_share_halts() -> None:
    rng = random.Random(2)
    cohorts = Cohorts(new=cohort(rng, 8, 0.9, 0.02, 100, "n"), control=cohort(rng, 8, 0.9, 0.02, 100, "o"),
                      active=8, took=12, failed=4)
    verdict = judge(GATES, cohorts)
    assert verdict.outcome == "fail" and verdict.reason.startswith("max_failed_share: 4 of 12")


def test_escalation_rise_and_latency_ratio_halt() -> None:
    rng = random.Random(4)
    new, control = cohort(rng, 10, 0.9, 0.02, 100, "n"), cohort(rng, 10, 0.9, 0.02, 100, "o")
    for counts in new.values():
        counts.escalated = counts.rows // 4  # 25% against 5%
    verdict = judge(Gates(max_escalation_rise=0.5), Cohorts(new=new, control=control, active=10, took=10))
    assert verdict.outcome == "fail"
    assert verdict.reason.startswith("max_escalation_rise: escalation rate 25.0%")
    slow = Cohorts(active=3, took=3, p95_new=(9.0, 10.0, 11.0), p95_control=(4.0, 5.0, 6.0))
    verdict = judge(Gates(max_p95_ratio=1.5), slow)
    assert verdict.outcome == "fail" and verdict.figures["p95_ratio"] == 2.0


def test_the_last_wave_compares_with_the_previous_waves_control() -> None:
    rng = random.Random(6)
    earlier = Cohorts(new=cohort(rng, 10, 0.9, 0.02, 100, "n"), control=cohort(rng, 10, 0.9, 0.02, 100, "o"))
    baseline = control_baseline(earlier)
    assert set(baseline) == {"agree", "escalation"}
    bad = Cohorts(new=cohort(rng, 20, 0.5, 0.02, 100, "n"), active=20, took=20)
    assert judge(GATES, bad).outcome == "wait"  # no control and no baseline: never a pass
    verdict = judge(GATES, bad, baseline)
    assert verdict.outcome == "fail" and verdict.figures["agree_control_from"] == "baseline"
