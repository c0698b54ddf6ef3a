"""``edgecloud demo --task detection``: the defect-detection case end to end (docs/design.md §10). A cloud
gateway serving the larger detector and an edge agent serving the small one, on loopback; held-out
frames with their true boxes sent to the agent as encoded frames, three times: edge only
(``escalate=never``), cloud only (``escalate=always``) and the cascade; then a table of mAP@0.5, share
escalated and latency, and a PNG of a few frames with the edge's and the cloud's boxes.

The models are found as the toolchain writes them (:data:`DETECTION_EDGE`, :data:`DETECTION_REPOSITORY`
under the models directory). The frames come from ``--data`` (a COCO-style JSON with the images
beside it, such as ``edgecloud examples export --detection-card`` writes) or else the toolchain's
held-out detection split. Boxes are compared in the frame's own pixels: each detector's input pixels
are mapped back through its card's ``preprocess``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, ImageDraw

from edgecloud.client import KServeClient
from edgecloud.confidence.detection import DetectionOutputs
from edgecloud.endpoint import free_loopback_port
from edgecloud.errors import ConfigError
from edgecloud.modelcard import card_detection, card_preprocess, read_card, served_name
from edgecloud.preprocess import Preprocess
from edgecloud.protocol.parameters import AgentRequest, AgentResponse
from edgecloud_tools.output import stderr_line, table
from edgecloud_tools.rig.services import ServiceProcess
from edgecloud_tools.toolchain import DET_CLOUD_NAME, DET_EDGE_INT8, MODELS_ENV, REPOSITORY
from edgecloud_tools.toolchain.detection.metrics import Detections, MeanAP, mean_ap

DEVICE = "demo-line-1"
#: where the toolchain puts the detectors, relative to a models directory
DETECTION_EDGE = DET_EDGE_INT8
DETECTION_REPOSITORY = REPOSITORY
#: the toolchain's held-out detection split (module, function), used when no --data is given
SPLIT = ("edgecloud_tools.toolchain.detection.dataset", "make_detection_split")
#: frames drawn in the PNG, and the colours of the boxes
PNG_FRAMES = 4
COLOURS = {"truth": (60, 200, 60), "edge": (255, 140, 0), "cloud": (40, 120, 255)}


@dataclass(frozen=True)
class HeldOut:
    """Encoded frames and, per frame, its true boxes [m, 4] (x1, y1, x2, y2 in frame pixels) and classes."""

    frames: list[bytes]
    boxes: list[np.ndarray]
    classes: list[np.ndarray]


@dataclass
class DetectionRun:
    """One pass over the frames: each frame's boxes, scores and classes (frame pixels), and how it went."""

    name: str
    boxes: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    classes: list[np.ndarray] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    escalated: list[bool] = field(default_factory=list)
    degraded: list[bool] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Detector:
    """What the demo reads from a detector's card: its outputs and how frames become its input."""

    outputs: DetectionOutputs
    preprocess: Preprocess
    labels: tuple[str, ...]

    @classmethod
    def of(cls, model: Path) -> Detector:
        card = read_card(model)
        where = f"model card of {model}"
        outputs, preprocess = card_detection(card, where), card_preprocess(card, where)
        if outputs is None or preprocess is None:
            raise ConfigError(f"{where}: the detection demo needs a card with task 'detection', its "
                              "'detection' section and a 'preprocess'")
        return cls(outputs, preprocess, tuple(card.get("labels") or ()))


def cloud_model(repository: Path, name: str = DET_CLOUD_NAME) -> tuple[str, Path]:
    """The cloud detector ``name`` of the repository: its name and its newest version's file."""
    versions = sorted((p for p in (repository / name).glob("*") if p.name.isdigit()),
                      key=lambda p: int(p.name))
    if not versions or not (versions[-1] / "model.onnx").is_file():
        raise ConfigError(f"--repository {repository}: no {name}/<version>/model.onnx (the cloud "
                          "detector)")
    return name, versions[-1] / "model.onnx"


