"""Builds a gRPC server for an InferenceHost: KServe v2, health checking, reflection, TLS."""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud._generated.inference import grpc_service_pb2_grpc as pb_grpc
from edgecloud.endpoint import Endpoint
from edgecloud.errors import ConfigError
from edgecloud.protocol.servicer import InferenceHost, KServeServicer

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


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


@dataclass
class RunningServer:
    """A started server: its bound port, its health servicer, and how to stop it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace`` seconds."""
        self.set_serving(False)
        self.server.stop(grace).wait()


def start_server(host: InferenceHost, listen: Endpoint, *, tls: ServerTLS | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024, workers: int = 16,
                 extra_services=(), interceptors=()) -> RunningServer:
    """Start serving ``host`` on ``listen``. Plaintext is refused off loopback (secure by default).

    ``extra_services`` are callables ``add(server)`` that register more servicers (e.g. downloads);
    ``interceptors`` are ``grpc.ServerInterceptor``s run before every call of every service (e.g. the
    gateway's bearer-token check).
    """
    if tls is None and not listen.is_loopback:
        raise ConfigError(f"listen {listen}: plaintext gRPC is only allowed on loopback or a unix "
                          "socket; configure tls.cert and tls.key")
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options,
                         interceptors=tuple(interceptors))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(host), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for add in extra_services:
        add(server)
    names = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    names += [getattr(add, "service_name", "") for add in extra_services if getattr(add, "service_name", "")]
    reflection.enable_server_reflection(names, server)
    target = listen.grpc_target
    port = (server.add_secure_port(target, tls.credentials()) if tls
            else server.add_insecure_port(target))
    if not listen.unix_path and port == 0:
        raise ConfigError(f"listen {listen}: cannot bind (address in use or not permitted)")
    server.start()
    running = RunningServer(server, port, health_servicer)
    running.set_serving(True)
    log.info("event=server_started listen=%s port=%s tls=%s", target, port, tls is not None)
    return running
