"""``edgecloud models build`` and ``edgecloud calibrate``.

``calibrate`` needs numpy and ONNX Runtime only; ``models build`` imports torch when it runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgecloud.calibration import CascadeOutcome
from edgecloud.confidence import POLICIES
from edgecloud.errors import EdgecloudError
from edgecloud.modelcard import CardCalibration, ModelCard
from edgecloud.toolchain import MODELS_DIR
from edgecloud.toolchain.dataset import LABELS, make_split
from edgecloud.toolchain.evaluate import (
    TARGET_ACCURACY,
    CascadeFit,
    accuracy,
    cascade_on,
    fit_cascade,
    model_contract,
    model_logits,
)


def run_build(args: argparse.Namespace) -> int:
    try:
        from edgecloud.toolchain.build import build
    except ImportError as e:
        raise EdgecloudError("models build needs torch and onnx: pip install 'edgecloud[train]' "
                             f"({e})") from e
    return build(args.out)


@dataclass(frozen=True)
class Measured:
    """Edge and cloud scores on one split."""

    split: str
    labels: np.ndarray
    edge: np.ndarray
    cloud: np.ndarray

    @classmethod
    def run(cls, split: str, n: int, edge: Path, cloud: Path, score_output: str) -> Measured:
        images, labels = make_split(split, n)
        return cls(split, labels, model_logits(edge, images, output=score_output),
                   model_logits(cloud, images))

    def line(self, outcome: CascadeOutcome) -> str:
        return (f"{self.split:4} (n={len(self.labels)}): cascade {outcome.accuracy:.2%}, escalated "
                f"{outcome.escalation:.1%}, edge {accuracy(self.edge, self.labels):.2%}, "
                f"cloud {accuracy(self.cloud, self.labels):.2%}")


def _served_name(model: Path) -> str:
    """``inspection`` for a repository's ``inspection/1/model.onnx``, else the file's stem."""
    if model.stem == "model" and model.parent.name.isdigit():
        return model.parents[1].name
    return model.stem


def _existing_card(model: Path) -> ModelCard | None:
    card = ModelCard.load(model)
    problems = card.file_problems(model) if card is not None else []
    if problems:
        raise EdgecloudError(f"the card beside {model} describes another file: " + "; ".join(problems))
    return card


def _updated_card(args: argparse.Namespace, card: ModelCard | None, fit: CascadeFit, score_output: str,
                  target: dict[str, float], test: Measured) -> ModelCard:
    calibration = CardCalibration(fit.policy, fit.temperature, fit.threshold, score_output, fit.scores)
    calibrated_on = {"split": "val", "n": args.n, "cloud_model": _served_name(args.cloud), **target,
                     "accuracy": fit.outcome.accuracy, "escalation_rate": fit.outcome.escalation}
    held_out = cascade_on(test.edge, test.cloud, test.labels, fit)
    metrics = {**(card.metrics if card else {}), "split": test.split, "n": len(test.labels),
               "accuracy": accuracy(test.edge, test.labels),
               "cloud_accuracy": accuracy(test.cloud, test.labels), "cascade_accuracy": held_out.accuracy,
               "escalation_rate": held_out.escalation, "threshold": fit.threshold}
    if card is not None:
        return replace(card.with_calibration(calibration, calibrated_on), metrics=metrics)
    inputs, outputs = model_contract(args.model)
    return ModelCard.describe(args.model, name=_served_name(args.model), version=0, task="classification",
                              inputs=inputs, outputs=outputs, labels=LABELS, calibration=calibration,
                              metrics=metrics, source={"tool": "edgecloud calibrate"},
                              calibrated_on=calibrated_on)


def run_calibrate(args: argparse.Namespace) -> int:
    """Fit on "val", re-measure on "test" (the card's held-out figures must describe the new
    threshold), print both and update the edge model's card."""
    card = _existing_card(args.model)
    score_output = card.calibration.score_output if card else model_contract(args.model)[1][0].name
    scores = card.calibration.scores if card else "logits"
    if args.target_escalation is not None:
        target = {"target_escalation": args.target_escalation}
    elif args.target_accuracy is not None:
        target = {"target_accuracy": args.target_accuracy}
    else:
        target = {"target_accuracy": TARGET_ACCURACY}
    val = Measured.run("val", args.n, args.model, args.cloud, score_output)
    fit = fit_cascade(val.edge, val.cloud, val.labels, args.policy, target.get("target_accuracy"),
                      target.get("target_escalation"), scores)
    test = Measured.run("test", int(card.metrics.get("n", args.n)) if card else args.n, args.model,
                        args.cloud, score_output)
    goal = ", ".join(f"{k.removeprefix('target_')} {v:.2%}" for k, v in target.items())
    print(f"{args.model.name} with {_served_name(args.cloud)}: policy {args.policy}, target {goal}\n"
          f"  temperature {fit.temperature:.4f}, threshold {fit.threshold:.4f}\n"
          f"  {val.line(fit.outcome)}\n  {test.line(cascade_on(test.edge, test.cloud, test.labels, fit))}")
    if not args.dry_run:
        path = _updated_card(args, card, fit, score_output, target, test).save(args.model)
        print(f"  card written: {path}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], not {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="make the demo models (needs the train extra)")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build", help="generate data, train, export, quantize, calibrate, write artifacts and cards",
        description="Rebuild the demo models; exit 1 when a target is missed (nothing is installed then).")
    build.add_argument("--out", type=Path, default=MODELS_DIR, help="models directory (default: the repo's)")
    build.set_defaults(func=run_build)

    cal = sub.add_parser(
        "calibrate", help="fit temperature and threshold of an edge model against a cloud model",
        description="Run the edge and cloud ONNX models on the 'val' split, fit the temperature by NLL and "
                    "choose the threshold for one target, re-measure on 'test' and update the edge model's "
                    "card (<model>.card.json).")
    cal.add_argument("--model", type=Path, required=True, help="edge model (.onnx)")
    cal.add_argument("--cloud", type=Path, required=True, help="cloud model (.onnx)")
    target = cal.add_mutually_exclusive_group()
    target.add_argument("--target-accuracy", type=_fraction,
                        help=f"cascade accuracy to reach with the least escalation "
                             f"(default {TARGET_ACCURACY})")
    target.add_argument("--target-escalation", type=_fraction, help="share of rows to escalate at most")
    cal.add_argument("--policy", choices=sorted(POLICIES), default="max_prob", help="confidence policy")
    cal.add_argument("--n", type=_positive, default=5000, help="'val' samples to calibrate on (default 5000)")
    cal.add_argument("--dry-run", action="store_true", help="print the result, leave the card alone")
    cal.set_defaults(func=run_calibrate)
