"""The gateway under load, over real gRPC on loopback: hundreds of concurrent single-row calls all
reach the batcher (no thread per call caps it), calls beyond the admission bounds are refused at once
while health says SERVING, a request whose deadline passed while queued is never run, and batched
answers equal unbatched ones."""

from __future__ import annotations

import shutil
from collections import Counter

import grpc
import numpy as np
import pytest

from cloud_gateway import Gateway, gateway_config
from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud.client import KServeClient
from edgecloud.protocol.codec import decode_response
from tests.conftest import CLOUD_REPO
from tests.plugins.backends import GATE
from tests.support.fleet import Scrape
from tests.support.net import wait_for
from tests.support.onnx_models import linear_classifier
from tests.support.services import codes, fire

GATED = "tests.plugins.backends:GatedOrtBackend"
ROW = np.zeros((1, 8), dtype=np.float32)


@pytest.fixture
def gate():
    GATE.reset()
    yield GATE
    GATE.reset()


def gated_gateway(tmp_path, model_config: str, **sections) -> Gateway:
    """A gateway serving ``clf`` (a linear classifier) through the gate, with ``model_config`` as its
    config.toml."""
    linear_classifier(tmp_path / "repo" / "clf" / "1" / "model.onnx")
    (tmp_path / "repo" / "clf" / "config.toml").write_text(f'platform = "{GATED}"\n{model_config}')
    gateway = Gateway(gateway_config(tmp_path / "repo", listen="127.0.0.1:0",
                                     metrics={"listen": "127.0.0.1:0"}, **sections)).start()
    GATE.reset()  # forget the warm-up run
    return gateway


def marked(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 8), value, dtype=np.float32)}


def test_beyond_the_bounds_a_call_is_refused_at_once_and_health_stays_serving(tmp_path, gate):
    gw = gated_gateway(tmp_path, "max_batch_size = 0\n", admission={"max_in_flight": 1, "max_queue": 0})
    try:
        with KServeClient(f"127.0.0.1:{gw.port}") as client:
            gate.close()
            held = fire(gw.port, "clf", {"x": ROW}, 1)
            assert wait_for(lambda: gate.waiting == 1)
            with pytest.raises(grpc.RpcError) as refused:
                client.infer("clf", {"x": ROW})
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == ("gateway busy: 1 call in flight and 0 queued "
                                               "(limits in [admission]); retry later")
            assert client.serving()  # shedding is not being down
            assert client.stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert client.metadata("clf").name == "clf"
            scrape = Scrape(gw.metrics.port)
            assert scrape.value("edgecloud_admission_in_flight") == 1
            assert scrape.value("edgecloud_admission_shed_total") == 1
            assert scrape.value("edgecloud_admission_max_in_flight") == 1
            gate.open()
            assert codes(held) == Counter({grpc.StatusCode.OK: 1})
            assert client.infer("clf", {"x": ROW}).outputs["logits"].shape == (1, 4)
    finally:
        gate.open()
        gw.stop(grace=0)


def test_a_burst_beyond_the_bounds_sheds_exactly_the_excess(tmp_path, gate):
    gw = gated_gateway(tmp_path, "max_batch_size = 0\nconcurrent_runs = 1\n",
                       admission={"max_in_flight": 3, "max_queue": 2})
    try:
        gate.close()
        calls = fire(gw.port, "clf", {"x": ROW}, 12)
        admission = gw.server.admission
        assert wait_for(lambda: admission.figures().shed == 7)
        assert (admission.figures().in_flight, admission.figures().queued) == (3, 2)
        gate.open()
        assert codes(calls) == Counter({grpc.StatusCode.OK: 5, grpc.StatusCode.RESOURCE_EXHAUSTED: 7})
    finally:
        gate.open()
        gw.stop(grace=0)


def test_256_concurrent_single_row_calls_all_reach_the_batcher(tmp_path, gate):
    gw = gated_gateway(tmp_path, "max_batch_size = 32\nmax_queue_delay_us = 0\nconcurrent_runs = 1\n")
    assert gw.config.gateway.workers < 256
    try:
        gate.close()
        calls = fire(gw.port, "clf", {"x": ROW}, 256)
        assert wait_for(lambda: gw.server.admission.figures().in_flight == 256)
        assert gate.waiting == 1
        gate.open()
        assert codes(calls) == Counter({grpc.StatusCode.OK: 256})
    finally:
        gate.open()
        gw.stop(grace=0)
    sizes = [len(rows) for rows in gate.runs]
    assert sum(sizes) == 256
    assert max(sizes) == 32, f"the batcher never saw a full batch: {sizes}"


def test_a_request_whose_deadline_passed_while_queued_is_not_run(tmp_path, gate):
    gw = gated_gateway(tmp_path, "max_batch_size = 4\nmax_queue_delay_us = 0\nconcurrent_runs = 1\n")
    try:
        gate.close()
        slow = fire(gw.port, "clf", marked(1), 1)
        assert wait_for(lambda: gate.waiting == 1)
        short = fire(gw.port, "clf", marked(2), 1, timeout=0.5)
        patient = fire(gw.port, "clf", marked(3), 1)
        assert codes(short) == Counter({grpc.StatusCode.DEADLINE_EXCEEDED: 1})
        batcher = gw.repository.get("clf").batcher
        assert wait_for(lambda: batcher.stats().cancelled == 1)
        gate.open()
        assert codes(slow + patient) == Counter({grpc.StatusCode.OK: 2})
    finally:
        gate.open()
        gw.stop(grace=0)
    # the model saw only the requests somebody still waited for
    assert sorted(float(rows[0, 0]) for rows in gate.runs) == [1.0, 3.0]


def test_batched_answers_equal_unbatched_ones(tmp_path):
    repo = tmp_path / "repo"
    for name, config in (("batched", "max_batch_size = 32\nmax_queue_delay_us = 20000\n"),
                         ("alone", "max_batch_size = 0\n")):
        (repo / name / "1").mkdir(parents=True)
        shutil.copyfile(CLOUD_REPO / "inspection" / "1" / "model.onnx", repo / name / "1" / "model.onnx")
        (repo / name / "config.toml").write_text(config)
    images = np.random.default_rng(7).standard_normal((64, 1, 1, 32, 32)).astype(np.float32)
    with Gateway(gateway_config(repo, listen="127.0.0.1:0")) as gw, \
            KServeClient(f"127.0.0.1:{gw.port}") as client:
        batched = [fire(gw.port, "batched", {"image": image}, 1)[0] for image in images]
        alone = np.concatenate([client.infer("alone", {"image": i}).outputs["logits"] for i in images])
        assert codes(batched) == Counter({grpc.StatusCode.OK: 64})
        stats = gw.repository.get("batched").batcher.stats()
    together = np.concatenate([decode_response(f.result()).outputs["logits"] for f in batched])
    assert stats.requests == 64 and stats.batches < 32, f"requests were not merged: {stats}"
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    top2 = np.sort(alone, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3  # rows this close to a tie may flip in the last bit
    assert clear.sum() > 50
    np.testing.assert_array_equal(together.argmax(axis=1)[clear], alone.argmax(axis=1)[clear])
