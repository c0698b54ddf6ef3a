"""KServe v2 REST beside gRPC (docs/design.md §2): health, metadata, model configuration, statistics,
the repository index and inference with JSON or Triton's binary-data extension, so
``tritonclient.http`` and plain ``curl`` reach the same service as ``tritonclient.grpc``.

Every route calls the :class:`~edgecloud.protocol.servicer.KServeCore` the gRPC servicer calls: the
same admission gate (a call beyond it is 429 at once), the same contract checks, the same host and the
same statistics. Errors map to HTTP status from the gRPC code the core gives them, so a client sees
the same refusal whatever it speaks, with the message as ``{"error": "…"}``.

Served by aiohttp on an event loop the caller runs (:mod:`edgecloud.protocol.server`): the
gateway's own, where its batcher lives; a loop thread of its own on the agent, whose blocking
cascade runs on threads.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from edgecloud.endpoint import Endpoint
from edgecloud.errors import ConfigError
from edgecloud.protocol.codec import InferResponse
from edgecloud.protocol.rest_codec import (
    HEADER_LENGTH,
    config_json,
    decode_rest_request,
    encode_rest_response,
    metadata_json,
    split_body,
    statistics_json,
)
from edgecloud.protocol.servicer import Decoder, KServeCore, call_status

log = logging.getLogger(__name__)

#: gRPC status → HTTP status of the same refusal
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
#: paths answered without credentials, as grpc.health.v1 is over gRPC (probes carry none)
OPEN_PREFIX = "/v2/health/"


class RestPeer:
    """Who is calling over REST, with the attributes a host reads of a gRPC caller's ``PeerInfo``."""

    __slots__ = ("bearer_token", "certificate_pem", "common_name", "peer")

    def __init__(self, request: web.Request) -> None:
        transport = request.transport
        address = transport.get_extra_info("peername") if transport else None
        self.peer = f"ipv4:{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address or "")
        auth = request.headers.get("Authorization", "")
        self.bearer_token = auth[7:] if auth.lower().startswith("bearer ") else ""
        self.common_name, self.certificate_pem = "", b""
        tls = transport.get_extra_info("ssl_object") if transport else None
        certificate = tls.getpeercert() if tls else None
        if certificate:
            names = [value for rdn in certificate.get("subject", ()) for key, value in rdn
                     if key == "commonName"]
            self.common_name = names[0] if names else ""
            self.certificate_pem = ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)).encode()


#: runs an admitted inference: (model, version, decode, peer) → the host's answer
Infer = Callable[[str, str, Decoder, RestPeer], Awaitable[InferResponse]]
#: raises (with a gRPC ``code``, e.g. the gateway's AuthRefused) unless the caller may be served
Authenticate = Callable[[RestPeer], object]


def _error(exc: Exception) -> web.Response:
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):
        message = str(exc)
    else:
        code, message = call_status(exc)
    return web.json_response({"error": message}, status=HTTP_OF.get(code, 500))


class RestFront:
    """The routes of one service over ``core``; ``infer`` runs the core's inference for this
    service's kind of host (a thread for a blocking one, a coroutine otherwise)."""

    def __init__(self, core: KServeCore, infer: Infer, authenticate: Authenticate | None = None,
                 max_body_bytes: int = 64 * 1024 * 1024) -> None:
        self.core = core
        self.host = core.host
        self._infer = infer
        self._authenticate = authenticate
        self._max_body = max_body_bytes

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body, middlewares=[self._guard])
        get, post = web.get, web.post
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        app.add_routes([
            get("/v2/health/live", self.live), get("/v2/health/ready", self.ready), get("/v2", self.server),
            get("/v2/models/stats", self.stats), post("/v2/repository/index", self.index),
            *(route for base in (model, versioned) for route in (
                get(base, self.metadata), get(base + "/ready", self.model_ready),
                get(base + "/config", self.config), get(base + "/stats", self.stats),
                post(base + "/infer", self.infer)))])
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Credentials first (but for health), then the handler; any refusal is a JSON error."""
        try:
            if self._authenticate is not None and not request.path.startswith(OPEN_PREFIX):
                self._authenticate(RestPeer(request))
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as e:
            return _error(e)

    @staticmethod
    def _model(request: web.Request) -> tuple[str, str]:
        return request.match_info.get("name", ""), request.match_info.get("version", "")

    @staticmethod
    def _flag(ok: bool) -> web.Response:
        return web.Response(status=200 if ok else 503)

    async def live(self, request: web.Request) -> web.Response:
        return self._flag(self.host.is_live())

    async def ready(self, request: web.Request) -> web.Response:
        return self._flag(self.host.is_ready())

    async def model_ready(self, request: web.Request) -> web.Response:
        return self._flag(self.host.model_ready(*self._model(request)))

    async def server(self, request: web.Request) -> web.Response:
        return web.json_response({"name": self.host.server_name, "version": self.host.server_version,
                                  "extensions": list(self.core.EXTENSIONS)})

    async def metadata(self, request: web.Request) -> web.Response:
        return web.json_response(metadata_json(self.host.model_metadata(*self._model(request))))

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(config_json(self.host.model_metadata(*self._model(request))))

    async def stats(self, request: web.Request) -> web.Response:
        figures = self.core.model_statistics(*self._model(request))
        return web.json_response({"model_stats": [statistics_json(*f) for f in figures]})

    async def index(self, request: web.Request) -> web.Response:
        body = await request.read()
        document, _ = split_body(body, None) if body.strip() else ({}, b"")
        ready = document.get("ready", False) is True
        return web.json_response([{"name": e.name, "version": e.version,
                                   "state": "READY" if e.ready else "UNAVAILABLE"}
                                  for e in self.core.index(ready)])

    async def infer(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        body = await request.read()
        parsed: dict[str, Any] = {}

        def decode(contract):
            document, binary = split_body(body, request.headers.get(HEADER_LENGTH))
            parsed.update(document)
            return decode_rest_request(document, binary, name, version, contract)

        response = await self._infer(name, version, decode, RestPeer(request))
        payload, header_length = encode_rest_response(response, parsed)
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(header_length)})


class RestServer:
    """A :class:`RestFront` listening on ``listen`` (HOST:PORT or unix:/path), on the running loop."""

    def __init__(self, front: RestFront, listen: Endpoint, ssl_context: ssl.SSLContext | None = None) -> None:
        self.front = front
        self.listen = listen
        self.ssl_context = ssl_context
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, grace: float = 5.0) -> int:
        """Listen; ConfigError naming ``rest.listen`` when the address cannot be bound. ``grace``: how
        long a stop waits for calls in flight."""
        runner = web.AppRunner(self.front.app(), access_log=None, shutdown_timeout=grace)
        await runner.setup()
        listen = self.listen
        site = (web.UnixSite(runner, listen.unix_path, ssl_context=self.ssl_context) if listen.unix_path
                else web.TCPSite(runner, listen.host, listen.port, ssl_context=self.ssl_context))
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(f"rest.listen {listen}: cannot bind ({e.strerror or e})") from e
        self._runner = runner
        address = runner.addresses[0] if runner.addresses else None
        self.port = address[1] if isinstance(address, tuple) else 0
        log.info("event=rest_listening listen=%s port=%d tls=%s", listen, self.port,
                 self.ssl_context is not None)
        return self.port

    async def stop(self) -> None:
        """Stop listening and let calls in flight finish; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
