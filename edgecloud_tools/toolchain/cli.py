"""``edgecloud models build`` and ``edgecloud calibrate``.

``calibrate`` needs numpy and ONNX Runtime only; ``models build`` imports torch when it runs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgecloud.calibration import CascadeOutcome
from edgecloud.confidence import POLICIES
from edgecloud.errors import EdgecloudError
from edgecloud.modelcard import ModelCard
from edgecloud_tools.cli import positive_int
from edgecloud_tools.toolchain import models_dir
from edgecloud_tools.toolchain.evaluate import (
    TARGET_ACCURACY,
    CascadeCalibration,
    Scored,
    Splits,
    accuracy,
    calibrate_cascade,
    classifier_card,
)

#: the policy a model without a card is calibrated for
DEFAULT_POLICY = "max_prob"


def run_build(args: argparse.Namespace) -> int:
    try:
        from edgecloud_tools.toolchain.build import build
    except ImportError as e:
        raise EdgecloudError("models build needs torch and onnx: pip install 'edgecloud[train]' "
                             f"({e})") from e
    return build(args.out)


def _line(split: str, labels: np.ndarray, edge: np.ndarray, cloud: np.ndarray,
          outcome: CascadeOutcome) -> str:
    return (f"{split:4} (n={len(labels)}): cascade {outcome.accuracy:.2%}, escalated "
            f"{outcome.escalation:.1%}, edge {accuracy(edge, labels):.2%}, "
            f"cloud {accuracy(cloud, labels):.2%}")


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


def _policy(args: argparse.Namespace, card: ModelCard | None) -> str:
    """``--policy``, else the card's (recalibrating keeps what the model was calibrated for)."""
    if args.policy is not None:
        return args.policy
    if card is None:
        return DEFAULT_POLICY
    if card.calibration.policy not in POLICIES:
        raise EdgecloudError(f"the card of {args.model} names policy {card.calibration.policy!r}, "
                             f"which is not built-in: calibrate fits {sorted(POLICIES)} only; "
                             "choose one with --policy")
    return card.calibration.policy


def _updated_card(args: argparse.Namespace, card: ModelCard | None, edge: Scored,
                  cal: CascadeCalibration) -> ModelCard:
    metrics = {**(card.metrics if card else {}), **cal.metrics}
    if card is not None:
        return replace(card.with_calibration(cal.calibration, cal.calibrated_on), metrics=metrics)
    return classifier_card(args.model, edge, cal.calibration, metrics, name=_served_name(args.model),
                           version=0, source={"tool": "edgecloud calibrate"},
                           calibrated_on=cal.calibrated_on)


def run_calibrate(args: argparse.Namespace) -> int:
    """Fit on "val", re-measure on "test", print both and update the edge model's card."""
    card = _existing_card(args.model)
    policy = _policy(args, card)
    if args.target_escalation is not None:
        target = {"target_escalation": args.target_escalation}
    elif args.target_accuracy is not None:
        target = {"target_accuracy": args.target_accuracy}
    else:
        target = {"target_accuracy": TARGET_ACCURACY}
    splits = Splits.make(args.n, int(card.metrics.get("n", args.n)) if card else args.n)
    score_output = card.calibration.score_output if card else None  # None: the model's first output
    edge, cloud = splits.score(args.model, score_output), splits.score(args.cloud)
    cal = calibrate_cascade(splits, edge, cloud, policy, target, cloud_model=_served_name(args.cloud),
                            score_output=score_output or edge.outputs[0].name,
                            scores=card.calibration.scores if card else "logits")
    goal = ", ".join(f"{k.removeprefix('target_')} {v:.2%}" for k, v in target.items())
    print(f"{args.model.name} with {_served_name(args.cloud)}: policy {policy}, target {goal}\n"
          f"  temperature {cal.fit.temperature:.4f}, threshold {cal.fit.threshold:.4f}\n"
          f"  {_line('val', splits.val[1], edge.val, cloud.val, cal.fit.outcome)}\n"
          f"  {_line('test', splits.test[1], edge.test, cloud.test, cal.held_out)}")
    if not args.dry_run:
        path = _updated_card(args, card, edge, cal).save(args.model)
        print(f"  card written: {path}")
    return 0


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
    build.add_argument("--out", type=Path, default=models_dir(),
                       help="models directory (default: $EDGECLOUD_MODELS or ./models)")
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
    cal.add_argument("--policy", choices=sorted(POLICIES),
                     help=f"confidence policy (default: the card's, else {DEFAULT_POLICY})")
    cal.add_argument("--n", type=positive_int, default=5000,
                     help="'val' samples to calibrate on (default 5000)")
    cal.add_argument("--dry-run", action="store_true", help="print the result, leave the card alone")
    cal.set_defaults(func=run_calibrate)
