"""The dynamic batcher without gRPC, on an event loop as in the gateway: concurrent requests merge into
one model run and every caller gets its own rows back; oversized requests are chunked; the queue is
bounded; batches overlap up to ``concurrent_runs``; a cancelled request is never run."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cloud_gateway.batcher import Batcher
from edgecloud.errors import ModelUnavailable, ResourceExhausted


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


async def until(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` without blocking the loop, as ``wait_for`` does for threads."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return bool(predicate())


def test_concurrent_callers_are_merged_and_get_their_own_rows():
    model = CountingModel()
    batcher = Batcher("m", model, max_batch_size=64, max_queue_delay_us=200_000, max_queue_size=64)
    inputs = [request(caller, 1 + caller % 3) for caller in range(12)]

    async def scenario():
        return await asyncio.gather(*(batcher.run(x) for x in inputs))

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.close()
    for x, out in zip(inputs, results):
        np.testing.assert_array_equal(out["y"], x["x"] * 3 + 1)
        np.testing.assert_array_equal(out["rowsum"], x["x"].sum(axis=1))
    assert sum(model.batch_sizes) == sum(x["x"].shape[0] for x in inputs)
    assert len(model.batch_sizes) < len(inputs) / 2, f"calls were not merged: {model.batch_sizes}"
    assert batcher.stats().batches == len(model.batch_sizes) and batcher.stats().requests == len(inputs)


def test_batches_never_exceed_max_batch_size_and_big_requests_are_chunked():
    model = CountingModel()
    batcher = Batcher("m", model, max_batch_size=4, max_queue_delay_us=50_000, max_queue_size=64)

    async def scenario():
        return await asyncio.gather(*(batcher.run(request(c, 3 if c else 11)) for c in range(6)))

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.close()
    for caller, out in enumerate(results):
        np.testing.assert_array_equal(out["y"], request(caller, 3 if caller else 11)["x"] * 3 + 1)
    assert max(model.batch_sizes) <= 4
    assert sum(model.batch_sizes) == 11 + 5 * 3


def test_requests_with_other_inner_shapes_are_not_merged():
    model = CountingModel()
    batcher = Batcher("m", model, max_batch_size=16, max_queue_delay_us=100_000, max_queue_size=8)
    wide = {"x": np.ones((2, 5), dtype=np.float32)}

    async def scenario():
        return await asyncio.gather(batcher.run(request(1, 2)), batcher.run(wide))

    try:
        narrow_out, wide_out = asyncio.run(scenario())
    finally:
        batcher.close()
    assert wide_out["y"].shape == (2, 5) and narrow_out["y"].shape == (2, 2)
    assert sorted(model.batch_sizes) == [2, 2]


def test_full_queue_is_refused_and_model_errors_reach_every_caller():
    model = CountingModel()
    model.gate.clear()  # the first run blocks, so requests pile up
    batcher = Batcher("m", model, max_batch_size=1, max_queue_delay_us=0, max_queue_size=2)

    async def pile_up():
        running = asyncio.ensure_future(batcher.run(request(0, 1)))
        assert await until(lambda: model.entered == 1)  # taken into a batch, blocked in the model
        queued = [asyncio.ensure_future(batcher.run(request(c, 1))) for c in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="queue full"):
            await batcher.run(request(3, 1))
        model.gate.set()
        assert (await running)["y"].shape == (1, 2)
        assert [(await f)["y"][0, 0] for f in queued] == [4.0, 7.0]

    try:
        asyncio.run(pile_up())
    finally:
        model.gate.set()
        batcher.close()

    def broken(inputs):
        raise RuntimeError("model exploded")

    failing = Batcher("b", broken, max_batch_size=8, max_queue_delay_us=50_000, max_queue_size=8)

    async def fail():
        return await asyncio.gather(*(failing.run(request(c, 1)) for c in range(3)), return_exceptions=True)

    try:
        errors = asyncio.run(fail())
    finally:
        failing.close()
    assert [str(e) for e in errors] == ["model exploded"] * 3
    with pytest.raises(ModelUnavailable):
        asyncio.run(failing.run(request(0, 1)))


def test_batches_overlap_up_to_concurrent_runs():
    model = CountingModel()
    model.gate.clear()
    batcher = Batcher("m", model, max_batch_size=1, max_queue_delay_us=0, max_queue_size=8, concurrent_runs=2)

    async def scenario():
        calls = [asyncio.ensure_future(batcher.run(request(c, 1))) for c in range(3)]
        assert await until(lambda: model.entered == 2)  # the second batch runs while the first is in flight
        await asyncio.sleep(0.05)
        assert model.entered == 2  # the third waits for a free run
        model.gate.set()
        return [(await f)["y"][0, 0] for f in calls]

    try:
        assert asyncio.run(scenario()) == [1.0, 4.0, 7.0]
    finally:
        model.gate.set()
        batcher.close()


def test_a_request_cancelled_before_its_batch_is_never_run():
    model = CountingModel()
    model.gate.clear()
    batcher = Batcher("m", model, max_batch_size=1, max_queue_delay_us=0, max_queue_size=8)

    async def scenario():
        running = asyncio.ensure_future(batcher.run(request(10, 1)))
        assert await until(lambda: model.entered == 1)
        gone, kept, chunked = (asyncio.ensure_future(batcher.run(request(c, rows)))
                               for c, rows in ((20, 1), (30, 1), (40, 3)))
        await asyncio.sleep(0)
        gone.cancel()
        chunked.cancel()
        assert await until(lambda: batcher.stats().cancelled == 1 + 3)  # the big request's three chunks
        model.gate.set()
        assert (await running)["y"][0, 0] == 31.0 and (await kept)["y"][0, 0] == 91.0
        for call in (gone, chunked):
            with pytest.raises(asyncio.CancelledError):
                await call

    try:
        asyncio.run(scenario())
    finally:
        model.gate.set()
        batcher.close()
    assert model.seen == [10.0, 30.0]
    assert batcher.stats().requests == 2
