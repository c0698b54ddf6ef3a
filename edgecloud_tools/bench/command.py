"""``edgecloud bench``: the agent and the gateway side by side with their floors and their peers, in one
run on one machine, every figure beside its baseline.

Stages, in order (one progress line each on stderr):
  floors      the models in process; a minimal KServe v2 echo and a bare gRPC echo, same client and load
  agent       closed loops at 1, 4, 16, 64 clients, open loops at 1.5x and 3x the measured capacity
  peers       FastAPI + uvicorn (JSON) and MLServer 1.7 (custom ONNX Runtime runtime), same model and load
  gateway     1, 16, 64, 256 single-row streams, dynamic batching on and off; MLServer adaptive batching
  slow_cloud  a 250 ms cloud: edge-only p50/p99 with and without 16 escalating clients
  cascade     cascade vs cloud-only vs edge-only behind a 30 ms WAN: accuracy, latency, bytes upstream
  frames      640x480 JPEG frames: decode + pre-process beside the model, frames/s at 4 clients, and
              upstream bytes per escalated row, original frame vs tensor
  cold_start  agent start to READY=1, and its memory

Clients are separate processes (tritonclient's gRPC client; plain HTTP/1.1 for FastAPI). The peers run
in venvs the bench makes on first use ($EDGECLOUD_BENCH_PEERS); one that cannot be installed is
reported "not installed". Everything listens on and targets 127.0.0.1 only, and every load loop is
bounded in calls and time. Prints a table, writes bench.json and, with matplotlib (the ``bench``
extra), PNG plots. ``--quick`` is the same with small counts, without making peer venvs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from edgecloud_tools.bench.agent_load import agent_load
from edgecloud_tools.bench.cascade import cascade
from edgecloud_tools.bench.cold_start import cold_start
from edgecloud_tools.bench.floors import echoes, in_process
from edgecloud_tools.bench.frames import frames
from edgecloud_tools.bench.gateway_load import gateway_load
from edgecloud_tools.bench.peer_load import peer_load
from edgecloud_tools.bench.peers import venv_root
from edgecloud_tools.bench.plan import FULL, QUICK, Bench, Models, progress
from edgecloud_tools.bench.plots import plot
from edgecloud_tools.bench.report import format_table
from edgecloud_tools.bench.slow_cloud import slow_cloud
from edgecloud_tools.bench.targets import goals
from edgecloud_tools.rig.clients import ClientPool, model_input
from edgecloud_tools.rig.machine import machine
from edgecloud_tools.toolchain import CLOUD, EDGE_FP32, EDGE_INT8, REPOSITORY, check_found, models_dir


def floors(bench: Bench) -> dict:
    return {"in_process": in_process(bench), "echo": echoes(bench)}


#: stage name → what runs it; the order of the run
STAGES: dict[str, Callable[[Bench], dict]] = {
    "floors": floors, "agent": agent_load, "peers": peer_load, "gateway": gateway_load,
    "slow_cloud": slow_cloud, "cascade": cascade, "frames": frames, "cold_start": cold_start,
}


def run_stages(bench: Bench, names: list[str]) -> dict:
    """Every stage in ``names``; one that fails is recorded with its error and the others still run."""
    results: dict = {}
    for name in names:
        progress(f"stage {name}")
        started = time.monotonic()
        try:
            results[name] = STAGES[name](bench)
        except Exception as e:  # one broken stage must not hide the others' figures
            (bench.workdir / f"{name}.error.txt").write_text(traceback.format_exc())
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            progress(f"stage {name} failed: {results[name]['error']} (logs in {bench.workdir})")
        results.setdefault("seconds", {})[name] = round(time.monotonic() - started, 1)
    return results


def run_bench(args: argparse.Namespace) -> int:
    check_found(edge=args.edge, edge_fp32=args.edge_fp32, repository=args.repository)
    plan = dataclasses.replace(QUICK if args.quick else FULL,
                               make_peers=not args.quick and not args.no_peer_install)
    models = Models(edge=args.edge, edge_fp32=args.edge_fp32, repository=args.repository,
                    cloud=args.repository / CLOUD.relative_to(REPOSITORY))
    names = args.only or list(STAGES)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgecloud-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    progress(f"{'quick' if plan.quick else 'full'} run: stages {', '.join(names)}; logs in {workdir}")
    result: dict = {"command": "edgecloud bench" + (" --quick" if plan.quick else ""), "quick": plan.quick,
                    "machine": machine(args.client_procs), "plan": dataclasses.asdict(plan)}
    with ClientPool(args.client_procs, workdir / "clients") as pool:
        bench = Bench(plan, models, workdir, pool, args.peers_dir, model_input(models.edge))
        result.update(run_stages(bench, names))
    result["targets"] = [g.as_dict() for g in goals(result)]
    print(format_table(result), end="")
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    plotted = plot(result, out)
    written = [out / "bench.json", *(plotted or [])]
    print(f"\nwrote {', '.join(str(p) for p in written)}"
          + ("" if plotted is not None else "; no plots: matplotlib is not installed (the bench extra)"))
    failed = [n for n in names if "error" in result.get(n, {})]
    if failed:
        print(f"stages that failed: {', '.join(failed)} (logs in {workdir})", file=sys.stderr)
        return 1
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _client_procs(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (the slow cloud runs two loads at once), not {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    models = models_dir()
    p = sub.add_parser("bench", help="the agent and gateway beside their floors and peers, in one run",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts (CI); peers only if already installed")
    p.add_argument("--only", action="append", choices=list(STAGES), help="run only this stage (repeatable)")
    p.add_argument("--edge", type=Path, default=models / EDGE_INT8, help="the agent's (INT8) model")
    p.add_argument("--edge-fp32", type=Path, default=models / EDGE_FP32, help="its FP32 version")
    p.add_argument("--repository", type=Path, default=models / REPOSITORY, help="the gateway's repository")
    p.add_argument("--client-procs", type=_client_procs, default=2, help="client processes (default 2)")
    p.add_argument("--peers-dir", type=Path, default=venv_root(), help="where the peers' venvs are kept")
    p.add_argument("--no-peer-install", action="store_true", help="never make a peer's venv")
    p.add_argument("--workdir", type=Path, help="keep logs and state here (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where bench.json and the PNGs go")
    p.set_defaults(func=run_bench)
