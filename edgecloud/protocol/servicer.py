"""The KServe v2 gRPC servicer both services use: admit, decode, call the host, encode, map errors.

The host (the edge agent's cascade or the gateway's repository) never sees protobuf; this module and
the codec are the only places that do. :class:`AsyncKServeServicer` is the same front for a host whose
``infer`` is a coroutine, served by grpc.aio, so a call waiting on a batch holds no thread.

:class:`KServeCore` is what every front calls, whatever its wire: the unary and streaming gRPC
methods here and the REST routes of :mod:`edgecloud.protocol.rest` pass it a ``decode`` callable
(wire → :class:`InferRequest` against the model's contract) and get an :class:`InferResponse`, so
admission, the contract check, the host call and the statistics are one path for all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
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
    config_to_pb,
    decode_request,
    encode_response,
    metadata_to_pb,
)
from edgecloud.protocol.statistics import InferenceStatistics, ModelFigures

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
    def model_index(self) -> tuple[tuple[str, str], ...]:
        """(name, version) of every model version served (RepositoryIndex, ModelStatistics)."""
        ...


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


def call_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
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
    abort(context, *call_status(exc))


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with ``code``; the handler returns right after. The threaded server's
    ``context.abort`` raises, but grpc.aio's, given to a synchronous handler (the gateway's metadata,
    downloads, uploads), only sets the status and returns: a handler that went on would do the work
    it refused."""
    context.abort(code, message)


