"""Releases: envelope signing and every rejection rule with its reason code, rollout, version, size,
target; what gets signed validates against protos/schemas/release.schema.json."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest

from edgecloud.release import (
    Artifact,
    Calibration,
    Envelope,
    PlanTarget,
    Reason,
    ReleasePayload,
    ReleaseRejected,
    Rollout,
    check_size,
    check_target,
    check_version,
    in_rollout,
    sign_release,
    verify_envelope,
)
from edgecloud.signing import TrustStore, generate_key, key_id, public_key_pem, sign

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "protos/schemas/release.schema.json").read_text())
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
SHA = hashlib.sha256(b"model").hexdigest()


def payload(**overrides) -> ReleasePayload:
    base = ReleasePayload(
        model="inspection", version=4, publisher="ops@plant",
        artifact=Artifact(uri="grpc://gw:8001/inspection/4", sha256=SHA, size=5),
        issued_at=NOW - timedelta(hours=1), expires_at=NOW + timedelta(days=30),
        calibration=Calibration(policy="max_prob", temperature=1.3, threshold=0.7, score_output="logits",
                                scores="logits"),
        rollout=Rollout(50.0, "r1"), labels=("ok", "défaut"))
    return replace(base, **overrides)


@pytest.fixture
def keys(tmp_path: Path):
    """Two trusted keys (old and new, for rotation) and one stranger."""
    old, new, stranger = generate_key(), generate_key(), generate_key()
    paths = []
    for name, key in (("old", old), ("new", new)):
        path = tmp_path / f"{name}.pub"
        path.write_bytes(public_key_pem(key.public_key()))
        paths.append(path)
    return old, new, stranger, paths


def rejected(reason: Reason, envelope: Envelope, trust: TrustStore, **kwargs) -> ReleaseRejected:
    with pytest.raises(ReleaseRejected) as info:
        verify_envelope(envelope, trust, **kwargs)
    assert info.value.reason is reason, info.value
    return info.value


def test_the_engine_builder_holds_engines_to_the_budget_of_releases() -> None:
    from edgecloud.engine.builder import EDGE_BUDGET_BYTES
    from edgecloud.release import DEFAULT_BUDGET_BYTES

    assert EDGE_BUDGET_BYTES == DEFAULT_BUDGET_BYTES


def test_signed_envelope_verifies_and_matches_the_schema(keys) -> None:
    old, _, _, paths = keys
    envelope = sign_release(payload(), old)
    wire = json.loads(envelope.to_json())
    jsonschema.validate(wire, SCHEMA)
    assert wire["key_id"] == key_id(old.public_key())
    assert wire["payload"]["issued_at"] == "2025-06-01T11:00:00Z"
    parsed = verify_envelope(Envelope.from_json(envelope.to_json()), TrustStore.from_files(paths), now=NOW)
    assert parsed == payload()


def test_plan_release_carries_its_target(keys) -> None:
    plan = Artifact("https://cdn/x.plan", SHA, 5, "tensorrt-plan", PlanTarget("10.3.0.30", "orin"))
    envelope = sign_release(payload(artifact=plan), keys[0])
    jsonschema.validate(json.loads(envelope.to_json()), SCHEMA)
    assert verify_envelope(envelope, TrustStore.from_files(keys[3]), now=NOW).artifact.target == plan.target
    check_target(plan, "10.3.0.30", "orin")
    for trt, device in [("10.3.0.31", "orin"), ("10.3.0.30", "xavier"), (None, None)]:
        with pytest.raises(ReleaseRejected) as info:
            check_target(plan, trt, device)
        assert info.value.reason is Reason.WRONG_TARGET
    check_target(payload().artifact, None, None)  # ONNX runs everywhere


def test_bad_signature_unknown_and_revoked_keys(keys) -> None:
    old, new, stranger, paths = keys
    trust = TrustStore.from_files(paths)
    good = sign_release(payload(), old)
    tampered = Envelope({**good.payload, "version": 99}, good.key_id, good.signature)
    rejected(Reason.BAD_SIGNATURE, tampered, trust, now=NOW)
    swapped = Envelope(good.payload, key_id(new.public_key()), good.signature)  # claims the other key
    rejected(Reason.BAD_SIGNATURE, swapped, trust, now=NOW)
    rejected(Reason.UNKNOWN_KEY, sign_release(payload(), stranger), trust, now=NOW)
    rotated = TrustStore.from_files(paths, revoked=[key_id(old.public_key())])
    error = rejected(Reason.REVOKED_KEY, good, rotated, now=NOW)
    assert key_id(old.public_key()) in str(error)
    assert verify_envelope(sign_release(payload(), new), rotated, now=NOW).version == 4  # rotation
    rejected(Reason.MALFORMED, Envelope(good.payload, "../etc", good.signature), trust, now=NOW)


def test_expiry_with_skew_tolerance_and_unset_clock(keys) -> None:
    old, _, _, paths = keys
    trust = TrustStore.from_files(paths)
    expires = NOW + timedelta(days=1)
    envelope = sign_release(payload(expires_at=expires), old)
    verify_envelope(envelope, trust, now=expires + timedelta(seconds=299), clock_skew_s=300)
    error = rejected(Reason.EXPIRED, envelope, trust, now=expires + timedelta(seconds=301), clock_skew_s=300)
    assert "2025-06-02T12:00:00Z" in str(error)
    unset = datetime(1970, 1, 1, 0, 5, tzinfo=timezone.utc)  # no RTC, no NTP yet
    verify_envelope(envelope, trust, now=unset)  # nothing to judge by: the signature decides
    verify_envelope(envelope, trust, now=unset, newest_trusted_issued_at=NOW)
    error = rejected(Reason.EXPIRED, envelope, trust, now=unset,
                     newest_trusted_issued_at=expires + timedelta(days=3))
    assert "device clock unset" in str(error)
    # a set clock is believed even when the device has trusted newer releases
    verify_envelope(envelope, trust, now=NOW, newest_trusted_issued_at=expires + timedelta(days=3))


def test_unknown_payload_keys_are_signed_but_ignored(keys) -> None:
    old, _, _, paths = keys
    data = {**payload().to_dict(), "future_field": {"x": [1, 2]}}
    kid, signature = sign(old, data)
    envelope = Envelope.from_json(json.dumps({"payload": data, "key_id": kid, "signature": signature}))
    jsonschema.validate(envelope.to_dict(), SCHEMA)
    assert verify_envelope(envelope, TrustStore.from_files(paths), now=NOW) == payload()


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("version"),
    lambda d: d.update(version=True),
    lambda d: d.update(version="4"),
    lambda d: d.update(issued_at="yesterday"),
    lambda d: d.update(expires_at=d["issued_at"]),
    lambda d: d["artifact"].update(sha256="ABC"),
    lambda d: d["artifact"].update(format="tensorrt-plan"),
    lambda d: d["artifact"].update(size=-1),
    lambda d: d["rollout"].update(percent=101),
    lambda d: d["rollout"].update(percent=100, waves=[100], gates={"confidence": 1.5}),
    lambda d: d["rollout"].update(percent=100, waves=[100], gates={"min_devices": 0}),
    lambda d: d["rollout"].update(controller_key="not-a-key-id"),
    lambda d: d["calibration"].update(threshold=1.5),
    lambda d: d.update(labels=[1, 2]),
    lambda d: d.update(allow_downgrade="yes"),
])
def test_malformed_payloads_are_rejected_after_the_signature(keys, mutate) -> None:
    old, _, _, paths = keys
    data = payload().to_dict()
    mutate(data)
    kid, signature = sign(old, data)
    rejected(Reason.MALFORMED, Envelope(data, kid, signature), TrustStore.from_files(paths), now=NOW)
    if data.get("expires_at") != data.get("issued_at"):  # the one rule a JSON Schema cannot state
        with pytest.raises(jsonschema.ValidationError):  # the schema refuses the same payloads
            jsonschema.validate({"payload": data, "key_id": kid, "signature": signature}, SCHEMA)


@pytest.mark.parametrize("waves", [
    {"percent": 5, "waves": [5, 5, 100]},  # not increasing
    {"percent": 5, "waves": [5, 50]},  # not ending at 100
    {"percent": 10, "waves": [5, 100]},  # percent is not the first wave
])
def test_a_wave_plan_out_of_order_is_malformed(keys, waves: dict) -> None:
    """Rules across a plan's values, which its JSON Schema does not state."""
    old, _, _, paths = keys
    data = payload().to_dict()
    data["rollout"].update(waves)
    kid, signature = sign(old, data)
    error = rejected(Reason.MALFORMED, Envelope(data, kid, signature), TrustStore.from_files(paths), now=NOW)
    assert "rollout." in error.detail


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"payload": {}}',
                                  '{"payload": 1, "key_id": "a", "signature": "b"}'])
