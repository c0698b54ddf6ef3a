"""The peers on the agent's model under the agent's load: FastAPI + uvicorn (KServe v2 JSON over HTTP)
and MLServer with a custom ONNX Runtime runtime (KServe v2 gRPC, driven by tritonclient like the agent).

A peer whose venv is missing (quick mode) or cannot be made is reported "not installed" with the reason.
"""

from __future__ import annotations

from edgecloud.endpoint import free_loopback_port
from edgecloud_tools.bench.peers import FASTAPI, MLSERVER, Peer, fastapi_server, mlserver_server, peer_python
from edgecloud_tools.bench.plan import Bench, progress
from edgecloud_tools.rig import servers
from edgecloud_tools.rig.services import ServiceProcess


def ensure_peer(bench: Bench, peer: Peer):
    """The peer's interpreter and its status line; says so when a venv is being made."""
    if bench.plan.make_peers and not (peer.venv(bench.peers_root) / ".installed").exists():
        progress(f"{peer.title}: making its venv under {bench.peers_root} (first use, a few minutes)")
    return peer_python(peer, bench.peers_root, make=bench.plan.make_peers)


def measure(bench: Bench, service: ServiceProcess, target, counts, label: str, peer: bool = False) -> dict:
    """Start ``service``, run the closed loop at each of ``counts``, stop it (and its workers). A ``peer``
    that does not start is reported so, with its log, rather than failing the stage."""
    out: dict = {"closed": {}}
    try:
        try:
            service.start(timeout=120.0)
        except RuntimeError as e:
            if not peer:
                raise
            progress(f"{label}: did not start")
            return {"status": f"did not start ({str(e).splitlines()[0]})"}
        out["startup_s"] = round(service.startup_s or 0.0, 3)
        for n in counts:
            progress(f"{label}, {n} concurrent")
            out["closed"][str(n)] = bench.closed(target, n).summary()
        out["rss_bytes"] = servers.rss_bytes(service.proc.pid)
    finally:
        servers.stop(service)
    return out


def peer_load(bench: Bench) -> dict:
    out: dict = {}
    edge, name = bench.models.edge.resolve(), bench.models.edge_name
    for peer in (FASTAPI, MLSERVER):
        python, status = ensure_peer(bench, peer)
        out[peer.key] = {"title": peer.title, "status": status}
        if python is None:
            progress(f"{peer.title}: {status}")
            continue
        if peer is FASTAPI:
            port = free_loopback_port()
            service = fastapi_server(python, edge, port, bench.workdir / "fastapi.log")
            target = bench.target("http", port, path=f"/v2/models/{name}/infer")
        else:
            ports = (free_loopback_port(), free_loopback_port(), free_loopback_port())
            service = mlserver_server(python, edge, name, ports, bench.workdir / "mlserver-edge")
            target = bench.target("triton", ports[1], name)
        out[peer.key].update(measure(bench, service, target, bench.plan.concurrency, peer.title, peer=True))
    return out

