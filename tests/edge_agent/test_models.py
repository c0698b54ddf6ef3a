"""Several models on one agent (docs/design.md §10): each served under its name with its own metadata,
readiness, cloud model, rate limit, metrics and telemetry; a release updates the model it names and
no other; a model that does not load leaves the others serving. Real gRPC, a real gateway, tritonclient
in a subprocess and a real mosquitto."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import numpy as np
import pytest

from cloud_gateway import Gateway, gateway_config
from cloud_gateway.hard_examples import HardExampleStore
from edge_agent.app import EdgeAgent
from edge_agent.cli import build_parser, load_config
from edge_agent.config import AgentConfig
from edgecloud.config import build
from edgecloud.errors import ConfigError, ModelLoadError
from edgecloud.mqtt.client import MqttClient
from edgecloud.mqtt.topics import TopicKind
from edgecloud.protocol.parameters import AgentResponse
from edgecloud_tools.fleet.publish import ReleaseRequest, publish_release
from edgecloud_tools.fleet.status import collect, render_table
from tests.support.fleet import FLEET, Recorder, Scrape, schema
from tests.support.net import wait_for
from tests.support.onnx_models import linear_classifier, reference_logits
from tests.support.services import Client
from tests.support.triton import run_triton
from tests.support.update_fleet import GROUP, Fleet, toml

if TYPE_CHECKING:
    from edgecloud_tools.rig.broker import LocalBroker

X_A = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
X_B = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)


def models_config(state_dir: Path, models: dict[str, dict[str, Any]], **sections: Any) -> AgentConfig:
    data: dict[str, Any] = {"agent": {"listen": "127.0.0.1:0", "state_dir": str(state_dir)},
                            "metrics": {"listen": "127.0.0.1:0"}, "models": models}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return build(AgentConfig, data)


# -- configuration -------------------------------------------------------------------------------------------
def test_each_model_gets_its_own_settings_over_the_shared_ones(tmp_path):
    config = models_config(tmp_path, {
        "a": {"path": "a.onnx", "cloud_model": "a-full", "max_per_s": 7.0,
              "cascade": {"threshold": 0.9}, "preprocess": {"size": [64, 64], "color": "gray"}},
        "b": {"path": "b.onnx", "max_batch_rows": 4}},
        cascade={"threshold": 0.3, "temperature": 2.0}, cloud={"target": "127.0.0.1:9", "max_per_s": 20.0,
                                                                "burst": 40.0})
    a, b = config.served()
    assert (a.model.name, a.model.path, a.model.preprocess) == ("a", Path("a.onnx"),
                                                                {"size": [64, 64], "color": "gray"})
    assert (a.cascade.threshold, a.cascade.temperature) == (0.9, 2.0)  # its override, the shared rest
    assert (a.cloud.model, a.cloud.max_per_s, a.cloud.burst, a.cloud.target) == ("a-full", 7.0, None,
                                                                                 "127.0.0.1:9")
    assert (b.model.name, b.model.max_batch_rows, b.model.preprocess) == ("b", 4, None)
    assert (b.cascade.threshold, b.cloud.model, b.cloud.max_per_s, b.cloud.burst) == (0.3, None, 20.0, 40.0)
    assert (a.agent.state_dir, b.agent.state_dir) == (tmp_path / "served" / "a", tmp_path / "served" / "b")
    assert a.models == {} and config.agent.state_dir == tmp_path
    single = build(AgentConfig, {"model": {"path": "m.onnx", "preprocess": {"layout": "NHWC"}}})
    assert single.served() == (single,)


@pytest.mark.parametrize(("data", "message"), [
    ({"model": {"path": "m.onnx"}, "models": {"a": {"path": "a.onnx"}}}, "model.path and [models"),
    ({"model": {"name": "m"}, "models": {"a": {"path": "a.onnx"}}}, "model.name and [models"),
    ({"models": {"a/b": {"path": "a.onnx"}}}, "models: Value error, model name 'a/b' is invalid"),
    ({"models": {"a": {"path": "a.onnx", "name": "other"}}}, "served under its table's name"),
    ({"models": {"a": {}}}, "models.a.path: Field required"),
    ({"models": {"a": {"path": "a.onnx", "cascade": {"threshold": 2}}}}, "models.a.cascade.threshold"),
    ({"models": {"a": {"path": "a.onnx", "colour": 1}}}, "models.a.colour: unknown key"),
])
def test_bad_model_tables_are_refused_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build(AgentConfig, data)


def test_a_config_file_of_tables_needs_no_model_flag(tmp_path):
    config_file = tmp_path / "agent.toml"
    config_file.write_text(toml({"models.a": {"path": "a.onnx"}, "models.b": {"path": "b.onnx"},
                                 "models.b.cascade": {"threshold": 0.7}}))
    config = load_config(build_parser().parse_args(["--config", str(config_file), "--threshold", "0.2"]))
    assert [(c.model.name, c.cascade.threshold) for c in config.served()] == [("a", 0.2), ("b", 0.7)]
    with pytest.raises(ConfigError, match="both given"):
        load_config(build_parser().parse_args(["--config", str(config_file), "--model", "m.onnx"]))


# -- serving -------------------------------------------------------------------------------------------------
@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[Gateway, Path, dict[str, Path]]]:
    """A gateway serving a full model for each edge model (the same contract, other weights)."""
    repository, full = tmp_path / "repository", {}
    for name, features, classes, seed in (("a-full", 8, 4, 10), ("b-full", 6, 3, 11)):
        full[name] = linear_classifier(repository / name / "1" / "model.onnx", features, classes, seed)
    store = tmp_path / "hard-examples.db"
    gateway = Gateway(gateway_config(repository, listen="127.0.0.1:0", store=store)).start()
    yield gateway, store, full
    gateway.stop(grace=0)


def test_two_models_each_escalate_to_their_own_cloud_model_within_their_own_rate_limit(tmp_path, cloud):
    gateway, store, full = cloud
    edge_a = linear_classifier(tmp_path / "edge" / "a.onnx", 8, 4, seed=0, card={"version": 3})
    edge_b = linear_classifier(tmp_path / "edge" / "b.onnx", 6, 3, seed=1, card={"labels": ["x", "y", "z"]})
    config = models_config(tmp_path / "state", {
        "a": {"path": str(edge_a), "cloud_model": "a-full", "max_per_s": 1000.0},
        "b": {"path": str(edge_b), "cloud_model": "b-full", "max_per_s": 0.001, "burst": 2.0}},
        cascade={"threshold": 1.0}, cloud={"target": f"127.0.0.1:{gateway.port}"})
    with EdgeAgent(config).start() as agent:
        result = run_triton("""
            out = {"ready": client.is_server_ready()}
            for name, x in (("a", ARGS["a"]), ("b", ARGS["b"])):
                x = np.array(x, dtype=np.float32)
                inp = grpcclient.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                res = client.infer(name, [inp], outputs=[grpcclient.InferRequestedOutput("logits"),
                                                         grpcclient.InferRequestedOutput("edgecloud.source")])
                out[name] = {"meta": client.get_model_metadata(name, as_json=True),
                             "ready": client.is_model_ready(name),
                             "logits": res.as_numpy("logits").tolist(),
                             "source": [s.decode() for s in res.as_numpy("edgecloud.source")],
                             "params": res.get_response(as_json=True)["parameters"]}
            try:
                client.get_model_metadata("c")
            except InferenceServerException as e:
                out["unknown"] = [e.status(), e.message()]
            emit(out)
        """, url=f"127.0.0.1:{agent.port}", a=X_A.tolist(), b=X_B.tolist())
        scrape = Scrape(agent.metrics.port)

    assert result["ready"]
    a, b = result["a"], result["b"]
    for got, expected in ((a, ("a", ["3"], ["-1", "8"])), (b, ("b", ["0"], ["-1", "6"]))):
        meta = got["meta"]
        assert (meta["name"], meta["versions"], meta["inputs"][0]["shape"]) == expected
    assert a["ready"] and b["ready"]
    assert "unknown model 'c'; this agent serves 'a', 'b'" in result["unknown"][1]
    # a: every row answered by a-full; b: two rows (its burst) by b-full, three over its limit at the edge
    np.testing.assert_allclose(a["logits"], reference_logits(full["a-full"], X_A), rtol=1e-5, atol=1e-5)
    assert a["source"] == ["cloud"] * 5
    assert int(a["params"][AgentResponse.ESCALATED_ROWS]["int64_param"]) == 5
    assert int(a["params"][AgentResponse.RATE_LIMITED_ROWS]["int64_param"]) == 0
    expected_b = np.concatenate([reference_logits(full["b-full"], X_B[:2]),
                                 reference_logits(edge_b, X_B[2:])])
    np.testing.assert_allclose(b["logits"], expected_b, rtol=1e-5, atol=1e-5)
    assert b["source"] == ["cloud"] * 2 + ["edge"] * 3
    assert int(b["params"][AgentResponse.RATE_LIMITED_ROWS]["int64_param"]) == 3
    assert b["params"][AgentResponse.LABEL]["string_param"] in ("x", "y", "z")

    with HardExampleStore(store) as examples:
        stored = {m: sorted(int(e.row) for e in examples.examples(model=m)) for m in ("a-full", "b-full")}
    assert stored == {"a-full": [0, 1, 2, 3, 4], "b-full": [0, 1]}
    for name, escalated, limited in (("a", 5, 0), ("b", 2, 3)):
        assert scrape.value("edgecloud_requests_total", model=name) == 1
        assert scrape.value("edgecloud_escalated_rows_total", model=name) == escalated
        assert scrape.value("edgecloud_rate_limited_rows_total", model=name) == limited
        assert scrape.value("edgecloud_model_ready", model=name) == 1
        assert scrape.value("edgecloud_circuit_state", model=name, state="closed") == 1
        assert scrape.value("edgecloud_request_latency_seconds_count", model=name, path="escalated") == 1
    assert scrape.value("edgecloud_model_info", model="a", version="3") == 1


def test_a_model_that_does_not_load_leaves_the_others_serving(tmp_path):
    edge_a = linear_classifier(tmp_path / "a.onnx", 8, 4, seed=0)
    broken = tmp_path / "b.onnx"
    broken.write_bytes(b"not an onnx model")
    config = models_config(tmp_path / "state", {"a": {"path": str(edge_a)}, "b": {"path": str(broken)},
                                                "c": {"path": str(tmp_path / "missing.onnx")}})
    with EdgeAgent(config).start() as agent:
        result = run_triton("""
            x = np.array(ARGS["x"], dtype=np.float32)
            inp = grpcclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            out = {"server": client.is_server_ready(),
                   "ready": {name: client.is_model_ready(name) for name in ("a", "b", "c")},
                   "a": client.infer("a", [inp]).as_numpy("logits").tolist()}
            for name in ("b", "c"):
                try:
                    client.infer(name, [inp])
                except InferenceServerException as e:
                    out[name] = [e.status(), e.message()]
            emit(out)
        """, url=f"127.0.0.1:{agent.port}", x=X_A.tolist())
        scrape = Scrape(agent.metrics.port)
        assert agent.unit("b").error and "missing.onnx" in agent.unit("c").error

    assert result["server"] and result["ready"] == {"a": True, "b": False, "c": False}
    np.testing.assert_allclose(result["a"], reference_logits(edge_a, X_A), rtol=1e-5, atol=1e-5)
    assert result["b"][0] == "StatusCode.UNAVAILABLE" and "model 'b' is not serving" in result["b"][1]
    assert result["c"][0] == "StatusCode.UNAVAILABLE" and "does not exist" in result["c"][1]
    assert [scrape.value("edgecloud_model_ready", model=m) for m in "abc"] == [1, 0, 0]
    assert scrape.value("edgecloud_requests_total", model="a") == 1

    only_broken = models_config(tmp_path / "state2", {"b": {"path": str(broken)}})
    with pytest.raises(ModelLoadError, match="no model loaded: b: "):
        EdgeAgent(only_broken).start()


# -- the fleet -----------------------------------------------------------------------------------------------
def fleet_models(fleet: Fleet, edge: Path, names: str = "ab") -> dict[str, Path]:
    """Models named ``names``, each the fleet's base model (its contract, version 1 by its card)."""
    models = {}
    edge.mkdir(exist_ok=True)
    for name in names:
        models[name] = edge / f"{name}.onnx"
        shutil.copyfile(fleet.base, models[name])
        shutil.copyfile(fleet.base.with_name(fleet.base.name + ".card.json"),
                        models[name].with_name(models[name].name + ".card.json"))
    return models


