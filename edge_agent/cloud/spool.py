"""Cases the cloud did not get in time, kept on disk and replayed with ``edgecloud.deferred=true``.

A call never waits for the disk: ``put`` hands the case to a writer thread and returns. The writer
commits what is waiting as one batch, in one file written atomically (temp file, fsync, rename, fsync of
the directory), so a power cut never leaves half a batch and a burst of cases costs one fsync, not one
each. At most ``max_pending`` cases wait in memory; beyond them a case is dropped and counted rather than
held, so a hung disk never holds a call. That bounds what kill -9 (or a power cut) can lose: the cases
still in memory, at most ``max_pending``, in practice those of the commit under way (the writer starts
one as soon as a case arrives). The spool is bounded by size (oldest batches dropped first, counted and
logged). The gateway keys its store by (request_id, row), so a case replayed twice is stored once: after
a restart, a batch whose replay was cut short is replayed whole.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from edge_agent.disk_queue import DiskQueue
from edgecloud.errors import InvalidInput
from edgecloud.protocol.codec import InferRequest, request_from_bytes, request_to_bytes
from edgecloud.protocol.parameters import CloudRequest

log = logging.getLogger(__name__)
SUFFIX = ".case"
#: a batch file: MAGIC, the case count, then each case as its length and its wire bytes (little-endian)
MAGIC = b"ECSPOOL1"
_COUNT = struct.Struct("<I")
#: ``stall_after:<n>``: the writer commits n batches, then stalls as a hung disk would, so crash tests
#: can kill -9 the agent while cases wait in memory; unset in production
FAULT_ENV = "EDGECLOUD_SPOOL_FAULT"

#: a case in the spool: (its batch's sequence number, its index in the batch)
CaseKey = tuple[int, int]


def encode_batch(cases: list[bytes]) -> bytes:
    """One batch file's content."""
    parts = [MAGIC, _COUNT.pack(len(cases))]
    for data in cases:
        parts += [_COUNT.pack(len(data)), data]
    return b"".join(parts)


def decode_batch(data: bytes) -> list[bytes]:
    """The cases of a batch file; a file without the magic is one case, as earlier versions kept them;
    InvalidInput when the framing is broken."""
    if not data.startswith(MAGIC):
        return [data]
    try:
        (count,), offset = _COUNT.unpack_from(data, len(MAGIC)), len(MAGIC) + _COUNT.size
        cases = []
        for _ in range(count):
            (length,) = _COUNT.unpack_from(data, offset)
            offset += _COUNT.size
            if offset + length > len(data):
                raise InvalidInput(f"case {len(cases)} declares {length} bytes, {len(data) - offset} remain")
            cases.append(data[offset:offset + length])
            offset += length
    except struct.error as e:
        raise InvalidInput(f"truncated batch: {e}") from None
    return cases


def _case_count(path: Path) -> int:
    """How many cases a batch file holds, from its header; one for a file of an earlier version, or one
    whose header cannot be right (it is set aside when its turn comes)."""
    header = len(MAGIC) + _COUNT.size
    try:
        with open(path, "rb") as f:
            head, size = f.read(header), os.fstat(f.fileno()).st_size
    except OSError:
        return 1
    if not head.startswith(MAGIC) or len(head) < header:
        return 1
    (count,) = _COUNT.unpack_from(head, len(MAGIC))
    return count if count * _COUNT.size <= size - header else 1


def _adopt_named_cases(directory: Path) -> None:
    """Rename cases kept by earlier versions (``<time_ns>-<request id>.case``) to the queue's
    ``<seq>.case``, so an upgrade replays them instead of leaving them on disk forever."""
    for path in sorted(directory.glob(f"*-*{SUFFIX}")):
        stamp = path.name.split("-", 1)[0]
        target = directory / f"{stamp}{SUFFIX}"
        if stamp.isdigit() and not target.exists():
            path.rename(target)
            log.info("event=spool_case_adopted file=%s", path.name)


