"""Builds a gRPC server for an inference host: KServe v2, health checking, reflection, TLS, admission.

Two ways to run the same services: :func:`start_server` on a thread pool, for a host whose ``infer``
blocks (the edge agent), and :func:`start_async_server` on grpc.aio, for a host whose ``infer`` is a
coroutine (the gateway: hundreds of calls wait on a batch at once, and none holds a thread).

Either can also serve KServe v2 REST (:mod:`edgecloud.protocol.rest`) with ``rest``: over the same
:class:`KServeCore`, hence the same admission gate and statistics, with the same TLS. The gateway's
REST routes run on its grpc.aio loop, beside its batcher; the agent's on a loop thread of their own,
each admitted call on a thread as over gRPC.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud._generated.inference import grpc_service_pb2_grpc as pb_grpc
from edgecloud.config import AdmissionSection
from edgecloud.endpoint import Endpoint
from edgecloud.errors import ConfigError
from edgecloud.protocol.admission import Admission
from edgecloud.protocol.rest import Authenticate, RestFront, RestServer
from edgecloud.protocol.servicer import (
    AsyncInferenceHost,
    AsyncKServeServicer,
    InferenceHost,
    KServeCore,
    KServeServicer,
    abort,
)
from edgecloud.protocol.statistics import InferenceStatistics

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
T = TypeVar("T")
#: ``add(server)`` callables registering more services (e.g. downloads)
ExtraServices = Sequence[Callable[[Any], None]]


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """Server certificate and key; with ``client_ca`` clients must present a certificate (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def ssl_context(self) -> ssl.SSLContext:
        """The same for HTTPS: the server pair and, with ``client_ca``, a required client certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass(frozen=True, slots=True)
class RestOptions:
    """KServe v2 REST beside gRPC on ``listen`` (HOST:PORT or unix:/path), with the gRPC server's TLS;
    ``authenticate`` vets every caller but health checks."""

    listen: Endpoint
    authenticate: Authenticate | None = None


@dataclass
class RunningServer:
    """A started server: its bound port, its health servicer, its admission gate, and how to stop it."""

    port: int
    health: health.HealthServicer
    admission: Admission
    #: stops the gRPC server itself, letting in-flight calls finish within the grace given
    shutdown: Callable[[float | None], None]
    #: the REST port, 0 without REST
    rest_port: int = 0
    #: what every front has answered, per model version (ModelStatistics, the gateway's histogram)
    statistics: InferenceStatistics | None = None

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace`` seconds."""
        self.set_serving(False)
        self.shutdown(grace)


def start_server(host: InferenceHost, listen: Endpoint, *, admission: Admission | None = None,
                 tls: ServerTLS | None = None, max_message_bytes: int = 64 * 1024 * 1024,
                 workers: int = 16, waiting: int = 0, extra_services: ExtraServices = (), interceptors=(),
                 rest: RestOptions | None = None) -> RunningServer:
    """Start serving ``host`` on ``listen`` on a thread pool. Plaintext is refused off loopback (secure by
    default).

    ``admission`` gates ModelInfer (default: ``[admission]``'s defaults). Each admitted call, running or
    waiting for its turn, holds a thread, and so does each of at most ``waiting`` calls that gave their
    slot back to wait elsewhere (the agent's escalations, :func:`~edgecloud.protocol.admission.release_slot`);
    the pool has ``workers`` threads for everything else (health, metadata, ``extra_services``,
    refusals) on top: a health check never waits behind inference. gRPC itself refuses a call beyond
    that many at once (RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!"), before it takes a thread:
    without that bound calls would wait in the pool's unbounded queue before admission could shed
    them, and the smaller the bound, the sooner a flood is refused rather than queued inside gRPC
    (measured on 2 cores at 1.5x capacity: answered p99 0.9 s with 40 threads, 0.23-0.32 s with 16).
    ``extra_services`` are callables ``add(server)`` that register more servicers (e.g. downloads);
    ``interceptors`` are ``grpc.ServerInterceptor``s run before every call of every service (e.g. the
    gateway's bearer-token check). ``rest`` serves KServe v2 REST as well, its admitted calls on
    threads of their own, as many as over gRPC.
    """
    _check_plaintext(listen, tls)
    if rest is not None:
        _check_plaintext(rest.listen, tls, "rest.listen", "HTTP")
    admission = admission or Admission(host.server_name, AdmissionSection())
    core = KServeCore(host, admission)
    threads = workers + admission.limits.max_in_flight + admission.limits.max_queue + waiting
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=_options(max_message_bytes),
                         interceptors=tuple(interceptors), maximum_concurrent_rpcs=threads)
    health_servicer = _add_services(server, KServeServicer(host, admission, core), extra_services)
    # REST binds first: a gRPC server that bound a port but never started keeps it
    rest_port, stop_rest = _threaded_rest(core, rest, tls, max_message_bytes, threads) if rest else (0, None)
    try:
        port = _bind(server, listen, tls)
    except BaseException:
        if stop_rest is not None:
            stop_rest()
        raise
    server.start()

    def shutdown(grace: float | None) -> None:
        if stop_rest is not None:
            stop_rest()
        server.stop(grace).wait()

    return _started(RunningServer(port, health_servicer, admission, shutdown, rest_port, core.statistics),
                    listen, tls)


