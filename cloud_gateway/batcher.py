"""Dynamic batching for one model (docs/design.md §5): requests from many devices are concatenated
along dim 0, run once, and split back, so the cloud model sees batches even when every agent sends a
row at a time.

A dispatcher thread per model takes the first waiting request, then gathers more for up to
``max_queue_delay_us`` or until ``max_batch_size`` rows. A request that does not fit (too many rows,
or other non-batch dimensions) starts the next batch. A request larger than ``max_batch_size`` is cut
into chunks of at most that size, which may merge with other requests. Up to ``concurrent_runs``
batches run at once, so the next batch is gathered and run while one is in flight (a ``remote``
backend's calls overlap); while every run is busy, requests wait in the queue and the next batch is
fuller. The queue is bounded: when it is full, callers get ResourceExhausted at once instead of
waiting behind a backlog.

``submit`` answers with a future. A future cancelled before its batch is gathered is never run: the
gateway cancels it when the caller's gRPC deadline passes or the caller gives up, so the model spends
no time on answers nobody waits for.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
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
    future: Future = field(default_factory=Future)

    @property
    def shape_key(self) -> tuple:
        """Requests merge only when every input agrees beyond dim 0."""
        return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(self.inputs.items()))


_STOP = object()


class Batcher:
    """Merges concurrent ``submit`` calls into batches of at most ``max_batch_size`` rows for ``run``,
    with up to ``concurrent_runs`` batches in flight."""

    def __init__(self, name: str, run: RunFn, max_batch_size: int, max_queue_delay_us: int,
                 max_queue_size: int, concurrent_runs: int = 1) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_us / 1e6
        self._run = run
        self._queue: queue.Queue = queue.Queue(max_queue_size)
        self._stats = BatchStats()
        self._lock = threading.Lock()  # guards the stats
        self._gate = threading.Lock()  # orders submissions before the stop marker
        self._closed = False
        self._slots = threading.Semaphore(concurrent_runs)
        self._runs = ThreadPoolExecutor(concurrent_runs, thread_name_prefix=f"batch-{name}")
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def stats(self) -> BatchStats:
        with self._lock:
            return self._stats

    def submit(self, inputs: Tensors) -> Future:
        """Queue ``inputs`` (all with the same dim 0) for a batch; the future holds their outputs."""
        rows = next(iter(inputs.values())).shape[0]
        starts = range(0, max(rows, 1), self.max_batch_size)
        chunks = [_Pending({k: v[s:s + self.max_batch_size] for k, v in inputs.items()},
                           min(self.max_batch_size, rows - s)) for s in starts]
        for n, chunk in enumerate(chunks):
            try:
                self._enqueue(chunk)
            except EdgecloudError:
                for queued in chunks[:n]:
                    queued.future.cancel()
                raise
        for chunk in chunks:
            chunk.future.add_done_callback(self._count_cancelled)
        return chunks[0].future if len(chunks) == 1 else _joined(chunks)

    def _enqueue(self, pending: _Pending) -> None:
        with self._gate:
            if self._closed:
                raise ModelUnavailable(f"model {self.name!r} is shutting down")
            try:
                self._queue.put_nowait(pending)
            except queue.Full:
                raise ResourceExhausted(f"model {self.name!r}: queue full ({self._queue.maxsize} "
                                        "requests waiting); retry later") from None

    def _work(self) -> None:
        carry: object | None = None
        while True:
            self._slots.acquire()  # a free run first: while all are busy, requests keep queueing
            batch, carry = self._gather(carry)
            if batch is None:
                break
            self._runs.submit(self._run_batch, batch).add_done_callback(lambda _: self._slots.release())
        self._runs.shutdown()

    def _gather(self, carry: object | None) -> tuple[list[_Pending] | None, object | None]:
        """The first live request (``carry`` or the next queued) and whatever joins it within the
        delay; returns the batch (None once stopped) and a request carried to the next batch."""
        first = carry
        while True:
            if first is None:
                first = self._queue.get()
            if first is _STOP:
                return None, None
            if self._claim(first):
                break
            first = None
        batch, rows, key = [first], first.rows, first.shape_key
        deadline = time.monotonic() + self.delay_s
        while rows < self.max_batch_size:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is _STOP or rows + item.rows > self.max_batch_size or item.shape_key != key:
                return batch, item
            if self._claim(item):
                batch.append(item)
                rows += item.rows
        return batch, None

    @staticmethod
    def _claim(pending: _Pending) -> bool:
        """Take ``pending`` into a batch unless its caller cancelled it; from now on it runs."""
        return pending.future.set_running_or_notify_cancel()

    def _count_cancelled(self, future: Future) -> None:
        if future.cancelled():
            with self._lock:
                s = self._stats
                self._stats = BatchStats(s.batches, s.requests, s.rows, s.cancelled + 1)

    def _run_batch(self, batch: list[_Pending]) -> None:
        rows = sum(p.rows for p in batch)
        try:
            merged = batch[0].inputs if len(batch) == 1 else {
                name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
            outputs = self._run(merged)
            bad = [name for name, a in outputs.items() if a.ndim == 0 or a.shape[0] != rows]
            if bad:
                raise EdgecloudError(f"model {self.name!r}: output {bad[0]!r} does not have one row per "
                                     f"input row ({rows}); set max_batch_size = 0 in its config.toml")
        except Exception as e:
            for p in batch:
                p.future.set_exception(e)
            return
        with self._lock:  # before any caller is answered, so its stats are never behind
            s = self._stats
            self._stats = BatchStats(s.batches + 1, s.requests + len(batch), s.rows + rows, s.cancelled)
        offset = 0
        for p in batch:
            p.future.set_result({name: a[offset:offset + p.rows] for name, a in outputs.items()})
            offset += p.rows

    def close(self) -> None:
        """Refuse new requests, answer those already queued, stop the threads; safe to call twice."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)  # after every accepted request: the queue is FIFO
        self._thread.join()


def _joined(chunks: list[_Pending]) -> Future:
    """One future for a request cut into chunks: their outputs concatenated, or the first error;
    cancelling it cancels the chunks not yet taken into a batch."""
    joined: Future = Future()
    left = [len(chunks)]
    lock = threading.Lock()

    def cancel_chunks(done: Future) -> None:
        if done.cancelled():
            for chunk in chunks:
                chunk.future.cancel()

    def chunk_done(_done: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        if not joined.set_running_or_notify_cancel():
            return
        errors = [c.future.exception() for c in chunks if c.future.exception() is not None]
        if errors:
            joined.set_exception(errors[0])
            return
        parts = [c.future.result() for c in chunks]
        joined.set_result({name: np.concatenate([p[name] for p in parts]) for name in parts[0]})

    joined.add_done_callback(cancel_chunks)
    for chunk in chunks:
        chunk.future.add_done_callback(chunk_done)
    return joined
