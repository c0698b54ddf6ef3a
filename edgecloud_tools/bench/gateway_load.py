"""The cloud gateway under many concurrent single-row streams (tritonclient, closed loop), with its
dynamic batcher and without it (``max_batch_size = 0``), beside MLServer's adaptive batching on the same
cloud model, with the same batch size and delay as the gateway's defaults.
"""

from __future__ import annotations

from cloud_gateway.config import ModelConfig
from edgecloud.endpoint import free_loopback_port
from edgecloud_tools.bench.peer_load import ensure_peer, measure
from edgecloud_tools.bench.peers import MLSERVER, mlserver_server
from edgecloud_tools.bench.plan import Bench
from edgecloud_tools.rig import servers
from edgecloud_tools.toolchain import CLOUD_NAME

DEFAULTS = ModelConfig.model_fields


def gateway_load(bench: Bench) -> dict:
    out: dict = {}
    for batching in (True, False):
        key = "batching" if batching else "no_batching"
        service = servers.gateway(bench.workdir, bench.models.repository, f"gw-{key}", batching=batching)
        target = bench.target("triton", service.port, CLOUD_NAME)
        label = f"gateway, dynamic batching {'on' if batching else 'off'}, streams"
        out[key] = measure(bench, service, target, bench.plan.streams, label)
    python, status = ensure_peer(bench, MLSERVER)
    out["mlserver_adaptive"] = {"title": f"{MLSERVER.title}, adaptive batching", "status": status}
    if python is not None:
        ports = (free_loopback_port(), free_loopback_port(), free_loopback_port())
        batch, delay_s = DEFAULTS["max_batch_size"].default, DEFAULTS["max_queue_delay_us"].default / 1e6
        folder = bench.workdir / "mlserver-cloud"
        service = mlserver_server(python, bench.models.cloud.resolve(), CLOUD_NAME, ports, folder,
                                  max_batch_size=batch, max_batch_time_s=delay_s)
        target = bench.target("triton", ports[1], CLOUD_NAME)
        out["mlserver_adaptive"].update({"max_batch_size": batch, "max_batch_time_s": delay_s,
                                         **measure(bench, service, target, bench.plan.streams,
                                                   "MLServer adaptive batching, streams", peer=True)})
    return out
