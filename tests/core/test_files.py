"""Crash-safe writes (the file and its directory fsynced, nothing left half-written) and file hashes."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from edgecloud import files
from edgecloud.files import TEMP_GLOB, atomic_open, atomic_write, file_sha256


def test_sha256_of_a_file_spanning_several_blocks(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    (tmp_path / "m.onnx").write_bytes(data)
    assert file_sha256(tmp_path / "m.onnx") == hashlib.sha256(data).hexdigest()


def test_atomic_write_fsyncs_the_file_and_then_its_directory(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []  # one entry per fsync: was it a directory?
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and synced == [False, True]
    assert not list(tmp_path.glob(TEMP_GLOB))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "card.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write(b"half")
        raise RuntimeError("cut")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["card.json"]


def test_mode_holds_also_over_a_file_with_wider_permissions(tmp_path: Path) -> None:
    key = tmp_path / "release.key"
    key.write_bytes(b"old")
    key.chmod(0o644)
    atomic_write(key, b"secret", mode=0o600)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_bytes() == b"secret"
