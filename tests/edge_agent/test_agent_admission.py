"""The agent's admission control over real gRPC on loopback: beyond the bounds a local app (tritonclient,
in its own process) gets RESOURCE_EXHAUSTED at once with the limits named, while health and readiness
say SERVING; a burst sheds exactly the calls beyond the bounds; ``/metrics`` shows it all."""

from __future__ import annotations

from collections import Counter

import grpc
import numpy as np
import pytest

from edgecloud._generated.inference import grpc_service_pb2 as pb
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
