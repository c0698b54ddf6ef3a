"""The KServe v2 gRPC servicer both services use: decode, call the host, encode, map errors.

The host (the edge agent's cascade or the gateway's repository) never sees protobuf; this module and
the codec are the only places that do.
"""

from __future__ import annotations

import logging
from typing import Protocol

import grpc

from edgecloud import errors
from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud._generated.inference import grpc_service_pb2_grpc as pb_grpc
from edgecloud.protocol.codec import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    decode_request,
    encode_response,
    metadata_to_pb,
)

log = logging.getLogger(__name__)

#: error class → gRPC status; the first match in order wins (subclasses first).
STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.ModelUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.EdgecloudError, grpc.StatusCode.INTERNAL),
)


class InferenceHost(Protocol):
    """What a service implements to be served over KServe v2."""

    server_name: str
    server_version: str

    def is_live(self) -> bool: ...
    def is_ready(self) -> bool: ...
    def model_ready(self, name: str, version: str) -> bool: ...
    def model_metadata(self, name: str, version: str) -> ModelMetadata: ...
    def infer(self, request: InferRequest, peer: PeerInfo) -> InferResponse: ...


class PeerInfo:
    """Who is calling: the gRPC peer and, with mutual TLS, the client certificate's common name.

    Read from the call's context only when a host asks (the gateway, to prove a device id): the
    agent never does, so its calls pay for no auth context or metadata walk.
    """

    __slots__ = ("_context",)

    def __init__(self, context: grpc.ServicerContext | None = None) -> None:
        self._context = context

    @property
    def peer(self) -> str:
        return (self._context.peer() or "") if self._context else ""

    @property
    def common_name(self) -> str:
        auth = (self._context.auth_context() or {}) if self._context else {}
        names = auth.get("x509_common_name") or []
        return names[0].decode("utf-8", "replace") if names else ""

    @property
    def bearer_token(self) -> str:
        return bearer_token(self._context.invocation_metadata()) if self._context else ""


def bearer_token(metadata) -> str:
    """The token of an ``authorization: Bearer …`` entry in gRPC metadata, or ''."""
    for key, value in metadata or ():
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:]
    return ""


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            context.abort(code, str(exc))
    log.exception("event=internal_error error=%r", exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin gRPC front for an InferenceHost."""

    EXTENSIONS = ("classification", "model_configuration")

    def __init__(self, host: InferenceHost) -> None:
        self.host = host

    def ServerLive(self, request, context):  # noqa: N802 - gRPC method names
        return pb.ServerLiveResponse(live=self.host.is_live())

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.host.is_ready())

    def ModelReady(self, request, context):  # noqa: N802
        try:
            return pb.ModelReadyResponse(ready=self.host.model_ready(request.name, request.version))
        except Exception as e:
            _abort(context, e)

    def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name=self.host.server_name, version=self.host.server_version,
                                         extensions=list(self.EXTENSIONS))

    def ModelMetadata(self, request, context):  # noqa: N802
        try:
            meta = self.host.model_metadata(request.name, request.version)
        except Exception as e:
            _abort(context, e)
        return metadata_to_pb(meta)

    def ModelInfer(self, request, context):  # noqa: N802
        try:
            response = self.host.infer(decode_request(request), PeerInfo(context))
            return encode_response(response)
        except Exception as e:
            _abort(context, e)
