"""The agent's parts on their own: rate limit, circuit breaker, spool, settings precedence, policies."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from edge_agent.cloud.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from edge_agent.cloud.ratelimit import TokenBucket
from edge_agent.cloud.spool import Spool
from edge_agent.config import CascadeSection
from edge_agent.serving.settings import CascadeSettings
from edgecloud.confidence import calibrated_probabilities, make_policy
from edgecloud.confidence.probability import entropy, margin, max_prob
from edgecloud.protocol.codec import InferRequest, request_to_bytes
from edgecloud.protocol.parameters import CloudRequest
from edgecloud.tensors import TensorSpec


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_token_bucket_grants_burst_then_rate():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=5, clock=clock)
    assert bucket.take(3) == 3
    assert bucket.take(10) == 2
    assert bucket.take(1) == 0
    clock.now += 1.0
    assert bucket.take(5) == 2
    clock.now += 100
    assert bucket.take(99) == 5  # never more than the burst


def test_circuit_opens_after_failures_and_half_opens_for_one_trial():
    clock, changes = Clock(), []
    breaker = CircuitBreaker(failure_threshold=2, reset_s=5, clock=clock,
                             on_change=lambda a, b: changes.append((a, b)))
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == CLOSED
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()
    clock.now += 5
    assert breaker.state == HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.failure()
    assert breaker.state == OPEN
    clock.now += 5
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow()
    assert changes[:2] == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_a_reconnect_probes_an_open_circuit_at_once():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, reset_s=120, clock=clock)
    breaker.probe()  # closed: nothing to do
    assert breaker.state == CLOSED
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()
    breaker.probe()  # the channel is connected again: no need to wait out reset_s
    assert breaker.state == HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # still one trial at a time
    breaker.success()
    assert breaker.state == CLOSED


def _case(i: int, rows: int = 2) -> InferRequest:
    return InferRequest("m", {"x": np.full((rows, 4), i, dtype=np.float32)}, id=f"req-{i}",
                        parameters={CloudRequest.REQUEST_ID: f"req-{i}"})


def test_spool_is_fifo_marks_deferred_and_survives_restart(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    for i in range(3):
        assert spool.put(_case(i))
    spool.close()  # writes what waits
    (tmp_path / ".stale.case.1.tmp").write_bytes(b"half a case")
    reopened = Spool(tmp_path, max_bytes=1 << 20)  # a restart
    assert reopened.depth() == 3 and not list(tmp_path.glob(".*.tmp"))
    path, request = reopened.oldest()
    assert request.id == "req-0" and request.parameters[CloudRequest.DEFERRED] is True
    np.testing.assert_array_equal(request.inputs["x"], np.zeros((2, 4), np.float32))
    reopened.remove(path)
    assert reopened.oldest()[1].id == "req-1"


def test_spool_replays_cases_kept_by_earlier_versions(tmp_path):
    # earlier versions named a case <time_ns, 20 digits>-<request id>.case
    for i, stamp in ((1, 1_700_000_000_000_000_002), (0, 1_700_000_000_000_000_001)):
        (tmp_path / f"{stamp:020d}-req-{i}.case").write_bytes(request_to_bytes(_case(i)))
    spool = Spool(tmp_path, max_bytes=1 << 20)
    assert spool.depth() == 2
    seq, request = spool.oldest()
    assert request.id == "req-0"
    spool.remove(seq)
    assert spool.oldest()[1].id == "req-1"


def test_spool_drops_oldest_over_max_bytes_and_sets_corrupt_files_aside(tmp_path):
    probe = Spool(tmp_path / "probe", 1 << 20)
    probe.put(_case(0))
    probe.close()
    one = next((tmp_path / "probe").glob("*.case")).stat().st_size
    spool = Spool(tmp_path / "s", max_bytes=one * 2)
    for i in range(5):
        spool.put(_case(i))
        spool.flush()  # one case per batch file
    assert spool.depth() == 2 and spool.dropped == 3
    first = sorted((tmp_path / "s").glob("*.case"))[0]
    first.write_bytes(b"\xff not a request")
    assert spool.oldest()[1].id == "req-4"
    assert len(list((tmp_path / "s").glob("*.bad"))) == 1


def test_spool_on_a_full_disk_refuses_without_raising(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True, check=False).returncode:
        pytest.skip("mounting a small tmpfs needs root and mount permission")
    try:
        spool = Spool(mount, max_bytes=1 << 30)
        for i in range(8):  # 16 kB each
            assert spool.put(_case(i, rows=1000))  # handed to the writer: the call never sees the disk
            assert spool.flush(timeout=10)
        assert spool.dropped >= 1 and spool.depth() + spool.dropped == 8
        assert spool.oldest()[1].id == "req-0"  # what was kept is intact
        assert not list(mount.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


OUTPUTS = (TensorSpec("logits", "FP32", (-1, 4)), TensorSpec("probs", "FP32", (-1, 4)))


def test_settings_precedence_flag_release_card_default():
    card = {"threshold": 0.3, "temperature": 2.0, "policy": "margin", "score_output": "probs",
            "scores": "probabilities"}
    release = {"threshold": 0.4, "temperature": 1.5}
    s = CascadeSettings.resolve(CascadeSection(threshold=0.7), release, card, OUTPUTS)
    assert (s.threshold, s.temperature, s.policy_name, s.score_output, s.scores) == (
        0.7, 1.5, "margin", "probs", "probabilities")
    d = CascadeSettings.resolve(CascadeSection(), {}, {}, OUTPUTS)
    assert (d.threshold, d.temperature, d.policy_name, d.score_output, d.scores) == (
        0.5, 1.0, "max_prob", "logits", "logits")


def test_settings_reject_unknown_score_output_and_policy():
    from edgecloud.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="'nope' is not an output"):
        CascadeSettings.resolve(CascadeSection(score_output="nope"), {}, {}, OUTPUTS)
    with pytest.raises(ModelLoadError, match="cannot be imported"):
        CascadeSettings.resolve(CascadeSection(policy="tests.plugins.scorers:missing"), {}, {}, OUTPUTS)
    with pytest.raises(ModelLoadError, match="not callable"):
        CascadeSettings.resolve(CascadeSection(policy="tests.plugins.scorers:NOT_CALLABLE"), {}, {}, OUTPUTS)


def test_builtin_policies_and_temperature():
    p = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(max_prob(p), [0.7, 0.25])
    np.testing.assert_allclose(margin(p), [0.5, 0.0])
    h = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))
    np.testing.assert_allclose(entropy(p), [1 - h / np.log(4), 0.0], atol=1e-9)
    z = np.array([[2.0, 0.0, 0.0, 0.0]])
    hot, cool = calibrated_probabilities(z, "logits", 0.5), calibrated_probabilities(z, "logits", 2.0)
    assert hot.max() > calibrated_probabilities(z, "logits").max() > cool.max()
    np.testing.assert_allclose(calibrated_probabilities(p, "probabilities"), np.maximum(p, 1e-12)
                               / np.maximum(p, 1e-12).sum(axis=1, keepdims=True), atol=1e-9)


def test_custom_policy_by_dotted_path():
    policy = make_policy("tests.plugins.scorers:mean_abs_logit", "logits")
    logits = np.array([[0.0, 0.0], [4.0, -4.0]])
    np.testing.assert_allclose(policy({"logits": logits}), [0.5, 1 / (1 + np.exp(-4))])
    with pytest.raises(ValueError, match="neither built-in"):
        make_policy("nonsense", "logits")
