"""A bounded on-disk FIFO of records that survives restarts and power cuts.

It keeps one file per record, named by its sequence number, so the directory is the queue (each file
is written atomically). A record may hold several items (the spool writes a batch of cases as one
record, for one fsync per batch); ``items()`` and ``dropped`` count items. Beyond ``max_bytes`` the
oldest records are deleted, their items counted in ``dropped`` and logged. The spool (cases for the
cloud) and the telemetry buffer (one message per record) are both one of these.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from edgecloud.files import TEMP_GLOB, atomic_write

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".bad"


class DiskQueue:
    """Records (bytes) by increasing sequence number, oldest first; ``name`` prefixes the log events;
    ``count_items`` reads how many items a record file holds when the queue is opened (default: one)."""

    def __init__(self, directory: Path, max_bytes: int, suffix: str, name: str,
                 count_items: Callable[[Path], int] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.suffix = suffix
        self.name = name
        self.dropped = 0
        self._lock = threading.Lock()
        for stale in self.directory.glob(TEMP_GLOB):  # left by a crash mid-write
            stale.unlink(missing_ok=True)
        self._sizes: dict[int, int] = {}  # seq → bytes, oldest first
        self._items: dict[int, int] = {}  # seq → items not yet consumed
        for path in sorted(self.directory.glob(f"*{suffix}")):
            if path.stem.isdigit():
                self._sizes[int(path.stem)] = path.stat().st_size
                self._items[int(path.stem)] = count_items(path) if count_items else 1
        self._bytes = sum(self._sizes.values())
        self._item_count = sum(self._items.values())
        self._trim()

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:020d}{self.suffix}"

    def depth(self) -> int:
        """Records in the queue."""
        with self._lock:
            return len(self._sizes)

    def items(self) -> int:
        """Items in the queue's records, not yet consumed."""
        with self._lock:
            return self._item_count

    def highest(self) -> int | None:
        with self._lock:
            return next(reversed(self._sizes), None)

    def put(self, seq: int, data: bytes) -> None:
        """Keep a record (crash-safe), then trim to the bound; OSError when the disk refuses it."""
        self.write(seq, data)
        self.add(seq, len(data))

    def write(self, seq: int, data: bytes) -> None:
        """The slow half of ``put``: the record's file, on disk (crash-safe) but not yet in the queue."""
        atomic_write(self._path(seq), data)

    def add(self, seq: int, size: int, items: int = 1) -> None:
        """The quick half of ``put``: a written record of ``size`` bytes and ``items`` items joins the
        queue, which is trimmed to the bound (the spool does it under its own lock, so that a case is
        never counted both waiting and kept)."""
        with self._lock:
            self._sizes[seq] = size
            self._items[seq] = items
            self._bytes += size
            self._item_count += items
        self._trim()

    def _trim(self) -> None:
        with self._lock:
            while self._bytes > self.max_bytes and self._sizes:
                seq = next(iter(self._sizes))
                self.dropped += self._forget(seq)
                log.warning("event=%s_dropped seq=%d reason=over_max_bytes max_bytes=%d", self.name, seq,
                            self.max_bytes)

    def _forget(self, seq: int) -> int:
        """Delete a record; returns how many of its items were not yet consumed."""
        self._bytes -= self._sizes.pop(seq)
        self._path(seq).unlink(missing_ok=True)
        items = self._items.pop(seq)
        self._item_count -= items
        return items

    def oldest(self) -> tuple[int, bytes] | None:
        """The oldest readable record (an unreadable one is dropped, counted and logged)."""
        while True:
            with self._lock:
                seq = next(iter(self._sizes), None)
                if seq is None:
                    return None
                try:
                    return seq, self._path(seq).read_bytes()
                except OSError as e:
                    log.error("event=%s_unreadable seq=%d error=%r", self.name, seq, str(e))
                    self.dropped += self._forget(seq)

    def remove(self, seq: int, *, dropped: bool = False) -> None:
        """Forget a record: done with, or ``dropped`` (its items counted) when it can never be used."""
        with self._lock:
            if seq in self._sizes:
                items = self._forget(seq)
                self.dropped += items if dropped else 0

    def consume(self, seq: int) -> None:
        """One item of a record is done with; the record goes with its last."""
        with self._lock:
            if seq not in self._items:
                return
            self._items[seq] -= 1
            self._item_count -= 1
            if self._items[seq] <= 0:
                self._forget(seq)

    def set_aside(self, seq: int) -> None:
        """Move a record that cannot be decoded out of the queue (``.bad``, kept for a look), counted."""
        with self._lock:
            if seq in self._sizes:
                self._bytes -= self._sizes.pop(seq)
                path = self._path(seq)
                path.rename(path.with_suffix(CORRUPT_SUFFIX))
                items = self._items.pop(seq)
                self._item_count -= items
                self.dropped += items