def fleet_agent(fleet: Fleet, device: str, models: dict[str, Path], **sections: Any) -> EdgeAgent:
    merged = fleet.sections(device)
    merged["agent"].update(listen="127.0.0.1:0", state_dir=str(fleet.state_dir(device)))
    config = models_config(fleet.state_dir(device), {name: {"path": str(p)} for name, p in models.items()},
                           **merged, **sections)
    agent = EdgeAgent(config).start()
    fleet.agents.append(agent)
    return agent


def publish_v2(fleet: Fleet, broker: LocalBroker, tmp_path: Path, name: str, version: int = 2) -> None:
    v2 = linear_classifier(tmp_path / "releases" / f"{name}-v{version}.onnx", seed=version)
    request = ReleaseRequest(model=v2, name=name, version=version, key=fleet.key.private, fleet=FLEET,
                             group=GROUP, gateway=f"127.0.0.1:{fleet.cloud.port}")
    publish_release(request, broker.mqtt_config())


def test_a_release_updates_the_model_it_names_and_no_other(fleet, broker, tmp_path):
    device = "edge-multi"
    edge = tmp_path / "edge"
    models = fleet_models(fleet, edge)
    broken = edge / "c.onnx"
    broken.write_bytes(b"\0" * 64)
    telemetry, topic = Recorder(), f"edgecloud/{FLEET}/devices/{device}/telemetry"
    listener = MqttClient(broker.mqtt_config(), on_message=telemetry).start()
    listener.wait_connected(5)
    listener.subscribe(topic)
    agent = fleet_agent(fleet, device, models | {"c": broken}, telemetry={"interval_s": 0.2},
                        metrics={"listen": "127.0.0.1:0"})
    try:
        untouched = agent.unit("a").slot.model
        x = np.zeros((1, 8), dtype=np.float32)
        for _ in range(2):
            Client(agent.port).infer("a", {"x": x})
        # the status names every model, the one that did not load as not ready, and an event says why
        event = fleet.watcher.wait_event(device, "model.unloadable")
        assert event["severity"] == "error" and event["data"]["model"] == "c" and event["data"]["reason"]
        status = fleet.watcher.of(TopicKind.STATUS, device)[-1]
        assert [(m["name"], m["active_version"], m["ready"]) for m in status["models"]] == [
            ("a", 1, True), ("b", 1, True), ("c", None, False)]
        assert status["models"][2]["error"] and (status["model"], status["active_version"]) == ("a", 1)

        publish_v2(fleet, broker, tmp_path, "b")
        fleet.watcher.wait_report(device, "active", 2)
        assert wait_for(lambda: agent.unit("b").slot.model.version == "2")
        assert agent.unit("a").slot.model is untouched  # the same loaded model, never swapped
        assert {r["model"] for r in fleet.watcher.reports(device)} == {"b"}
        assert wait_for(lambda: [(m["name"], m["active_version"]) for m in
                                 fleet.watcher.of(TopicKind.STATUS, device)[-1]["models"]]
                        == [("a", 1), ("b", 2), ("c", None)])
        assert (fleet.state_dir(device) / "served" / "b" / "models" / "b" / "2").is_dir()
        assert not (fleet.state_dir(device) / "served" / "a" / "models").exists()

        # a release naming no served model is refused by the first model's updater, with the reason
        publish_v2(fleet, broker, tmp_path, "zzz", version=5)
        failed = fleet.watcher.wait_report(device, "failed", 5)
        assert failed["model"] == "zzz" and "contract_mismatch" in failed["reason"]
        assert agent.unit("b").slot.model.version == "2" and agent.unit("a").slot.model is untouched

        # telemetry: the device's totals, and each model's own figures
        assert wait_for(lambda: any(m["models"][1]["model_version"] == 2 for m in telemetry.bodies(topic)))
        message = telemetry.bodies(topic)[-1]
        jsonschema.validate(message, schema("telemetry"))
        assert [(m["name"], m["model_version"], m["ready"], m["counters"]["requests"])
                for m in message["models"]] == [("a", 1, True, 2), ("b", 2, True, 0), ("c", None, False, 0)]
        assert message["counters"]["requests"] == 2 and message["models"][2]["error"]
    finally:
        listener.close()


