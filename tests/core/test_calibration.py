"""Calibration: temperature by NLL and threshold choice, on synthetic data with known answers."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import array_shapes, arrays

from edgecloud.calibration import (
    CalibrationError,
    cascade_outcome,
    choose_threshold,
    confidence,
    fit_temperature,
    nll,
)
from edgecloud.confidence import calibrated_probabilities, make_policy
from edgecloud.confidence.probability import log_calibrated_probabilities


def _sample_labels(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Labels drawn from softmax(logits / T): T is then the NLL-optimal temperature."""
    p = np.exp(logits / temperature - (logits / temperature).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (rng.random((len(p), 1)) > p.cumsum(1)).sum(1)


@pytest.mark.parametrize("true_t", [0.5, 2.0, 3.5])
def test_fit_temperature_recovers_a_known_temperature(true_t: float) -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 3, (20_000, 4))
    labels = _sample_labels(logits, true_t, rng)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    assert nll(logits, labels, fitted) <= min(nll(logits, labels, fitted * 0.9),
                                              nll(logits, labels, fitted * 1.1))


def test_fit_temperature_reads_probabilities_like_the_agent() -> None:
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 3, (20_000, 4))
    labels = _sample_labels(logits, 2.0, rng)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert fit_temperature(probs, labels, "probabilities") == pytest.approx(2.0, rel=0.05)


def test_confidence_is_the_agents_policy() -> None:
    logits = np.random.default_rng(9).normal(0, 2, (50, 4)).astype(np.float32)
    for policy in ("max_prob", "margin", "entropy"):
        agent = make_policy(policy, "logits", "logits", 1.7)({"logits": logits})
        np.testing.assert_allclose(confidence(logits, policy, 1.7), agent)


@pytest.mark.parametrize("kind", ["logits", "probabilities"])
def test_nll_is_taken_on_the_probabilities_the_agent_serves(kind: str) -> None:
    rng = np.random.default_rng(10)
    scores = rng.normal(0, 3, (500, 4))
    if kind == "probabilities":
        scores = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    labels = rng.integers(0, 4, 500)
    served = calibrated_probabilities(scores, kind, 1.3)[np.arange(500), labels]
    assert nll(scores, labels, 1.3, kind) == pytest.approx(-np.log(served).mean(), rel=1e-9)
    with pytest.raises(ValueError, match="scores must be one of"):
        fit_temperature(scores, labels, "odds")


def _cascade_data(n: int = 2000, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidences where low confidence means likely wrong, and a mostly right cloud."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.25, 1.0, n)
    edge_correct = rng.random(n) < conf
    cloud_correct = rng.random(n) < 0.98
    return conf, edge_correct, cloud_correct


def _brute_force_min_escalation(conf, edge_ok, cloud_ok, target):
    """Smallest escalation count over every distinct threshold whose accuracy meets ``target``."""
    best = None
    for t in np.concatenate([np.unique(conf), [np.inf]]):
        out = cascade_outcome(conf, edge_ok, cloud_ok, t)
        if out.accuracy >= target and (best is None or out.escalation < best):
            best = out.escalation
    return best


@pytest.mark.parametrize("target", [0.80, 0.90, 0.95])
def test_choose_threshold_meets_an_accuracy_target_with_least_escalation(target: float) -> None:
    conf, edge_ok, cloud_ok = _cascade_data()
    threshold = choose_threshold(conf, edge_ok, cloud_ok, target_accuracy=target)
    out = cascade_outcome(conf, edge_ok, cloud_ok, threshold)
    assert out.accuracy >= target
    assert out.escalation == pytest.approx(_brute_force_min_escalation(conf, edge_ok, cloud_ok, target))
    # the threshold sits between confidences: no row is within a hair of it
    assert np.min(np.abs(conf - threshold)) > 1e-9


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 1.0])
def test_choose_threshold_for_an_escalation_fraction(fraction: float) -> None:
    conf, edge_ok, cloud_ok = _cascade_data()
    threshold = choose_threshold(conf, edge_ok, cloud_ok, target_escalation=fraction)
    out = cascade_outcome(conf, edge_ok, cloud_ok, threshold)
    assert fraction - 1 / len(conf) <= out.escalation <= fraction
    # the escalated rows are the least confident ones
    escalated_in_order = (conf < threshold)[np.argsort(conf)]
    k = round(out.escalation * len(conf))
    assert escalated_in_order[:k].all() and not escalated_in_order[k:].any()


def test_ties_escalate_together() -> None:
    conf = np.array([0.3, 0.3, 0.3, 0.9])
    threshold = choose_threshold(conf, [False, False, True, True], [True] * 4, target_escalation=0.5)
    assert cascade_outcome(conf, [0] * 4, [1] * 4, threshold).escalation == 0.0


def test_escalation_is_strictly_below_the_threshold() -> None:
    out = cascade_outcome(np.array([0.5, 0.4]), np.array([True, False]), np.array([False, True]), 0.5)
    assert out.escalation == 0.5 and out.accuracy == 1.0


def test_unreachable_target_and_bad_arguments() -> None:
    conf, edge_ok, _ = _cascade_data()
    cloud_ok = np.zeros_like(edge_ok)
    with pytest.raises(CalibrationError, match="out of reach"):
        choose_threshold(conf, edge_ok, cloud_ok, target_accuracy=0.99)
    with pytest.raises(ValueError, match="exactly one"):
        choose_threshold(conf, edge_ok, cloud_ok)
    with pytest.raises(ValueError, match="exactly one"):
        choose_threshold(conf, edge_ok, cloud_ok, target_accuracy=0.9, target_escalation=0.1)


@pytest.mark.parametrize("kind", ["logits", "probabilities"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_served_probabilities_are_the_calibrated_ones(kind: str, temperature: float, dtype: type) -> None:
    """The serving path (direct softmax, in float32 for float32 scores) gives the probabilities of the
    float64 log form that calibration fits on: identical argmax, values within float32 rounding."""
    rng = np.random.default_rng(11)
    scores = rng.normal(0, 4, (300, 5))
    if kind == "probabilities":
        scores = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    scores = scores.astype(dtype)
    served = calibrated_probabilities(scores, kind, temperature)
    reference = np.exp(log_calibrated_probabilities(scores, kind, temperature))
    assert served.dtype == dtype
    np.testing.assert_array_equal(served.argmax(1), reference.argmax(1))
    np.testing.assert_allclose(served, reference, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-7)
    for policy in ("max_prob", "margin", "entropy"):
        agent = make_policy(policy, "s", kind, temperature)({"s": scores})
        np.testing.assert_allclose(agent, confidence(scores.astype(np.float64), policy, temperature, kind),
                                   rtol=1e-5, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(logits=arrays(np.float32, array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                     elements=st.floats(-60, 60, width=32)),
       temperature=st.sampled_from([0.3, 1.0, 1.7, 4.0]))
def test_the_served_top_probability_is_the_top_calibrated_probability(logits, temperature) -> None:
    """The agent's shortcut for ``max_prob`` on logits (1 / sum(exp), no full softmax) gives what the
    calibrated probabilities' maximum gives."""
    served = make_policy("max_prob", "logits", "logits", temperature)({"logits": logits})
    full = calibrated_probabilities(logits, "logits", temperature).max(axis=-1)
    assert served.shape == (logits.shape[0],)
    np.testing.assert_allclose(served, full, rtol=1e-5, atol=1e-7)