#: a request's wire form → InferRequest, checked against the contract of the model it names
Decoder = Callable[[InputContract], InferRequest]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One model version of RepositoryIndex."""

    name: str
    version: str
    ready: bool


class KServeCore:
    """What every KServe v2 front calls: admission, the model's contract, the host and statistics."""

    EXTENSIONS = ("classification", "model_configuration", "statistics", "model_repository")

    def __init__(self, host: InferenceHost | AsyncInferenceHost, admission: Admission) -> None:
        self.host = host
        self.admission = admission
        self.statistics = InferenceStatistics()

    def _decode(self, name: str, version: str, decode: Decoder) -> InferRequest:
        return decode(self.host.input_contract(name, version))

    def _answered(self, request: InferRequest, response: InferResponse, started: int) -> InferResponse:
        rows = next((len(a) for a in request.inputs.values() if a.ndim), 1)
        self.statistics.success(response.model_name or request.model_name,
                                response.model_version or request.model_version, rows,
                                time.perf_counter_ns() - started)
        return response

    def _failed(self, name: str, version: str, started: int) -> None:
        """Count a refused call under the version it named, else the one an empty version means (the
        highest served); a call to a model not served is counted nowhere."""
        versions = [v for n, v in self.host.model_index() if n == name]
        if not version and versions:
            version = max(versions, key=lambda v: (v.isdigit() and int(v), v))
        if version in versions:
            self.statistics.failure(name, version, time.perf_counter_ns() - started)

    def infer(self, name: str, version: str, decode: Decoder, peer: PeerInfo,
              timeout: float | None) -> InferResponse:
        """Admit (waiting up to ``timeout`` s), decode against the model's contract, call the host."""
        started = time.perf_counter_ns()
        try:
            with self.admission.admitted(timeout):
                request = self._decode(name, version, decode)
                return self._answered(request, self.host.infer(request, peer), started)
        except Exception:
            self._failed(name, version, started)
            raise

    async def infer_async(self, name: str, version: str, decode: Decoder, peer: PeerInfo) -> InferResponse:
        """:meth:`infer` for a host whose ``infer`` is a coroutine."""
        started = time.perf_counter_ns()
        try:
            async with self.admission.admitted_async():
                request = self._decode(name, version, decode)
                return self._answered(request, await self.host.infer(request, peer), started)
        except Exception:
            self._failed(name, version, started)
            raise

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = [IndexEntry(name, version, self.host.model_ready(name, version))
                   for name, version in self.host.model_index()]
        return [e for e in entries if e.ready or not ready_only]

    def model_statistics(self, name: str, version: str) -> list[tuple[str, str, ModelFigures]]:
        """Figures of every version served of ``name`` (every model when empty), or of one version;
        ModelNotFound for a model or version not served."""
        if name:
            self.host.model_metadata(name, version)  # ModelNotFound names what is served
        return [(n, v, self.statistics.of(n, v)) for n, v in self.host.model_index()
                if (not name or n == name) and (not version or v == version)]


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin gRPC front for an InferenceHost."""

    def __init__(self, host: InferenceHost, admission: Admission, core: KServeCore | None = None) -> None:
        self.host = host
        self.admission = admission
        self.core = core or KServeCore(host, admission)

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
                                         extensions=list(self.core.EXTENSIONS))

    def ModelMetadata(self, request, context):  # noqa: N802
        try:
            return metadata_to_pb(self.host.model_metadata(request.name, request.version))
        except Exception as e:
            return _abort(context, e)

    def ModelConfig(self, request, context):  # noqa: N802
        try:
            return pb.ModelConfigResponse(config=config_to_pb(self.host.model_metadata(request.name,
                                                                                       request.version)))
        except Exception as e:
            _abort(context, e)

    def RepositoryIndex(self, request, context):  # noqa: N802
        Entry = pb.RepositoryIndexResponse.ModelIndex  # noqa: N806
        return pb.RepositoryIndexResponse(models=[
            Entry(name=e.name, version=e.version, state="READY" if e.ready else "UNAVAILABLE")
            for e in self.core.index(request.ready)])

    def ModelStatistics(self, request, context):  # noqa: N802
        try:
            figures = self.core.model_statistics(request.name, request.version)
        except Exception as e:
            return _abort(context, e)
        return pb.ModelStatisticsResponse(model_stats=[_statistics_pb(*f) for f in figures])

    def _infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return encode_response(self.core.infer(request.model_name, request.model_version,
                                               lambda contract: decode_request(request, contract),
                                               PeerInfo(context), context.time_remaining()))

    def ModelInfer(self, request, context):  # noqa: N802
        try:
            return self._infer(request, context)
        except Exception as e:
            _abort(context, e)

    def ModelStreamInfer(self, request_iterator, context) -> Iterator[pb.ModelStreamInferResponse]:  # noqa: N802
        """Each request answered in order on the stream; a refused one is an ``error_message`` on it,
        as Triton does, and the stream goes on."""
        for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=self._infer(request, context))
            except Exception as e:
                yield _stream_error(request, e)


def _stream_error(request: pb.ModelInferRequest, exc: Exception) -> pb.ModelStreamInferResponse:
    code, message = call_status(exc)
    return pb.ModelStreamInferResponse(
        error_message=f"[StatusCode.{code.name}] {message}",
        infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))


def _statistics_pb(name: str, version: str, f: ModelFigures) -> pb.ModelStatistics:
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=name, version=version, last_inference=f.last_inference_ms, inference_count=f.inference_count,
        execution_count=f.execution_count,
        inference_stats=pb.InferStatistics(success=duration(count=f.success_count, ns=f.success_ns),
                                           fail=duration(count=f.fail_count, ns=f.fail_ns),
                                           queue=duration(), compute_input=duration(),
                                           compute_infer=duration(count=f.success_count, ns=f.success_ns),
                                           compute_output=duration()))


class AsyncKServeServicer(KServeServicer):
    """The servicer for grpc.aio: ModelInfer awaits the host; the other methods are quick and run as
    they are, on the server's thread pool."""

    host: AsyncInferenceHost

    async def _infer_async(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return encode_response(await self.core.infer_async(
            request.model_name, request.model_version, lambda contract: decode_request(request, contract),
            PeerInfo(context)))

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            return await self._infer_async(request, context)
        except Exception as e:
            await context.abort(*call_status(e))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator, context) -> None:  # noqa: N802
        """Written with ``context.write`` rather than as an async generator: a coroutine handler is
        what the gateway's auth interceptor wraps."""
        async for request in request_iterator:
            try:
                await context.write(pb.ModelStreamInferResponse(
                    infer_response=await self._infer_async(request, context)))
            except Exception as e:
                await context.write(_stream_error(request, e))
