"""The floors the agent and the gateway are read against: the models called in process, and the echo
servers (KServe v2 and bare gRPC) under the same client and load as the services.

In process: latency at batch 1 of the edge model (INT8, also with one intra-op thread, the setting for
few cores), its FP32 version and the cloud model, and rows/s at the gateway's batch size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cloud_gateway.config import ModelConfig
from edgecloud.backends import open_backend
from edgecloud.backends.ort_session import OrtConfig
from edgecloud_tools.bench.echo import BARE_METHOD
from edgecloud_tools.bench.plan import CPU_STREAMS, Bench, progress
from edgecloud_tools.rig import servers
from edgecloud_tools.rig.stats import cdf, latency_summary, timed_calls
from edgecloud_tools.toolchain import CLOUD_NAME
from edgecloud_tools.toolchain.dataset import make_split

#: rows per run in the batched figure: the gateway's default max_batch_size
BATCH = ModelConfig.model_fields["max_batch_size"].default


def _timed(path: Path, config: OrtConfig | None, rows: np.ndarray, calls: int) -> tuple[np.ndarray, ...]:
    """Milliseconds per ``infer`` at batch 1 and at :data:`BATCH` rows."""
    backend = open_backend(path, config=config)
    try:
        name = backend.inputs[0].name
        one, many = {name: rows[:1]}, {name: rows[:BATCH]}
        return (timed_calls(lambda: backend.infer(one), calls),
                timed_calls(lambda: backend.infer(many), max(20, calls // 10)))
    finally:
        backend.close()


def in_process(bench: Bench) -> dict:
    """Each model file through its backend's ``infer`` in this process, no server."""
    rows = make_split("test", max(BATCH, 64))[0].astype(np.float32)
    m = bench.models
    cases = {"edge INT8": (m.edge, None),
             "edge INT8, 1 intra-op thread": (m.edge, OrtConfig(intra_op_threads=1)),
             "edge FP32": (m.edge_fp32, None), "cloud FP32": (m.cloud, None)}
    out = {}
    for label, (path, config) in cases.items():
        progress(f"in-process backend: {label}")
        single, batched = _timed(path, config, rows, bench.plan.in_process_calls)
        out[label] = {"file": path.name, "size_bytes": path.stat().st_size,
                      "batch1": {**latency_summary(single), "cdf": cdf(single)},
                      "batch": BATCH, "rows_per_s": round(BATCH * 1000.0 / float(np.median(batched)), 1)}
    return out


def echoes(bench: Bench) -> dict:
    """The KServe v2 echo at every concurrency of the agent and the gateway; the bare echo and the edge
    model served bare at the agent's, the cloud model served bare at the gateway's."""
    plan = bench.plan
    m = bench.models
    service = servers.echo(bench.workdir, {m.edge_name: m.edge, CLOUD_NAME: m.cloud})
    with service:
        kserve = bench.target("triton", service.port, "echo")
        bare = bench.target("bare", service.port, "echo", method=BARE_METHOD)
        model = bench.target("triton", service.port, m.edge_name)
        cloud = bench.target("triton", service.port, CLOUD_NAME)
        out: dict = {"startup_s": round(service.startup_s or 0.0, 3), "kserve": {}, "bare": {}, "model": {},
                     "cloud_model": {}}
        for n in sorted({*plan.concurrency, *plan.streams}):
            progress(f"KServe v2 echo, {n} concurrent")
            out["kserve"][str(n)] = bench.closed(kserve, n).summary()
        for n in plan.concurrency:
            progress(f"bare gRPC echo, {n} concurrent")
            out["bare"][str(n)] = bench.closed(bare, n).summary()
        for n in plan.concurrency:
            progress(f"edge model served bare, {n} concurrent")
            out["model"][str(n)] = bench.closed(model, n).summary()
        for n in plan.streams:
            progress(f"cloud model served bare, {n} concurrent")
            out["cloud_model"][str(n)] = bench.closed(cloud, n).summary()
        progress(f"CPU per call at {CPU_STREAMS} clients: KServe v2 echo, edge model served bare")
        out["cpu_us_per_call"] = {"kserve": bench.cpu_per_call(kserve, service.proc.pid),
                                  "model": bench.cpu_per_call(model, service.proc.pid)}
        out["rss_bytes"] = servers.rss_bytes(service.proc.pid)
    return out
