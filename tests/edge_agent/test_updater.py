"""The agent updater end to end: real mosquitto, real gateway (artifact service), real agents (in this
process, or as child processes where they must be SIGKILLed), releases published by the real
``fleet publish`` code path. Every reported and event payload is checked against its JSON Schema as
it arrives."""

from __future__ import annotations

import json
import logging
import re
import signal
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.update.faults import FAULT_ENV, FAULT_STEPS
from edgecloud.clock import utc_now
from edgecloud.mqtt.topics import TopicKind
from edgecloud.release import PlanTarget, in_rollout
from edgecloud_tools.fleet.publish import build_release
from tests.support.artifact_gateway import CHUNK
from tests.support.artifact_gateway import Gateway as StallingGateway
from tests.support.net import wait_for
from tests.support.onnx_models import linear_classifier, reference_logits, spread_classifier
from tests.support.services import Client
from tests.support.update_fleet import (
    GROUP,
    NAME,
    TOPICS,
    Fleet,
    Load,
    X,
    served_version,
    state_file,
)


# -- models --------------------------------------------------------------------------------------------
def padded(source: Path, dest: Path, extra_bytes: int) -> Path:
    """``source`` with ``extra_bytes`` of doc string: a bigger file with the same graph and contract."""
    model = onnx.load(str(source))
    model.doc_string = "x" * extra_bytes
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return dest