def test_malformed_envelopes(text: str) -> None:
    with pytest.raises(ReleaseRejected) as info:
        Envelope.from_json(text)
    assert info.value.reason is Reason.MALFORMED


def test_rollout_is_deterministic_and_close_to_the_percent() -> None:
    devices = [f"device-{i:04d}" for i in range(1000)]
    digest = hashlib.sha256(b"salt-1:device-0000").digest()
    expected = int.from_bytes(digest[:8], "big") % 10000 < 2500
    assert in_rollout("device-0000", 25, "salt-1") is expected
    for percent in (10, 25, 50, 90):
        chosen = [d for d in devices if in_rollout(d, percent, "salt-1")]
        assert abs(len(chosen) / 10 - percent) <= 5, (percent, len(chosen))
        assert chosen == [d for d in devices if in_rollout(d, percent, "salt-1")]  # same every time
    assert not any(in_rollout(d, 0, "s") for d in devices)
    assert all(in_rollout(d, 100, "s") for d in devices)
    at_10 = {d for d in devices if in_rollout(d, 10, "s")}
    assert at_10 <= {d for d in devices if in_rollout(d, 50, "s")}  # raising the percent only adds
    assert at_10 != {d for d in devices if in_rollout(d, 10, "other-salt")}


def test_version_rule() -> None:
    check_version(5, 4, allow_downgrade=False)
    check_version(5, None, allow_downgrade=False)
    check_version(3, 4, allow_downgrade=True)
    for new, active, downgrade in [(4, 4, False), (4, 4, True), (3, 4, False)]:
        with pytest.raises(ReleaseRejected) as info:
            check_version(new, active, downgrade)
        assert info.value.reason is Reason.NOT_NEWER


