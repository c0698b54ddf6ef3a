"""The engine cache: one engine per (ONNX sha256, TensorRT release, device), under the agent's state dir.

An ONNX release serves every device (docs/design.md §6); a Jetson builds its engine while staging and
keeps it here, so a restart or a rollback to a model seen before loads in seconds instead of rebuilding.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

from edgecloud.engine.sidecar import check_compatible, read_sidecar, sidecar_path, tensorrt_release
from edgecloud.errors import ModelLoadError
from edgecloud.files import file_sha256, replace

log = logging.getLogger(__name__)

#: builds ``onnx`` into the engine file ``out`` and writes its sidecar (e.g. builder.build_engine)
BuildFn = Callable[[Path, Path], object]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


class EngineCache:
    """Engines under ``root`` (e.g. ``/var/lib/edge-agent/engines``), named by their key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def path_for(self, onnx_sha256: str, trt_version: str, device: str) -> Path:
        """Where the engine for this key lives (whether or not it exists yet)."""
        release = tensorrt_release(trt_version)
        return self.root / f"{onnx_sha256[:16]}-trt{release}-{_slug(device)}.plan"

    def lookup(self, onnx_sha256: str, trt_version: str, device: str) -> Path | None:
        """The cached engine for this key, if present with a sidecar that confirms the key."""
        path = self.path_for(onnx_sha256, trt_version, device)
        if not path.is_file():
            return None
        try:
            sidecar = read_sidecar(path)
            check_compatible(sidecar, trt_version, device, path)
        except ModelLoadError as e:
            log.warning("event=engine_cache_stale path=%s reason=%r", path, str(e))
            return None
        if sidecar.onnx_sha256 != onnx_sha256:
            log.warning("event=engine_cache_stale path=%s reason=onnx_sha256_differs", path)
            return None
        return path

    def get_or_build(self, onnx: Path, trt_version: str, device: str, build: BuildFn) -> Path:
        """The engine for ``onnx`` on this TensorRT and device: from the cache, else built and cached."""
        digest = file_sha256(onnx)
        with self._lock:
            cached = self.lookup(digest, trt_version, device)
            if cached:
                log.info("event=engine_cache_hit onnx=%s engine=%s", onnx, cached)
                return cached
            path = self.path_for(digest, trt_version, device)
            self.root.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(path.name + ".building")
            log.info("event=engine_cache_miss onnx=%s engine=%s", onnx, path)
            build(Path(onnx), staging)
            built = read_sidecar(staging)
            if built.onnx_sha256 != digest:
                raise ModelLoadError(f"engine built from {onnx} records ONNX sha256 {built.onnx_sha256}, "
                                     f"expected {digest}")
            check_compatible(built, trt_version, device, staging)
            replace(sidecar_path(staging), sidecar_path(path))
            replace(staging, path)
            return path

    def prune(self, keep: int = 2) -> list[Path]:
        """Delete all but the ``keep`` most recently used engines; returns what was deleted."""
        with self._lock:
            engines = sorted(self.root.glob("*.plan"), key=lambda p: p.stat().st_mtime, reverse=True)
            removed = engines[keep:]
            for engine in removed:
                engine.unlink(missing_ok=True)
                sidecar_path(engine).unlink(missing_ok=True)
                log.info("event=engine_cache_pruned engine=%s", engine)
            return removed
