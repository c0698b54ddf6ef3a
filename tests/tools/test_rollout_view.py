"""Folding the fleet's messages for the controller (edgecloud_tools.fleet.rollout_view): releases with
waves verified, telemetry counts summed per device and version once per ``seq``, telemetry without
quality read as unknown, and malformed messages dropped without touching what was folded."""

from __future__ import annotations

import json
from datetime import timedelta

from edgecloud.clock import utc_now
from edgecloud.mqtt.client import Message
from edgecloud.mqtt.payloads import AgreementCounts, Quality
from edgecloud.mqtt.topics import FleetTopics
from edgecloud.release import Artifact, ReleasePayload, Rollout, sign_release
from edgecloud.signing import TrustStore, generate_key, key_id
from edgecloud_tools.fleet.gates import Counts
from edgecloud_tools.fleet.rollout_view import RolloutView

TOPICS = FleetTopics("plant-1")
KEY = generate_key()
TRUST = TrustStore({key_id(KEY.public_key()): KEY.public_key()})


def release(version: int, waves: tuple[float, ...] | None = (25, 50, 100)) -> bytes:
    now = utc_now()
    payload = ReleasePayload("inspection", version, "ops", Artifact("file:///m.onnx", "0" * 64, 10),
                             now, now + timedelta(days=1),
                             rollout=Rollout(waves[0] if waves else 100, "s", waves))
    return sign_release(payload, KEY).to_json()


def message(topic: object, body: object) -> Message:
    return Message(str(topic), body if isinstance(body, bytes) else json.dumps(body).encode(), 1, False)


def telemetry(device: str, seq: int, quality: object, **served: object) -> Message:
    return message(TOPICS.telemetry(device), {"device": device, "seq": seq, "models": [
        {"name": "inspection", "model_version": 2, **served, **({"quality": quality} if quality else {})}]})


def counts(version: int, audited: int, agree: int) -> dict[str, object]:
    interval = {"rows": 100, "escalated": 5, "audited": audited, "audit_agree": agree}
    return {"version": version, **interval, "confidence_hist": [0] * 10, "totals": interval}


def test_only_verified_releases_with_waves_become_plans() -> None:
    view = RolloutView("plant-1", TRUST)
    view.apply(message(TOPICS.group_desired("line-a", "inspection"), release(2, waves=None)))
    assert view.plans == {}
    other = generate_key()
    forged = sign_release(ReleasePayload.from_dict(json.loads(release(3))["payload"]), other).to_json()
    view.apply(message(TOPICS.group_desired("line-b", "inspection"), forged))
    assert view.plans == {}
    view.apply(message(TOPICS.group_desired("line-a", "inspection"), release(2)))
    view.apply(message(TOPICS.device_desired("cam-9", "inspection"), release(2)))
    plan = view.plans["inspection"]
    assert plan.release.version == 2 and plan.groups == {"line-a"} and plan.devices == {"cam-9"}
    view.apply(message(TOPICS.group_desired("line-a", "inspection"), b""))  # cleared
    assert view.plans["inspection"].groups == frozenset()


def test_telemetry_sums_per_device_and_version_once_per_seq() -> None:
    view = RolloutView("plant-1", TRUST)
    view.apply(message(TOPICS.group_desired("line-a", "inspection"), release(2)))
    for device, version in (("cam-1", 2), ("cam-2", 1)):
        view.apply(message(TOPICS.status(device), {"state": "online", "group": "line-a", "models": [
            {"name": "inspection", "active_version": version}]}))
    view.open_period("inspection")
    view.apply(telemetry("cam-1", 1, counts(2, 10, 9), latency_ms={"edge": {"p95": 4.0}}))
    view.apply(telemetry("cam-1", 1, counts(2, 10, 9)))  # QoS 1 delivered it twice
    view.apply(telemetry("cam-1", 2, counts(2, 10, 7)))
    view.apply(telemetry("cam-2", 5, counts(1, 20, 20)))
    view.apply(telemetry("cam-2", 6, None))  # an older agent: unknown, not agreement
    new, old = Counts(200, 10, 20, 16), Counts(100, 5, 20, 20)
    assert view.period["inspection"] == {("cam-1", 2): new, ("cam-2", 1): old}
    cohorts = view.cohorts(view.plans["inspection"], view.period["inspection"])
    assert cohorts.new == {"cam-1": new} and cohorts.control == {"cam-2": old}
    assert (cohorts.active, cohorts.took, cohorts.p95_new) == (1, 1, (4.0,))


def test_malformed_messages_are_dropped_and_change_nothing() -> None:
    view = RolloutView("plant-1", TRUST)
    view.apply(message(TOPICS.group_desired("line-a", "inspection"), release(2)))
    view.open_period("inspection")
    for body in (b"not json", b"[1, 2]", {"seq": 1, "models": 7}, {"seq": 2, "models": [1, "x", None]},
                 {"seq": 3, "models": [{"name": "inspection", "latency_ms": [1], "quality": {"version": 2}}]},
                 {"seq": 4, "models": [{"name": "inspection", "quality": counts(2, 10, 11)}]},  # 11 of 10
                 {"seq": 5, "models": [{"name": "inspection", "quality": {**counts(2, 10, 5), "rows": -1}}]}):
        view.apply(message(TOPICS.telemetry("cam-1"), body))
    view.apply(message(TOPICS.status("cam-1"), {"state": "online", "models": "inspection"}))
    view.apply(message(TOPICS.rollout("inspection"), b"{}"))
    assert view.period["inspection"] == {}
    assert view.command("inspection") is None


def test_the_agents_quality_payload_is_read() -> None:
    """The telemetry model agents publish (edgecloud.mqtt.payloads.Quality), not a hand-written dict."""
    view = RolloutView("plant-1", TRUST)
    view.apply(message(TOPICS.group_desired("line-a", "inspection"), release(2)))
    view.open_period("inspection")
    totals = AgreementCounts(rows=500, escalated=40, audited=30, audit_agree=27, escalated_agree=30)
    quality = Quality(rows=100, escalated=8, audited=6, audit_agree=5, escalated_agree=6, version=2,
                      confidence_hist=[10] * 10, totals=totals)
    view.apply(telemetry("cam-1", 1, quality.to_dict()))
    assert view.period["inspection"] == {("cam-1", 2): Counts(100, 8, 6, 5)}
    assert view.totals["inspection"] == {("cam-1", 2): Counts(500, 40, 30, 27)}
