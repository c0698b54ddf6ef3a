"""A plaintext port that serves nothing but ``grpc.health.v1``, for probes that cannot speak TLS or
must not queue behind inference.

Kubelet's gRPC probes are plaintext, and the gateway refuses plaintext off loopback, so a pod whose
probes dialled its TLS port would never become Ready. On the agent, gRPC refuses any call beyond the
main server's threads in a flood, health checks included; this port has threads of its own, so a probe
keeps reading SERVING while inference is shed. It answers the same health servicer as the main port
(SERVING once every model is loaded, NOT_SERVING while draining) and carries no inference, metadata
or downloads: plaintext reveals only that status (docs/design.md §9). A native probe is one gRPC call
from kubelet; an exec probe would start a Python process every few seconds.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from edgecloud.endpoint import Endpoint
from edgecloud.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class HealthPort:
    """A started health-only server and its bound port."""

    server: grpc.Server
    port: int

    def stop(self, grace: float | None = 0) -> None:
        self.server.stop(grace).wait()


def start_health_port(servicer: health.HealthServicer, listen: Endpoint, *, what: str = "health.listen"
                      ) -> HealthPort:
    """Serve ``servicer`` alone on ``listen`` (plaintext); ConfigError naming ``what`` when it cannot bind."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                         options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(listen.grpc_target)
    except RuntimeError:  # grpcio raises where older releases returned 0
        port = 0
    if port == 0:
        raise ConfigError(f"{what} {listen}: cannot bind (address in use or not permitted)")
    server.start()
    log.info("event=health_port_started listen=%s port=%d", listen.grpc_target, port)
    return HealthPort(server, port)
