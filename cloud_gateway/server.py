"""Assembles a gateway from its config: repository, store, auth, and the gRPC server (KServe v2,
health, reflection). Used by the ``cloud-gateway`` command and, in-process, by the demo and tests::

    with Gateway(gateway_config(repo, listen="127.0.0.1:0", store=db)) as gw:
        client = KServeClient(f"127.0.0.1:{gw.port}")
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence

import grpc

from cloud_gateway.artifacts import add_artifact_service
from cloud_gateway.auth import Authenticator, AuthInterceptor, TokenTable
from cloud_gateway.config import GatewayConfig, TLSSection
from cloud_gateway.hard_examples import HardExampleStore
from cloud_gateway.host import GatewayHost
from cloud_gateway.metrics import GatewayMetrics, ServingCollector
from cloud_gateway.repository import ModelRepository
from edgecloud.endpoint import parse_endpoint
from edgecloud.errors import ConfigError
from edgecloud.protocol.admission import Admission
from edgecloud.protocol.health_port import HealthPort, start_health_port
from edgecloud.protocol.server import RestOptions, RunningServer, ServerTLS, start_async_server

log = logging.getLogger(__name__)


def server_tls(section: TLSSection) -> ServerTLS | None:
    """The TLS settings, with every named file checked to exist (ConfigError naming the key)."""
    if section.cert is None or section.key is None:
        return None
    for key in ("cert", "key", "client_ca"):
        path = getattr(section, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"tls.{key}: {path} does not exist")
    return ServerTLS(section.cert, section.key, section.client_ca)


class Gateway:
    """One running gateway. ``start()`` returns once every model is loaded, warmed up and served.

    ``extra_services`` are ``add(server)`` callables registering more gRPC services on the same port
    (see :func:`edgecloud.protocol.server.start_async_server`).
    """

    def __init__(self, config: GatewayConfig,
                 extra_services: Sequence[Callable[[grpc.Server], None]] = ()) -> None:
        self.config = config
        self.extra_services = tuple(extra_services)
        self.repository: ModelRepository | None = None
        self.store: HardExampleStore | None = None
        self.host: GatewayHost | None = None
        self.server: RunningServer | None = None
        self.metrics: GatewayMetrics | None = None
        self.health_port: HealthPort | None = None
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def port(self) -> int:
        return self.server.port if self.server else 0

    @property
    def rest_port(self) -> int:
        return self.server.rest_port if self.server else 0

    def start(self) -> Gateway:
        cfg = self.config
        if cfg.gateway.model_repository is None:
            raise ConfigError("gateway.model_repository: no model repository given "
                              "(--model-repository or [gateway] model_repository)")
        listen = parse_endpoint(cfg.gateway.listen)
        tls = server_tls(cfg.tls)
        tokens = TokenTable.load(cfg.auth.tokens_file) if cfg.auth.tokens_file else None
        self.repository = ModelRepository.load(cfg.gateway.model_repository, cfg.model_defaults)
        try:
            self.store = self._open_store()
            self.host = GatewayHost(self.repository, self.store, tokens, cfg.gateway.added_latency_ms / 1000)
            mutual_tls = tls is not None and tls.client_ca is not None
            auth = Authenticator(tokens, mutual_tls, cfg.auth.operators) if tokens or mutual_tls else None
            interceptors = (AuthInterceptor(auth),) if auth else ()
            upload = cfg.gateway.allow_upload
            if upload is None:  # without client authentication, only local callers may upload releases
                upload = listen.is_loopback or auth is not None
            artifacts = add_artifact_service(cfg.gateway.model_repository, allow_upload=upload,
                                             authenticator=auth)
            rest = (RestOptions(parse_endpoint(cfg.rest.listen), auth.of_rest if auth else None)
                    if cfg.rest.listen else None)
            self.server = start_async_server(self.host, listen, admission=Admission("gateway", cfg.admission),
                                             tls=tls, max_message_bytes=cfg.gateway.max_message_bytes,
                                             workers=cfg.gateway.workers,
                                             extra_services=(artifacts, *self.extra_services),
                                             interceptors=interceptors, rest=rest)
            if cfg.health.listen:
                self.health_port = start_health_port(self.server.health, parse_endpoint(cfg.health.listen))
            serving = ServingCollector(self.repository, self.store, self.server.admission,
                                       self.server.statistics)
            self.metrics = GatewayMetrics(cfg, serving).start()
        except BaseException:
            self.stop(grace=0)
            raise
        client_auth = [name for name, on in (("mtls", tls and tls.client_ca), ("tokens", tokens)) if on]
        if not listen.is_loopback and not client_auth:
            log.warning("event=no_client_auth listen=%s hint='set tls.client_ca and/or auth.tokens_file'",
                        listen)
        log.info("event=gateway_ready listen=%s port=%d models=%s store=%s client_auth=%s "
                 "added_latency_ms=%g metrics_port=%d", listen, self.port, ",".join(self.repository.names),
                 cfg.store.path or "none", ",".join(client_auth) or "none", cfg.gateway.added_latency_ms,
                 self.metrics.port)
        return self

    def _open_store(self) -> HardExampleStore | None:
        section = self.config.store
        if section.path is None:
            log.warning("event=store_disabled hint='escalated rows are logged, not kept; set store.path'")
            return None
        try:
            return HardExampleStore(section.path, section.max_rows, section.retention_days)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"store.path: cannot open {section.path}: {e}") from e

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace`` s, release everything; safe to
        call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self.host is not None:
            self.host.accepting = False
        if self.server is not None:
            self.server.stop(grace)  # health says NOT_SERVING on both ports from here
        if self.health_port is not None:
            self.health_port.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.repository is not None:
            self.repository.close()
        if self.store is not None:
            self.store.close()
        log.info("event=gateway_stopped")

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
