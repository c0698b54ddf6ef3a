"""Backend registry: an explicit table key → ``module:Class``; everything else is read from the classes.

Each class declares its suffixes, release format, repository file name and config model (see
:class:`~edgecloud.backends.base.Backend`), and importing one never imports its runtime, so the lookups
below are derived from the table whenever they are asked: a new backend is one module and one line here.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edgecloud.backends.base import Backend
from edgecloud.errors import ModelLoadError

#: backend key → "module:Class", in order of preference where several could serve
REGISTRY: dict[str, str] = {
    "onnxruntime": "edgecloud.backends.ort_session:OrtBackend",
    "tensorrt": "edgecloud.backends.trt_engine:TrtBackend",
    "remote": "edgecloud.backends.remote:RemoteBackend",
}


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


def registered() -> dict[str, type[Backend]]:
    """Every registered backend class by key, in the registry's order."""
    return {key: backend_class(key) for key in REGISTRY}


def backend_key_for(path: Path, explicit: str | None = None) -> str:
    """Which backend serves ``path``: ``explicit`` if given, else chosen by the file suffix."""
    if explicit:
        return explicit
    by_suffix = {suffix: key for key, cls in registered().items() for suffix in cls.suffixes}
    try:
        return by_suffix[Path(path).suffix.lower()]
    except KeyError:
        raise ModelLoadError(f"{path}: no backend for suffix {Path(path).suffix!r}; "
                             f"known: {sorted(by_suffix)}") from None


def release_backends() -> dict[str, type[Backend]]:
    """Release format (``artifact.format``) → the backend that serves its files."""
    return {cls.release_format: cls for cls in registered().values() if cls.release_format is not None}


def repository_files() -> tuple[str, ...]:
    """The model file names a version directory of a Triton-layout repository may hold, preferred first."""
    return tuple(cls.repository_file for cls in registered().values() if cls.repository_file is not None)


def open_backend(path: Path, key: str | None = None, config: object | None = None) -> Backend:
    """Create and load the backend for ``path``; the caller owns ``close()``."""
    cls = backend_class(backend_key_for(path, key))
    backend = cls(config) if config is not None else cls()
    backend.load(Path(path))
    return backend
