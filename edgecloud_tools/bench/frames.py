"""Encoded frames (docs/design.md §10): what decoding and pre-processing a camera's frame costs beside the
model itself, what the agent sustains when it is sent frames, and what escalating the original frame
costs on the uplink compared with the tensor.

- in process: decode + pre-process of one 640x480 gray JPEG (Pillow, the edge card's ``preprocess``),
  p50 and p99, beside the edge model's own ``infer`` of the row it gives;
- through the agent: frames/s and latency at 4 tritonclient clients (``escalate=never``);
- upstream: the bytes per escalated row (``escalate=always``, counted on the wire by the delay proxy
  before the gateway), the original frame vs the model's tensor.
"""

from __future__ import annotations

import numpy as np

from edgecloud.backends import open_backend
from edgecloud.modelcard import card_preprocess, read_card
from edgecloud.preprocess import decode_frames
from edgecloud.protocol.parameters import AgentRequest
from edgecloud_tools.bench.plan import Bench, progress
from edgecloud_tools.camera_frames import camera_frame
from edgecloud_tools.rig import servers
from edgecloud_tools.rig.delay_proxy import DelayProxy
from edgecloud_tools.rig.stats import latency_summary, timed_calls
from edgecloud_tools.toolchain.dataset import make_split

FRAME_SIZE = (480, 640)
QUALITY = 90
CONCURRENCY = 4


def in_process(bench: Bench) -> dict:
    """Decode + pre-process per frame beside the model's own time, both p50/p99 in milliseconds."""
    spec = card_preprocess(read_card(bench.models.edge))
    if spec is None:
        raise ValueError(f"{bench.models.edge} has no preprocess in its model card")
    patches = make_split("test", bench.plan.frames)[0]
    frames = [np.array([camera_frame(p, FRAME_SIZE, QUALITY)], dtype=np.object_) for p in patches]
    backend = open_backend(bench.models.edge)
    try:
        fed = next(s for s in backend.inputs if s.name == spec.input)
        order = iter(range(10**9))
        decode = timed_calls(lambda: decode_frames(frames[next(order) % len(frames)], spec, fed.datatype),
                             bench.plan.frames, warmup=2)
        row = {spec.input: decode_frames(frames[0], spec, fed.datatype).tensor}
        model = timed_calls(lambda: backend.infer(row), bench.plan.frames, warmup=2)
    finally:
        backend.close()
    return {"frame": {"size": list(FRAME_SIZE), "quality": QUALITY,
                      "mean_bytes": round(float(np.mean([len(f[0]) for f in frames])))},
            "decode_preprocess": latency_summary(decode), "model": latency_summary(model)}


def frames(bench: Bench) -> dict:
    out = {"in_process": in_process(bench)}
    n, frame = bench.plan.frames, {"size": list(FRAME_SIZE), "quality": QUALITY}
    model = bench.models.edge_name
    frames_input = {"name": card_preprocess(read_card(bench.models.edge)).frames, "datatype": "BYTES"}
    gateway = servers.gateway(bench.workdir, bench.models.repository, "gw-frames", store=True)
    with gateway, DelayProxy(gateway.port, 0.0) as proxy, \
            servers.agent(bench.workdir, bench.models.edge, "agent-frames", cloud=proxy.port) as agent:
        never = {str(AgentRequest.ESCALATE): "never"}
        always = {str(AgentRequest.ESCALATE): "always"}
        progress(f"frames: {CONCURRENCY} clients sending {FRAME_SIZE[1]}x{FRAME_SIZE[0]} JPEG frames")
        load = bench.closed(bench.target("triton", agent.port, model, params=never, frames=frame,
                                         input=frames_input), CONCURRENCY)
        out["agent"] = {"clients": CONCURRENCY, **load.summary()}
        # the first escalation opens the link and checks the cloud model: once, untimed
        bench.pool.sequence(bench.target("triton", agent.port, model, params=always), 1)
        upstream = {}
        for kind, target in (
                ("frame", bench.target("triton", agent.port, model, params=always, frames=frame,
                                       input=frames_input)),
                ("tensor", bench.target("triton", agent.port, model, params=always))):
            progress(f"frames: {n} escalations of the {kind}")
            sent = proxy.upstream_bytes
            result = bench.pool.sequence(target, n)
            upstream[kind] = {"rows": result.ok,
                              "bytes_per_row": round((proxy.upstream_bytes - sent) / max(result.ok, 1))}
        out["upstream"] = upstream
    return out
