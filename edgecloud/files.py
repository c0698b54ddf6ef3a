"""Files that survive a crash or a power cut: written whole or not at all, and their sha256.

A write lands through a temp file beside the target (``.<name>.<random>.tmp``, the pattern a reader
of the directory skips and cleans up), fsynced, renamed onto the target, and the directory fsynced,
so after a power cut the target holds the old content or the new one, and the rename itself is kept.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

#: read size when hashing: model files reach the edge budget of 1 GB
_BLOCK_BYTES = 1 << 20
#: what a temp file left by a crash mid-write looks like, for a directory's reader to skip or delete
TEMP_GLOB = ".*.tmp"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's content, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries, so a file created or renamed in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst`` (same directory) and make the rename durable."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextmanager
def atomic_open(path: Path, mode: int = 0o666) -> Iterator[BinaryIO]:
    """A binary file whose content lands on ``path`` whole when the block ends, or not at all when it
    raises (the temp file is removed). ``mode``: permission bits before the umask, from the first byte
    (0o600 for private keys)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes | memoryview, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one (see
    :func:`atomic_open` for ``mode``)."""
    with atomic_open(path, mode) as f:
        f.write(data)
