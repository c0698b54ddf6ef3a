"""Rebuild the demo models from nothing: ``python -m edgecloud_tools.toolchain.build [--out models]`` (also
``edgecloud models build``).

Generates the synthetic data, trains the edge model (v1), a better edge model (v2, for the signed
update demo) and the cloud model, exports them to ONNX, quantizes the edge models to QDQ INT8,
calibrates each edge model's cascade on "val" (temperature by NLL, threshold for the target cascade
accuracy), scores everything on the held-out "test" split and writes artifacts plus model cards.

Everything is built in a staging directory and installed into ``--out`` only when every target holds;
otherwise the exit code is 1, the misses are listed and the rejected artifacts stay where they were
built. Rebuilt models are not byte-identical to the committed ones: training is seeded, but
multi-threaded CPU kernels sum in a different order from run to run, so figures move by a few tenths
of a point.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgecloud.calibration import CalibrationError, CascadeOutcome, fit_temperature
from edgecloud.modelcard import CARD_SUFFIX, CardCalibration
from edgecloud.release import DEFAULT_BUDGET_BYTES
from edgecloud_tools.toolchain import (
    CLOUD,
    CLOUD_NAME,
    EDGE_FP32,
    EDGE_INT8,
    EDGE_V2_INT8,
    check_writable,
    own_models_dir,
)
from edgecloud_tools.toolchain.dataset import make_split
from edgecloud_tools.toolchain.evaluate import (
    TARGET_ACCURACY,
    CascadeFit,
    Scored,
    Splits,
    calibrate_cascade,
    classifier_card,
)
from edgecloud_tools.toolchain.export import OPSET, OUTPUT_NAME, export_onnx
from edgecloud_tools.toolchain.nets import CloudNet, EdgeNet
from edgecloud_tools.toolchain.quantize import check_tensorrt_ready, quantize_int8
from edgecloud_tools.toolchain.train import TrainConfig, train

EDGE_NAME = "inspection-edge"
EDGE_V2_FP32 = Path("edge/inspection-edge-v2-fp32.onnx")  # scored for the v2 card, not installed


@dataclass(frozen=True)
class Targets:
    """What the shipped models must reach on the held-out split, or the build fails."""

    budget_bytes: int = DEFAULT_BUDGET_BYTES
    edge_int8_accuracy: float = 0.90
    int8_max_drop: float = 0.01
    cloud_accuracy: float = 0.98
    cascade_accuracy: float = 0.975
    max_escalation: float = 0.20


@dataclass(frozen=True)
class Recipe:
    """Data sizes, architectures and training schedules of one build."""

    n_train: int = 20_000
    n_val: int = 5_000
    n_test: int = 5_000
    n_quant_calibration: int = 1_000
    edge_width: int = 6
    edge_v2_width: int = 8
    cloud_width: int = 16
    edge_training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=6, seed=1))
    edge_v2_training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=8, seed=2))
    cloud_training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, seed=3))
    policy: str = "max_prob"
    calibration_accuracy: float = TARGET_ACCURACY


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Build:
    """The state of one build: data, staging directory, scored models, fitted cascades and what they
    do on the held-out split."""

    recipe: Recipe
    stage: Path
    data: dict[str, tuple[np.ndarray, np.ndarray]]
    scored: dict[Path, Scored] = field(default_factory=dict)
    fits: dict[Path, CascadeFit] = field(default_factory=dict)
    held_out: dict[Path, CascadeOutcome] = field(default_factory=dict)
    #: targets missed before check_targets runs (a calibration target out of reach)
    misses: list[str] = field(default_factory=list)

    @property
    def splits(self) -> Splits:
        return Splits(self.data["val"], self.data["test"])

    def score(self, rel: Path) -> None:
        self.scored[rel] = self.splits.score(self.stage / rel)


def _train_and_export(b: Build, name: str, net: torch.nn.Module, config: TrainConfig, rel: Path) -> None:
    started = time.perf_counter()
    log(f"training {name}: {sum(p.numel() for p in net.parameters()):,} parameters, {config.epochs} epochs")
    train(net, *b.data["train"], config, b.data["val"], name, log)
    export_onnx(net, b.stage / rel, b.data["val"][0][:256])
    log(f"  {name}: trained and exported to {rel} in {time.perf_counter() - started:.0f} s")


def _train_all(b: Build) -> None:
    r = b.recipe
    _train_and_export(b, "cloud", CloudNet(r.cloud_width), r.cloud_training, CLOUD)
    for name, width, config, fp32, int8 in (
            ("edge v1", r.edge_width, r.edge_training, EDGE_FP32, EDGE_INT8),
            ("edge v2", r.edge_v2_width, r.edge_v2_training, EDGE_V2_FP32, EDGE_V2_INT8)):
        _train_and_export(b, name, EdgeNet(width), config, fp32)
        quantize_int8(b.stage / fp32, b.stage / int8, b.data["train"][0][:r.n_quant_calibration])
        log(f"  {name}: quantized to {int8}")


def _source(b: Build, architecture: str, config: TrainConfig, quantized_from: Path | None) -> dict:
    r = b.recipe
    source: dict[str, Any] = {
        "tool": "edgecloud_tools.toolchain.build",
        "data": {"generator": "edgecloud_tools.toolchain.dataset", "train": r.n_train, "val": r.n_val,
                 "test": r.n_test},
        "architecture": architecture, "training": asdict(config),
        "export": {"exporter": f"torch {torch.__version__} torch.onnx (TorchScript)", "opset": OPSET},
        "calibration": f"temperature by NLL and threshold for cascade accuracy {r.calibration_accuracy} "
                       f"on {r.n_val} 'val' samples",
    }
    if quantized_from is not None:
        source["quantization"] = {
            "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": "int8 per-channel", "activations": "int8 per-tensor, inputs of weighted layers",
            "symmetric": True, "bias": "fp32", "method": "MinMax",
            "calibration_samples": r.n_quant_calibration, "from": quantized_from.name}
    return source


def _card(b: Build, rel: Path, name: str, version: int, calibration: CardCalibration,
          metrics: Mapping[str, Any], source: dict, calibrated_on: dict | None = None) -> None:
    path = b.stage / rel
    classifier_card(path, b.scored[rel], calibration, metrics, name=name, version=version, source=source,
                    calibrated_on=calibrated_on).save(path)


def _edge_card(b: Build, rel: Path, version: int, fp32: Path, int8: Path, width: int,
               config: TrainConfig) -> None:
    r = b.recipe
    try:
        cal = calibrate_cascade(b.splits, b.scored[rel], b.scored[CLOUD], r.policy,
                                {"target_accuracy": r.calibration_accuracy}, cloud_model=CLOUD_NAME,
                                score_output=OUTPUT_NAME)
    except CalibrationError as e:  # a miss like any other: listed, and nothing is installed
        b.misses.append(f"{rel}: {e}")
        return
    b.fits[rel], b.held_out[rel] = cal.fit, cal.held_out
    metrics = {**cal.metrics, "accuracy_fp32": b.scored[fp32].test_accuracy,
               "accuracy_int8": b.scored[int8].test_accuracy}
    _card(b, rel, EDGE_NAME, version, cal.calibration, metrics,
          _source(b, f"EdgeNet(width={width})", config, fp32 if rel == int8 else None), cal.calibrated_on)


def _write_cards(b: Build) -> None:
    r = b.recipe
    cloud = b.scored[CLOUD]
    # the cloud is the last tier: threshold 0 never escalates; its temperature still calibrates
    # the confidence it reports
    cloud_cal = CardCalibration(r.policy, fit_temperature(cloud.val, b.data["val"][1]), 0.0, OUTPUT_NAME)
    _card(b, CLOUD, CLOUD_NAME, 1, cloud_cal,
          {"split": "test", "n": r.n_test, "accuracy": cloud.test_accuracy,
           "accuracy_fp32": cloud.test_accuracy},
          _source(b, f"CloudNet(width={r.cloud_width})", r.cloud_training, None))
    for rel in (EDGE_FP32, EDGE_INT8):
        _edge_card(b, rel, 1, EDGE_FP32, EDGE_INT8, r.edge_width, r.edge_training)
    _edge_card(b, EDGE_V2_INT8, 2, EDGE_V2_FP32, EDGE_V2_INT8, r.edge_v2_width, r.edge_v2_training)


def check_targets(b: Build, targets: Targets) -> list[str]:
    """Every target the built models miss, as readable lines ([] = all met)."""
    misses = list(b.misses)
    for rel in (EDGE_FP32, EDGE_INT8, EDGE_V2_INT8):
        size = (b.stage / rel).stat().st_size
        if size > targets.budget_bytes:
            misses.append(f"{rel}: {size:,} bytes, over the edge budget of {targets.budget_bytes:,}")
    for fp32, int8 in ((EDGE_FP32, EDGE_INT8), (EDGE_V2_FP32, EDGE_V2_INT8)):
        acc8, acc32 = b.scored[int8].test_accuracy, b.scored[fp32].test_accuracy
        if acc8 < targets.edge_int8_accuracy:
            misses.append(f"{int8}: INT8 accuracy {acc8:.2%} < {targets.edge_int8_accuracy:.0%}")
        if acc8 < acc32 - targets.int8_max_drop:
            misses.append(f"{int8}: INT8 accuracy {acc8:.2%} is more than {targets.int8_max_drop:.0%} "
                          f"below FP32 {acc32:.2%}")
        misses += [f"{int8}: {p}" for p in check_tensorrt_ready(b.stage / int8)]
    if b.scored[CLOUD].test_accuracy < targets.cloud_accuracy:
        misses.append(f"cloud accuracy {b.scored[CLOUD].test_accuracy:.2%} < {targets.cloud_accuracy:.0%}")
    return misses + _cascade_misses(b, targets)


def _cascade_misses(b: Build, targets: Targets) -> list[str]:
    """The held-out cascade targets; an edge model that could not be calibrated is in b.misses."""
    misses = []
    for int8 in (EDGE_INT8, EDGE_V2_INT8):
        out = b.held_out.get(int8)
        if out is None:
            continue
        if out.accuracy < targets.cascade_accuracy:
            misses.append(f"{int8}: cascade accuracy {out.accuracy:.2%} < {targets.cascade_accuracy:.1%}")
        if out.escalation > targets.max_escalation:
            misses.append(f"{int8}: escalation {out.escalation:.1%} > {targets.max_escalation:.0%}")
    if EDGE_INT8 in b.held_out and EDGE_V2_INT8 in b.held_out:
        v1, v2 = b.held_out[EDGE_INT8].escalation, b.held_out[EDGE_V2_INT8].escalation
        if v2 >= v1:
            misses.append(f"edge v2 escalates {v2:.1%}, not less than v1's {v1:.1%}: it is no better")
    return misses


def report(b: Build) -> str:
    """The table printed at the end: accuracy and size per model, then each cascade."""
    rows = [("edge v1", "FP32", EDGE_FP32), ("edge v1", "INT8", EDGE_INT8), ("edge v2", "FP32", EDGE_V2_FP32),
            ("edge v2", "INT8", EDGE_V2_INT8), ("cloud", "FP32", CLOUD)]
    n = b.recipe.n_test
    lines = [f"held-out 'test' split, n={n}", f"{'model':8} {'prec':5} {'accuracy':>9} {'size':>10}  file"]
    for name, precision, rel in rows:
        size_kb = (b.stage / rel).stat().st_size / 1000
        lines.append(f"{name:8} {precision:5} {b.scored[rel].test_accuracy:>9.2%} {size_kb:>7.1f} kB  {rel}")
    lines.append("")
    lines.append(f"{'cascade (INT8 edge + cloud)':28} {'accuracy':>9} {'escalated':>10} {'threshold':>10} "
                 f"{'T':>6}")
    for name, rel in (("edge v1", EDGE_INT8), ("edge v2", EDGE_V2_INT8)):
        if rel not in b.fits:
            lines.append(f"{name:28} not calibrated: target out of reach")
            continue
        fit, out = b.fits[rel], b.held_out[rel]
        lines.append(f"{name:28} {out.accuracy:>9.2%} {out.escalation:>10.1%} {fit.threshold:>10.4f} "
                     f"{fit.temperature:>6.3f}")
    return "\n".join(lines)


def _install(stage: Path, out: Path) -> None:
    for rel in (EDGE_FP32, EDGE_INT8, EDGE_V2_INT8, CLOUD):
        for src in (stage / rel, (stage / rel).with_name(rel.name + CARD_SUFFIX)):
            dest = out / src.relative_to(stage)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)


def build(out: Path | None = None, recipe: Recipe | None = None, targets: Targets | None = None) -> int:
    """Run the whole build; 0 when every target holds and the artifacts are installed in ``out``
    (default: :func:`own_models_dir`, never the packaged models)."""
    out = Path(out) if out is not None else own_models_dir()
    check_writable(out, "the built models")
    recipe, targets = recipe or Recipe(), targets or Targets()
    started = time.perf_counter()
    log(f"generating data: train {recipe.n_train}, val {recipe.n_val}, test {recipe.n_test}")
    data = {s: make_split(s, n) for s, n in (("train", recipe.n_train), ("val", recipe.n_val),
                                                ("test", recipe.n_test))}
    b = Build(recipe, Path(tempfile.mkdtemp(prefix="edgecloud-build-")), data)
    _train_all(b)
    log("scoring with ONNX Runtime and calibrating")
    for rel in (CLOUD, EDGE_FP32, EDGE_INT8, EDGE_V2_FP32, EDGE_V2_INT8):
        b.score(rel)
    _write_cards(b)
    print(report(b))
    misses = check_targets(b, targets)
    elapsed = time.perf_counter() - started
    if misses:
        print(f"\nbuild FAILED after {elapsed:.0f} s; targets missed:", *misses, sep="\n  ")
        print(f"rejected artifacts kept in {b.stage}")
        return 1
    _install(b.stage, out)
    shutil.rmtree(b.stage)
    print(f"\nall targets met; installed in {out} ({elapsed:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgecloud_tools.toolchain.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=own_models_dir(),
                        help="models directory (default: $EDGECLOUD_MODELS, else ./models)")
    return build(parser.parse_args(argv).out)


if __name__ == "__main__":
    sys.exit(main())
