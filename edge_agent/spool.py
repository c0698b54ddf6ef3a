"""Cases the cloud did not get in time, kept on disk and replayed with ``edgecloud.deferred=true``.

One file per case, written atomically (temp file, fsync, rename) so a power cut never leaves half a
case; bounded by size (oldest dropped first, counted and logged). The gateway keys its store by
(request_id, row), so a case replayed twice is stored once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from edgecloud.errors import InvalidInput
from edgecloud.protocol.codec import InferRequest, request_from_bytes, request_to_bytes

log = logging.getLogger(__name__)
SUFFIX = ".case"
DEFERRED = "edgecloud.deferred"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Spool:
    """A bounded on-disk FIFO of upstream requests."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.dropped = 0
        self._lock = threading.Lock()
        for stale in self.directory.glob(".*.tmp"):  # left by a crash mid-write
            stale.unlink(missing_ok=True)

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def depth(self) -> int:
        return len(self._files())

    def put(self, request: InferRequest) -> bool:
        """Keep ``request``; False (logged) when the disk refuses it, so a full disk never fails a call."""
        data = request_to_bytes(request)
        name = f"{time.time_ns():020d}-{request.id or 'case'}"[:120] + SUFFIX
        with self._lock:
            try:
                atomic_write(self.directory / name, data)
            except OSError as e:
                self.dropped += 1
                log.error("event=spool_write_failed request_id=%s error=%r", request.id, e)
                return False
            self._trim()
        return True

    def _trim(self) -> None:
        files = self._files()
        sizes = [f.stat().st_size for f in files]
        total = sum(sizes)
        for path, size in zip(files, sizes):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.dropped += 1
            log.warning("event=spool_dropped file=%s reason=over_max_bytes max_bytes=%d", path.name,
                        self.max_bytes)

    def oldest(self) -> tuple[Path, InferRequest] | None:
        """The oldest readable case (a corrupt one is set aside as ``.bad`` and skipped)."""
        for path in self._files():
            try:
                request = request_from_bytes(path.read_bytes())
            except (OSError, InvalidInput) as e:
                log.error("event=spool_corrupt file=%s error=%r", path.name, e)
                path.rename(path.with_suffix(".bad"))
                continue
            return path, replace(request, parameters={**request.parameters, DEFERRED: True})
        return None

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
