"""The committed JSON Schemas of the fleet's payloads are the ones the payload models generate, and they
keep what outside tools rely on: required keys, the enums of states, ``seq``."""

from __future__ import annotations

import json

import jsonschema

from edgecloud.metrics.names import COUNTERS
from edgecloud.mqtt import schemas
from edgecloud.mqtt.payloads import UPDATE_STATES, Counters


def test_committed_schemas_are_fresh(tmp_path) -> None:
    written = schemas.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{name}.schema.json" for name in schemas.PAYLOADS)
    for path in written:
        committed = schemas.OUT_DIR / path.name
        assert committed.exists(), f"{committed} is not committed; run python -m edgecloud.mqtt.schemas"
        assert committed.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"{committed} is stale against its payload model; run python -m edgecloud.mqtt.schemas")


def test_schemas_are_valid_and_keep_the_published_contract() -> None:
    loaded = {name: json.loads((schemas.OUT_DIR / f"{name}.schema.json").read_text())
              for name in schemas.PAYLOADS}
    for schema in loaded.values():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == schemas.DIALECT and schema["title"].startswith("edgecloud ")
    assert loaded["status"]["required"] == ["device", "state", "at", "agent_version", "model",
                                            "active_version"]
    assert loaded["status"]["properties"]["state"]["enum"] == ["online", "offline"]
    assert loaded["reported"]["required"] == ["device", "model", "version", "state", "progress", "reason",
                                              "active_version", "at"]
    assert loaded["reported"]["properties"]["state"]["enum"] == list(UPDATE_STATES) == [
        "downloading", "verifying", "staged", "active", "failed", "rolled_back"]
    assert loaded["events"]["required"] == ["device", "at", "type", "severity", "data"]
    telemetry = loaded["telemetry"]
    assert {"schema", "device", "seq", "at", "counters", "system"} <= set(telemetry["required"])
    assert telemetry["properties"]["seq"] == {"minimum": 0, "type": "integer"}
    counters = {"$ref": "#/$defs/Counters"}  # the device's totals and each model's own (``models``)
    assert telemetry["properties"]["counters"] == counters
    assert telemetry["properties"]["models"]["items"]["properties"]["counters"] == counters
    assert telemetry["$defs"]["Counters"]["required"] == list(Counters.model_fields)
    assert telemetry["properties"]["circuit_state"]["enum"] == ["closed", "open", "half_open", "disabled"]
    release = loaded["release"]
    assert release["required"] == ["payload", "key_id", "signature"]
    assert set(release["properties"]["payload"]["required"]) == {
        "schema", "model", "version", "publisher", "artifact", "calibration", "rollout", "issued_at",
        "expires_at", "allow_downgrade"}


def test_telemetry_counters_are_the_metrics_counters() -> None:
    assert list(COUNTERS) == list(Counters.model_fields)
    assert COUNTERS["escalated"] == ("escalated_rows_total", "Rows sent to the cloud")
