"""The KServe v2 gRPC servicer both services use: admit, decode, call the host, encode, map errors.

The host (the edge agent's cascade or the gateway's repository) never sees protobuf; this module and
the codec are the only places that do. :class:`AsyncKServeServicer` is the same front for a host whose
``infer`` is a coroutine, served by grpc.aio, so a call waiting on a batch holds no thread.
"""

from __future__ import annotations

import logging
from typing import Protocol

import grpc

from edgecloud import errors
from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud._generated.inference import grpc_service_pb2_grpc as pb_grpc
from edgecloud.guards import InputContract
from edgecloud.protocol.admission import Admission
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
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.EdgecloudError, grpc.StatusCode.INTERNAL),
)


class ServedHost(Protocol):
    """What a service answers besides inference."""

    server_name: str
    server_version: str

    def is_live(self) -> bool: ...
    def is_ready(self) -> bool: ...
    def model_ready(self, name: str, version: str) -> bool: ...
    def model_metadata(self, name: str, version: str) -> ModelMetadata: ...

    def input_contract(self, name: str, version: str) -> InputContract: ...


class InferenceHost(ServedHost, Protocol):
    """What a service implements to be served over KServe v2."""

    def infer(self, request: InferRequest, peer: PeerInfo) -> InferResponse: ...


class AsyncInferenceHost(ServedHost, Protocol):
    """The same, with ``infer`` a coroutine (served by :class:`AsyncKServeServicer`)."""

    async def infer(self, request: InferRequest, peer: PeerInfo) -> InferResponse: ...


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


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status STATUS_OF gives ``exc``, logged in one line: at INFO for a client's mistake or a
    passing condition, at ERROR for INTERNAL. Anything unmapped is our own bug: logged with its
    traceback, and INTERNAL."""
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            level = logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.INFO
            log.log(level, "event=call_refused code=%s error=%r", code.name, str(exc))
            return code, str(exc)
    log.exception("event=internal_error error=%r", exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    context.abort(*_status(exc))


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin gRPC front for an InferenceHost."""

    EXTENSIONS = ("classification", "model_configuration")

    def __init__(self, host: InferenceHost, admission: Admission) -> None:
        self.host = host
        self.admission = admission

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
            with self.admission.admitted(context.time_remaining()):
                contract = self.host.input_contract(request.model_name, request.model_version)
                response = self.host.infer(decode_request(request, contract), PeerInfo(context))
                return encode_response(response)
        except Exception as e:
            _abort(context, e)


class AsyncKServeServicer(KServeServicer):
    """The servicer for grpc.aio: ModelInfer awaits the host; the other methods are quick and run as
    they are, on the server's thread pool."""

    host: AsyncInferenceHost

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            async with self.admission.admitted_async():
                contract = self.host.input_contract(request.model_name, request.model_version)
                response = await self.host.infer(decode_request(request, contract), PeerInfo(context))
                return encode_response(response)
        except Exception as e:
            await context.abort(*_status(e))
