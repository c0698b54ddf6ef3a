"""Backend registry: an explicit table, imported lazily so a missing runtime never breaks start-up."""

from __future__ import annotations

import importlib
from pathlib import Path

from edgecloud.backends.base import Backend
from edgecloud.errors import ModelLoadError

#: backend key → "module:Class"
REGISTRY: dict[str, str] = {
    "onnxruntime": "edgecloud.backends.ort_session:OrtBackend",
    "tensorrt": "edgecloud.backends.trt_engine:TrtBackend",
    "remote": "edgecloud.backends.remote:RemoteBackend",
}
#: file suffix → backend key
BY_SUFFIX: dict[str, str] = {".onnx": "onnxruntime", ".plan": "tensorrt", ".engine": "tensorrt"}


def backend_class(key: str) -> type[Backend]:
    """The Backend class registered under ``key``, or a user's own named ``package.module:Class``."""
    target = REGISTRY.get(key, key)
    module, sep, cls = target.partition(":")
    if not sep:
        raise ModelLoadError(f"unknown backend {key!r}; known: {sorted(REGISTRY)} or package.module:Class")
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"backend {key!r} cannot be imported: {e}") from e
    if not (isinstance(found, type) and issubclass(found, Backend)):
        raise ModelLoadError(f"backend {key!r} is not a subclass of edgecloud.backends.base.Backend")
    return found


def backend_key_for(path: Path, explicit: str | None = None) -> str:
    """Which backend serves ``path``: ``explicit`` if given, else chosen by the file suffix."""
    if explicit:
        return explicit
    try:
        return BY_SUFFIX[Path(path).suffix.lower()]
    except KeyError:
        raise ModelLoadError(f"{path}: no backend for suffix {Path(path).suffix!r}; "
                             f"known: {sorted(BY_SUFFIX)}") from None


def open_backend(path: Path, key: str | None = None, config: object | None = None) -> Backend:
    """Create and load the backend for ``path``; the caller owns ``close()``."""
    cls = backend_class(backend_key_for(path, key))
    backend = cls(config) if config is not None else cls()
    backend.load(Path(path))
    return backend
