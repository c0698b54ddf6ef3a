"""Dynamic batching for one model (docs/design.md §5): requests from many devices are concatenated
along dim 0, run once, and split back, so the cloud model sees batches even when every agent sends a
row at a time.

The batcher lives on the gateway's event loop: a request is a coroutine waiting in a queue, and only
the model runs on threads. A batch starts as soon as ``max_batch_size`` rows wait, or once the oldest
request has waited ``max_queue_delay_us``, whichever comes first; it takes requests in arrival order
while they fit, and a request that does not (too many rows, or other non-batch dimensions) starts the
next batch. A request larger than ``max_batch_size`` is cut into chunks of at most that size, which
may merge with other requests. Up to ``concurrent_runs`` batches run at once, so the next batch is
gathered and run while one is in flight (a ``remote`` backend's calls overlap); while every run is
busy, requests wait and the next batch is fuller. The queue is bounded: when it is full, callers get
ResourceExhausted at once instead of waiting behind a backlog.

A request cancelled before its batch starts is never run: gRPC cancels a call when the caller's
deadline passes or the caller gives up, so the model spends no time on answers nobody waits for.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field

import numpy as np

from edgecloud.errors import EdgecloudError, ModelUnavailable, ResourceExhausted

log = logging.getLogger(__name__)

Tensors = Mapping[str, np.ndarray]
RunFn = Callable[[Tensors], dict[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What the batcher did so far: model runs, requests (chunks) served, rows, and requests dropped
    unrun because their caller had gone."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    cancelled: int = 0


@dataclass(eq=False)
class _Pending:
    inputs: Tensors
    rows: int
    future: asyncio.Future
    due: float  # loop time by which it starts a batch, full or not
    taken: bool = False
    shape_key: tuple = field(init=False)

    def __post_init__(self) -> None:
        # requests merge only when every input agrees beyond dim 0
        self.shape_key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(self.inputs.items()))


class Batcher:
    """Merges concurrent ``run`` calls, made on one event loop, into batches of at most
    ``max_batch_size`` rows for ``run_fn``, with up to ``concurrent_runs`` batches in flight."""

    def __init__(self, name: str, run_fn: RunFn, max_batch_size: int, max_queue_delay_us: int,
                 max_queue_size: int, concurrent_runs: int = 1) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.concurrent_runs = concurrent_runs
        self.delay_s = max_queue_delay_us / 1e6
        self._run_fn = run_fn
        self._waiting: deque[_Pending] = deque()
        self._waiting_rows = 0
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = BatchStats()  # replaced whole on the loop, so a reader on any thread sees one state
        self._closed = False
        self._runs = ThreadPoolExecutor(concurrent_runs, thread_name_prefix=f"batch-{name}")

    def stats(self) -> BatchStats:
        return self._stats

    async def run(self, inputs: Tensors) -> dict[str, np.ndarray]:
        """Outputs for ``inputs`` (all with the same dim 0), computed as part of batches."""
        if self._closed:
            raise ModelUnavailable(f"model {self.name!r} is shutting down")
        rows = next(iter(inputs.values())).shape[0]
        starts = range(0, max(rows, 1), self.max_batch_size)
        if len(self._waiting) + len(starts) > self.max_queue_size:
            raise ResourceExhausted(f"model {self.name!r}: queue full ({self.max_queue_size} requests "
                                    "waiting); retry later")
        loop = self._loop = asyncio.get_running_loop()
        due = loop.time() + self.delay_s
        chunks = [_Pending({k: v[s:s + self.max_batch_size] for k, v in inputs.items()},
                           min(self.max_batch_size, rows - s), loop.create_future(), due) for s in starts]
        for chunk in chunks:
            chunk.future.add_done_callback(lambda f, chunk=chunk: self._count_cancelled(chunk))
            self._waiting.append(chunk)
            self._waiting_rows += chunk.rows
        self._schedule()
        if len(chunks) == 1:
            return await chunks[0].future
        parts = await asyncio.gather(*(chunk.future for chunk in chunks))
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _count_cancelled(self, pending: _Pending) -> None:
        if pending.future.cancelled() and not pending.taken:
            s = self._stats
            self._stats = BatchStats(s.batches, s.requests, s.rows, s.cancelled + 1)

    def _schedule(self) -> None:
        """Start batches while a run is free: at once when a full batch waits, else when the oldest
        request is due."""
        loop = self._loop
        while self._running < self.concurrent_runs and self._drop_cancelled():
            due = self._waiting[0].due
            if self._waiting_rows < self.max_batch_size and loop.time() < due:
                if self._timer is None:
                    self._timer = loop.call_at(due, self._on_timer)
                return
            self._start(self._take_batch())

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()

    def _drop_cancelled(self) -> bool:
        """Forget cancelled requests at the head of the queue; whether any request waits."""
        while self._waiting and self._waiting[0].future.cancelled():
            self._waiting_rows -= self._waiting.popleft().rows
        return bool(self._waiting)

    def _take_batch(self) -> list[_Pending]:
        batch, rows, key = [], 0, self._waiting[0].shape_key
        while self._drop_cancelled():
            head = self._waiting[0]
            if batch and (rows + head.rows > self.max_batch_size or head.shape_key != key):
                break
            self._waiting.popleft()
            self._waiting_rows -= head.rows
            head.taken = True
            batch.append(head)
            rows += head.rows
        return batch

    def _start(self, batch: list[_Pending]) -> None:
        self._running += 1
        done = self._runs.submit(self._execute, [p.inputs for p in batch], sum(p.rows for p in batch))
        done.add_done_callback(lambda f: self._back_on_loop(batch, f))

    def _execute(self, parts: list[Tensors], rows: int) -> dict[str, np.ndarray]:
        """One model run, on a run thread: merge, run, check there is one output row per input row."""
        merged = parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts])
                                                   for name in parts[0]}
        outputs = self._run_fn(merged)
        bad = [name for name, a in outputs.items() if a.ndim == 0 or a.shape[0] != rows]
        if bad:
            raise EdgecloudError(f"model {self.name!r}: output {bad[0]!r} does not have one row per "
                                 f"input row ({rows}); set max_batch_size = 0 in its config.toml")
        return outputs

    def _back_on_loop(self, batch: list[_Pending], done: Future) -> None:
        with suppress(RuntimeError):  # the loop is closed once the server has stopped: nobody waits
            self._loop.call_soon_threadsafe(self._finish, batch, done)

    def _finish(self, batch: list[_Pending], done: Future) -> None:
        """Back on the loop: answer every caller still waiting, then start what waits next."""
        self._running -= 1
        error = done.exception()
        if error is not None:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
        else:
            s = self._stats  # before any caller is answered, so its stats are never behind
            self._stats = BatchStats(s.batches + 1, s.requests + len(batch),
                                     s.rows + sum(p.rows for p in batch), s.cancelled)
            outputs, offset = done.result(), 0
            for p in batch:
                if not p.future.done():  # not when its caller gave up while the batch ran
                    p.future.set_result({name: a[offset:offset + p.rows] for name, a in outputs.items()})
                offset += p.rows
        self._schedule()

    def close(self) -> None:
        """Refuse new requests and wait for the batches in flight; safe to call twice."""
        self._closed = True
        self._runs.shutdown()
