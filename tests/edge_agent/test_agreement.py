"""Agreement with the cloud, live, per model version (docs/design.md §12), on a real agent against a real
gateway and a real mosquitto: what the device counts is what the gateway stored for it, row for row and
agreement for agreement; audits take their tokens from the escalation budget; a swap starts the new
version's counts."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING

import jsonschema
import numpy as np
import pytest

from cloud_gateway.hard_examples import HardExampleStore, tally_agreement
from edge_agent.serving.quality import Quality
from edge_agent.serving.slot import load_edge_model
from edgecloud.mqtt.client import MqttClient
from edgecloud.mqtt.payloads import AgreementCounts
from edgecloud.mqtt.topics import FleetTopics
from edgecloud.protocol.parameters import AgentResponse
from edgecloud_tools import cli
from edgecloud_tools.fleet.status import collect, render_table
from tests.support.fleet import FLEET, Recorder, Scrape, fleet_sections, schema
from tests.support.net import wait_for
from tests.support.onnx_models import linear_classifier
from tests.support.services import Client, GatewayCloud, agent_config, start_agent

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

TOPIC = FleetTopics(FLEET).telemetry("d1")
#: the store's reasons by the device's: escalated (unsure, forced or background) and audited rows
REASONS = {"low_confidence": "escalated", "forced": "escalated", "audit": "audit", "empty_frame": "audit"}
AGREEMENT = "edgecloud_agreement_rows_total"


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    edge = linear_classifier(tmp_path / "edge.onnx", seed=0, card={"name": "clf", "version": 1})
    cloud = linear_classifier(tmp_path / "cloud.onnx", seed=1)  # another model: they often disagree
    return edge, cloud


@pytest.fixture
def cloud(tmp_path: Path, models: tuple[Path, Path]) -> Iterator[GatewayCloud]:
    server = GatewayCloud(tmp_path / "cloud", models[1], "clf").start()
    yield server
    server.stop()


@pytest.fixture
def recorder(broker) -> Iterator[Recorder]:
    recorder = Recorder()
    with MqttClient(broker.mqtt_config(), on_message=recorder) as watcher:
        watcher.wait_connected(5)
        watcher.subscribe(TOPIC)
        yield recorder


def device_counts(scrape: Scrape, version: str) -> dict[str, tuple[int, int]]:
    """(rows, agreeing rows) per reason, as the agent's /metrics says for ``version``."""
    def value(reason: str, agree: str) -> int:
        found = scrape.value(AGREEMENT, model="clf", version=version, reason=reason, agree=agree)
        return -1 if found is None else int(found)
    return {reason: (value(reason, "true") + value(reason, "false"), value(reason, "true"))
            for reason in ("escalated", "audit")}


def stored_counts(cloud: GatewayCloud, version: str) -> dict[str, tuple[int, int]]:
    """(rows, agreeing rows) per reason among the rows the gateway stored for d1's ``version`` and
    answered in time, recounted here from the stored cloud logits and the edge's stored prediction."""
    counts = {"escalated": [0, 0], "audit": [0, 0]}
    for example in cloud.stored():
        if example.device == "d1" and example.edge_model_version == version and not example.deferred:
            tally = counts[REASONS[example.reason]]
            tally[0] += 1
            tally[1] += int(np.argmax(example.cloud_outputs["logits"]) == example.edge_prediction)
    return {reason: (rows, agree) for reason, (rows, agree) in counts.items()}


def answered(agent, version: str, rows: int) -> bool:
    """Whether the device comes to count ``rows`` rows of ``version`` answered by the cloud: audits and
    background escalations come back on their own, after the call's answer."""
    return wait_for(lambda: sum(n for n, _ in device_counts(Scrape(agent.metrics.port), version).values())
                    == rows)


def latest_quality(recorder: Recorder) -> dict:
    """The newest telemetry's quality of the one model (empty before any telemetry)."""
    bodies = recorder.bodies(TOPIC)
    return bodies[-1]["models"][0]["quality"] if bodies else {"version": None, "totals": {"rows": None}}