def test_a_device_offline_while_each_model_was_released_takes_every_release(fleet, broker, tmp_path):
    """Each release stays retained on its model's own topic: b's, published after a's, does not
    replace it, as it did when the models shared one topic."""
    device = "edge-late"
    for name in "ab":
        publish_v2(fleet, broker, tmp_path, name)
    agent = fleet_agent(fleet, device, fleet_models(fleet, tmp_path / "edge"))
    assert wait_for(lambda: {(r["model"], r["version"]) for r in fleet.watcher.reports(device)
                             if r["state"] == "active"} == {("a", 2), ("b", 2)}, 30)
    assert [agent.unit(name).slot.model.version for name in "ab"] == ["2", "2"]
    # what `fleet status` reads back: each model's own state and report, each release active on it
    view = collect(broker.mqtt_config(), FLEET, listen_s=0.5)
    row = view.rows[device]
    assert {(m.name, m.active_version, m.update) for m in row.models.values()} == {("a", 2, "active v2"),
                                                                                  ("b", 2, "active v2")}
    assert [(s.release.model, s.release.version, dict(s.devices)) for s in view.releases()] == [
        ("a", 2, {"active": (device,)}), ("b", 2, {"active": (device,)})]
    assert [line.split()[2:5] for line in render_table([row]).splitlines()[1:]] == [
        ["a", "2", "active"], ["b", "2", "active"]]


def test_a_reload_applies_each_models_own_cascade_overrides(tmp_path):
    edge_a = linear_classifier(tmp_path / "a.onnx", 8, 4, seed=0)
    edge_b = linear_classifier(tmp_path / "b.onnx", 6, 3, seed=1)
    models = {"a": {"path": str(edge_a)}, "b": {"path": str(edge_b), "cascade": {"threshold": 0.7}}}
    with EdgeAgent(models_config(tmp_path / "state", models, cascade={"threshold": 0.2})).start() as agent:
        assert [agent.unit(m).slot.model.settings.threshold for m in "ab"] == [0.2, 0.7]
        assert agent.unit("a").cascade.decoding is agent.unit("b").cascade.decoding  # [frames]: the agent's
        models["a"]["cascade"] = {"threshold": 0.9}
        agent.reload_cascade(models_config(tmp_path / "state", models, cascade={"threshold": 0.3}))
        assert [agent.unit(m).slot.model.settings.threshold for m in "ab"] == [0.9, 0.7]
        reply = Client(agent.port).infer("b", {"x": X_B}, escalate="never")
        assert reply.outputs["logits"].shape == (5, 3)
