"""Cases the cloud did not get in time, kept on disk and replayed with ``edgecloud.deferred=true``.

One file per case, written atomically (temp file, fsync, rename) so a power cut never leaves half a
case; bounded by size (oldest dropped first, counted and logged). The gateway keys its store by
(request_id, row), so a case replayed twice is stored once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

from edge_agent.disk_queue import DiskQueue
from edgecloud.errors import InvalidInput
from edgecloud.protocol.codec import InferRequest, request_from_bytes, request_to_bytes
from edgecloud.protocol.parameters import CloudRequest

log = logging.getLogger(__name__)
SUFFIX = ".case"


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
    """A bounded on-disk FIFO of upstream requests, in the order they were kept."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        _adopt_named_cases(Path(directory))
        self._queue = DiskQueue(directory, max_bytes, SUFFIX, "spool")
        self._refused = 0  # cases the disk would not take
        self._lock = threading.Lock()
        self._last = self._queue.highest() or 0

    @property
    def dropped(self) -> int:
        """Cases lost: over the bound, unreadable, or refused by the disk."""
        return self._queue.dropped + self._refused

    def depth(self) -> int:
        return self._queue.depth()

    def put(self, request: InferRequest) -> bool:
        """Keep ``request``; False (logged) when the disk refuses it, so a full disk never fails a call."""
        data = request_to_bytes(request)
        with self._lock:
            self._last = seq = max(time.time_ns(), self._last + 1)  # ordered across restarts too
            try:
                self._queue.put(seq, data)
            except OSError as e:
                self._refused += 1
                log.error("event=spool_write_failed request_id=%s error=%r", request.id, e)
                return False
        return True

    def oldest(self) -> tuple[int, InferRequest] | None:
        """The oldest readable case, marked deferred (one that does not decode is set aside as ``.bad``)."""
        while (item := self._queue.oldest()) is not None:
            seq, data = item
            try:
                request = request_from_bytes(data)
            except InvalidInput as e:
                log.error("event=spool_corrupt seq=%d error=%r", seq, e)
                self._queue.set_aside(seq)
                continue
            return seq, replace(request, parameters={**request.parameters, CloudRequest.DEFERRED: True})
        return None

    def remove(self, seq: int) -> None:
        """Forget a case the cloud took."""
        self._queue.remove(seq)
