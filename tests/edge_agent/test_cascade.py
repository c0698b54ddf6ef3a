"""The cascade against a running cloud: who answers each row, and what happens when the cloud fails."""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from edgecloud.confidence import calibrated_probabilities
from edgecloud.endpoint import parse_endpoint
from edgecloud.errors import ModelUnavailable
from edgecloud.guards import InputContract
from edgecloud.protocol.codec import InferResponse, ModelMetadata
from edgecloud.protocol.parameters import AgentRequest, AgentResponse
from edgecloud.protocol.server import start_server
from tests.support.fleet import Scrape
from tests.support.net import wait_for
from tests.support.onnx_models import linear_classifier, reference_logits
from tests.support.services import Client, GatewayCloud, start_agent

THRESHOLD = 0.6
ROWS = 64
# the cascade under test, with a rate limit far above what these tests send and no audits (the default
# audits 2% of confident rows: these tests count the cloud's rows and the spooled cases exactly)
SETTINGS = {"cascade": {"threshold": THRESHOLD, "audit_rate": 0.0}, "cloud": {"max_per_s": 100000}}


@pytest.fixture
def models(tmp_path):
    edge = linear_classifier(tmp_path / "edge.onnx", seed=0, card={"name": "clf", "version": 1})
    cloud = linear_classifier(tmp_path / "cloud.onnx", seed=1)
    return edge, cloud


@pytest.fixture
def cloud(tmp_path, models):
    server = GatewayCloud(tmp_path / "cloud", models[1], "clf").start()
    yield server
    server.stop()


@pytest.fixture
def x():
    return np.random.default_rng(7).standard_normal((ROWS, 8)).astype(np.float32)


def offline_cascade(edge, cloud, x, threshold):
    """What the cascade must answer, computed from the two models directly."""
    edge_logits, cloud_logits = reference_logits(edge, x), reference_logits(cloud, x)
    confidence = calibrated_probabilities(edge_logits, "logits").max(axis=1)
    wants = confidence < threshold
    expected = np.where(wants[:, None], cloud_logits, edge_logits)
    clear = np.abs(confidence - threshold) > 1e-3  # rows at the threshold may tip either way
    return expected, wants, confidence, clear


def test_each_row_answered_as_offline_cascade_says(tmp_path, models, cloud, x):
    edge, cloud_model = models
    expected, wants, confidence, clear = offline_cascade(edge, cloud_model, x, THRESHOLD)
    assert 0 < wants.sum() < ROWS, "test data must mix confident and unsure rows"
    with start_agent(tmp_path / "edge", edge, cloud.port, **SETTINGS) as agent:
        r = Client(agent.port).infer("clf", {"x": x}, outputs=("logits", AgentResponse.SOURCE,
                                                               AgentResponse.CONFIDENCE),
                                     request_id="line-7-frame-42")
    source = r.outputs[AgentResponse.SOURCE]
    assert (source[clear] == np.where(wants, b"cloud", b"edge")[clear]).all()
    np.testing.assert_allclose(r.outputs["logits"][clear], expected[clear], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.outputs[AgentResponse.CONFIDENCE], confidence, rtol=1e-4, atol=1e-5)
    p = r.parameters
    assert p[AgentResponse.SOURCE] == "mixed" and p[AgentResponse.ESCALATED] is True
    assert p[AgentResponse.DEGRADED] is False
    assert p[AgentResponse.ESCALATED_ROWS] == int((source == b"cloud").sum())
    assert p[AgentResponse.CONFIDENCE] == pytest.approx(float(confidence.min()), rel=1e-4)
    # the gateway stored exactly the escalated rows, under the client's request id
    stored = {e.row: e for e in cloud.stored()}
    assert set(stored) == set(np.flatnonzero(source == b"cloud").tolist())
    for row, example in stored.items():
        assert example.request_id == "line-7-frame-42" and example.reason == "low_confidence"
        assert example.device == "edge-0" and example.edge_model_version == "1"
        np.testing.assert_array_equal(example.inputs["x"], x[row])
        assert example.edge_confidence == pytest.approx(float(confidence[row]), abs=1e-5)


@pytest.mark.parametrize("mode,source", [("always", "cloud"), ("never", "edge")])
def test_escalate_always_and_never(tmp_path, models, cloud, x, mode, source):
    edge, cloud_model = models
    want = reference_logits(cloud_model if mode == "always" else edge, x)
    with start_agent(tmp_path / "edge", edge, cloud.port, cascade={"threshold": THRESHOLD},
                     cloud={"max_per_s": 1.0, "burst": 1.0}) as agent:
        r = Client(agent.port).infer("clf", {"x": x}, escalate=mode)
    np.testing.assert_allclose(r.outputs["logits"], want, rtol=1e-4, atol=1e-4)
    assert r.parameters[AgentResponse.SOURCE] == source
    assert r.parameters[AgentResponse.ESCALATED] is (mode == "always")
    assert r.parameters[AgentResponse.RATE_LIMITED_ROWS] == 0  # always bypasses the rate limit