def test_the_device_counts_what_the_gateway_stored_per_version_and_reason(tmp_path, broker, recorder, models,
                                                                         cloud, capsys):
    """Every confident row is audited here, so that every row reaches the cloud: the device must count
    each one, once, under the reason the gateway stored it with."""
    settings = {"agent": {"device_id": "d1"}, "cascade": {"threshold": 0.6, "audit_rate": 1.0},
                "cloud": {"max_per_s": 100000, "deadline_ms": 10000}, **fleet_sections(broker, 0.2)}
    rng = np.random.default_rng(11)
    edge = models[0]
    with start_agent(tmp_path / "edge", edge, cloud.port, **settings) as agent, Client(agent.port) as client:
        for i in range(15):  # unsure rows waited for, forced, and sent in the background
            x = rng.standard_normal((16, 8)).astype(np.float32)
            client.infer("clf", {"x": x}, escalate=("auto", "always", "background")[i % 3])
            assert answered(agent, "1", 16 * (i + 1))  # each call's background work is back
        counted = device_counts(Scrape(agent.metrics.port), "1")
        # what `edgecloud fleet status` shows of it: the audit agreement of the active version
        audited, audit_agree = counted["audit"]
        view = collect(broker.mqtt_config(), FLEET, listen_s=1.0)
        assert f"audit {audit_agree / audited:.1%} of {audited}" in render_table(view.sorted_rows())
    stored = stored_counts(cloud, "1")
    assert counted == stored
    for reason, (rows, agree) in counted.items():
        assert 0 < agree < rows, f"{reason}: the two models must both agree and disagree here"
    # the store's own tally (edgecloud examples agreement) says the same, by the gateway's reasons
    with HardExampleStore(cloud.store_path) as store:
        tallied, unpredicted = tally_agreement(store.answers())
    assert unpredicted == 0 and {r.device for r in tallied} == {"d1"}
    by_reason: dict[str, Counter] = {}
    for row in tallied:
        by_reason.setdefault(REASONS[row.reason], Counter()).update(rows=row.rows, agree=row.agree)
    assert {reason: (c["rows"], c["agree"]) for reason, c in by_reason.items()} == counted
    assert cli.main(["examples", "agreement", "--store", str(cloud.store_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == [row.to_dict() for row in tallied]
    # telemetry: the last message (sent at stop) carries the same totals; the intervals add up to them
    assert wait_for(lambda: any(b["models"][0]["quality"]["totals"]["rows"] == 15 * 16
                                for b in recorder.bodies(TOPIC)))
    bodies = recorder.bodies(TOPIC)
    for body in bodies:
        jsonschema.validate(body, schema("telemetry"))
    qualities = [b["models"][0]["quality"] for b in bodies]
    last = qualities[-1]
    assert last["version"] == 1
    assert {"escalated": (last["totals"]["escalated"], last["totals"]["escalated_agree"]),
            "audit": (last["totals"]["audited"], last["totals"]["audit_agree"])} == counted
    for key in ("rows", "escalated", "audited", "audit_agree", "escalated_agree"):
        assert sum(q[key] for q in qualities) == last["totals"][key], key
    assert sum(sum(q["confidence_hist"]) for q in qualities) == 15 * 16


def test_audits_take_their_tokens_from_the_escalation_budget(tmp_path, models, cloud):
    """Every confident row is chosen for an audit, but the rate limit holds 5 tokens and refills next to
    nothing: 5 rows are audited, the rest skipped (not sent, not counted), and the next call finds none."""
    settings = {"agent": {"device_id": "d1"}, "cascade": {"threshold": 0.0, "audit_rate": 1.0},
                "cloud": {"max_per_s": 0.001, "burst": 5}}
    x = np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32)
    with start_agent(tmp_path / "edge", models[0], cloud.port, **settings) as agent:
        with Client(agent.port) as client:
            first = client.infer("clf", {"x": x})
            assert wait_for(lambda: device_counts(Scrape(agent.metrics.port), "1")["audit"][0] == 5)
            second = client.infer("clf", {"x": x[::-1].copy()})
        scrape = Scrape(agent.metrics.port)
    assert not first.parameters[AgentResponse.ESCALATED] and not second.parameters[AgentResponse.ESCALATED]
    assert [e.reason for e in cloud.stored()] == ["audit"] * 5
    assert device_counts(scrape, "1") == stored_counts(cloud, "1")
    assert stored_counts(cloud, "1")["escalated"] == (0, 0)


def test_a_swap_starts_the_new_versions_counts_and_the_old_ones_stop(tmp_path, broker, recorder, models,
                                                                    cloud):
    """Version 2 is the cloud's own model: on it, every audit agrees; version 1's series stay on
    /metrics as they were, and telemetry reports version 2 from zero. Every row is audited here."""
    edge, cloud_model = models
    settings = {"agent": {"device_id": "d1"}, "cascade": {"threshold": 0.0, "audit_rate": 1.0},
                "cloud": {"max_per_s": 100000}, **fleet_sections(broker, 0.2)}
    rng = np.random.default_rng(3)
    with start_agent(tmp_path / "edge", edge, cloud.port, **settings) as agent, Client(agent.port) as client:
        for i in range(4):
            client.infer("clf", {"x": rng.standard_normal((32, 8)).astype(np.float32)})
            assert answered(agent, "1", 32 * (i + 1))
        before = device_counts(Scrape(agent.metrics.port), "1")
        v2 = load_edge_model(agent.config, cloud_model, version="2", release={"model": "clf"})
        agent.primary.slot.swap(v2)
        assert wait_for(lambda: latest_quality(recorder)["version"] == 2)
        for i in range(4):
            client.infer("clf", {"x": rng.standard_normal((32, 8)).astype(np.float32)})
            assert answered(agent, "2", 32 * (i + 1))
        scrape = Scrape(agent.metrics.port)
    assert device_counts(scrape, "1") == before == stored_counts(cloud, "1")
    assert 0 < before["audit"][1] < before["audit"][0] == 4 * 32  # version 1 disagreed at times
    assert device_counts(scrape, "2") == stored_counts(cloud, "2") == {"escalated": (0, 0),
                                                                       "audit": (4 * 32, 4 * 32)}
    assert wait_for(lambda: latest_quality(recorder)["totals"]["rows"] == 4 * 32)
    last = latest_quality(recorder)
    assert (last["version"], last["totals"]["audited"], last["totals"]["audit_agree"]) == (2, 4 * 32, 4 * 32)


def test_counts_belong_to_the_version_serving_and_a_swap_starts_them_again():
    quality = Quality("1")
    quality.answered("1", 3, [9, 9, 0])
    quality.compared("1", audit=True, rows=2, agree=1)
    quality.compared("1", audit=False, rows=1, agree=0)
    assert quality.interval() == {
        "version": "1", "rows": 3, "escalated": 1, "audited": 2, "audit_agree": 1, "escalated_agree": 0,
        "confidence_hist": [1, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        "totals": {"rows": 3, "escalated": 1, "audited": 2, "audit_agree": 1, "escalated_agree": 0}}
    quality.answered("1", 1, [4])
    quality.activate("2")  # a swap: what version 1 counted since the last interval stays version 1's
    quality.answered("1", 1, [5])  # a call that started on version 1 and ends after the swap
    quality.compared("1", audit=False, rows=1, agree=1)
    quality.answered("2", 2, [5, 6])
    quality.compared("2", audit=True, rows=1, agree=1)
    second = quality.interval()
    assert second["version"] == "2" and second["confidence_hist"] == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert second["totals"] == {"rows": 2, "escalated": 0, "audited": 1, "audit_agree": 1,
                                "escalated_agree": 0}
    assert quality.interval()["rows"] == 0  # nothing since
    quality.activate("1")  # a rollback: telemetry counts version 1 from zero again, /metrics adds up
    quality.compared("1", audit=True, rows=3, agree=3)
    assert quality.interval()["totals"] == {"rows": 0, "escalated": 0, "audited": 3, "audit_agree": 3,
                                            "escalated_agree": 0}
    assert quality.totals() == {
        "1": AgreementCounts(rows=4, escalated=1, audited=5, audit_agree=4, escalated_agree=0),
        "2": AgreementCounts(rows=2, escalated=0, audited=1, audit_agree=1, escalated_agree=0)}


def test_a_reload_changes_the_audit_share(tmp_path, models, cloud):
    """``[cascade] audit_rate`` is re-read on a reload (SIGHUP), like the rest of ``[cascade]``."""
    sections = {"agent": {"device_id": "d1"}, "cloud": {"max_per_s": 100000}}
    x = np.random.default_rng(8).standard_normal((16, 8)).astype(np.float32)
    state = tmp_path / "edge"
    with start_agent(state, models[0], cloud.port, cascade={"threshold": 0.0, "audit_rate": 0.0},
                     **sections) as agent, Client(agent.port) as client:
        client.infer("clf", {"x": x})
        agent.reload_cascade(agent_config(state, models[0], cloud.port,
                                          cascade={"threshold": 0.0, "audit_rate": 1.0}, **sections))
        client.infer("clf", {"x": x[::-1].copy()})
        assert answered(agent, "1", 16)
    assert stored_counts(cloud, "1")["audit"][0] == 16  # the second call's rows, all of them
