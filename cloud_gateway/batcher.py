"""Dynamic batching for one model: requests from many devices are concatenated along dim 0, run once,
and split back, so the cloud model sees batches even when every agent sends a row at a time.

One worker thread per model takes the first waiting request, then gathers more for up to
``max_queue_delay_us`` or until ``max_batch_size`` rows. A request that does not fit (too many rows,
or other non-batch dimensions) starts the next batch. A request larger than ``max_batch_size`` is cut
into chunks of at most that size, which may merge with other requests. The queue is bounded: when it
is full, callers get ResourceExhausted at once instead of waiting behind a backlog.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from edgecloud.errors import EdgecloudError, ModelUnavailable, ResourceExhausted

log = logging.getLogger(__name__)

Tensors = Mapping[str, np.ndarray]
RunFn = Callable[[Tensors], dict[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What the batcher did so far: model runs, requests (chunks) served, and rows."""

    batches: int = 0
    requests: int = 0
    rows: int = 0


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
    """Merges concurrent ``submit`` calls into batches of at most ``max_batch_size`` rows for ``run``."""

    def __init__(self, name: str, run: RunFn, max_batch_size: int, max_queue_delay_us: int,
                 max_queue_size: int) -> None:
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
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def stats(self) -> BatchStats:
        with self._lock:
            return self._stats

    def submit(self, inputs: Tensors) -> dict[str, np.ndarray]:
        """Run ``inputs`` (all with the same dim 0) as part of a batch; blocks until answered."""
        rows = next(iter(inputs.values())).shape[0]
        starts = range(0, max(rows, 1), self.max_batch_size)
        chunks = [_Pending({k: v[s:s + self.max_batch_size] for k, v in inputs.items()},
                           min(self.max_batch_size, rows - s)) for s in starts]
        for chunk in chunks:
            self._enqueue(chunk)
        parts = [chunk.future.result() for chunk in chunks]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

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
        carry: _Pending | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            if first is _STOP:
                break
            batch, carry = self._gather(first)
            self._run_batch(batch)

    def _gather(self, first: _Pending) -> tuple[list[_Pending], object | None]:
        """``first`` plus whatever joins it within the delay; returns the batch and a carried item."""
        batch, rows, key = [first], first.rows, first.shape_key
        deadline = time.monotonic() + self.delay_s
        while rows < self.max_batch_size:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is _STOP or rows + item.rows > self.max_batch_size or item.shape_key != key:
                return batch, item
            batch.append(item)
            rows += item.rows
        return batch, None

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
            self._stats = BatchStats(s.batches + 1, s.requests + len(batch), s.rows + rows)
        offset = 0
        for p in batch:
            p.future.set_result({name: a[offset:offset + p.rows] for name, a in outputs.items()})
            offset += p.rows

    def close(self) -> None:
        """Refuse new requests, answer those already queued, stop the thread; safe to call twice."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)  # after every accepted request: the queue is FIFO
        self._thread.join()