def test_threshold_override_per_request(tmp_path, models, cloud, x):
    edge, cloud_model = models
    with start_agent(tmp_path / "edge", edge, cloud.port, **SETTINGS) as agent:
        client = Client(agent.port)
        low = client.infer("clf", {"x": x}, threshold=0.0)
        high = client.infer("clf", {"x": x}, threshold=1.5)
        bad = None
        try:
            client.infer("clf", {"x": x}, threshold="high")
        except grpc.RpcError as e:
            bad = e
    assert low.parameters[AgentResponse.SOURCE] == "edge" and not low.parameters[AgentResponse.ESCALATED]
    assert high.parameters[AgentResponse.SOURCE] == "cloud"
    np.testing.assert_allclose(high.outputs["logits"], reference_logits(cloud_model, x), rtol=1e-4, atol=1e-4)
    assert bad is not None and bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert AgentRequest.THRESHOLD in bad.details()


def test_rate_limit_keeps_excess_rows_at_the_edge(tmp_path, models, cloud, x):
    edge, cloud_model = models
    _, wants, _, _ = offline_cascade(edge, cloud_model, x, THRESHOLD)
    with start_agent(tmp_path / "edge", edge, cloud.port, cascade={"threshold": THRESHOLD},
                     cloud={"max_per_s": 0.001, "burst": 3}) as agent:
        r = Client(agent.port).infer("clf", {"x": x}, outputs=(AgentResponse.SOURCE,))
    assert r.parameters[AgentResponse.ESCALATED_ROWS] == 3
    assert r.parameters[AgentResponse.RATE_LIMITED_ROWS] == int(wants.sum()) - 3
    assert r.parameters[AgentResponse.DEGRADED] is False
    assert int((r.outputs[AgentResponse.SOURCE] == b"cloud").sum()) == 3


def _assert_degraded_calls(agent, edge, x, deadline_s, calls=5):
    client = Client(agent.port)
    for _ in range(calls):
        started = time.monotonic()
        r = client.infer("clf", {"x": x})
        elapsed = time.monotonic() - started
        assert r.parameters[AgentResponse.DEGRADED] is True
        assert r.parameters[AgentResponse.SOURCE] == "edge"
        np.testing.assert_allclose(r.outputs["logits"], reference_logits(edge, x), rtol=1e-4, atol=1e-4)
        assert elapsed < deadline_s + 1.0, f"answer took {elapsed:.2f}s, deadline {deadline_s}s"


def test_cloud_down_degrades_spools_and_replays_when_back(tmp_path, models, cloud, x):
    edge, _ = models
    with start_agent(tmp_path / "edge", edge, cloud.port, **SETTINGS) as agent:
        cloud.stop()
        _assert_degraded_calls(agent, edge, x, 0.3)
        assert agent.primary.spool.depth() == 5
        cloud.start()
        assert wait_for(lambda: agent.primary.spool.depth() == 0, timeout=20), "spool was not replayed"
        assert agent.primary.replayer.replayed == 5
    stored = cloud.stored()
    assert len({e.request_id for e in stored}) == 5 and all(e.deferred for e in stored)


def test_cloud_slower_than_the_deadline_degrades_and_the_store_keeps_each_row_once(tmp_path, models, x):
    edge, cloud_model = models
    slow = GatewayCloud(tmp_path / "slow", cloud_model, "clf", gateway={"added_latency_ms": 800}).start()
    try:
        with start_agent(tmp_path / "edge", edge, slow.port, **SETTINGS) as agent:
            _assert_degraded_calls(agent, edge, x, 0.3, calls=2)
            spool = agent.primary.spool
            assert wait_for(lambda: spool.depth() == 0, timeout=30), "slow cases were not replayed"
        _, wants, _, _ = offline_cascade(edge, cloud_model, x, THRESHOLD)
        stored = slow.stored()
        # the gateway finished the late calls too; their replays did not store the rows twice
        assert len(stored) == 2 * int(wants.sum())
        assert len({(e.request_id, e.row) for e in stored}) == len(stored)
    finally:
        slow.stop()


def test_audit_sends_confident_rows_in_the_background(tmp_path, models, cloud, x):
    edge, _ = models
    with start_agent(tmp_path / "edge", edge, cloud.port, cascade={"threshold": 0.0, "audit_rate": 1.0},
                     cloud={"max_per_s": 100000}) as agent:
        r = Client(agent.port).infer("clf", {"x": x}, request_id="audit-1")
        assert r.parameters[AgentResponse.SOURCE] == "edge" and not r.parameters[AgentResponse.ESCALATED]
        np.testing.assert_allclose(r.outputs["logits"], reference_logits(edge, x), rtol=1e-4, atol=1e-4)
        assert wait_for(lambda: len(cloud.stored()) == ROWS, timeout=10)
    assert {e.reason for e in cloud.stored()} == {"audit"}


