"""Build the demo detectors: ``edgecloud models build --task detection [--quick] [--out models]``.

Generates the detection data, trains the small edge detector and the larger cloud detector, exports
both with their decoding, quantizes the edge one to QDQ INT8, chooses on "val" the ``score_threshold``
(best F1 of boxes at IoU 0.5) and the cascade threshold of policy ``box_mean`` for a target cascade
mAP@0.5 or escalation share, scores everything on the held-out "test" split (mAP@0.5 and
mAP@0.5:0.95 of edge FP32, edge INT8, cloud and the cascade) and writes artifacts plus model cards.

As for the classifiers, everything is built in a staging directory and installed into ``--out`` only
when every check holds. ``--quick`` builds the same architectures on a small split in a minute or two:
the format, contract and budget checks apply, the quality targets do not, since so little training
reaches none of them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgecloud.calibration import CalibrationError
from edgecloud.modelcard import CARD_SUFFIX
from edgecloud.release import DEFAULT_BUDGET_BYTES
from edgecloud_tools.toolchain import DET_CLOUD, DET_CLOUD_NAME, DET_EDGE_FP32, DET_EDGE_INT8, check_writable
from edgecloud_tools.toolchain.build import log
from edgecloud_tools.toolchain.detection.card import ScoredDetector, score_detector, write_detector_card
from edgecloud_tools.toolchain.detection.cascade import (
    CascadeResult,
    cascade,
    choose_threshold,
    f1_score_threshold,
)
from edgecloud_tools.toolchain.detection.dataset import DET_LABELS, DetectionSplit, make_detection_split
from edgecloud_tools.toolchain.detection.export import contract_problems, export_detector
from edgecloud_tools.toolchain.detection.nets import TOP_K, Detector, cloud_detector, edge_detector
from edgecloud_tools.toolchain.detection.train import train_detector
from edgecloud_tools.toolchain.export import OPSET
from edgecloud_tools.toolchain.quantize import check_tensorrt_ready, quantize_int8
from edgecloud_tools.toolchain.train import TrainConfig

EDGE_NAME = "inspection-detect-edge"
DETECTORS = (DET_EDGE_FP32, DET_EDGE_INT8, DET_CLOUD)


@dataclass(frozen=True)
class Targets:
    """What the shipped detectors must reach on the held-out split (mAP@0.5), or the build fails."""

    budget_bytes: int = DEFAULT_BUDGET_BYTES
    edge_int8_map50: float = 0.80
    int8_max_drop: float = 0.03
    cloud_map50: float = 0.90
    max_escalation: float = 0.40


@dataclass(frozen=True)
class Recipe:
    """Data sizes, training schedules and the calibration target of one build."""

    n_train: int = 8_000
    n_val: int = 1_500
    n_test: int = 1_500
    n_quant_calibration: int = 500
    edge_training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=12, batch_size=64, seed=11))
    cloud_training: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=12, batch_size=64, seed=13))
    #: the cascade must reach the cloud's "val" mAP@0.5 less this margin ...
    target_map50_margin: float | None = 0.02
    #: ... or escalate at most this share (when the margin is None)
    target_escalation: float | None = None


#: a build that fits in CI: same networks, a small split, short schedules, no quality targets
QUICK = Recipe(n_train=600, n_val=150, n_test=150, n_quant_calibration=64,
               edge_training=TrainConfig(epochs=3, batch_size=64, seed=11),
               cloud_training=TrainConfig(epochs=2, batch_size=64, seed=13),
               target_map50_margin=None, target_escalation=0.3)


@dataclass
class Build:
    """The state of one detection build: data, staging directory, scored detectors, the cascade chosen
    on "val" and what it does on "test", per edge detector."""

    recipe: Recipe
    stage: Path
    data: dict[str, DetectionSplit]
    scored: dict[Path, ScoredDetector] = field(default_factory=dict)
    fits: dict[Path, CascadeResult] = field(default_factory=dict)
    held_out: dict[Path, CascadeResult] = field(default_factory=dict)
    score_thresholds: dict[Path, float] = field(default_factory=dict)
    misses: list[str] = field(default_factory=list)


def _train_and_export(b: Build, name: str, net: Detector, config: TrainConfig, rel: Path) -> None:
    started = time.perf_counter()
    log(f"training {name} detector: {sum(p.numel() for p in net.parameters()):,} parameters, "
        f"{config.epochs} epochs")
    train_detector(net, b.data["train"], config, name, log)
    export_detector(net, b.stage / rel, b.data["val"].images[:128])
    log(f"  {name}: trained and exported to {rel} in {time.perf_counter() - started:.0f} s")


def _source(b: Build, architecture: str, config: TrainConfig, quantized: bool) -> dict[str, Any]:
    r = b.recipe
    target = (f"cascade mAP@0.5 within {r.target_map50_margin} of the cloud's" if r.target_map50_margin
              is not None else f"escalation at most {r.target_escalation}")
    source: dict[str, Any] = {
        "tool": "edgecloud_tools.toolchain.detection.build",
        "data": {"generator": "edgecloud_tools.toolchain.detection.dataset", "train": r.n_train,
                 "val": r.n_val, "test": r.n_test},
        "architecture": architecture, "training": asdict(config),
        "export": {"exporter": f"torch {torch.__version__} torch.onnx (TorchScript)", "opset": OPSET,
                   "decoding": f"3x3 peak, top-{TOP_K} in the graph"},
        "calibration": f"score_threshold by best F1 at IoU 0.5, policy box_mean threshold for {target} "
                       f"on {r.n_val} 'val' frames",
    }
    if quantized:
        source["quantization"] = {
            "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": "int8 per-channel", "activations": "int8 per-tensor, inputs of weighted layers",
            "symmetric": True, "bias": "fp32", "method": "MinMax",
            "calibration_samples": r.n_quant_calibration, "from": DET_EDGE_FP32.name}
    return source


def _map_figures(s: ScoredDetector, prefix: str = "", suffix: str = "") -> dict[str, float]:
    return {f"{prefix}map50{suffix}": s.test_map.map50, f"{prefix}map50_95{suffix}": s.test_map.map50_95}


def _edge_card(b: Build, rel: Path) -> None:
    """Calibrate the cascade of edge model ``rel`` with the cloud on "val", re-measure on "test", write
    its card."""
    r, val, test = b.recipe, b.data["val"], b.data["test"]
    edge, cloud = b.scored[rel], b.scored[DET_CLOUD]
    classes = len(DET_LABELS)
    t = f1_score_threshold(edge.val, val.boxes, val.classes)
    if r.target_map50_margin is not None:
        cloud_val = cascade(cloud.val, cloud.val, 0.0, 0.0, val.boxes, val.classes, classes).map.map50
        target = {"target_map50": round(max(cloud_val - r.target_map50_margin, 0.0), 4)}
    else:
        target = {"target_escalation": r.target_escalation}
    try:
        fit = choose_threshold(edge.val, cloud.val, t, val.boxes, val.classes, classes, **target)
    except CalibrationError as e:
        b.misses.append(f"{rel}: {e}")
        return
    held = cascade(edge.test, cloud.test, t, fit.threshold, test.boxes, test.classes, classes)
    b.fits[rel], b.held_out[rel], b.score_thresholds[rel] = fit, held, t
    metrics = {"split": "test", "n": r.n_test, **_map_figures(edge),
               **_map_figures(b.scored[DET_EDGE_FP32], suffix="_fp32"),
               **_map_figures(b.scored[DET_EDGE_INT8], suffix="_int8"),
               **_map_figures(cloud, prefix="cloud_"), "cascade_map50": held.map.map50,
               "cascade_map50_95": held.map.map50_95, "escalation_rate": held.escalation,
               "threshold": fit.threshold}
    calibrated_on = {"split": "val", "n": r.n_val, "cloud_model": DET_CLOUD_NAME, **target,
                     "map50": fit.map.map50, "escalation_rate": fit.escalation}
    write_detector_card(b.stage / rel, edge, name=EDGE_NAME, version=1, threshold=fit.threshold,
                        score_threshold=t, metrics=metrics, calibrated_on=calibrated_on,
                        source=_source(b, "Detector(width=8)", r.edge_training, rel == DET_EDGE_INT8))


def _write_cards(b: Build) -> None:
    r, val = b.recipe, b.data["val"]
    cloud = b.scored[DET_CLOUD]
    # the cloud is the last tier: threshold 0 never escalates
    t = f1_score_threshold(cloud.val, val.boxes, val.classes)
    b.score_thresholds[DET_CLOUD] = t
    metrics = {"split": "test", "n": r.n_test, **_map_figures(cloud), **_map_figures(cloud, suffix="_fp32")}
    write_detector_card(b.stage / DET_CLOUD, cloud, name=DET_CLOUD_NAME, version=1, threshold=0.0,
                        score_threshold=t, metrics=metrics,
                        source=_source(b, "Detector(width=16, depth=2)", r.cloud_training, False))
    for rel in (DET_EDGE_FP32, DET_EDGE_INT8):
        _edge_card(b, rel)


def check(b: Build, targets: Targets | None) -> list[str]:
    """Every check the built detectors fail ([] = all hold): the contract, TensorRT's INT8 rules and
    the edge budget always; the quality ``targets`` unless None."""
    misses = list(b.misses)
    for rel in DETECTORS:
        misses += [f"{rel}: {p}" for p in contract_problems(b.stage / rel)]
    misses += [f"{DET_EDGE_INT8}: {p}" for p in check_tensorrt_ready(b.stage / DET_EDGE_INT8)]
    budget = (targets or Targets()).budget_bytes
    for rel in (DET_EDGE_FP32, DET_EDGE_INT8):
        size = (b.stage / rel).stat().st_size
        if size > budget:
            misses.append(f"{rel}: {size:,} bytes, over the edge budget of {budget:,}")
    if targets is None:
        return misses
    int8, fp32 = b.scored[DET_EDGE_INT8].test_map.map50, b.scored[DET_EDGE_FP32].test_map.map50
    if int8 < targets.edge_int8_map50:
        misses.append(f"{DET_EDGE_INT8}: mAP@0.5 {int8:.3f} < {targets.edge_int8_map50}")
    if int8 < fp32 - targets.int8_max_drop:
        misses.append(f"{DET_EDGE_INT8}: mAP@0.5 {int8:.3f} is more than {targets.int8_max_drop} below "
                      f"FP32 {fp32:.3f}")
    if b.scored[DET_CLOUD].test_map.map50 < targets.cloud_map50:
        misses.append(f"cloud mAP@0.5 {b.scored[DET_CLOUD].test_map.map50:.3f} < {targets.cloud_map50}")
    held = b.held_out.get(DET_EDGE_INT8)
    if held is not None and held.escalation > targets.max_escalation:
        misses.append(f"{DET_EDGE_INT8}: escalation {held.escalation:.1%} > {targets.max_escalation:.0%}")
    return misses


def report(b: Build) -> str:
    """The table printed at the end: mAP and size per detector, then each cascade."""
    lines = [f"held-out 'test' split, n={b.recipe.n_test} frames",
             f"{'detector':9} {'prec':5} {'mAP@0.5':>8} {'mAP@.5:.95':>10} {'size':>10}  file"]
    for name, precision, rel in (("edge", "FP32", DET_EDGE_FP32), ("edge", "INT8", DET_EDGE_INT8),
                                 ("cloud", "FP32", DET_CLOUD)):
        m, size_kb = b.scored[rel].test_map, (b.stage / rel).stat().st_size / 1000
        lines.append(f"{name:9} {precision:5} {m.map50:>8.3f} {m.map50_95:>10.3f} {size_kb:>7.1f} kB  {rel}")
    lines += ["", f"{'cascade (edge + cloud)':23} {'mAP@0.5':>8} {'mAP@.5:.95':>10} {'escalated':>10} "
                  f"{'threshold':>10} {'score_t':>8}"]
    for name, rel in (("edge FP32", DET_EDGE_FP32), ("edge INT8", DET_EDGE_INT8)):
        if rel not in b.held_out:
            lines.append(f"{name:23} not calibrated: target out of reach")
            continue
        held = b.held_out[rel]
        lines.append(f"{name:23} {held.map.map50:>8.3f} {held.map.map50_95:>10.3f} {held.escalation:>10.1%} "
                     f"{held.threshold:>10.4f} {b.score_thresholds[rel]:>8.3f}")
    return "\n".join(lines)


def _install(stage: Path, out: Path) -> None:
    for rel in DETECTORS:
        for src in (stage / rel, (stage / rel).with_name(rel.name + CARD_SUFFIX)):
            dest = out / src.relative_to(stage)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)


def build_detection(out: Path, recipe: Recipe | None = None, targets: Targets | None = None,
                    quick: bool = False) -> int:
    """Run the detection build; 0 when every check holds and the detectors are installed in ``out``.
    ``quick``: the :data:`QUICK` recipe and no quality targets."""
    out = Path(out)
    check_writable(out, "the built models")
    recipe = recipe or (QUICK if quick else Recipe())
    targets = None if quick else (targets or Targets())
    started = time.perf_counter()
    log(f"generating detection data: train {recipe.n_train}, val {recipe.n_val}, test {recipe.n_test}")
    data = {s: make_detection_split(s, n) for s, n in (("train", recipe.n_train), ("val", recipe.n_val),
                                                          ("test", recipe.n_test))}
    b = Build(recipe, Path(tempfile.mkdtemp(prefix="edgecloud-detection-build-")), data)
    _train_and_export(b, "cloud", cloud_detector(), recipe.cloud_training, DET_CLOUD)
    _train_and_export(b, "edge", edge_detector(), recipe.edge_training, DET_EDGE_FP32)
    quantize_int8(b.stage / DET_EDGE_FP32, b.stage / DET_EDGE_INT8,
                  data["train"].images[:recipe.n_quant_calibration])
    log(f"  edge: quantized to {DET_EDGE_INT8}")
    log("scoring with ONNX Runtime and calibrating")
    for rel in DETECTORS:
        b.scored[rel] = score_detector(b.stage / rel, data["val"], data["test"])
    _write_cards(b)
    print(report(b))
    misses = check(b, targets)
    elapsed = time.perf_counter() - started
    if misses:
        print(f"\nbuild FAILED after {elapsed:.0f} s; checks failed:", *misses, sep="\n  ")
        print(f"rejected artifacts kept in {b.stage}")
        return 1
    _install(b.stage, out)
    shutil.rmtree(b.stage)
    print(f"\nall checks met; installed in {out} ({elapsed:.0f} s)")
    return 0
