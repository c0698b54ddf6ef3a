"""The collaboration parameters: every key and type as clients, agents and gateways know them (written
out here, so a renamed key fails), what a reader accepts, and the edge summary from build to parse."""

from __future__ import annotations

import json

import pytest

from edgecloud.errors import InvalidInput
from edgecloud.protocol.parameters import (
    AgentRequest,
    AgentResponse,
    CloudRequest,
    Collaboration,
    EdgeSummary,
)

WIRE = {
    "edgecloud.escalate": "string", "edgecloud.threshold": "double",
    "edgecloud.source": "string", "edgecloud.confidence": "double", "edgecloud.escalated": "bool",
    "edgecloud.degraded": "bool", "edgecloud.model_version": "string", "edgecloud.label": "string",
    "edgecloud.escalated_rows": "int64", "edgecloud.rate_limited_rows": "int64",
    "edgecloud.request_id": "string", "edgecloud.device_id": "string",
    "edgecloud.edge_model_version": "string", "edgecloud.edge_summary": "string",
    "edgecloud.deferred": "bool", "edgecloud.stream": "string", "edgecloud.reused": "bool",
}


def test_keys_and_types_are_the_published_ones() -> None:
    members = [*AgentRequest, *AgentResponse, *CloudRequest]
    assert {key: key.choice for key in members} == WIRE
    assert len(members) == len(WIRE)
    for key in members:  # a plain string wherever a key is used
        assert f"{key}" == str(key) == key and hash(key) == hash(str(key))
        assert {str(key): 1}[key] == 1
    assert str(AgentRequest.THRESHOLD) == "edgecloud.threshold" and type(str(AgentRequest.THRESHOLD)) is str


def test_readers_take_what_the_codec_decodes() -> None:
    assert AgentRequest.THRESHOLD.accepts(0.5) and AgentRequest.THRESHOLD.accepts(1)
    assert not AgentRequest.THRESHOLD.accepts(True) and not AgentRequest.THRESHOLD.accepts("0.5")
    assert CloudRequest.DEFERRED.accepts(False) and not CloudRequest.DEFERRED.accepts(1)
    assert CloudRequest.REQUEST_ID.accepts("r-1") and CloudRequest.REQUEST_ID.accepts(7)
    assert not CloudRequest.REQUEST_ID.accepts(True) and not CloudRequest.REQUEST_ID.accepts(1.5)
    assert AgentResponse.ESCALATED_ROWS.accepts(3) and not AgentResponse.ESCALATED_ROWS.accepts(3.0)


def test_edge_summary_round_trip_and_wire_form() -> None:
    summary = EdgeSummary(rows=[0, 3], prediction=[2, 1], confidence=[0.25, 0.125], reason="low_confidence")
    text = summary.to_json()
    assert json.loads(text) == {"rows": [0, 3], "prediction": [2, 1], "confidence": [0.25, 0.125],
                                "reason": "low_confidence"}
    assert EdgeSummary.parse(text, rows=2) == summary
    minimal = EdgeSummary.parse('{"rows": [4], "reason": "audit", "later": 1}', rows=1)  # unknown: ignored
    assert (minimal.rows, minimal.prediction, minimal.confidence) == ((4,), None, None)


@pytest.mark.parametrize(("text", "rows", "message"), [
    ("not json", 1, "parameter 'edgecloud.edge_summary' is not a valid summary"),
    ('{"rows": [0]}', 1, "is not a valid summary"),
    ('{"rows": [0], "reason": "bored"}', 1, "is not a valid summary"),
    ('{"rows": [0, 1], "prediction": [1], "reason": "audit"}', 2, "1 prediction values for 2 rows"),
    ('{"rows": [0, 1], "confidence": [0.5], "reason": "audit"}', 2, "1 confidence values for 2 rows"),
    ('{"rows": [0, 1], "reason": "forced"}', 3, "names 2 rows, the request carries 3"),
    ('{"rows": [1, 1], "reason": "forced"}', 2, "rows must be distinct non-negative indices"),
    ('{"rows": [-1], "reason": "forced"}', 1, "rows must be distinct non-negative indices"),
])
def test_malformed_edge_summaries_are_refused(text: str, rows: int, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        EdgeSummary.parse(text, rows)
    assert "parameter 'edgecloud.edge_summary'" in str(info.value) and message in str(info.value)


def test_the_collaboration_the_agent_writes_is_the_one_the_gateway_reads() -> None:
    summary = EdgeSummary(rows=(3, 7), prediction=(1, 0), confidence=(0.41, 0.2), reason="low_confidence")
    written = Collaboration("req-9", "press-7", "4", summary)
    assert Collaboration.read(written.parameters(), "ignored", rows=2) == written
    replayed = Collaboration("req-9", "press-7", "4", summary, deferred=True)
    assert replayed.parameters()[CloudRequest.DEFERRED] is True
    assert Collaboration.read(replayed.parameters(), "", rows=2) == replayed
    plain = Collaboration.read({}, "", rows=1)  # a plain inference call: no id, no summary
    assert (plain.request_id, plain.summary, plain.deferred) == ("", None, False)
    with pytest.raises(InvalidInput, match=r"edgecloud\.device_id"):
        Collaboration.read({CloudRequest.DEVICE_ID: True}, "", rows=1)
    with pytest.raises(InvalidInput, match="names 2 rows, the request carries 3"):
        Collaboration.read(written.parameters(), "", rows=3)
