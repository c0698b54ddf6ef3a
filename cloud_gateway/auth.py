"""Bearer-token authentication: a tokens file maps sha256(token) to a device id, and a server
interceptor refuses calls without a known token before any handler runs.

Only token hashes are kept on disk and in memory, and no token is ever logged. Health checks stay open
so that load balancers and Kubernetes probes, which carry no token, can watch the gateway.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health

from edgecloud.errors import ConfigError
from edgecloud.protocol.servicer import bearer_token

log = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
#: method prefixes callable without a token
OPEN_METHODS = (f"/{health.SERVICE_NAME}/",)


def token_hash(token: str) -> str:
    """What the tokens file holds for ``token``: its sha256, lowercase hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenTable:
    """sha256(token) → device id, read from a tokens file: one ``<sha256 hex> <device id>`` per line,
    ``#`` comments and blank lines allowed. Make a line with
    ``printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1``, a space, and the device id."""

    def __init__(self, devices: dict[str, str]) -> None:
        self._devices = devices

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"auth.tokens_file: cannot read {path}: {e.strerror}") from None
        devices = {}
        for number, text in enumerate(lines, 1):
            entry = text.split("#", 1)[0].strip()
            if not entry:
                continue
            digest, _, device = entry.partition(" ")
            device = device.strip()
            if not _SHA256_HEX.match(digest) or not device:
                raise ConfigError(f"auth.tokens_file: {path}:{number}: expected '<sha256 hex> <device id>'")
            devices[digest] = device
        if not devices:
            raise ConfigError(f"auth.tokens_file: {path} holds no token")
        return cls(devices)

    def device_for(self, token: str) -> str | None:
        """The device a token belongs to, or None for an unknown or empty token."""
        return self._devices.get(token_hash(token)) if token else None


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts with UNAUTHENTICATED."""
    def abort(_request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds: tuple[tuple[str, Callable], ...] = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attribute, make in kinds:
        if getattr(handler, attribute) is not None:
            return make(abort, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    raise TypeError(f"unknown handler kind: {handler!r}")


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call but health checks unless it carries a token of the table."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if self.table.device_for(token) is not None:
            return handler
        reason = "unknown bearer token" if token else "missing bearer token (authorization: Bearer …)"
        log.warning("event=auth_refused method=%s reason=%r", method, reason)
        return _deny(handler, reason)
