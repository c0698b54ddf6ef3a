"""A bounded on-disk FIFO of records that survives restarts and power cuts.

It keeps one file per record, named by its sequence number, so the directory is the queue (each file
is written atomically). Beyond ``max_bytes`` the oldest records are deleted, counted in ``dropped``
and logged. The spool (cases for the cloud) and the telemetry buffer are both one of these.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from edgecloud.files import TEMP_GLOB, atomic_write

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".bad"


class DiskQueue:
    """Records (bytes) by increasing sequence number, oldest first; ``name`` prefixes the log events."""

    def __init__(self, directory: Path, max_bytes: int, suffix: str, name: str) -> None:
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
        for path in sorted(self.directory.glob(f"*{suffix}")):
            if path.stem.isdigit():
                self._sizes[int(path.stem)] = path.stat().st_size
        self._bytes = sum(self._sizes.values())
        self._trim()

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:020d}{self.suffix}"

    def depth(self) -> int:
        with self._lock:
            return len(self._sizes)

    def highest(self) -> int | None:
        with self._lock:
            return next(reversed(self._sizes), None)

    def put(self, seq: int, data: bytes) -> None:
        """Keep a record (crash-safe), then trim to the bound; OSError when the disk refuses it."""
        atomic_write(self._path(seq), data)
        with self._lock:
            self._sizes[seq] = len(data)
            self._bytes += len(data)
        self._trim()

    def _trim(self) -> None:
        with self._lock:
            while self._bytes > self.max_bytes and self._sizes:
                seq = next(iter(self._sizes))
                self._forget(seq)
                self.dropped += 1
                log.warning("event=%s_dropped seq=%d reason=over_max_bytes max_bytes=%d", self.name, seq,
                            self.max_bytes)

    def _forget(self, seq: int) -> None:
        self._bytes -= self._sizes.pop(seq)
        self._path(seq).unlink(missing_ok=True)

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
                    self._forget(seq)
                    self.dropped += 1

    def remove(self, seq: int, *, dropped: bool = False) -> None:
        """Forget a record: done with, or ``dropped`` (counted) when it can never be used."""
        with self._lock:
            if seq in self._sizes:
                self._forget(seq)
                self.dropped += dropped

    def set_aside(self, seq: int) -> None:
        """Move a record that cannot be decoded out of the queue (``.bad``, kept for a look), counted."""
        with self._lock:
            if seq in self._sizes:
                self._bytes -= self._sizes.pop(seq)
                path = self._path(seq)
                path.rename(path.with_suffix(CORRUPT_SUFFIX))
                self.dropped += 1