def coco_held_out(path: Path, n: int) -> HeldOut:
    """The first ``n`` images of a COCO-style JSON (file names relative to its folder) and their boxes."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        images = document["images"][:n]
        truth: dict[int, list] = {}
        for a in document["annotations"]:
            truth.setdefault(a["image_id"], []).append(a)
        frames = [(Path(path).parent / im["file_name"]).read_bytes() for im in images]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--data {path}: not a COCO-style JSON with its images beside it ({e})") from None
    boxes, classes = [], []
    for im in images:
        found = truth.get(im["id"], [])
        boxes.append(np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in found)],
                              dtype=np.float64).reshape(-1, 4))
        classes.append(np.array([a["category_id"] - 1 for a in found], dtype=np.int64))
    return HeldOut(frames, boxes, classes)


def split_held_out(n: int) -> HeldOut:
    """The toolchain's held-out detection split as PNG frames; ConfigError when it is not installed."""
    try:
        make = getattr(importlib.import_module(SPLIT[0]), SPLIT[1])
    except (ImportError, AttributeError):
        raise ConfigError("the toolchain's detection data set is not in this install; give --data "
                          "COCO.json (images beside it)") from None
    split = make("test", n)
    frames = []
    for image in split.images:
        buffer = io.BytesIO()
        Image.fromarray(np.clip(np.rint(image[0] * 255), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
        frames.append(buffer.getvalue())
    return HeldOut(frames, [np.asarray(b, np.float64).reshape(-1, 4) for b in split.boxes],
                   [np.asarray(c, np.int64) for c in split.classes])


def frame_sizes(frames: Sequence[bytes]) -> list[tuple[int, int]]:
    sizes = []
    for data in frames:
        with Image.open(io.BytesIO(data)) as image:
            sizes.append(image.size)
    return sizes


def stream(client: KServeClient, model: str, data: HeldOut, name: str, mode: str,
           detectors: dict[str, Detector]) -> DetectionRun:
    """Send each frame as one request and keep its boxes, mapped to frame pixels through the preprocess
    of whichever detector answered it (``edge`` or ``cloud``)."""
    run = DetectionRun(name)
    edge = detectors["edge"]
    sizes = frame_sizes(data.frames)
    for i, frame in enumerate(data.frames):
        started = time.perf_counter()
        try:
            reply = client.infer(model, {edge.preprocess.frames: np.array([frame], dtype=np.object_)},
                                 params={AgentRequest.ESCALATE: mode}, request_id=f"{name}-{i}")
        except grpc.RpcError as e:
            run.failed.append(f"{e.code().name}: {e.details()}")
            continue
        run.latency_s.append(time.perf_counter() - started)
        p = reply.parameters
        answered_by = "cloud" if p.get(AgentResponse.SOURCE) == "cloud" else "edge"
        out = edge.outputs
        width, height = sizes[i]
        boxes = np.asarray(reply.outputs[out.boxes], np.float64).reshape(-1, 4)
        mapping = detectors[answered_by].preprocess
        run.boxes.append(np.array([mapping.frame_box(b, width, height) for b in boxes]).reshape(-1, 4))
        run.scores.append(np.asarray(reply.outputs[out.scores], np.float64).reshape(-1))
        run.classes.append(np.asarray(reply.outputs[out.classes], np.int64).reshape(-1))
        run.escalated.append(bool(p.get(AgentResponse.ESCALATED, False)))
        run.degraded.append(bool(p.get(AgentResponse.DEGRADED, False)))
        if (i + 1) % max(1, len(data.frames) // 5) == 0:
            stderr_line(f"  {name}: {i + 1}/{len(data.frames)}")
    return run


def run_map(run: DetectionRun, data: HeldOut, classes: int) -> MeanAP:
    """COCO-style mAP of one pass over the frames (the toolchain's metric, numpy only)."""
    answers = Detections(np.stack(run.boxes), np.stack(run.scores), np.stack(run.classes))
    return mean_ap(answers, data.boxes, data.classes, classes)


def _ms(values: Sequence[float], q: float | None = None) -> float | None:
    if not values:
        return None
    ms = np.asarray(values) * 1000
    return round(float(ms.mean() if q is None else np.percentile(ms, q)), 2)


def summarize(runs: dict[str, DetectionRun], data: HeldOut, classes: int) -> dict:
    out: dict = {"frames": len(data.frames), "failed_requests": sum(len(r.failed) for r in runs.values())}
    for key, run in runs.items():
        complete = len(run.boxes) == len(data.frames)
        found = run_map(run, data, classes) if complete else None
        out[key] = {"map50": round(found.map50, 4) if found else None,
                    "map50_95": round(found.map50_95, 4) if found else None,
                    "escalated": round(float(np.mean(run.escalated)), 4) if run.escalated else 0.0,
                    "degraded": int(sum(run.degraded)), "mean_ms": _ms(run.latency_s),
                    "p50_ms": _ms(run.latency_s, 50), "p99_ms": _ms(run.latency_s, 99)}
    return out


def format_table(s: dict, wan_ms: int) -> str:
    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [(label, cell(s[key]["map50"], ".3f"), cell(s[key]["map50_95"], ".3f"), cell(share, ".1%"),
             cell(s[key]["mean_ms"], ".1f"))
            for key, label, share in (
                ("edge", "edge only (escalate=never)", None),
                ("cloud", f"cloud only (every frame over a {wan_ms} ms WAN)", 1.0),
                ("cascade", "cascade (edge + unsure frames to the cloud)", s["cascade"]["escalated"]))]
    lines = table(("", "mAP@0.5", "mAP@.5:.95", "to cloud", "mean ms"), rows,
                  justify=("left", "right", "right", "right", "right")).splitlines()
    c = s["cascade"]
    lines += ["", f"cascade latency: p50 {cell(c['p50_ms'], '.1f')} ms, p99 {cell(c['p99_ms'], '.1f')} ms; "
                  f"degraded answers: {c['degraded']} of {s['frames']}",
              f"failed requests: {s['failed_requests']}"]
    return "\n".join(lines)


def draw(path: Path, data: HeldOut, edge: DetectionRun, cloud: DetectionRun, thresholds: dict[str, float],
         labels: Sequence[str], scale: int = 4) -> Path:
    """A PNG of a few frames side by side, enlarged, those with defects first: true boxes green, the
    edge's (above its score threshold) orange, the cloud's blue."""
    answered = range(min(len(edge.boxes), len(cloud.boxes)))
    shown = sorted(answered, key=lambda i: len(data.boxes[i]) == 0)[:PNG_FRAMES]  # stable: in order
    tiles = []
    for i in shown:
        with Image.open(io.BytesIO(data.frames[i])) as image:
            tile = image.convert("RGB")
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
        pen = ImageDraw.Draw(tile)
        sets = [("truth", data.boxes[i], None, data.classes[i]),
                ("edge", edge.boxes[i], edge.scores[i], edge.classes[i]),
                ("cloud", cloud.boxes[i], cloud.scores[i], cloud.classes[i])]
        for who, boxes, scores, classes in sets:
            for k, box in enumerate(boxes):
                if scores is not None and scores[k] < thresholds[who]:
                    continue
                pen.rectangle([float(v) * scale for v in box], outline=COLOURS[who], width=2)
                name = labels[int(classes[k])] if 0 <= int(classes[k]) < len(labels) else str(int(classes[k]))
                pen.text((float(box[0]) * scale + 2, float(box[1]) * scale + 1), name, fill=COLOURS[who])
        tiles.append(tile)
    width = sum(t.width for t in tiles) + 4 * max(len(tiles) - 1, 0)
    canvas = Image.new("RGB", (max(width, 1), max((t.height for t in tiles), default=1) + 14), "white")
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 14))
        x += tile.width + 4
    ImageDraw.Draw(canvas).text((2, 1), "truth green, edge orange, cloud blue", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def run_detection_demo(args: argparse.Namespace, models: Path) -> int:
    edge_model = Path(args.edge_model or models / DETECTION_EDGE)
    repository = Path(args.repository or models / DETECTION_REPOSITORY)
    for flag, path in (("edge-model", edge_model), ("repository", repository)):
        if not path.exists():
            raise ConfigError(f"--{flag} {path}: no detection model there (`edgecloud models build "
                              f"--task detection` builds them into ${MODELS_ENV}, else ./models)")
    cloud_name, cloud_file = cloud_model(repository)
    detectors = {"edge": Detector.of(edge_model), "cloud": Detector.of(cloud_file)}
    data = coco_held_out(args.data, args.n) if args.data else split_held_out(args.n)
    labels = detectors["edge"].labels
    classes = max([len(labels), *(int(c.max()) + 1 for c in data.classes if c.size)])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgecloud-demo-detection-"))
    gw_port, agent_port = free_loopback_port(), free_loopback_port()
    print(f"edgecloud demo --task detection: {len(data.frames)} held-out frames, WAN {args.wan_ms} ms, "
          f"logs in {workdir}", file=sys.stderr)
    shutil.rmtree(workdir / "repository", ignore_errors=True)  # a workdir given again: a fresh copy
    copied = shutil.copytree(repository, workdir / "repository", ignore=shutil.ignore_patterns(".releases"))
    gateway = ServiceProcess("cloud-gateway", [
        "--model-repository", str(copied), "--listen", f"127.0.0.1:{gw_port}",
        "--store", str(workdir / "hard-examples.db"), "--added-latency-ms", str(args.wan_ms)],
        gw_port, workdir / "gateway.log")
    agent = ServiceProcess("edge-agent", [
        "--model", str(edge_model), "--listen", f"127.0.0.1:{agent_port}",
        "--cloud", f"127.0.0.1:{gw_port}", "--cloud-model", cloud_name,
        "--deadline-ms", str(args.deadline_ms), "--max-per-s", "1000",
        "--state-dir", str(workdir / "agent-state"), "--device-id", DEVICE,
        "--metrics-listen", f"127.0.0.1:{free_loopback_port()}"], agent_port, workdir / "agent.log")
    model = served_name(edge_model)
    with ExitStack() as stack:
        stack.enter_context(gateway)
        stack.enter_context(agent)
        client = stack.enter_context(KServeClient(f"127.0.0.1:{agent_port}"))
        runs = {key: stream(client, model, data, name, mode, detectors)
                for key, name, mode in (("edge", "edge-only", "never"), ("cloud", "cloud-only", "always"),
                                        ("cascade", "cascade", "auto"))}
    summary = summarize(runs, data, classes)
    thresholds = {"truth": 0.0, "edge": detectors["edge"].outputs.score_threshold,
                  "cloud": detectors["cloud"].outputs.score_threshold}
    png = draw(Path(args.png or workdir / "detections.png"), data, runs["edge"], runs["cloud"], thresholds,
               labels)
    summary["png"] = str(png)
    print(format_table(summary, args.wan_ms))
    print(f"frames with edge and cloud boxes: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0