class _OneModelHost:
    """A KServe v2 server with one model from a file; subclasses decide how ``infer`` answers."""

    server_name, server_version = "one-model", "1"

    def __init__(self, model_path):
        from edgecloud.backends import open_backend
        self.backend = open_backend(model_path)

    def is_live(self):
        return True

    def is_ready(self):
        return True

    def model_ready(self, name, version):
        return True

    def model_metadata(self, name, version):
        return ModelMetadata(name, ("1",), "x", self.backend.inputs, self.backend.outputs)

    def input_contract(self, name, version):
        return InputContract(name, self.backend.inputs)

    def model_index(self):
        return ()


class _FailingHost(_OneModelHost):
    """A KServe v2 server whose model always errors."""

    def infer(self, request, peer):
        raise ModelUnavailable("cloud model is overloaded")


def test_cloud_answering_errors_degrades(tmp_path, models, x):
    edge, cloud_model = models
    server = start_server(_FailingHost(cloud_model), parse_endpoint("127.0.0.1:0"))
    try:
        with start_agent(tmp_path / "edge", edge, server.port, **SETTINGS) as agent:
            _assert_degraded_calls(agent, edge, x, 0.3)
            state = agent.primary.link.state
            assert "overloaded" in state.error or state.circuit == "open"
    finally:
        server.stop(0)


class _MangledHost(_OneModelHost):
    """A KServe v2 server whose model answers, but not what was asked: a row short, or without its
    output."""

    def __init__(self, model_path, mangle: str):
        super().__init__(model_path)
        self.mangle = mangle

    def infer(self, request, peer):
        answered = self.backend.infer(request.inputs)
        outputs = {n: v[1:] for n, v in answered.items()} if self.mangle == "row short" else {}
        return InferResponse(model_name=request.model_name, model_version="1", id=request.id,
                             outputs=outputs)


@pytest.mark.parametrize("mangle, error", [("row short", r"output 'logits' has (\d+) rows, (\d+) were sent"),
                                           ("no output", "output 'logits' missing")])
def test_a_cloud_answering_what_was_not_asked_degrades_and_keeps_the_case(tmp_path, models, x, mangle,
                                                                          error, caplog):
    caplog.set_level(logging.INFO, logger="edge_agent.serving.cascade")
    edge, cloud_model = models
    server = start_server(_MangledHost(cloud_model, mangle), parse_endpoint("127.0.0.1:0"))
    try:
        with start_agent(tmp_path / "edge", edge, server.port, **SETTINGS) as agent:
            _assert_degraded_calls(agent, edge, x, 0.3, calls=2)
            found = re.search(f"bad cloud answer: {error}", caplog.text)
            assert found and (mangle != "row short" or int(found[2]) == int(found[1]) + 1), caplog.text
            assert agent.primary.spool.depth() == 2  # kept for a cloud that answers right
    finally:
        server.stop(0)


def test_incompatible_cloud_model_disables_escalation(tmp_path, models, x):
    edge, _ = models
    other = linear_classifier(tmp_path / "other.onnx", classes=5, seed=3)
    cloud = GatewayCloud(tmp_path / "c2", other, "clf").start()
    try:
        with start_agent(tmp_path / "edge", edge, cloud.port, **SETTINGS) as agent:
            client = Client(agent.port)
            for _ in range(3):
                r = client.infer("clf", {"x": x})
                np.testing.assert_allclose(r.outputs["logits"], reference_logits(edge, x), rtol=1e-4,
                                           atol=1e-4)
                assert r.parameters[AgentResponse.SOURCE] == "edge"
                assert r.parameters[AgentResponse.DEGRADED] is True
            state = agent.primary.link.state
            assert state.compatible is False
            assert "cloud output 'logits': per-row shape [5], expected [4]" in state.error
            assert agent.primary.spool.depth() == 0  # an incompatible cloud cannot use the cases
    finally:
        cloud.stop()


class _HeldCloud(_OneModelHost):
    """A KServe v2 cloud that holds every answer until the test lets go: escalations stay in flight for
    as long as the test needs, with no clock involved."""

    def __init__(self, model_path):
        super().__init__(model_path)
        self.arrived = threading.Semaphore(0)  # one release per call that reached the model
        self.let_go = threading.Event()

    def infer(self, request, peer):
        self.arrived.release()
        self.let_go.wait(60)
        return InferResponse(request.model_name, self.backend.infer(request.inputs), id=request.id)