def test_size_rule() -> None:
    check_size(1_000_000_000)
    with pytest.raises(ReleaseRejected) as info:
        check_size(1_000_000_001)
    assert info.value.reason is Reason.TOO_LARGE and "1000000000" in str(info.value)
    with pytest.raises(ReleaseRejected):
        check_size(11, budget=10)


def test_a_release_with_float_calibration_signs_the_rfc_8785_bytes(keys) -> None:
    """The signature covers the JCS bytes a publisher in any language writes: ``1.0`` is ``1``, keys in
    code-unit order; written out here by hand, not by the code under test."""
    old, _, _, paths = keys
    release = payload(calibration=Calibration(policy="max_prob", temperature=1.0, threshold=0.5,
                                              score_output="logits", scores="logits"),
                      rollout=Rollout(100.0, "r1"))
    envelope = sign_release(release, old)
    jcs = ('{"allow_downgrade":false,"artifact":{"format":"onnx","sha256":"' + SHA + '","size":5,'
           '"uri":"grpc://gw:8001/inspection/4"},"calibration":{"policy":"max_prob","score_output":"logits",'
           '"scores":"logits","temperature":1,"threshold":0.5},"expires_at":"2025-07-01T12:00:00Z",'
           '"issued_at":"2025-06-01T11:00:00Z","labels":["ok","défaut"],"model":"inspection",'
           '"publisher":"ops@plant","rollout":{"percent":100,"salt":"r1"},"schema":1,"version":4}')
    old.public_key().verify(base64.b64decode(envelope.signature), jcs.encode("utf-8"))  # raises if not
    # what a non-Python publisher sends (integers where Python has floats) verifies and parses the same
    wire = json.dumps({"payload": json.loads(jcs), "key_id": envelope.key_id,
                       "signature": envelope.signature})
    assert verify_envelope(Envelope.from_json(wire), TrustStore.from_files(paths), now=NOW) == release
