"""``edgecloud demo``: a cloud gateway and an edge agent on loopback, a stream of held-out inspection
images through the agent as a local app would send them, and a summary of what the cascade bought.

The gateway adds an emulated WAN delay (``--wan-ms``) so that cloud answers cost what they would
across a factory uplink. The same images also go edge-only (``escalate=never``) and cloud-only
(straight to the gateway) for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecloud.client import KServeClient
from edgecloud.endpoint import free_loopback_port
from edgecloud.modelcard import served_name
from edgecloud.services import ServiceProcess

MODELS = Path(__file__).resolve().parents[1] / "models"
EDGE_MODEL = MODELS / "edge" / "inspection-edge-int8.onnx"
CLOUD_REPOSITORY = MODELS / "repository"
CLOUD_MODEL = "inspection"


@dataclass
class Run:
    """What one pass over the stream saw, per image."""

    name: str
    correct: list[bool] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    escalated: list[bool] = field(default_factory=list)
    degraded: list[bool] = field(default_factory=list)

    def add(self, correct: bool, latency_s: float, escalated: bool = False, degraded: bool = False) -> None:
        self.correct.append(correct)
        self.latency_s.append(latency_s)
        self.escalated.append(escalated)
        self.degraded.append(degraded)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else float("nan")

    def latency_ms(self, which: str = "all") -> np.ndarray:
        lat, esc = np.asarray(self.latency_s) * 1000, np.asarray(self.escalated, dtype=bool)
        return {"all": lat, "edge": lat[~esc], "escalated": lat[esc]}[which]


def _percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values.size else None


def stream(client: KServeClient, model: str, images: np.ndarray, labels: np.ndarray, name: str,
           params: dict | None = None) -> Run:
    """Send each image as one request, the way a camera loop would, and score the answers."""
    run = Run(name)
    progress_every = max(1, len(images) // 10)
    for i, (image, label) in enumerate(zip(images, labels)):
        started = time.perf_counter()
        reply = client.infer(model, {"image": image[None]}, params=params, request_id=f"{name}-{i}")
        elapsed = time.perf_counter() - started
        p = reply.parameters
        prediction = int(np.argmax(reply.outputs["logits"][0]))
        run.add(prediction == int(label), elapsed, bool(p.get("edgecloud.escalated_rows", 0)) or
                bool(p.get("edgecloud.degraded")), bool(p.get("edgecloud.degraded", False)))
        if (i + 1) % progress_every == 0:
            print(f"  {name}: {i + 1}/{len(images)}", file=sys.stderr, flush=True)
    return run


def summarize(edge: Run, cloud: Run, cascade: Run) -> dict:
    """The figures the demo reports, as one JSON-able dict."""
    return {
        "images": len(cascade.correct),
        "accuracy": {"edge_only": edge.accuracy, "cloud_only": cloud.accuracy, "cascade": cascade.accuracy},
        "escalation_rate": float(np.mean(cascade.escalated)),
        "degraded": int(np.sum(cascade.degraded)),
        "latency_ms": {
            "cascade_edge_answers": {"p50": _percentile(cascade.latency_ms("edge"), 50),
                                     "p99": _percentile(cascade.latency_ms("edge"), 99)},
            "cascade_escalated": {"p50": _percentile(cascade.latency_ms("escalated"), 50),
                                  "p99": _percentile(cascade.latency_ms("escalated"), 99)},
            "cascade_mean": round(float(cascade.latency_ms().mean()), 2),
            "edge_only_mean": round(float(edge.latency_ms().mean()), 2),
            "cloud_only_mean": round(float(cloud.latency_ms().mean()), 2),
        },
    }


def format_table(s: dict, wan_ms: int) -> str:
    acc, lat = s["accuracy"], s["latency_ms"]

    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    rows = [
        ("edge only (INT8, escalate=never)", f"{acc['edge_only']:.2%}", "-", ms(lat["edge_only_mean"])),
        (f"cloud only (every image over a {wan_ms} ms WAN)", f"{acc['cloud_only']:.2%}", "100%",
         ms(lat["cloud_only_mean"])),
        ("cascade (edge + unsure rows to the cloud)", f"{acc['cascade']:.2%}",
         f"{s['escalation_rate']:.1%}", ms(lat["cascade_mean"])),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'accuracy':>9}  {'to cloud':>9}  {'mean ms':>8}"]
    lines += [f"{r[0]:{width}}  {r[1]:>9}  {r[2]:>9}  {r[3]:>8}" for r in rows]
    e, x = lat["cascade_edge_answers"], lat["cascade_escalated"]
    lines += ["", f"cascade latency: edge answers p50 {ms(e['p50'])} ms, p99 {ms(e['p99'])} ms; "
                  f"escalated p50 {ms(x['p50'])} ms, p99 {ms(x['p99'])} ms",
              f"degraded answers (cloud wanted, not reached in time): {s['degraded']} of {s['images']}",
              f"mean latency, cascade vs cloud only: {ms(lat['cascade_mean'])} ms vs "
              f"{ms(lat['cloud_only_mean'])} ms"]
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from edgecloud.toolchain.dataset import make_split  # numpy only; the demo needs no torch

    images, labels = make_split("test", args.n)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgecloud-demo-"))
    gw_port, agent_port = free_loopback_port(), free_loopback_port()
    print(f"edgecloud demo: {args.n} held-out images, WAN {args.wan_ms} ms, logs in {workdir}",
          file=sys.stderr)
    gateway = ServiceProcess("cloud-gateway", [
        "--model-repository", str(args.repository), "--listen", f"127.0.0.1:{gw_port}",
        "--store", str(workdir / "hard-examples.db"), "--added-latency-ms", str(args.wan_ms)],
        gw_port, workdir / "gateway.log")
    agent = ServiceProcess("edge-agent", [
        "--model", str(args.edge_model), "--listen", f"127.0.0.1:{agent_port}",
        "--cloud", f"127.0.0.1:{gw_port}", "--cloud-model", CLOUD_MODEL,
        "--deadline-ms", str(args.deadline_ms), "--max-per-s", "1000",
        "--state-dir", str(workdir / "agent-state"), "--device-id", "demo-line-1"],
        agent_port, workdir / "agent.log")
    with gateway, agent, KServeClient(f"127.0.0.1:{agent_port}") as edge_client, \
            KServeClient(f"127.0.0.1:{gw_port}") as cloud_client:
        model = served_name(args.edge_model)
        cascade = stream(edge_client, model, images, labels, "cascade")
        edge = stream(edge_client, model, images, labels, "edge-only", {"edgecloud.escalate": "never"})
        cloud = stream(cloud_client, CLOUD_MODEL, images, labels, "cloud-only")
    summary = summarize(edge, cloud, cascade)
    print(format_table(summary, args.wan_ms))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="gateway + agent on loopback, a stream of images, a summary",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="images to stream (default 500)")
    p.add_argument("--wan-ms", type=int, default=30, help="emulated WAN delay at the cloud (default 30)")
    p.add_argument("--deadline-ms", type=int, default=300, help="agent's escalation deadline")
    p.add_argument("--edge-model", type=Path, default=EDGE_MODEL)
    p.add_argument("--repository", type=Path, default=CLOUD_REPOSITORY)
    p.add_argument("--workdir", type=Path, help="where logs and state go (default: a new temp dir)")
    p.add_argument("--json", type=Path, help="also write the summary as JSON here")
    p.set_defaults(func=run_demo)
