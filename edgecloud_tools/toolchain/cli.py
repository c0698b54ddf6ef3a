"""``edgecloud models build`` and ``edgecloud calibrate``.

``calibrate`` needs numpy and ONNX Runtime only; ``models build`` imports torch when it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgecloud.calibration import CascadeOutcome
from edgecloud.confidence import POLICIES
from edgecloud.errors import EdgecloudError
from edgecloud.modelcard import ModelCard, card_path
from edgecloud_tools.cli import positive_int
from edgecloud_tools.toolchain import (
    CLOUD,
    EDGE_INT8,
    MODELS_ENV,
    check_found,
    check_writable,
    models_dir,
    own_models_dir,
)
from edgecloud_tools.toolchain.evaluate import (
    TARGET_ACCURACY,
    CascadeCalibration,
    Scored,
    Splits,
    accuracy,
    calibrate_cascade,
    classifier_card,
)
from edgecloud_tools.toolchain.labelled import INPUTS_KEY, LABEL_KEYS, LabelledSet, load_labelled
from edgecloud_tools.toolchain.plot import tradeoff_png

#: the policy a model without a card is calibrated for
DEFAULT_POLICY = "max_prob"


def run_build(args: argparse.Namespace) -> int:
    check_writable(args.out, "the built models")  # before importing torch, which may be missing
    if args.quick and args.task != "detection":
        raise EdgecloudError("--quick builds the detectors only: give --task detection")
    try:
        if args.task == "detection":
            from edgecloud_tools.toolchain.detection.build import build_detection
        else:
            from edgecloud_tools.toolchain.build import build
    except ImportError as e:
        raise EdgecloudError("models build needs torch and onnx: pip install 'edgecloud[train]' "
                             f"({e})") from e
    if args.task == "detection":
        return build_detection(args.out, quick=args.quick)
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
                  cal: CascadeCalibration, data: LabelledSet | None) -> ModelCard:
    metrics = {**(card.metrics if card else {}), **cal.metrics}
    if card is not None:
        return replace(card.with_calibration(cal.calibration, cal.calibrated_on), metrics=metrics)
    labels = None  # the synthetic set's; own data: its label_names, else the class indices
    if data is not None:
        classes = edge.val.reshape(len(edge.val), -1).shape[1]
        labels = data.label_names or tuple(str(i) for i in range(classes))
    return classifier_card(args.model, edge, cal.calibration, metrics, name=_served_name(args.model),
                           version=0, source={"tool": "edgecloud calibrate"},
                           calibrated_on=cal.calibrated_on, labels=labels)


def _splits(args: argparse.Namespace, card: ModelCard | None) -> tuple[Splits, LabelledSet | None]:
    """The synthetic "val" and "test" splits, or ``--data`` split into a fit and a held-out part (and
    the data, whose class names a card written from scratch takes)."""
    if args.data is None:
        return Splits.make(args.n, int(card.metrics.get("n", args.n)) if card else args.n), None
    data = load_labelled(args.data)
    fit, held_out = data.split(args.held_out)
    print(f"{args.data}: {len(data.labels)} rows labelled by {data.labelled_by!r}; fitting on {len(fit[1])}, "
          f"measuring on {len(held_out[1])}", file=sys.stderr)
    return Splits(fit, held_out, (f"{args.data.name}:fit", f"{args.data.name}:held_out")), data


def _score(splits: Splits, model: Path, output: str | None) -> Scored:
    """Score with a progress line on stderr (rewritten in place on a terminal)."""
    tty, started = sys.stderr.isatty(), time.perf_counter()

    def progress(done: int, total: int) -> None:
        if tty or done == total:
            end = "\n" if done == total else ""
            print(f"\r  scoring {model.name}: {done}/{total} rows, {time.perf_counter() - started:.1f} s",
                  end=end, file=sys.stderr, flush=True)

    return splits.score(model, output, progress)


def run_calibrate(args: argparse.Namespace) -> int:
    """Fit on "val" (or --data's fit part), re-measure on "test" (its held-out part), print both and
    update the edge model's card."""
    check_found(model=args.model, cloud=args.cloud)
    if not args.dry_run:
        check_writable(card_path(args.model), "the updated card")
    card = _existing_card(args.model)
    policy = _policy(args, card)
    if args.target_escalation is not None:
        target = {"target_escalation": args.target_escalation}
    elif args.target_accuracy is not None:
        target = {"target_accuracy": args.target_accuracy}
    else:
        target = {"target_accuracy": TARGET_ACCURACY}
    splits, data = _splits(args, card)
    score_output = card.calibration.score_output if card else None  # None: the model's first output
    edge, cloud = _score(splits, args.model, score_output), _score(splits, args.cloud, None)
    cal = calibrate_cascade(splits, edge, cloud, policy, target, cloud_model=_served_name(args.cloud),
                            score_output=score_output or edge.outputs[0].name,
                            scores=card.calibration.scores if card else "logits")
    goal = ", ".join(f"{k.removeprefix('target_')} {v:.2%}" for k, v in target.items())
    fit_name, test_name = splits.names
    print(f"{args.model.name} with {_served_name(args.cloud)}: policy {policy}, target {goal}\n"
          f"  temperature {cal.fit.temperature:.4f}, threshold {cal.fit.threshold:.4f}\n"
          f"  {_line(fit_name, splits.val[1], edge.val, cloud.val, cal.fit.outcome)}\n"
          f"  {_line(test_name, splits.test[1], edge.test, cloud.test, cal.held_out)}")
    if args.plot is not None:
        path = tradeoff_png(args.plot, edge.test, cloud.test, splits.test[1], cal.fit,
                            f"{args.model.name} with {_served_name(args.cloud)} on {test_name}")
        print(f"  plot written: {path}")
    if not args.dry_run:
        path = _updated_card(args, card, edge, cal, data).save(args.model)
        print(f"  card written: {path}")
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], not {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="make the demo models (the train extra), or say where they are")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build", help="generate data, train, export, quantize, calibrate, write artifacts and cards",
        description="Rebuild the demo models (the classifiers, or with --task detection the detectors); "
                    "exit 1 when a target is missed (nothing is installed then).")
    build.add_argument("--out", type=Path, default=own_models_dir(),
                       help="models directory (default: $EDGECLOUD_MODELS, else ./models in the current "
                            "directory; never the packaged models)")
    build.add_argument("--task", choices=("classification", "detection"), default="classification",
                       help="the classifiers (default) or the edge and cloud detectors")
    build.add_argument("--quick", action="store_true",
                       help="detectors only: a small split and short training, in a minute or two; format, "
                            "contract and budget are checked, the quality targets are not")
    build.set_defaults(func=run_build)
    path = actions.add_parser("path", help="print the models directory the tools use",
                              description=f"${MODELS_ENV}, else ./models, else the packaged demo models.")
    path.set_defaults(func=lambda _args: print(models_dir()))

    models = models_dir()
    cal = sub.add_parser(
        "calibrate", help="fit temperature and threshold of an edge model against a cloud model",
        description="Run the edge and cloud ONNX models on labelled data (the synthetic 'val' split, or "
                    "--data), fit the temperature by NLL and choose the threshold for one target, re-measure "
                    "on held-out data ('test', or --data's held-out part) and update the edge model's card "
                    "(<model>.card.json).")
    cal.add_argument("--model", type=Path, default=models / EDGE_INT8,
                     help=f"edge model (.onnx; default: {EDGE_INT8} of the models directory)")
    cal.add_argument("--cloud", type=Path, default=models / CLOUD,
                     help=f"cloud model (.onnx; default: {CLOUD} of the models directory)")
    cal.add_argument("--data", type=Path,
                     help=f"labelled data of your own (.npz): the inputs (the model's input name or "
                          f"{INPUTS_KEY!r}) and {LABEL_KEYS[0]!r}, or a file of 'edgecloud examples export' "
                          f"(labelled by {LABEL_KEYS[1]!r}); default: the synthetic demo data")
    cal.add_argument("--held-out", type=_fraction, default=0.5,
                     help="share of --data's rows kept to measure on (default 0.5)")
    target = cal.add_mutually_exclusive_group()
    target.add_argument("--target-accuracy", type=_fraction,
                        help=f"cascade accuracy to reach with the least escalation "
                             f"(default {TARGET_ACCURACY})")
    target.add_argument("--target-escalation", type=_fraction, help="share of rows to escalate at most")
    cal.add_argument("--policy", choices=sorted(POLICIES),
                     help=f"confidence policy (default: the card's, else {DEFAULT_POLICY})")
    cal.add_argument("--n", type=positive_int, default=5000,
                     help="'val' samples to calibrate on, without --data (default 5000)")
    cal.add_argument("--plot", type=Path,
                     help="also draw the held-out accuracy against escalation as a PNG (needs matplotlib)")
    cal.add_argument("--dry-run", action="store_true", help="print the result, leave the card alone")
    cal.set_defaults(func=run_calibrate)