def test_escalations_held_by_a_slow_cloud_leave_edge_answers_free(tmp_path, models, x):
    """With two edge threads and two escalation slots, both escalations wait at the cloud while an
    ``escalate=never`` call is answered; one more escalation finds the slots taken and is answered by the
    edge at once, degraded, counted and spooled. (With escalations on the request threads, the two held
    calls took both threads and the edge-only call waited for the cloud.)"""
    edge, cloud_model = models
    cloud = _HeldCloud(cloud_model)
    server = start_server(cloud, parse_endpoint("127.0.0.1:0"))
    settings = {"agent": {"workers": 2}, "spool": {"replay_interval_s": 3600},
                "cloud": {"max_per_s": 100000, "deadline_ms": 60000, "max_in_flight": 2}}
    try:
        with start_agent(tmp_path / "edge", edge, server.port, **settings) as agent, \
                ThreadPoolExecutor(2) as pool:
            held = [pool.submit(Client(agent.port).infer, "clf", {"x": x[:1]}, escalate="always", timeout=60)
                    for _ in range(2)]
            for _ in held:
                assert cloud.arrived.acquire(timeout=20), "the escalation never reached the cloud"
            edge_only = Client(agent.port).infer("clf", {"x": x}, escalate="never", timeout=20)
            over = Client(agent.port).infer("clf", {"x": x[:1]}, escalate="always", timeout=20,
                                            request_id="over-the-bound")
            assert not any(f.done() for f in held), "the escalations are still waiting at the cloud"
            assert agent.primary.spool.depth() == 1
            metrics = Scrape(agent.metrics.port)
            cloud.let_go.set()
            answers = [f.result(timeout=30) for f in held]
    finally:
        cloud.let_go.set()
        server.stop(0)
    assert edge_only.parameters[AgentResponse.SOURCE] == "edge"
    np.testing.assert_allclose(edge_only.outputs["logits"], reference_logits(edge, x), rtol=1e-4, atol=1e-4)
    assert over.parameters[AgentResponse.DEGRADED] is True and over.parameters[AgentResponse.SOURCE] == "edge"
    np.testing.assert_allclose(over.outputs["logits"], reference_logits(edge, x[:1]), rtol=1e-4, atol=1e-4)
    for answer in answers:
        assert answer.parameters[AgentResponse.SOURCE] == "cloud"
        np.testing.assert_allclose(answer.outputs["logits"], reference_logits(cloud_model, x[:1]), rtol=1e-4,
                                   atol=1e-4)
    assert metrics.value("edgecloud_in_flight_limited_rows_total") == 1
    assert metrics.value("edgecloud_degraded_rows_total") == 1
    assert metrics.value("edgecloud_spool_depth") == 1


def test_an_escalation_waiting_on_the_cloud_gives_its_admission_slot_back(tmp_path, models, x):
    """Admission bounds the work done on the device: with one call admitted at a time and none queued,
    two escalations held at a slow cloud hold no admission slot, and an ``escalate=never`` call is
    admitted and answered meanwhile. (With the slot held through the wait, it was refused at once with
    RESOURCE_EXHAUSTED, and so was the second escalation.)"""
    edge, cloud_model = models
    cloud = _HeldCloud(cloud_model)
    server = start_server(cloud, parse_endpoint("127.0.0.1:0"))
    settings = {"admission": {"max_in_flight": 1, "max_queue": 0}, "spool": {"replay_interval_s": 3600},
                "cloud": {"max_per_s": 100000, "deadline_ms": 60000, "max_in_flight": 2}}
    try:
        with start_agent(tmp_path / "edge", edge, server.port, **settings) as agent, \
                ThreadPoolExecutor(2) as pool:
            held = []
            for _ in range(2):
                held.append(pool.submit(Client(agent.port).infer, "clf", {"x": x[:1]}, escalate="always",
                                        timeout=60))
                assert cloud.arrived.acquire(timeout=20), "the escalation never reached the cloud"
            figures = agent.server.admission.figures()
            edge_only = Client(agent.port).infer("clf", {"x": x}, escalate="never", timeout=20)
            assert not any(f.done() for f in held), "the escalations are still waiting at the cloud"
            cloud.let_go.set()
            answers = [f.result(timeout=30) for f in held]
    finally:
        cloud.let_go.set()
        server.stop(0)
    assert (figures.in_flight, figures.queued, figures.shed) == (0, 0, 0)
    assert edge_only.parameters[AgentResponse.SOURCE] == "edge"
    np.testing.assert_allclose(edge_only.outputs["logits"], reference_logits(edge, x), rtol=1e-4, atol=1e-4)
    assert [a.parameters[AgentResponse.SOURCE] for a in answers] == ["cloud", "cloud"]