def fragile_classifier(path: Path, limit: float = 100.0) -> Path:
    """A linear classifier whose Gather index is floor(x[:, 0] / limit): zeros and random normal rows
    (the self-test) run, a real reading of ``limit`` or more is out of range and fails the call."""
    linear_classifier(path, seed=2)
    model = onnx.load(str(path))
    graph = model.graph
    graph.node[-1].output[0] = "raw"
    graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "zero"),
                              numpy_helper.from_array(np.array([1], np.int64), "one"),
                              numpy_helper.from_array(np.array(limit, np.float32), "limit"),
                              numpy_helper.from_array(np.zeros(2, np.float32), "table")])
    graph.node.extend([
        helper.make_node("Slice", ["x", "zero", "one", "one"], ["first"]),
        helper.make_node("Div", ["first", "limit"], ["scaled"]),
        helper.make_node("Floor", ["scaled"], ["floored"]),
        helper.make_node("Cast", ["floored"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["offset"]),
        helper.make_node("Add", ["raw", "offset"], ["logits"])])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# -- happy path -----------------------------------------------------------------------------------------
def test_group_moves_to_the_release_with_zero_failed_calls(fleet: Fleet, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.update")
    devices = ["edge-1", "edge-2", "edge-3"]
    agents = [fleet.agent(d, update={"watch_s": 0.5}) for d in devices]
    v2 = fleet.model(2, card={"name": NAME, "version": 2, "labels": ["ok", "scratch", "dent", "stain"],
                              "calibration": {"threshold": 0.7, "temperature": 1.5}})
    loads = [Load(agent.port) for agent in agents]
    held = agents[0].primary.slot.model  # as a call in flight across the swap holds it
    with ExitStack() as stack:
        for load in loads:
            stack.enter_context(load).wait("1")
        fleet.publish(v2, 2)
        for device in devices:
            report = fleet.watcher.wait_report(device, "active", 2)
            assert report["active_version"] == 2
            assert fleet.watcher.status_says(device, 2)  # the retained status follows the swap
        for load in loads:
            load.wait("2")  # answered by the new model, under the same load
    assert [load.failures for load in loads] == [[], [], []]
    for device, agent in zip(devices, agents):
        assert fleet.watcher.states(device, 2) == ["downloading", "verifying", "staged", "active"]
        progress = [r["progress"] for r in fleet.watcher.reports(device) if r["state"] == "downloading"]
        assert progress == [0.0, 1.0]  # one chunk: the start and the end
        model = agent.primary.slot.model
        assert (model.version, model.settings.threshold, model.settings.temperature) == ("2", 0.7, 1.5)
        assert model.labels == ("ok", "scratch", "dent", "stain")  # calibration and labels from the release
        with Client(agent.port) as client:
            logits = client.infer(NAME, {"x": X}).outputs["logits"]
        np.testing.assert_allclose(logits, reference_logits(v2, X), rtol=1e-5, atol=1e-5)
        fleet.watcher.wait_event(device, "update.watch_passed")
        state = state_file(fleet, device)
        assert state["active"]["path"] == "models/inspection/2/model.onnx" and state["pending"] is None
        assert state["active"]["release"]["calibration"]["threshold"] == 0.7
    # the replaced model still answers a call that began before the swap, after the watch window
    np.testing.assert_allclose(held.backend.infer({"x": X})["logits"], reference_logits(fleet.base, X),
                               rtol=1e-5, atol=1e-5)
    # the same version again (signed anew: another issued_at) is skipped quietly
    reports = len(fleet.watcher.reports("edge-1"))
    fleet.publish(v2, 2, now=utc_now() - timedelta(minutes=1))
    assert wait_for(lambda: caplog.text.count("reason=active_version") == len(devices))
    assert len(fleet.watcher.reports("edge-1")) == reports


# -- rejections -----------------------------------------------------------------------------------------
def _bad_signature(fleet: Fleet) -> int:
    _, payload = build_release(fleet.request(fleet.model(2), 2))
    envelope = fleet.sign(payload)
    forged = {**envelope.to_dict(), "payload": {**envelope.payload, "version": 3}}
    fleet.send(TOPICS.group_desired(GROUP), json.dumps(forged).encode())
    return 3


def _unknown_key(fleet: Fleet) -> int:
    fleet.publish(fleet.model(2), 2, key=fleet.new_key("stranger"))
    return 2


def _expired(fleet: Fleet) -> int:
    now = utc_now()
    fleet.publish(fleet.model(2), 2, now=now - timedelta(days=2), expires_at=now - timedelta(days=1))
    return 2


def _not_newer(fleet: Fleet) -> int:
    fleet.publish(fleet.model(0), 0)
    return 0


def _too_large(fleet: Fleet) -> int:
    fleet.publish(padded(fleet.model(2), fleet.root / "big" / "inspection.onnx", 5000), 2)
    return 2


def _sha256_mismatch(fleet: Fleet) -> int:
    model = fleet.model(2)
    served = fleet.root / "media" / "inspection.onnx"
    served.parent.mkdir()
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    served.write_bytes(bytes(data))
    fleet.publish(model, 2, uri=served.as_uri())
    return 2


def _unloadable(fleet: Fleet) -> int:
    junk = fleet.root / "junk" / "inspection.onnx"
    junk.parent.mkdir()
    junk.write_bytes(b"\x08\x07" + bytes(range(256)) * 8)
    fleet.publish(junk, 2)
    return 2


def _contract_mismatch(fleet: Fleet) -> int:
    fleet.publish(fleet.model(2, features=16), 2)
    return 2


def _renamed_output(fleet: Fleet) -> int:
    fleet.publish(fleet.model(2, output_name="scores"), 2)
    return 2


def _renamed_output_with_its_calibration(fleet: Fleet) -> int:
    fleet.publish(fleet.model(2, output_name="scores"), 2, calibration={"score_output": "logits"})
    return 2


def _plan_for_another_target(fleet: Fleet) -> int:
    plan = fleet.root / "plans" / "inspection.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"serialized engine")
    fleet.publish(plan, 2, plan_target=PlanTarget("10.3.0", "NVIDIA Jetson AGX Orin Developer Kit"))
    return 2


def _uri_escaping(fleet: Fleet) -> int:
    _, payload = build_release(fleet.request(fleet.model(2), 2))
    escaping = replace(payload, artifact=replace(payload.artifact,
                                                 uri=f"grpc://127.0.0.1:{fleet.cloud.port}/../secret/2"))
    fleet.send(TOPICS.group_desired(GROUP), fleet.sign(escaping).to_json())
    return 2


def _name_escaping(fleet: Fleet) -> int:
    _, payload = build_release(fleet.request(fleet.model(2), 2))
    escaping = replace(payload, model="../../etc")
    fleet.send(TOPICS.group_desired(GROUP), fleet.sign(escaping).to_json())
    return 2


REJECTIONS: dict[str, tuple[Callable[[Fleet], int], str, dict[str, Any]]] = {
    "bad_signature": (_bad_signature, "bad_signature", {}),
    "unknown_key": (_unknown_key, "unknown_key", {}),
    "expired": (_expired, "expired", {}),
    "not_newer": (_not_newer, "not_newer", {}),
    "over_budget": (_too_large, "too_large", {"model": {"budget_bytes": 2000}}),
    "sha256_mismatch": (_sha256_mismatch, "sha256_mismatch", {"fleet": {"allowed_file_roots": ["MEDIA"]}}),
    "unloadable": (_unloadable, "unloadable", {}),
    "contract_mismatch": (_contract_mismatch, "contract_mismatch", {}),
    "renamed_output": (_renamed_output, "contract_mismatch", {}),
    "renamed_output_with_its_calibration": (_renamed_output_with_its_calibration, "contract_mismatch", {}),
    "plan_for_another_target": (_plan_for_another_target, "wrong_target", {}),
    "uri_escaping": (_uri_escaping, "bad_uri", {}),
    "name_escaping": (_name_escaping, "bad_name", {}),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_rejected_release_is_reported_and_the_old_model_serves(fleet: Fleet, case: str) -> None:
    publish, reason, settings = REJECTIONS[case]
    settings = json.loads(json.dumps(settings).replace('"MEDIA"', json.dumps(str(fleet.root / "media"))))
    agent = fleet.agent("edge-1", **settings)
    version = publish(fleet)
    report = fleet.watcher.wait_report("edge-1", "failed", version)
    assert report["reason"].startswith(f"{reason}: "), report
    assert report["active_version"] == 1
    events = fleet.watcher.of(TopicKind.EVENTS, "edge-1")  # published before the report
    assert [e["severity"] for e in events if e["data"].get("state") == "failed"] == ["warning"]
    assert served_version(agent.port) == "1" and agent.primary.slot.model.version == "1"
    models = fleet.state_dir("edge-1") / "models"
    assert not models.exists() or not any(models.rglob("*.onnx")), "a refused file was kept"
    state = fleet.state_dir("edge-1") / "update" / "state.json"
    assert not state.exists() or state_file(fleet, "edge-1")["active"] is None


def test_an_unreadable_release_is_reported_failed_on_model_reported(fleet: Fleet) -> None:
    agent = fleet.agent("edge-1")
    fleet.send(TOPICS.group_desired(GROUP), b"{not json")
    report = fleet.watcher.wait_report("edge-1", "failed", None)  # it names no version
    assert report["model"] == NAME and report["active_version"] == 1
    assert report["reason"].startswith("malformed: "), report
    events = [e for e in fleet.watcher.of(TopicKind.EVENTS, "edge-1") if e["data"].get("state") == "failed"]
    assert [(e["severity"], e["data"]["reason"]) for e in events] == [("warning", report["reason"])]
    assert served_version(agent.port) == "1"


def test_key_rotation_new_key_accepted_revoked_key_refused(fleet: Fleet) -> None:
    old, new = fleet.key, fleet.new_key("2025")
    fleet.agent("edge-1", fleet={"trusted_keys": [str(old.public), str(new.public)],
                                 "revoked_keys": [old.kid]})
    fleet.publish(fleet.model(2), 2, key=new)
    fleet.watcher.wait_report("edge-1", "active", 2)
    fleet.publish(fleet.model(3), 3, key=old)
    report = fleet.watcher.wait_report("edge-1", "failed", 3)
    assert report["reason"].startswith(f"revoked_key: signed by revoked key {old.kid}")
    assert report["active_version"] == 2


def test_unset_clock_judges_expiry_by_the_newest_trusted_release(fleet: Fleet) -> None:
    agent = fleet.agent("edge-1")
    fleet.publish(fleet.model(2), 2)
    fleet.watcher.wait_report("edge-1", "active", 2)
    assert agent.primary.updater is not None
    agent.primary.updater.clock = lambda: datetime(1970, 1, 1, tzinfo=timezone.utc)  # no RTC, no NTP yet
    now = utc_now()
    fleet.publish(fleet.model(3), 3, now=now - timedelta(days=40), expires_at=now - timedelta(days=10))
    report = fleet.watcher.wait_report("edge-1", "failed", 3)
    assert report["reason"].startswith("expired: ") and "device clock unset" in report["reason"]


# -- resume, rollback, precedence, rollout ------------------------------------------------------------------
def test_cut_download_resumes_from_its_offset(fleet: Fleet, caplog) -> None:
    caplog.set_level(logging.INFO)
    gateway = StallingGateway(fleet.root / "artifacts").start(stall_after=3)
    try:
        fleet.agent("edge-1")
        stalling = gateway.stalling
        assert stalling is not None
        big = padded(fleet.model(2), fleet.root / "big" / "inspection.onnx", 1_000_000)
        fleet.publish(big, 2, gateway=f"127.0.0.1:{gateway.port}")
        assert stalling.stalled.wait(10)
        gateway.stop()  # the gateway goes away after 3 chunks
        failed = fleet.watcher.wait_report("edge-1", "failed", 2)
        assert failed["reason"].startswith("download_failed: ")
        part = fleet.state_dir("edge-1") / "models" / NAME / "2" / "model.onnx.part"
        kept = part.stat().st_size
        assert kept == 3 * CHUNK
        seen = len(fleet.watcher.reports("edge-1"))
        gateway.start()  # same port; the agent retries with backoff
        fleet.watcher.wait_report("edge-1", "active", 2)
    finally:
        gateway.stop()
    size = big.stat().st_size
    resumed = fleet.watcher.wait_report("edge-1", "downloading", 2, after=seen)
    assert resumed["progress"] == pytest.approx(kept / size, abs=1e-4)  # the report says where it resumed
    assert f"resumed_from={kept} bytes={size - kept}" in caplog.text  # the agent fetched only the rest
    assert re.search(rf"event=artifact_download name={NAME} version=2 offset={kept} ", caplog.text)


def test_a_report_made_while_the_broker_is_away_is_kept_and_the_update_goes_on(fleet: Fleet, caplog) -> None:
    """The download is cut while the broker is down: its failed report cannot go out, is kept, and
    the update retries and ends active once both are back."""
    caplog.set_level(logging.WARNING, logger="edge_agent.update")
    gateway = StallingGateway(fleet.root / "artifacts").start(stall_after=3)
    try:
        agent = fleet.agent("edge-1")
        stalling = gateway.stalling
        assert stalling is not None
        big = padded(fleet.model(2), fleet.root / "big" / "inspection.onnx", 1_000_000)
        fleet.publish(big, 2, gateway=f"127.0.0.1:{gateway.port}")
        assert stalling.stalled.wait(10)
        fleet.broker.stop()
        gateway.stop()  # the download fails; its report finds no broker
        assert wait_for(lambda: "event=update_report_not_sent device=edge-1 state=failed" in caplog.text)
        fleet.broker.restart()
        gateway.start()  # same port; the agent retries with backoff
        fleet.watcher.wait_report("edge-1", "active", 2, timeout=30)
        assert served_version(agent.port) == "2"
    finally:
        gateway.stop()


def test_release_failing_the_watch_window_is_rolled_back(fleet: Fleet) -> None:
    agent = fleet.agent("edge-1", update={"watch_s": 1.0})
    reading = np.full((1, 8), 1000.0, dtype=np.float32)  # fine for v1, out of range for the fragile v2
    with Load(agent.port, reading) as load:
        load.wait("1")
        fleet.publish(fragile_classifier(fleet.root / "models" / "fragile" / "inspection.onnx"), 2)
        fleet.watcher.wait_report("edge-1", "active", 2)  # passed the self-test on zeros and random rows
        report = fleet.watcher.wait_report("edge-1", "rolled_back", 2)
        answered = load.versions["1"]
        load.wait("1", answered + 20)  # the previous model serves again
    assert report["reason"].startswith("error_rate: ") and report["active_version"] == 1
    assert fleet.watcher.status_says("edge-1", 1)
    assert load.failures and load.versions["2"] == 0
    state = state_file(fleet, "edge-1")
    assert state["active"] is None and state["pending"] is None  # the configured model is back
    assert [r["version"] for r in state["rolled_back"]] == [2]
    assert fleet.watcher.states("edge-1", 2)[-2:] == ["active", "rolled_back"]


def test_a_burst_of_bigger_batches_after_the_swap_is_no_regression(fleet: Fleet, caplog) -> None:
    """The very same model re-released while the traffic moves from batches of 1 to batches of 64:
    each batch costs more, no batch costs more than it did on the previous model."""
    caplog.set_level(logging.INFO, logger="edge_agent.update")
    model = spread_classifier(fleet.root / "models" / "spread" / "inspection.onnx", spread=64,
                              card={"name": NAME, "version": 1})
    agent = fleet.agent("edge-1", serving=model, update={"watch_s": 2.0})
    with Load(agent.port) as load:
        load.wait("1", 30)
        fleet.publish(model, 2)
        fleet.watcher.wait_report("edge-1", "active", 2)
        load.x = np.repeat(X, 64, axis=0)
        fleet.watcher.wait_event("edge-1", "update.watch_passed")
    assert load.failures == [] and served_version(agent.port) == "2"
    assert fleet.watcher.states("edge-1", 2) == ["downloading", "verifying", "staged", "active"]
    done = next(r.getMessage() for r in caplog.records if "event=update_watch_done" in r.getMessage())
    assert re.search(r" latency=(1:p50=\S+,)?64-127:p50=", done), done  # the new model's big batches
    assert re.search(r" previous_latency=1:p50=[0-9.]+ms/\d+$", done), done  # against none of its own


def test_a_slower_model_is_rolled_back_with_its_figures_and_retried_when_published_again(
        fleet: Fleet, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.update")
    agent = fleet.agent("edge-1", update={"watch_s": 1.0})
    slow = spread_classifier(fleet.root / "models" / "slow" / "inspection.onnx", spread=2048)
    with Load(agent.port) as load:
        load.wait("1")
        fleet.publish(slow, 2)
        report = fleet.watcher.wait_report("edge-1", "rolled_back", 2)
        figures = (r"latency: p50 [0-9.]+ ms vs [0-9.]+ ms of the previous model on batches of 1 rows, "
                   r"over \d+ and \d+ calls \(x[0-9.]+, allowed x3\)")
        assert re.fullmatch(figures, report["reason"]), report
        assert load.failures == [] and served_version(agent.port) == "1"
        seen = len(fleet.watcher.reports("edge-1"))
        fleet.publish(slow, 2)  # the same release again, signed later: the operator retries it
        fleet.watcher.wait_report("edge-1", "active", 2, after=seen)
        fleet.watcher.wait_report("edge-1", "rolled_back", 2, after=seen)  # still slower
    assert [r["version"] for r in state_file(fleet, "edge-1")["rolled_back"]] == [2]
    agent.stop()
    fleet.agents.remove(agent)
    restarted = fleet.agent("edge-1")  # the retained copy arrives again: it was rolled back, no retry
    assert wait_for(lambda: "reason=rolled_back_before" in caplog.text)
    assert served_version(restarted.port) == "1"


def test_clean_stop_inside_the_watch_window_is_no_verdict(fleet: Fleet) -> None:
    agent = fleet.agent("edge-1", update={"watch_s": 30.0})
    fleet.publish(fleet.model(2), 2)
    fleet.watcher.wait_report("edge-1", "active", 2)
    seen = len(fleet.watcher.reports("edge-1"))
    agent.stop()  # systemctl restart, a reboot: not a crash
    state = state_file(fleet, "edge-1")
    assert state["active"] is None and state["pending"] is None and state["rolled_back"] == []
    restarted = fleet.agent("edge-1", update={"watch_s": 0.3})
    fleet.watcher.wait_report("edge-1", "active", 2, after=seen)  # the retained release applies again
    assert served_version(restarted.port) == "2"


def test_reloaded_cascade_flags_hold_for_the_next_release_and_a_rollback(fleet: Fleet) -> None:
    agent = fleet.agent("edge-1", update={"watch_s": 1.0})
    agent.reload_cascade(agent.config.model_copy(
        update={"cascade": agent.config.cascade.model_copy(update={"threshold": 0.42})}))  # SIGHUP
    assert agent.primary.slot.model.settings.threshold == 0.42
    v2 = fleet.model(2, card={"name": NAME, "version": 2, "calibration": {"threshold": 0.7}})
    fleet.publish(v2, 2)
    fleet.watcher.wait_report("edge-1", "active", 2)
    assert agent.primary.slot.model.settings.threshold == 0.42  # the flag beats the release's calibration
    reading = np.full((1, 8), 1000.0, dtype=np.float32)
    fragile = fragile_classifier(fleet.root / "models" / "fragile" / "inspection.onnx")
    with Load(agent.port, reading) as load:
        load.wait("2")
        fleet.publish(fragile, 3)
        fleet.watcher.wait_report("edge-1", "rolled_back", 3)
    assert (agent.primary.slot.model.version, agent.primary.slot.model.settings.threshold) == ("2", 0.42)


def test_device_desired_wins_over_group(fleet: Fleet) -> None:
    fleet.publish(fleet.model(3), 3)  # group: newer
    fleet.publish(fleet.model(2), 2, device="edge-1")
    agent = fleet.agent("edge-1")  # both are retained when it connects
    fleet.watcher.wait_report("edge-1", "active", 2)
    fleet.watcher.wait_event("edge-1", "update.watch_passed")
    assert fleet.watcher.states("edge-1", 3) == []  # the group release was never considered
    for topic in (TOPICS.device_desired("edge-1", NAME), TOPICS.device_desired("edge-1")):
        fleet.send(topic, b"")  # cleared, as `fleet clear --device` does: the group's release applies
    fleet.watcher.wait_report("edge-1", "active", 3)
    assert served_version(agent.port) == "3"


def test_the_later_issued_of_the_models_topic_and_the_shared_one_wins(fleet: Fleet) -> None:
    """A release on the shared topic only (as a publisher that predates the topics per model writes
    it) moves the device on, and a stale one there does not shadow the model's own."""
    agent = fleet.agent("edge-1")
    start = utc_now() - timedelta(minutes=5)
    fleet.publish(fleet.model(2), 2, now=start)  # the model's own topic and the shared one
    fleet.watcher.wait_report("edge-1", "active", 2)
    for version, topic in ((3, TOPICS.group_desired(GROUP)), (4, TOPICS.group_desired(GROUP, NAME))):
        _, payload = build_release(fleet.request(fleet.model(version), version),
                                   start + timedelta(minutes=version))
        fleet.send(topic, fleet.sign(payload).to_json())
        fleet.watcher.wait_report("edge-1", "active", version)
    assert served_version(agent.port) == "4"


def test_rollout_percent_is_honoured(fleet: Fleet, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.update")
    ids = [f"edge-{i}" for i in range(100)]
    inside = next(d for d in ids if in_rollout(d, 50, "canary"))
    outside = next(d for d in ids if not in_rollout(d, 50, "canary"))
    fleet.agent(inside)
    staying = fleet.agent(outside)
    fleet.publish(fleet.model(2), 2, rollout_percent=50, rollout_salt="canary")
    fleet.watcher.wait_report(inside, "active", 2)
    assert wait_for(lambda: f"event=update_not_in_rollout device={outside} model={NAME} version=2 "
                            "percent=50 salt=canary" in caplog.text)
    assert fleet.watcher.reports(outside) == [] and served_version(staying.port) == "1"


def test_corrupt_state_is_set_aside_and_reported(fleet: Fleet) -> None:
    state = fleet.state_dir("edge-1") / "update" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"schema": 1, "active": {"version": ')
    agent = fleet.agent("edge-1")
    assert served_version(agent.port) == "1"
    event = fleet.watcher.wait_event("edge-1", "update.state_corrupt")
    assert event["severity"] == "error" and "set aside" in event["data"]["detail"]
    assert not state.exists() and len(list(state.parent.glob("state.json.corrupt-*"))) == 1


# -- crash safety -----------------------------------------------------------------------------------------
def first_ready_version(log_path: Path) -> str:
    """The version of the first ``agent_ready`` line; the line may land just after health says SERVING."""
    pattern = re.compile(r"event=agent_ready device=\S+ model=\S+ version=(\S+)")
    assert wait_for(lambda: pattern.search(log_path.read_text())), log_path.read_text()
    return pattern.search(log_path.read_text()).group(1)


@pytest.mark.parametrize("step", FAULT_STEPS)
def test_sigkill_at_each_step_restarts_on_the_last_good_model(fleet: Fleet, step: str) -> None:
    v2 = padded(fleet.model(2), fleet.root / "big" / "inspection.onnx", 2_500_000)  # several 1 MiB chunks
    doomed = fleet.process_agent("edge-1", env={FAULT_ENV: f"after:{step}"})
    fleet.publish(v2, 2)
    assert doomed.proc is not None and doomed.proc.wait(30) == -signal.SIGKILL
    assert f"event=fault_injected device=edge-1 step={step}" in doomed.log_path.read_text()
    persisted = state_file(fleet, "edge-1")["pending"]
    assert persisted["version"] == 2 and persisted["step"] == ("watching" if step == "swapped" else step)
    part = fleet.state_dir("edge-1") / "models" / NAME / "2" / "model.onnx.part"
    kept = part.stat().st_size if part.exists() else 0
    if step == "downloading":
        assert 0 < kept < v2.stat().st_size
    seen = len(fleet.watcher.reports("edge-1"))

    restarted = fleet.process_agent("edge-1")
    assert first_ready_version(restarted.log_path) == "1"  # the last good model first
    if step == "swapped":  # a restart inside the watch window is a crash loop: roll back, stay back
        report = fleet.watcher.wait_report("edge-1", "rolled_back", 2, after=seen)
        assert report["reason"].startswith("crash_loop: ") and report["active_version"] == 1
        assert state_file(fleet, "edge-1")["rolled_back"][-1]["version"] == 2
        assert wait_for(lambda: "reason=rolled_back_before" in restarted.log_path.read_text())
        assert served_version(restarted.port) == "1"
    else:  # the retained release is taken up again where it stopped
        fleet.watcher.wait_report("edge-1", "active", 2, after=seen)
        assert served_version(restarted.port) == "2"
        log = restarted.log_path.read_text()
        if step == "downloading":
            assert f"resumed_from={kept} " in log
        else:
            assert "reason=verified_file_present" in log
    assert fleet.watcher.reports("edge-1")[-1]["state"] in ("active", "rolled_back")


def test_a_rollback_cuts_a_running_watch_window_short(fleet: Fleet) -> None:
    agent = fleet.agent("edge-1", update={"watch_s": 600.0})
    with Load(agent.port) as load:
        load.wait("1")
        fleet.publish(fleet.model(2), 2)
        fleet.watcher.wait_report("edge-1", "active", 2)
        load.wait("2")
        fleet.publish(fleet.base, 1, allow_downgrade=True)  # fleet rollback, 600 s before the verdict
        cut = fleet.watcher.wait_event("edge-1", "update.watch_cut_short")
        fleet.watcher.wait_report("edge-1", "active", 1)
        load.wait("1", load.versions["1"] + 20)
    assert cut["data"] == {"model": NAME, "version": 2}
    assert fleet.watcher.of(TopicKind.STATUS, "edge-1")[-1]["group"] == GROUP  # fleet status counts it there
    assert load.failures == [] and served_version(agent.port) == "1"
    assert "rolled_back" not in fleet.watcher.states("edge-1", 2)  # no verdict on v2: it was replaced
    state = state_file(fleet, "edge-1")
    assert state["active"]["version"] == 1 and state["pending"]["step"] == "watching"
    assert state["rolled_back"] == []


def test_the_same_release_delivered_again_does_not_cut_its_watch_short(fleet: Fleet, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.update")
    agent = fleet.agent("edge-1", update={"watch_s": 1.0})
    published = fleet.publish(fleet.model(2), 2)
    fleet.watcher.wait_report("edge-1", "active", 2)
    fleet.send(TOPICS.group_desired(GROUP), published.envelope.to_json())  # a reconnect's retained copy
    fleet.watcher.wait_event("edge-1", "update.watch_passed")
    assert "event=update_watch_cut_short" not in caplog.text and served_version(agent.port) == "2"