def _threaded_rest(core: KServeCore, rest: RestOptions, tls: ServerTLS | None, max_message_bytes: int,
                   threads: int) -> tuple[int, Callable[[], None]]:
    """REST for a blocking host: aiohttp on a loop thread, each inference on a pool thread."""
    loop = _LoopThread(f"rest-{rest.listen}")
    pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rest")

    async def infer(name, version, decode, peer):
        return await asyncio.get_running_loop().run_in_executor(pool, core.infer, name, version, decode,
                                                                peer, None)

    server = RestServer(RestFront(core, infer, rest.authenticate, max_message_bytes), rest.listen,
                        tls.ssl_context() if tls else None)

    def stop() -> None:
        loop.run(server.stop())
        pool.shutdown(cancel_futures=True)
        loop.close()

    try:
        return loop.run(server.start()), stop
    except BaseException:
        stop()
        raise


def start_async_server(host: AsyncInferenceHost, listen: Endpoint, *, admission: Admission | None = None,
                       tls: ServerTLS | None = None, max_message_bytes: int = 64 * 1024 * 1024,
                       workers: int = 16, extra_services: ExtraServices = (),
                       interceptors: Sequence[grpc.ServerInterceptor] = (),
                       rest: RestOptions | None = None) -> RunningServer:
    """:func:`start_server` on grpc.aio, in a thread of its own with its own event loop: ModelInfer
    runs there as a coroutine, so a call waiting for its batch costs no thread and the admission queue
    is a line of coroutines. The other methods, ``extra_services`` and ``interceptors`` are synchronous
    and run as they are, on ``workers`` threads. ``rest`` serves KServe v2 REST as well, on the same
    loop.
    """
    _check_plaintext(listen, tls)
    if rest is not None:
        _check_plaintext(rest.listen, tls, "rest.listen", "HTTP")
    admission = admission or Admission(host.server_name, AdmissionSection())
    core = KServeCore(host, admission)
    loop = _LoopThread(f"grpc-aio-{listen}")
    pool = futures.ThreadPoolExecutor(max_workers=workers)
    rest_server = (RestServer(RestFront(core, core.infer_async, rest.authenticate, max_message_bytes),
                              rest.listen, tls.ssl_context() if tls else None) if rest else None)

    async def start() -> tuple[grpc.aio.Server, health.HealthServicer, int]:
        server = grpc.aio.server(migration_thread_pool=pool, options=_options(max_message_bytes),
                                 interceptors=[_SyncInterceptor(i) for i in interceptors])
        health_servicer = _add_services(server, AsyncKServeServicer(host, admission, core), extra_services)
        if rest_server is not None:  # first: a gRPC server that bound a port but never started keeps it
            await rest_server.start()
        port = _bind(server, listen, tls)
        await server.start()
        return server, health_servicer, port

    def shutdown(grace: float | None) -> None:
        if rest_server is not None:
            loop.run(rest_server.stop())
        loop.run(server.stop(grace))
        loop.shutdown_pool(pool)
        loop.close()

    try:
        server, health_servicer, port = loop.run(start())
    except BaseException:
        if rest_server is not None:
            loop.run(rest_server.stop())
        loop.close()
        pool.shutdown()
        raise
    return _started(RunningServer(port, health_servicer, admission, shutdown,
                                  rest_server.port if rest_server else 0, core.statistics), listen, tls)


def _check_plaintext(listen: Endpoint, tls: ServerTLS | None, key: str = "listen",
                     wire: str = "gRPC") -> None:
    if tls is None and not listen.is_loopback:
        raise ConfigError(f"{key} {listen}: plaintext {wire} is only allowed on loopback or a unix "
                          "socket; configure tls.cert and tls.key")


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0)]


def _add_services(server, kserve: KServeServicer, extra_services: ExtraServices) -> health.HealthServicer:
    """KServe v2, health checking, ``extra_services`` and reflection of them all, each method refusing a
    message it cannot decode with INVALID_ARGUMENT (:class:`_Tolerant`)."""
    tolerant = _Tolerant(server)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, tolerant)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, tolerant)
    for add in extra_services:
        add(tolerant)
    names = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    names += [getattr(add, "service_name", "") for add in extra_services if getattr(add, "service_name", "")]
    reflection.enable_server_reflection(names, tolerant)
    return health_servicer


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """What a method's deserializer gives for bytes that are no message of its type."""

    error: str

    @property
    def message(self) -> str:
        return f"the request is not a valid protobuf message of this method: {self.error}"


