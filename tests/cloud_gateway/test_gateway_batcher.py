"""The dynamic batcher without gRPC: concurrent requests merge into one model run and every caller
gets its own rows back; oversized requests are chunked; the queue is bounded; batches overlap up to
``concurrent_runs``; a cancelled request is never run."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cloud_gateway.batcher import Batcher
from edgecloud.errors import ModelUnavailable, ResourceExhausted
from tests.support.net import wait_for


class CountingModel:
    """y = 3x + 1 per row, recording the batch size and the first column of every run; ``gate`` can
    hold runs back, ``entered`` counts the runs started."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.seen: list[float] = []
        self.entered = 0
        self._lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs):
        with self._lock:
            self.entered += 1
        self.gate.wait(10)
        with self._lock:
            self.batch_sizes.append(inputs["x"].shape[0])
            self.seen.extend(inputs["x"][:, 0].tolist())
        return {"y": inputs["x"] * 3 + 1, "rowsum": inputs["x"].sum(axis=1)}


def request(caller: int, rows: int) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 2), caller, dtype=np.float32) + np.arange(rows, dtype=np.float32)[:, None]}


def test_concurrent_callers_are_merged_and_get_their_own_rows():
    model = CountingModel()
    batcher = Batcher("m", model, max_batch_size=64, max_queue_delay_us=200_000, max_queue_size=64)
    callers = 12
    start = threading.Barrier(callers)

    def call(caller: int):
        x = request(caller, 1 + caller % 3)
        start.wait()
        return x, batcher.submit(x).result(10)

    try:
        with ThreadPoolExecutor(callers) as pool:
            results = list(pool.map(call, range(callers)))
    finally:
        batcher.close()
    for x, out in results:
        np.testing.assert_array_equal(out["y"], x["x"] * 3 + 1)
        np.testing.assert_array_equal(out["rowsum"], x["x"].sum(axis=1))
    total = sum(x["x"].shape[0] for x, _ in results)
    assert sum(model.batch_sizes) == total
    assert len(model.batch_sizes) < callers / 2, f"calls were not merged: {model.batch_sizes}"
    assert batcher.stats().batches == len(model.batch_sizes) and batcher.stats().requests == callers


def test_batches_never_exceed_max_batch_size_and_big_requests_are_chunked():
    model = CountingModel()
    batcher = Batcher("m", model, max_batch_size=4, max_queue_delay_us=50_000, max_queue_size=64)
    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda c: (c, batcher.submit(request(c, 3 if c else 11)).result(10)),
                                    range(6)))
    finally:
        batcher.close()
    for caller, out in results:
        np.testing.assert_array_equal(out["y"], request(caller, 3 if caller else 11)["x"] * 3 + 1)
    assert max(model.batch_sizes) <= 4
    assert sum(model.batch_sizes) == 11 + 5 * 3


def test_requests_with_other_inner_shapes_are_not_merged():
    model = CountingModel()
    batcher = Batcher("m", model, max_batch_size=16, max_queue_delay_us=100_000, max_queue_size=8)
    wide = {"x": np.ones((2, 5), dtype=np.float32)}
    try:
        narrow, other = batcher.submit(request(1, 2)), batcher.submit(wide)
        narrow_out, wide_out = narrow.result(10), other.result(10)
    finally:
        batcher.close()
    assert wide_out["y"].shape == (2, 5) and narrow_out["y"].shape == (2, 2)
    assert sorted(model.batch_sizes) == [2, 2]


def test_full_queue_is_refused_and_model_errors_reach_every_caller():
    model = CountingModel()
    model.gate.clear()  # the first run blocks, so requests pile up
    batcher = Batcher("m", model, max_batch_size=1, max_queue_delay_us=0, max_queue_size=2)
    try:
        running = batcher.submit(request(0, 1))
        assert wait_for(batcher._queue.empty)  # taken by the worker, blocked in the model
        queued = [batcher.submit(request(c, 1)) for c in (1, 2)]
        assert wait_for(batcher._queue.full)
        with pytest.raises(ResourceExhausted, match="queue full"):
            batcher.submit(request(3, 1))
        model.gate.set()
        assert running.result(5)["y"].shape == (1, 2)
        assert [f.result(5)["y"][0, 0] for f in queued] == [4.0, 7.0]
    finally:
        model.gate.set()
        batcher.close()

    def broken(inputs):
        raise RuntimeError("model exploded")

    failing = Batcher("b", broken, max_batch_size=8, max_queue_delay_us=50_000, max_queue_size=8)
    try:
        futures = [failing.submit(request(c, 1)) for c in range(3)]
        for f in futures:
            with pytest.raises(RuntimeError, match="exploded"):
                f.result(5)
    finally:
        failing.close()
    with pytest.raises(ModelUnavailable):
        failing.submit(request(0, 1))


def test_batches_overlap_up_to_concurrent_runs():
    model = CountingModel()
    model.gate.clear()
    batcher = Batcher("m", model, max_batch_size=1, max_queue_delay_us=0, max_queue_size=8, concurrent_runs=2)
    try:
        futures = [batcher.submit(request(c, 1)) for c in range(3)]
        assert wait_for(lambda: model.entered == 2)  # the second batch runs while the first is in flight
        assert batcher._queue.qsize() == 1  # the third waits for a free run
        model.gate.set()
        assert [f.result(5)["y"][0, 0] for f in futures] == [1.0, 4.0, 7.0]
    finally:
        model.gate.set()
        batcher.close()


def test_a_request_cancelled_before_its_batch_is_never_run():
    model = CountingModel()
    model.gate.clear()
    batcher = Batcher("m", model, max_batch_size=1, max_queue_delay_us=0, max_queue_size=8)
    try:
        running = batcher.submit(request(10, 1))
        assert wait_for(lambda: model.entered == 1)
        gone, kept, chunked = batcher.submit(request(20, 1)), batcher.submit(request(30, 1)), \
            batcher.submit(request(40, 3))
        assert gone.cancel() and chunked.cancel()
        assert batcher.stats().cancelled == 1 + 3  # the three chunks of the big request too
        model.gate.set()
        assert running.result(5)["y"][0, 0] == 31.0 and kept.result(5)["y"][0, 0] == 91.0
    finally:
        model.gate.set()
        batcher.close()
    assert model.seen == [10.0, 30.0]
    assert batcher.stats().requests == 2
