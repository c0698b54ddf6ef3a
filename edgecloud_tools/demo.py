"""``edgecloud demo``: a cloud gateway and an edge agent on loopback, a stream of held-out inspection
images through the agent as a local app would send them, and a summary of what the cascade bought.

The gateway adds an emulated WAN delay (``--wan-ms``) so that cloud answers cost what they would
across a factory uplink. The same images also go edge-only (``escalate=never``) and cloud-only
(straight to the gateway) for comparison.

When mosquitto is installed, the agent also joins a fleet on a local broker and, half-way through the
cascade stream, the better edge model (v2) is published to it as a signed release: the summary shows
the escalation rate before and after the hot swap and how many requests failed across it.

Last, a camera-style local app (:mod:`edgecloud_tools.camera_client`, tritonclient in its own process)
sends the patches as JPEG frames of several camera sizes and reads the labels back, then streams one
still scene: the summary shows the bytes sent upstream per escalated row (the original frame) and how
many frames of the still stream reused the cloud's answer.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from edgecloud.client import KServeClient
from edgecloud.endpoint import free_loopback_port
from edgecloud.modelcard import served_name
from edgecloud.protocol.parameters import AgentRequest, AgentResponse
from edgecloud_tools.cli import positive_int
from edgecloud_tools.demo_detection import DETECTION_EDGE, DETECTION_REPOSITORY, run_detection_demo
from edgecloud_tools.demo_fleet import WATCH_S, DemoFleet, UpdateOutcome
from edgecloud_tools.output import stderr_line, table
from edgecloud_tools.rig.broker import INSTALL_HINT, mosquitto_path
from edgecloud_tools.rig.services import ServiceProcess
from edgecloud_tools.toolchain import (
    CLOUD_NAME,
    EDGE_INT8,
    EDGE_V2_INT8,
    MODELS_ENV,
    REPOSITORY,
    check_found,
    models_dir,
)

DEVICE = "demo-line-1"
UPDATE_TIMEOUT_S = 60.0
CAMERA_TIMEOUT_S = 180.0
#: the agent's counters the camera part reads before and after it
UPSTREAM, ESCALATED = "edgecloud_upstream_bytes_total", "edgecloud_escalated_rows_total"


@dataclass
class Run:
    """What one pass over the stream saw, per answered image, and how many calls failed."""

    name: str
    correct: list[bool] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    escalated: list[bool] = field(default_factory=list)
    degraded: list[bool] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, correct: bool, latency_s: float, escalated: bool = False, degraded: bool = False,
            version: str = "") -> None:
        self.correct.append(correct)
        self.latency_s.append(latency_s)
        self.escalated.append(escalated)
        self.degraded.append(degraded)
        self.versions.append(version)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else float("nan")

    def latency_ms(self, which: str = "all") -> np.ndarray:
        lat, esc = np.asarray(self.latency_s) * 1000, np.asarray(self.escalated, dtype=bool)
        return {"all": lat, "edge": lat[~esc], "escalated": lat[esc]}[which]

    def by_version(self, version: str) -> dict:
        """Accuracy and escalation rate of the answers the edge model ``version`` gave."""
        mask = np.asarray(self.versions) == version
        return {"version": version, "images": int(mask.sum()),
                "accuracy": float(np.mean(np.asarray(self.correct)[mask])) if mask.any() else None,
                "escalation_rate": float(np.mean(np.asarray(self.escalated)[mask])) if mask.any() else None}


def _percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values.size else None


def stream(client: KServeClient, model: str, images: np.ndarray, labels: np.ndarray, name: str,
           params: dict | None = None, *, run: Run | None = None,
           until: Callable[[], bool] | None = None) -> Run:
    """Send each image as one request, the way a camera loop would, and score the answers; a failed
    call is counted and the stream goes on. With ``until``, cycle through the images until it is true.
    With ``run``, add to that run instead of a new one."""
    run = run or Run(name)
    order = itertools.cycle(range(len(images))) if until else range(len(images))
    progress_every = max(1, len(images) // 5)
    for count, i in enumerate(order, 1):
        if until is not None and until():
            break
        started = time.perf_counter()
        request_id = f"{name}-{len(run.correct) + len(run.failed)}"
        try:
            reply = client.infer(model, {"image": images[i][None]}, params=params, request_id=request_id)
        except grpc.RpcError as e:
            run.failed.append(f"{e.code().name}: {e.details()}")
            continue
        elapsed = time.perf_counter() - started
        p = reply.parameters
        prediction = int(np.argmax(reply.outputs["logits"][0]))
        run.add(prediction == int(labels[i]), elapsed, bool(p.get(AgentResponse.ESCALATED_ROWS, 0)) or
                bool(p.get(AgentResponse.DEGRADED)), bool(p.get(AgentResponse.DEGRADED, False)),
                reply.model_version)
        if until is None and count % progress_every == 0:
            stderr_line(f"  {name}: {count}/{len(images)}")
    return run


def counters(metrics_port: int) -> dict[str, float]:
    """The agent's counters from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def camera(agent_port: int, metrics_port: int, model: str, n: int) -> dict:
    """Run the camera client against the agent; its JSON, with the bytes the agent sent upstream per
    row it escalated meanwhile."""
    if importlib.util.find_spec("tritonclient") is None:
        return {"skipped": "needs tritonclient, the client local apps use: pip install 'edgecloud[bench]'"}
    before = counters(metrics_port)
    proc = subprocess.run([sys.executable, "-m", "edgecloud_tools.camera_client", "--url",
                           f"127.0.0.1:{agent_port}", "--model", model, "--n", str(n)],
                          capture_output=True, text=True, timeout=CAMERA_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    after = counters(metrics_port)
    rows = after.get(ESCALATED, 0) - before.get(ESCALATED, 0)
    sent = after.get(UPSTREAM, 0) - before.get(UPSTREAM, 0)
    result["upstream_bytes_per_escalated_row"] = round(sent / rows) if rows else None
    return result


def format_camera(c: dict) -> list[str]:
    if "skipped" in c:
        return [f"camera client skipped: {c['skipped']}"]
    if "error" in c:
        return [f"camera client failed: {c['error']}"]
    sizes = ", ".join(f"{w}x{h}" for h, w in c["sizes"])
    per_row = c["upstream_bytes_per_escalated_row"]
    still = c["still"]
    return [f"camera client (tritonclient, JPEG frames {sizes}): {c['frames']} frames, "
            f"{c['labelled_right'] / max(c['frames'], 1):.1%} labelled right, {c['escalated']} escalated, "
            f"p50 {c['p50_ms']:.1f} ms",
            f"  upstream per escalated row: {'-' if per_row is None else f'{per_row:,}'} bytes (the original "
            f"frame, ~{c['mean_frame_bytes']:,} bytes; the model's tensor would be {c['tensor_bytes']:,})",
            f"  still stream {still['stream']} ({still['frames']} frames of one scene, every one unsure): "
            f"{still['escalated']} escalated, {still['reused']} reused the cloud's answer"]


def summarize(edge: Run, cloud: Run, cascade: Run, during: Run | None = None,
              update: UpdateOutcome | None = None) -> dict:
    """The figures the demo reports, as one JSON-able dict."""
    summary = {
        "images": len(cascade.correct),
        "failed_requests": sum(len(r.failed) for r in (edge, cloud, cascade, during) if r is not None),
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
    if update is not None and during is not None:
        summary["update"] = summarize_update(cascade, during, update)
    return summary


def summarize_update(cascade: Run, during: Run, update: UpdateOutcome) -> dict:
    """The cascade before the release and after it settled (told apart by the model version of each
    answer), and the requests sent while it was downloaded, verified and swapped in."""
    new = str(update.version)
    old = next((v for v in cascade.versions if v != new), None)
    settle_s = None
    if update.published_at is not None and update.settled_at is not None:
        settle_s = round(update.settled_at - update.published_at, 2)
    return {"version": update.version, "state": update.state, "reason": update.reason,
            "publish_error": update.error, "publish_to_settled_s": settle_s, "watch": update.watch,
            "before": cascade.by_version(old) if old is not None else None, "after": cascade.by_version(new),
            "during": {"answered": len(during.correct), "versions": sorted(set(during.versions))},
            "failed_requests": len(cascade.failed) + len(during.failed)}


def format_table(s: dict, wan_ms: int) -> str:
    acc, lat = s["accuracy"], s["latency_ms"]

    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    rows = [
        ("edge only (INT8, escalate=never)", f"{acc['edge_only']:.2%}", "-", ms(lat["edge_only_mean"])),
        (f"cloud only (every image over a {wan_ms} ms WAN)", f"{acc['cloud_only']:.2%}", "100%",
         ms(lat["cloud_only_mean"])),
        ("cascade (edge + unsure rows to the cloud)" + (", v1 then v2" if "update" in s else ""),
         f"{acc['cascade']:.2%}",
         f"{s['escalation_rate']:.1%}", ms(lat["cascade_mean"])),
    ]
    lines = table(("", "accuracy", "to cloud", "mean ms"), rows,
                  justify=("left", "right", "right", "right")).splitlines()
    e, x = lat["cascade_edge_answers"], lat["cascade_escalated"]
    lines += ["", f"cascade latency: edge answers p50 {ms(e['p50'])} ms, p99 {ms(e['p99'])} ms; "
                  f"escalated p50 {ms(x['p50'])} ms, p99 {ms(x['p99'])} ms",
              f"degraded answers (cloud wanted, not reached in time): {s['degraded']} of {s['images']}",
              f"mean latency, cascade vs cloud only: {ms(lat['cascade_mean'])} ms vs "
              f"{ms(lat['cloud_only_mean'])} ms",
              f"failed requests: {s['failed_requests']}"]
    if "update" in s:
        lines += ["", *format_update(s["update"])]
    if "camera" in s:
        lines += ["", *format_camera(s["camera"])]
    return "\n".join(lines)


def format_update(u: dict) -> list[str]:
    def part(side: dict | None) -> str:
        if not side or not side["images"]:
            return "-"
        return (f"v{side['version']}: {side['escalation_rate']:.1%} escalated, {side['accuracy']:.2%} "
                f"accurate over {side['images']} images")

    state = u["state"] + (f" ({u['reason']})" if u["reason"] else "")
    if u["publish_error"]:
        state = f"not published: {u['publish_error']}"
    took = "" if u["publish_to_settled_s"] is None else f" {u['publish_to_settled_s']:.2f} s after publishing"
    watched = f"; watch window ({WATCH_S:g} s): {u['watch']}" if u["state"] == "active" else ""
    return [f"signed release v{u['version']} published half-way through the cascade stream: "
            f"{state}{took}{watched}",
            f"  before the swap  {part(u['before'])}",
            f"  after the swap   {part(u['after'])}",
            f"  while updating   {u['during']['answered']} requests answered (by version "
            f"{', '.join(u['during']['versions']) or '-'}); failed requests across the update: "
            f"{u['failed_requests']}"]


def run_demo(args: argparse.Namespace) -> int:
    if args.task == "detection":
        return run_detection_demo(args, args.models)
    from edgecloud_tools.toolchain.dataset import make_split  # numpy only; the demo needs no torch

    args.edge_model = args.edge_model or args.models / EDGE_INT8
    args.repository = args.repository or args.models / REPOSITORY
    check_found(edge_model=args.edge_model, update_model=args.update_model, repository=args.repository)
    images, labels = make_split("test", args.n)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgecloud-demo-"))
    gw_port, agent_port, metrics_port = free_loopback_port(), free_loopback_port(), free_loopback_port()
    print(f"edgecloud demo: {args.n} held-out images, WAN {args.wan_ms} ms, logs in {workdir}",
          file=sys.stderr)
    fleet = None
    if args.update_model is not None and mosquitto_path() is None:
        print(f"update part skipped: mosquitto is not installed ({INSTALL_HINT}); with it, the demo also "
              "publishes a better edge model as a signed release half-way through", file=sys.stderr)
    elif args.update_model is not None:
        fleet = DemoFleet(workdir / "fleet", DEVICE, args.update_model, f"127.0.0.1:{gw_port}")
    # The gateway keeps uploaded releases in its repository: give it a copy, not the checkout's models.
    repository = shutil.copytree(args.repository, workdir / "repository",
                                 ignore=shutil.ignore_patterns(".releases"))
    gateway = ServiceProcess("cloud-gateway", [
        "--model-repository", str(repository), "--listen", f"127.0.0.1:{gw_port}",
        "--store", str(workdir / "hard-examples.db"), "--added-latency-ms", str(args.wan_ms)],
        gw_port, workdir / "gateway.log")
    agent = ServiceProcess("edge-agent", [
        "--model", str(args.edge_model), "--listen", f"127.0.0.1:{agent_port}",
        "--cloud", f"127.0.0.1:{gw_port}", "--cloud-model", CLOUD_NAME,
        "--deadline-ms", str(args.deadline_ms), "--max-per-s", "1000",
        "--state-dir", str(workdir / "agent-state"), "--device-id", DEVICE,
        "--metrics-listen", f"127.0.0.1:{metrics_port}", *(fleet.agent_flags() if fleet else [])],
        agent_port, workdir / "agent.log")
    with ExitStack() as stack:
        if fleet is not None:
            stack.enter_context(fleet)
        stack.enter_context(gateway)
        stack.enter_context(agent)
        edge_client = stack.enter_context(KServeClient(f"127.0.0.1:{agent_port}"))
        cloud_client = stack.enter_context(KServeClient(f"127.0.0.1:{gw_port}"))
        model = served_name(args.edge_model)
        edge = stream(edge_client, model, images, labels, "edge-only", {AgentRequest.ESCALATE: "never"})
        cloud = stream(cloud_client, CLOUD_NAME, images, labels, "cloud-only")
        if fleet is None:
            cascade, during = stream(edge_client, model, images, labels, "cascade"), None
        else:  # the first half on v1; the release; requests go on until it settles; the second half
            half = args.n // 2
            cascade = stream(edge_client, model, images[:half], labels[:half], "cascade")
            fleet.publish_in_background()
            during = stream(edge_client, model, images[half:], labels[half:], "during-update",
                            until=fleet.settled_or_timed_out(UPDATE_TIMEOUT_S))
            stream(edge_client, model, images[half:], labels[half:], "cascade", run=cascade)
            fleet.wait_watched(WATCH_S + UPDATE_TIMEOUT_S)
        camera_part = camera(agent_port, metrics_port, model, args.camera) if args.camera else None
    summary = summarize(edge, cloud, cascade, during, fleet.outcome if fleet else None)
    if camera_part is not None:
        summary["camera"] = camera_part
    print(format_table(summary, args.wan_ms))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    models = models_dir()
    p = sub.add_parser("demo", help="gateway + agent on loopback, a stream of images, a summary",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, default=500, help="images to stream (default 500)")
    p.add_argument("--wan-ms", type=int, default=30, help="emulated WAN delay at the cloud (default 30)")
    p.add_argument("--deadline-ms", type=int, default=300, help="agent's escalation deadline")
    p.add_argument("--task", choices=("classification", "detection"), default="classification",
                   help="classification (default), or defect detection: mAP of edge, cloud and cascade "
                        "and a PNG of boxes")
    p.add_argument("--edge-model", type=Path,
                   help=f"edge model (default: {EDGE_INT8}, for detection {DETECTION_EDGE}, under "
                        f"${MODELS_ENV}, else ./models, else the packaged models)")
    p.add_argument("--update-model", type=Path, default=models / EDGE_V2_INT8,
                   help="edge model published as a signed release half-way (needs mosquitto)")
    p.add_argument("--no-update", dest="update_model", action="store_const", const=None,
                   help="skip the update part")
    p.add_argument("--repository", type=Path,
                   help=f"the cloud's model repository (copied, never written; default: {REPOSITORY}, for "
                        f"detection {DETECTION_REPOSITORY})")
    p.add_argument("--data", type=Path, help="detection: held-out frames as a COCO-style JSON with the "
                   "images beside it (default: the toolchain's held-out detection split)")
    p.add_argument("--png", type=Path, help="detection: where the PNG of frames with boxes goes "
                   "(default: detections.png in the workdir)")
    p.add_argument("--camera", type=int, default=100, metavar="N",
                   help="frames the camera-style client sends at the end (default 100; 0 = skip)")
    p.add_argument("--workdir", type=Path, help="where logs and state go (default: a new temp dir)")
    p.add_argument("--json", type=Path, help="also write the summary as JSON here")
    p.set_defaults(func=run_demo, models=models)
