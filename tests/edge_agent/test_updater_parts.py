"""Updater parts without a broker: the persisted state, the watch window's verdict and meter, the
TensorRT decisions (no GPU: a stand-in builder), the self-test, and what an agent serves at start."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.config import AgentConfig
from edge_agent.serving.slot import EdgeModel, load_edge_model
from edge_agent.update.staging import Runtime, self_test
from edge_agent.update.startup import load_startup
from edge_agent.update.state import (
    ROLLED_BACK_KEPT,
    Pending,
    Release,
    RolledBack,
    Slot,
    StateStore,
    UpdateState,
)
from edge_agent.update.watch import (
    Figures,
    Latency,
    MeteredBackend,
    batch_class,
    class_rows,
    figures,
    metered,
    regression,
)
from edgecloud.backends.base import Backend
from edgecloud.clock import parse_time
from edgecloud.engine.cache import EngineCache
from edgecloud.engine.sidecar import EngineSidecar, write_sidecar
from edgecloud.errors import InvalidInput
from edgecloud.files import file_sha256
from edgecloud.release import Artifact, PlanTarget, Reason, ReleaseRejected
from edgecloud.tensors import TensorSpec
from tests.support.onnx_models import linear_classifier
from tests.support.services import agent_config

ORIN = "NVIDIA Jetson AGX Orin Developer Kit"
SHA = "ab" * 32
RELEASE = {"model": "inspection", "version": 2, "artifact": {"sha256": SHA},
           "calibration": {"threshold": 0.7}}
ISSUED = "2025-03-01T12:00:00Z"


# -- persisted state ----------------------------------------------------------------------------------------
def test_state_round_trips_atomically_and_parses_strictly(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = UpdateState(active=Slot(2, "models/inspection/2/model.onnx", RELEASE),
                        previous=Slot(1, "models/inspection/1/model.onnx", {"model": "inspection"}),
                        pending=Pending(Release("inspection", 3, SHA), "staged"),
                        newest_issued_at="2025-03-01T12:00:00Z")
    store.save(state)
    assert store.load() == (state, None)
    assert not list(store.path.parent.glob(".*.tmp"))
    assert state.active is not None and (state.active.model, state.active.sha256) == ("inspection", SHA)
    for bad in ("/etc/passwd", "../outside/model.onnx", ""):
        with pytest.raises(ValueError):
            Slot(1, bad)
    with pytest.raises(ValueError):
        Pending(Release("inspection", 3, SHA), "installing")
    for text in ('{"schema": 2}', '{"schema": 1, "active": {"version": "2"}}', "[]", "{"):
        store.path.write_text(text)
        loaded, why = store.load()
        assert loaded == UpdateState() and why and "set aside" in why
        assert not store.path.exists()


def test_rolled_back_releases_are_remembered_bounded(tmp_path: Path) -> None:
    state = UpdateState()
    for version in range(ROLLED_BACK_KEPT + 4):
        state = state.with_rolled_back(Release("inspection", version, SHA), ISSUED)
    state = state.with_rolled_back(Release("inspection", 5, SHA), ISSUED)  # again: moves to the end, once
    versions = [r.release.version for r in state.rolled_back]
    assert len(versions) == ROLLED_BACK_KEPT and versions[-1] == 5 and versions.count(5) == 1
    assert not state.rolled_back_before(Release("inspection", 0, SHA), parse_time(ISSUED))  # the oldest went


def test_a_rolled_back_release_is_retried_only_when_signed_again_later(tmp_path: Path) -> None:
    release = Release("inspection", 2, SHA)
    state = UpdateState().with_rolled_back(release, ISSUED)
    signed = parse_time(ISSUED)
    assert state.rolled_back_before(release, signed)  # the retained copy, delivered again
    assert state.rolled_back_before(release, signed - timedelta(hours=1))
    assert not state.rolled_back_before(release, signed + timedelta(seconds=1))  # published again
    assert not state.rolled_back_before(Release("inspection", 2, "cd" * 32), signed)  # another file
    store = StateStore(tmp_path)
    store.save(state)
    assert store.load() == (state, None)
    # a state written before issued_at was recorded: that release stays rolled back
    store.path.write_text(json.dumps({"schema": 1, "active": None, "previous": None, "pending": None,
                                      "newest_issued_at": None, "rolled_back": [release.to_dict()]}))
    loaded, why = store.load()
    assert why is None and loaded.rolled_back_before(release, signed + timedelta(days=1))


def test_prune_keeps_the_slots_and_the_release_in_progress(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for version in (1, 2, 3, 4):
        path = store.slot_file("inspection", version, ".onnx")
        path.parent.mkdir(parents=True)
        path.with_name("model.onnx.part").write_bytes(b"partial")
    state = UpdateState(active=Slot(2, store.relative(store.slot_file("inspection", 2, ".onnx"))),
                        previous=Slot(1, store.relative(store.slot_file("inspection", 1, ".onnx"))),
                        pending=Pending(Release("inspection", 4, SHA), "downloading"))
    removed = store.prune(state)
    assert [p.name for p in removed] == ["3"]
    assert sorted(p.name for p in (tmp_path / "models" / "inspection").iterdir()) == ["1", "2", "4"]


# -- the watch window -------------------------------------------------------------------------------------
def fig(calls: int, errors: int = 0, **p50_by_rows: float) -> Figures:
    """Figures whose kept run times are ``calls - errors`` per batch class named ``rows_<n>``."""
    return Figures(calls, errors, {batch_class(int(key.split("_")[1])): Latency(calls - errors, p50)
                                   for key, p50 in p50_by_rows.items()})


@pytest.mark.parametrize(("previous", "new", "verdict"), [
    (fig(500, rows_1=0.10), fig(100, rows_1=0.12), None),
    (fig(500, rows_1=0.10), fig(100, 6, rows_1=0.10), "error_rate"),  # 6 % > 5 %
    (fig(500, rows_1=0.10), fig(100, 5, rows_1=0.10), None),  # 5 % is allowed
    (fig(500, 50, rows_1=0.10), fig(100, 10, rows_1=0.10), None),  # no worse than before
    (fig(500, 50, rows_1=0.10), fig(100, 20, rows_1=0.10), "error_rate"),
    (fig(500, rows_1=2.0), fig(100, rows_1=6.2), "latency"),  # x3.1 > x3
    (fig(500, rows_1=0.10), fig(100, rows_1=0.90), None),  # x9, but under a millisecond: noise
    (fig(5, rows_1=0.10), fig(100, rows_1=5.0), None),  # too few previous calls to compare
    (fig(500, rows_1=0.10), Figures(9, 9), None),  # too few new calls to judge
    (Figures(0, 0), Figures(100, 100), "error_rate"),
    # like with like: a burst of bigger batches after the swap is no regression ...
    (fig(500, rows_1=0.32), fig(100, rows_64=9.2), None),
    (fig(500, rows_1=0.32), fig(100, rows_1=0.35, rows_64=9.2), None),
    # ... a model slower on the batches both served still is
    (fig(500, rows_1=0.32, rows_64=3.0), fig(100, rows_1=0.35, rows_64=9.2), "latency"),
    (fig(500, rows_2=0.5), fig(100, rows_3=2.5), "latency"),  # 2 and 3 rows are one class
])
def test_regression_verdict(previous: Figures, new: Figures, verdict: str | None) -> None:
    reason = regression(previous, new, max_error_rate=0.05, max_latency_factor=3.0)
    assert (reason.split(":")[0] if reason else None) == verdict


def test_a_rollback_names_the_figures_that_caused_it() -> None:
    reason = regression(fig(800, rows_1=0.32, rows_64=3.0), fig(120, rows_1=0.35, rows_64=9.216), 0.05, 3.0)
    assert reason == ("latency: p50 9.216 ms vs 3.000 ms of the previous model on batches of 64-127 rows, "
                      "over 120 and 800 calls (x3.1, allowed x3)")
    reason = regression(fig(800, 8, rows_1=0.3), fig(40, 12, rows_1=0.3), 0.05, 3.0)
    assert reason == ("error_rate: 12 of 40 calls failed (30.0%); allowed 5.0% "
                      "(previous model: 8 of 800)")


def test_the_meter_keeps_run_times_by_batch_class() -> None:
    meter = MeteredBackend(_Scripted())
    for rows in (1, 1, 2, 3, 64, 100, 128):
        meter.infer({"x": np.zeros((rows, 2), np.float32)})
    seen = meter.figures()
    assert seen.calls == 7
    assert {class_rows(b): lat.calls for b, lat in seen.latency.items()} == {"1": 2, "2-3": 2, "64-127": 2,
                                                                             "128-255": 1}
    assert seen.summary().startswith("1:p50=") and "64-127:p50=" in seen.summary()


class _Scripted(Backend):
    """A backend whose answers a test scripts: an exception to raise, or outputs."""

    key, platform = "scripted", "scripted_platform"
    outcome: Exception | None = None

    def load(self, path: Path) -> None:
        pass

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", "FP32", (-1, 2)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("y", "FP32", (-1, 2)),)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.outcome is not None:
            raise self.outcome
        return {"y": inputs["x"]}

    def close(self) -> None:
        pass


def test_metered_backend_counts_the_models_own_failures(tmp_path: Path) -> None:
    inner = _Scripted()
    meter = MeteredBackend(inner)
    assert meter.platform == "scripted_platform" and meter.inputs == inner.inputs
    x = {"x": np.zeros((1, 2), np.float32)}
    meter.infer(x)
    meter.warmup(1)  # warm-ups and watchdog probes are not calls
    inner.outcome = InvalidInput("bad request")
    with pytest.raises(InvalidInput):
        meter.infer(x)  # the caller's fault: not counted
    inner.outcome = RuntimeError("kernel failed")
    with pytest.raises(RuntimeError):
        meter.infer(x)
    seen = meter.figures()
    assert (seen.calls, seen.errors) == (2, 1) and seen.latency[1].calls == 1 and seen.latency[1].p50_ms >= 0
    model = load_edge_model(agent_config(tmp_path, linear_classifier(tmp_path / "m.onnx")))
    watched = metered(model)
    assert metered(watched) is watched and figures(model) == Figures(0, 0)


# -- TensorRT decisions without a GPU ---------------------------------------------------------------------
def test_plan_releases_only_run_where_they_were_built() -> None:
    plan = Artifact("grpc://h:1/m/2", SHA, 10, "tensorrt-plan", PlanTarget("10.3.0", ORIN))
    onnx = Artifact("grpc://h:1/m/2", SHA, 10)
    Runtime("10.3.0.30", ORIN).check(plan)  # the build number does not matter
    Runtime(None, "unknown").check(onnx)  # ONNX serves every device
    elsewhere = (Runtime("8.6.2", ORIN), Runtime("10.3.0", "NVIDIA Jetson Orin Nano"), Runtime(None, ORIN))
    for runtime in elsewhere:
        with pytest.raises(ReleaseRejected) as info:
            runtime.check(plan)
        assert info.value.reason is Reason.WRONG_TARGET


def test_onnx_release_becomes_a_cached_engine_on_a_tensorrt_device(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx bytes")
    built: list[Path] = []

    def build(source: Path, out: Path) -> None:  # stands in for TensorRT's builder
        built.append(out)
        out.write_bytes(b"engine")
        write_sidecar(out, EngineSidecar("10.3.0", ORIN, "int8+fp16", file_sha256(source)))

    cache = EngineCache(tmp_path / "engines")
    artifact = Artifact("grpc://h:1/m/2", file_sha256(onnx), 10)
    assert Runtime(None, ORIN).servable(onnx, artifact, cache, build) == onnx  # ONNX Runtime loads it as is
    engine = Runtime("10.3.0", ORIN).servable(onnx, artifact, cache, build)
    assert engine.suffix == ".plan" and engine.parent == tmp_path / "engines" and len(built) == 1
    assert Runtime("10.3.0", ORIN).servable(onnx, artifact, cache, build) == engine and len(built) == 1
    plan = Artifact("grpc://h:1/m/2", SHA, 10, "tensorrt-plan", PlanTarget("10.3.0", ORIN))
    assert Runtime("10.3.0", ORIN).servable(engine, plan, cache, build) == engine  # a plan is loaded as is


# -- self-test ---------------------------------------------------------------------------------------------
def _load(tmp_path: Path, name: str, **kwargs) -> EdgeModel:
    path = linear_classifier(tmp_path / name / "inspection.onnx", **kwargs)
    return load_edge_model(agent_config(tmp_path, path, model={"name": "inspection"}))


def test_self_test_refuses_other_contracts_and_non_finite_outputs(tmp_path: Path) -> None:
    serving = _load(tmp_path, "v1")
    self_test(_load(tmp_path, "v2", seed=2), serving, rows=4)
    for name, kwargs, words in [("wide", {"features": 16}, "input 'x': per-row shape [16], expected [8]"),
                                ("five", {"classes": 5}, "output 'logits': per-row shape [5], expected [4]")]:
        with pytest.raises(ReleaseRejected) as info:
            self_test(_load(tmp_path, name, **kwargs), serving, rows=4)
        assert info.value.reason is Reason.CONTRACT_MISMATCH and words in info.value.detail
    broken = _load(tmp_path, "nan", scale=float("nan"))
    with pytest.raises(ReleaseRejected) as info:
        self_test(broken, serving, rows=3)
    assert info.value.reason is Reason.UNLOADABLE
    assert info.value.detail.startswith("self-test on 3 rows of zeros: output 'logits' is not finite")


def test_served_output_missing_from_the_release_is_named_both_ways(tmp_path: Path) -> None:
    serving = _load(tmp_path, "v1")
    other = _load(tmp_path, "other", output_name="scores", card={"calibration": {"score_output": "scores"}})
    with pytest.raises(ReleaseRejected) as info:
        self_test(other, serving, rows=1)
    assert "release output 'logits' is missing" in info.value.detail
    assert "served output 'scores' is missing" in info.value.detail  # the new one the clients do not know


# -- what an agent serves at start ------------------------------------------------------------------------
def _config(tmp_path: Path, **sections: Any) -> AgentConfig:
    """A fleet member's config (the updater's state is a fleet's) with the base model v1."""
    base = linear_classifier(tmp_path / "base" / "inspection.onnx", card={"name": "inspection", "version": 1})
    return agent_config(tmp_path / "state", base, **{"fleet": {"name": "plant-1"}, **sections})


