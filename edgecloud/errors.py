"""One exception tree for edgecloud; each maps onto one gRPC status code (see protocol.servicer)."""

from __future__ import annotations

import sys


class EdgecloudError(Exception):
    """Root of every error edgecloud raises on purpose."""


class InvalidInput(EdgecloudError):
    """A request does not match the model's inputs (name, datatype, shape, byte size)."""


class ModelNotFound(EdgecloudError):
    """No such model, or no such version of it."""


class ModelUnavailable(EdgecloudError):
    """The model exists but cannot answer now (loading, draining, shut down)."""


class ResourceExhausted(EdgecloudError):
    """A size or rate limit was hit."""


class DeadlineExceeded(EdgecloudError):
    """The caller's deadline passed before its call could run."""


class ConfigError(EdgecloudError):
    """Configuration is invalid; the message names the key. Services exit with code 2."""


class ModelLoadError(EdgecloudError):
    """A model file could not be loaded or does not meet its contract."""


class BackendUnavailable(ModelLoadError):
    """The backend's runtime library is not installed on this machine."""


def excerpt(value: object, limit: int = 64) -> str:
    """``repr(value)`` cut to about ``limit`` characters: a client's name or value quoted in an error
    message, so that a megabyte of garbage never travels back in a status message or a log line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} characters)"


def exit_status(prog: str, error: EdgecloudError) -> int:
    """Say ``error`` in one line on stderr and return the command's exit code (docs/design.md §9):
    2 for bad configuration (the message names the key), 1 for any other failure."""
    if isinstance(error, ConfigError):
        print(f"{prog}: configuration error: {error}", file=sys.stderr)
        return 2
    print(f"{prog}: {error}", file=sys.stderr)
    return 1