class Spool:
    """A bounded on-disk FIFO of upstream requests, in the order they were kept, with its writer thread."""

    def __init__(self, directory: Path, max_bytes: int, max_pending: int = 64) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _adopt_named_cases(directory)
        self._queue = DiskQueue(directory, max_bytes, SUFFIX, "spool", count_items=_case_count)
        self.max_pending = max_pending
        self._refused = 0  # cases the disk would not take, or that found max_pending cases waiting
        self._pending: deque[InferRequest] = deque()  # waiting for the writer, oldest first
        self._changed = threading.Condition()
        self._closing = False
        self._last = self._queue.highest() or 0
        self._head: tuple[int, list[InferRequest], int] | None = None  # (seq, its cases, next) in replay
        self._stall_after = self._fault()
        self._writer = threading.Thread(target=self._write, name="spool-writer", daemon=True)
        self._writer.start()

    @property
    def dropped(self) -> int:
        """Cases lost: over the bound, unreadable, refused by the disk or over ``max_pending``."""
        return self._queue.dropped + self._refused

    def depth(self) -> int:
        """Cases kept: on disk and not yet replayed, or waiting for the writer."""
        with self._changed:
            return self._queue.items() + len(self._pending)

    def put(self, request: InferRequest) -> bool:
        """Hand ``request`` to the writer and return at once; False (logged, counted) when
        ``max_pending`` cases are already waiting or the spool is closed."""
        with self._changed:
            if self._closing or len(self._pending) >= self.max_pending:
                self._refused += 1
                closing = self._closing
            else:
                self._pending.append(request)
                self._changed.notify_all()
                return True
        log.error("event=spool_case_dropped request_id=%s reason=%s max_pending=%d", request.id,
                  "closed" if closing else "writer_behind", self.max_pending)
        return False

    # -- writer thread ------------------------------------------------------------------------------
    def _write(self) -> None:
        commits = 0
        while True:
            if self._stall_after is not None and commits >= self._stall_after:
                log.critical("event=fault_injected step=spool_stall commits=%d", commits)
                threading.Event().wait()
            with self._changed:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if not self._pending:
                    return
                batch = list(self._pending)
            self._commit(batch)
            commits += 1

    def _commit(self, batch: list[InferRequest]) -> None:
        """Write ``batch`` as one file, then move it from waiting to kept in one step."""
        self._last = seq = max(time.time_ns(), self._last + 1)  # ordered across restarts too
        data = encode_batch([request_to_bytes(r) for r in batch])
        try:
            self._queue.write(seq, data)
        except OSError as e:
            log.error("event=spool_write_failed cases=%d request_ids=%s error=%r", len(batch),
                      ",".join(r.id for r in batch), e)
            seq = None
        with self._changed:
            if seq is None:
                self._refused += len(batch)
            else:
                self._queue.add(seq, len(data), items=len(batch))
            for _ in batch:
                self._pending.popleft()
            self._changed.notify_all()

    @staticmethod
    def _fault() -> int | None:
        setting = os.environ.get(FAULT_ENV, "")
        if setting.startswith("stall_after:") and setting.removeprefix("stall_after:").isdigit():
            return int(setting.removeprefix("stall_after:"))
        if setting:
            log.warning("event=fault_unknown %s=%s", FAULT_ENV, setting)
        return None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every case handed over is on disk (or refused); False when ``timeout`` passed."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what waits (for at most ``timeout`` seconds), then stop the writer; safe to call twice."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._writer.join(timeout)

    # -- replay (one reader: the replayer's thread) -------------------------------------------------
    def oldest(self) -> tuple[CaseKey, InferRequest] | None:
        """The oldest case, marked deferred (a batch that does not decode is set aside as ``.bad``,
        kept for a look, its cases counted as dropped)."""
        if self._head is None and not self._read_head():
            return None
        seq, cases, index = self._head
        return (seq, index), cases[index]

    def _read_head(self) -> bool:
        while (item := self._queue.oldest()) is not None:
            seq, data = item
            try:
                cases = [request_from_bytes(case) for case in decode_batch(data)]
            except InvalidInput as e:
                log.error("event=spool_corrupt seq=%d error=%r", seq, e)
                self._queue.set_aside(seq)
                continue
            if not cases:
                self._queue.remove(seq)
                continue
            deferred = [replace(r, parameters={**r.parameters, CloudRequest.DEFERRED: True}) for r in cases]
            self._head = (seq, deferred, 0)
            return True
        return False

    def remove(self, key: CaseKey) -> None:
        """Forget a case the cloud took; its batch goes with its last case."""
        seq, index = key
        if self._head is None or self._head[0] != seq or self._head[2] != index:
            return
        cases = self._head[1]
        self._head = (seq, cases, index + 1) if index + 1 < len(cases) else None
        self._queue.consume(seq)