def _slot(store: StateStore, version: int) -> Slot:
    path = linear_classifier(store.slot_file("inspection", version, ".onnx"), seed=version)
    return Slot(version, store.relative(path), {**RELEASE, "version": version, "issued_at": ISSUED})


def test_startup_serves_the_active_slot_with_its_release_calibration(tmp_path: Path) -> None:
    config = _config(tmp_path)
    store = StateStore(config.agent.state_dir)
    pending = Pending(Release("inspection", 3, SHA), "verifying")
    store.save(UpdateState(active=_slot(store, 2), pending=pending))
    startup = load_startup(config)
    model = startup.model
    assert (model.name, model.version, model.settings.threshold) == ("inspection", "2", 0.7)
    assert isinstance(model.backend, MeteredBackend) and startup.rolled_back is None
    assert store.load()[0].pending is None  # an interrupted step starts again from the retained release


def test_outside_a_fleet_the_model_is_not_metered(tmp_path: Path) -> None:
    model = load_startup(_config(tmp_path, fleet={})).model  # nothing to watch: no cost per call
    assert not isinstance(model.backend, MeteredBackend)


def test_startup_inside_a_watch_window_rolls_back(tmp_path: Path) -> None:
    config = _config(tmp_path)
    store = StateStore(config.agent.state_dir)
    store.save(UpdateState(active=_slot(store, 3), previous=_slot(store, 2),
                           pending=Pending(Release("inspection", 3, SHA), "watching")))
    startup = load_startup(config)
    assert startup.model.version == "2" and startup.rolled_back == Release("inspection", 3, SHA)
    state = store.load()[0]
    assert state.active is not None and state.active.version == 2 and state.pending is None
    assert state.rolled_back == (RolledBack(Release("inspection", 3, SHA), ISSUED),)  # the watched copy


def test_startup_falls_back_when_the_slot_file_is_gone(tmp_path: Path) -> None:
    config = _config(tmp_path)
    store = StateStore(config.agent.state_dir)
    slot = _slot(store, 2)
    store.save(UpdateState(active=slot))
    store.absolute(slot).unlink()
    startup = load_startup(config)
    assert startup.model.version == "1"  # the configured model
    assert store.load()[0].active is None
