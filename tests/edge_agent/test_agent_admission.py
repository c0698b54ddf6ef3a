"""The agent's admission control over real gRPC on loopback: beyond the bounds a local app (tritonclient,
in its own process) gets RESOURCE_EXHAUSTED at once with the limits named, while health and readiness
say SERVING; a burst sheds exactly the calls beyond the bounds; ``/metrics`` shows it all."""

from __future__ import annotations

import threading
from collections import Counter

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud._generated.inference import grpc_service_pb2_grpc as pb_grpc
from tests.plugins.backends import GATE
from tests.support.fleet import Scrape
from tests.support.net import wait_for
from tests.support.onnx_models import linear_classifier
from tests.support.services import Client, codes, fire, start_agent
from tests.support.triton import run_triton

ROW = np.zeros((1, 8), dtype=np.float32)
GATED = "tests.plugins.backends:GatedOrtBackend"
BUSY = "agent busy: 1 call in flight and 0 queued (limits in [admission]); retry later"


@pytest.fixture
def gated_agent(tmp_path):
    """Start an agent whose model runs pass the test's gate, with ``admission`` limits."""
    model = linear_classifier(tmp_path / "clf.onnx")
    started = []

    def start(workers: int = 4, **admission):
        agent = start_agent(tmp_path / "state", model, model={"backend": GATED}, admission=admission,
                            agent={"workers": workers})
        started.append(agent)
        GATE.reset()  # forget the warm-up run
        return agent

    yield start
    GATE.reset()
    for agent in started:
        agent.stop(grace=0)


def test_a_local_app_beyond_the_bounds_is_refused_at_once_and_health_stays_serving(gated_agent):
    agent = gated_agent(max_in_flight=1, max_queue=0)
    GATE.close()
    held = fire(agent.port, "clf", {"x": ROW}, 1)
    assert wait_for(lambda: GATE.waiting == 1)
    refused = run_triton("""
        import numpy as np
        x = grpcclient.InferInput("x", [1, 8], "FP32")
        x.set_data_from_numpy(np.zeros((1, 8), np.float32))
        try:
            client.infer("clf", [x])
            emit({"refused": None})
        except InferenceServerException as e:
            emit({"refused": [e.status(), e.message()]})
    """, url=f"127.0.0.1:{agent.port}")
    assert refused["refused"] == ["StatusCode.RESOURCE_EXHAUSTED", BUSY]
    with Client(agent.port) as client:
        assert client.serving()  # shedding is not being down
        assert client.stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        assert client.stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert client.metadata("clf").name == "clf"
    scrape = Scrape(agent.metrics.port)
    assert scrape.value("edgecloud_admission_in_flight") == 1
    assert scrape.value("edgecloud_admission_queued") == 0
    assert scrape.value("edgecloud_admission_shed_total") == 1
    assert scrape.value("edgecloud_admission_max_in_flight") == 1
    assert scrape.value("edgecloud_admission_max_queue") == 0
    GATE.open()
    assert codes(held) == Counter({grpc.StatusCode.OK: 1})


def test_a_burst_beyond_the_bounds_sheds_exactly_the_excess(gated_agent):
    # threads enough for every call of the burst to reach admission (gRPC refuses beyond them itself)
    agent = gated_agent(workers=12, max_in_flight=3, max_queue=2)
    GATE.close()
    calls = fire(agent.port, "clf", {"x": ROW}, 12)
    admission = agent.server.admission
    assert wait_for(lambda: admission.figures().shed == 7)
    assert (admission.figures().in_flight, admission.figures().queued) == (3, 2)
    GATE.open()
    assert codes(calls) == Counter({grpc.StatusCode.OK: 5, grpc.StatusCode.RESOURCE_EXHAUSTED: 7})
    assert Scrape(agent.metrics.port).value("edgecloud_requests_total") == 5


def test_the_health_port_says_serving_while_every_thread_of_the_main_port_is_taken(tmp_path):
    """In a flood gRPC refuses any call beyond the main server's threads, health checks too; the health
    port ([health] listen) has threads of its own and keeps saying SERVING; it closes with the agent."""
    model = linear_classifier(tmp_path / "clf.onnx")
    agent = start_agent(tmp_path / "state", model, agent={"workers": 1},
                        admission={"max_in_flight": 1, "max_queue": 0}, health={"listen": "127.0.0.1:0"})
    release = threading.Event()
    request = pb.ModelInferRequest(model_name="clf")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(ROW.tobytes())

    def held():  # one call, then a stream that holds its server thread until it ends
        yield request
        release.wait(30)

    streams = []
    try:
        assert agent.health_port is not None and agent.health_port.port not in (0, agent.port)
        with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(2):  # both threads: each stream answered once, so its handler is running
                streams.append(stub.ModelStreamInfer(held(), timeout=30))
                assert not next(streams[-1]).error_message
            refused = _health_code(agent.port)
            assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
            with Client(agent.health_port.port) as probe:
                assert probe.serving()
            release.set()
            for stream in streams:
                assert list(stream) == []  # nothing more, ended cleanly
            with Client(agent.port) as main:
                assert wait_for(main.serving, timeout=10)
    finally:
        release.set()
        port = agent.health_port.port if agent.health_port else 0
        agent.stop(grace=0)
    assert _health_code(port) == grpc.StatusCode.UNAVAILABLE  # the health port is closed with the agent


def _health_code(port: int) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK
