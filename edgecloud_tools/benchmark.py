"""``edgecloud bench``: speed and memory of the hot paths, each figure beside its baseline, measured in
the same run on the same machine.

- **backend**: the edge INT8 model vs its FP32 version vs the cloud model (ONNX Runtime, CPU):
  latency at batch 1, throughput at a larger batch, file size, resident memory added by loading;
- **agent**: one request through the edge agent (gRPC on loopback, ``escalate=never``) vs the same
  model called in-process: what the agent's stack costs per call;
- **gateway**: rows/s of the cloud model under concurrent single-row clients, with the dynamic batcher
  vs without it (``max_batch_size = 0``).

Prints a table, writes JSON and, when matplotlib is installed (the ``bench`` extra), a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgecloud.backends import open_backend
from edgecloud.client import KServeClient
from edgecloud.endpoint import free_loopback_port
from edgecloud.modelcard import served_name
from edgecloud.protocol.parameters import AgentRequest
from edgecloud_tools.cli import positive_int
from edgecloud_tools.services import ServiceProcess
from edgecloud_tools.toolchain import CLOUD, EDGE_FP32, EDGE_INT8, models_dir


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _timed(fn, repeats: int, warmup: int = 5) -> np.ndarray:
    """Milliseconds per call over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = np.empty(repeats)
    for i in range(repeats):
        started = time.perf_counter()
        fn()
        samples[i] = time.perf_counter() - started
    return samples * 1000.0


def _stats(ms: np.ndarray) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(ms.mean()), 3)}


def _progress(message: str) -> None:
    print(f"  bench: {message}", file=sys.stderr, flush=True)


def bench_backend(label: str, path: Path, rows: np.ndarray, repeats: int, batch: int) -> dict:
    """Latency at batch 1 and throughput at ``batch`` for one model file, with its memory cost."""
    _progress(f"backend {label}: {path.name}")
    before = _rss_bytes()
    backend = open_backend(path)
    loaded = _rss_bytes()
    name = backend.inputs[0].name
    one, many = {name: rows[:1]}, {name: rows[:batch]}
    single = _timed(lambda: backend.infer(one), repeats)
    batched = _timed(lambda: backend.infer(many), max(5, repeats // 10))
    backend.close()
    return {"model": label, "file": path.name, "size_bytes": path.stat().st_size,
            "rss_added_bytes": loaded - before,
            "batch1": _stats(single),
            "throughput_rows_per_s": round(batch * 1000.0 / float(np.median(batched)), 1)}


def bench_agent(edge: Path, rows: np.ndarray, repeats: int, workdir: Path) -> dict:
    """The agent's per-call cost: a gRPC round trip through the cascade vs the model in-process."""
    _progress("agent round trip")
    backend = open_backend(edge)
    name = backend.inputs[0].name
    direct = _timed(lambda: backend.infer({name: rows[:1]}), repeats)
    backend.close()
    port = free_loopback_port()
    flags = ["--model", str(edge), "--listen", f"127.0.0.1:{port}", "--state-dir", str(workdir / "agent"),
             "--log-level", "WARNING", "--metrics-listen", f"127.0.0.1:{free_loopback_port()}"]
    agent = ServiceProcess("edge-agent", flags, port, workdir / "agent.log")
    model = served_name(edge)
    with agent, KServeClient(f"127.0.0.1:{port}") as client:
        never = {AgentRequest.ESCALATE: "never"}
        served = _timed(lambda: client.infer(model, {name: rows[:1]}, params=never), repeats)
    return {"in_process": _stats(direct), "through_agent": _stats(served),
            "overhead_p50_ms": round(float(np.median(served) - np.median(direct)), 3)}


def _gateway_rows_per_s(cloud: Path, input_name: str, rows: np.ndarray, clients: int, calls: int,
                        batch_size: int, workdir: Path) -> float:
    repo = workdir / f"repo-{batch_size}"
    (repo / "m" / "1").mkdir(parents=True)
    shutil.copyfile(cloud, repo / "m" / "1" / "model.onnx")
    (repo / "m" / "config.toml").write_text(f"max_batch_size = {batch_size}\nmax_queue_delay_us = 2000\n")
    port = free_loopback_port()
    flags = ["--model-repository", str(repo), "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"]
    gateway = ServiceProcess("cloud-gateway", flags, port, workdir / f"gw-{batch_size}.log")
    with gateway:
        def worker(k: int) -> None:
            with KServeClient(f"127.0.0.1:{port}") as client:
                for i in range(calls):
                    client.infer("m", {input_name: rows[(k + i) % len(rows)][None]})
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return clients * calls / (time.perf_counter() - started)


def bench_gateway(cloud: Path, rows: np.ndarray, clients: int, calls: int, workdir: Path) -> dict:
    """Dynamic batching vs one run per request, same model, same concurrent load."""
    _progress(f"gateway, {clients} concurrent clients")
    backend = open_backend(cloud)
    name = backend.inputs[0].name
    backend.close()
    batched = _gateway_rows_per_s(cloud, name, rows, clients, calls, 32, workdir)
    single = _gateway_rows_per_s(cloud, name, rows, clients, calls, 0, workdir)
    return {"clients": clients, "calls_per_client": calls, "rows_per_s_batched": round(batched, 1),
            "rows_per_s_unbatched": round(single, 1), "speedup": round(batched / single, 2)}


def format_table(r: dict) -> str:
    lines = [f"{'model (ONNX Runtime, CPU)':34} {'size MB':>8} {'RSS MB':>7} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'rows/s @' + str(r['batch']):>10}"]
    for b in r["backend"]:
        lines.append(f"{b['model']:34} {b['size_bytes'] / 1e6:8.2f} {b['rss_added_bytes'] / 1e6:7.1f} "
                     f"{b['batch1']['p50_ms']:7.3f} {b['batch1']['p99_ms']:7.3f} "
                     f"{b['throughput_rows_per_s']:10.0f}")
    a = r["agent"]
    lines += ["", f"agent round trip (batch 1): p50 {a['through_agent']['p50_ms']:.3f} ms vs in-process "
                  f"{a['in_process']['p50_ms']:.3f} ms: overhead {a['overhead_p50_ms']:.3f} ms"]
    g = r["gateway"]
    lines += [f"gateway, {g['clients']} concurrent clients: {g['rows_per_s_batched']:.0f} rows/s with "
              f"dynamic batching vs {g['rows_per_s_unbatched']:.0f} without ({g['speedup']:.2f}x)"]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> bool:
    """Bar charts of latency and throughput; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [b["model"] for b in r["backend"]]
    axes[0].bar(names, [b["batch1"]["p50_ms"] for b in r["backend"]], color="#4c72b0")
    axes[0].set_title("latency at batch 1 (p50, ms)")
    axes[1].bar(names, [b["throughput_rows_per_s"] for b in r["backend"]], color="#55a868")
    axes[1].set_title(f"throughput at batch {r['batch']} (rows/s)")
    g = r["gateway"]
    axes[2].bar(["dynamic batching", "no batching"], [g["rows_per_s_batched"], g["rows_per_s_unbatched"]],
                color=["#c44e52", "#8172b2"])
    axes[2].set_title(f"gateway rows/s, {g['clients']} clients")
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_bench(args: argparse.Namespace) -> int:
    from edgecloud_tools.toolchain.dataset import make_split

    images, _ = make_split("test", max(args.batch, 64))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgecloud-bench-") as tmp:
        machine = {"python": platform.python_version(), "cpus": os.cpu_count(),
                   "platform": platform.platform()}
        models = {"edge INT8": args.edge, "edge FP32": args.edge_fp32, "cloud FP32": args.cloud}
        open_backend(args.edge).close()  # ONNX Runtime's own start-up is nobody's model: pay it first
        result = {
            "machine": machine,
            "batch": args.batch,
            "backend": [bench_backend(label, path, images, args.repeats, args.batch)
                        for label, path in models.items()],
            "agent": bench_agent(args.edge, images, args.repeats, Path(tmp)),
            "gateway": bench_gateway(args.cloud, images, args.clients, args.calls, Path(tmp)),
        }
    print(format_table(result))
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    plotted = plot(result, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if plotted else
                                              " (pip install edgecloud[bench] for the plot)"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    models = models_dir()
    p = sub.add_parser("bench", help="speed and memory of the hot paths beside their baselines",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edge", type=Path, default=models / EDGE_INT8, help="edge INT8 model")
    p.add_argument("--edge-fp32", type=Path, default=models / EDGE_FP32,
                   help="its FP32 version (baseline)")
    p.add_argument("--cloud", type=Path, default=models / CLOUD, help="cloud model")
    p.add_argument("--repeats", type=positive_int, default=300, help="timed calls per latency figure")
    p.add_argument("--batch", type=positive_int, default=32, help="batch size for throughput")
    p.add_argument("--clients", type=positive_int, default=8, help="concurrent clients against the gateway")
    p.add_argument("--calls", type=positive_int, default=100, help="calls per gateway client")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where JSON and PNG go")
    p.set_defaults(func=run_bench)