class _Tolerant:
    """The server, as the generated ``add_*_to_server`` functions see it: each method handler they
    register gets a deserializer that turns undecodable bytes (e.g. a string field that is not UTF-8)
    into a refusal with INVALID_ARGUMENT, where gRPC would answer INTERNAL ("Exception deserializing
    request!") for the client's mistake."""

    def __init__(self, server) -> None:
        self._server = server

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(service, {n: _tolerant(h) for n, h in handlers.items()})

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_TolerantGeneric(g) for g in generic_handlers))

    def __getattr__(self, name: str):
        return getattr(self._server, name)


class _TolerantGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        return None if handler is None else _tolerant(handler)


def _tolerant(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer

    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as e:
            return _Undecodable(str(e))

    serialize = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_checked_stream(handler.stream_stream), parse, serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_checked_stream(handler.stream_unary), parse, serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_checked_unary(handler.unary_stream), parse, serialize)
    return grpc.unary_unary_rpc_method_handler(_checked_unary(handler.unary_unary), parse, serialize)


def _checked_unary(behaviour: Callable) -> Callable:
    if inspect.iscoroutinefunction(behaviour):
        async def checked_async(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behaviour(request, context)
        return checked_async

    def checked(request, context):
        if isinstance(request, _Undecodable):
            return abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return behaviour(request, context)
    return checked


def _checked_stream(behaviour: Callable) -> Callable:
    """A stream with an undecodable message ends with INVALID_ARGUMENT there: its framing is broken."""
    if inspect.iscoroutinefunction(behaviour):
        async def each_async(requests, context):
            async for request in requests:
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                yield request

        async def checked_async(requests, context):
            return await behaviour(each_async(requests, context), context)
        return checked_async

    def each(requests, context):
        for request in requests:
            if isinstance(request, _Undecodable):
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return
            yield request

    def checked(requests, context):
        return behaviour(each(requests, context), context)
    return checked


def _bind(server, listen: Endpoint, tls: ServerTLS | None) -> int:
    """The port bound; ConfigError (exit 2, one line) when it cannot be (grpcio raises RuntimeError
    for it; older releases returned 0)."""
    target = listen.grpc_target
    refused = ConfigError(f"listen {listen}: cannot bind (address in use or not permitted)")
    try:
        port = (server.add_secure_port(target, tls.credentials()) if tls
                else server.add_insecure_port(target))
    except RuntimeError:
        raise refused from None
    if not listen.unix_path and port == 0:
        raise refused
    return port


def _started(running: RunningServer, listen: Endpoint, tls: ServerTLS | None) -> RunningServer:
    running.set_serving(True)
    limits = running.admission.limits
    log.info("event=server_started listen=%s port=%s tls=%s max_in_flight=%d max_queue=%d",
             listen.grpc_target, running.port, tls is not None, limits.max_in_flight, limits.max_queue)
    return running


class _SyncInterceptor(grpc.aio.ServerInterceptor):
    """A ``grpc.ServerInterceptor`` on grpc.aio: it picks the handler of a call (the service's, or one
    of its own such as a refusal) from the one it is given."""

    def __init__(self, inner: grpc.ServerInterceptor) -> None:
        self.inner = inner

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return self.inner.intercept_service(lambda _details: handler, handler_call_details)


class _LoopThread:
    """An asyncio event loop running in a daemon thread; ``run`` waits for a coroutine on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_unless_cancelled)
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def shutdown_pool(self, pool: futures.ThreadPoolExecutor) -> None:
        """Shut down the pool of a stopped grpc.aio server, cancelling what its threads wait for.

        grpc.aio hands a synchronous streaming handler's messages to and from the loop one at a time
        (``run_coroutine_threadsafe(...).result()``). When the call ends with a peer that stopped
        reading or sending, nothing on the loop completes that future, and the thread would wait for
        ever: the cancellation raises in it instead, and is repeated for what it waits on next (its
        ``finally`` hands over one more message)."""
        joiner = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True},
                                  name=f"{self._thread.name}-pool-shutdown", daemon=True)
        joiner.start()
        while joiner.is_alive():
            self.run(_cancel_other_tasks())
            joiner.join(0.05)

    def close(self) -> None:
        """Wait for the loop's worker threads (``asyncio.to_thread``), then stop and close the loop."""
        self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _cancel_other_tasks() -> None:
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.cancel()


def _unless_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's default report of an error nobody retrieved, except a cancellation: grpc.aio drops
    the future of a streaming handler's thread when :meth:`_LoopThread.shutdown_pool` cancels it."""
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)
