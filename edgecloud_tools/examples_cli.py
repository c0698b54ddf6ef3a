"""``edgecloud examples export``: the hard examples a gateway stored, as a training set (.npz).

The file holds one stacked array per model input, every cloud output as ``cloud.<name>``,
``cloud_prediction`` (argmax of the cloud's first output), and per row ``edge_prediction``,
``edge_confidence``, ``request_id``, ``row``, ``device``, ``reason``, ``deferred``, versions and
``created_at`` (UNIX seconds). Load it with ``numpy.load(path)``. Escalated camera frames (an input
whose every row is one encoded JPEG or PNG) are written as image files under ``<out>.frames/<input>/``,
with ``labels.csv`` there, and the ``.npz`` holds their file names (docs/design.md §10). With
``--detection-card`` (the cloud detector's model card), ``coco.json`` there is a detection training
set: the images, the cloud's boxes above the card's score threshold in COCO ``[x, y, w, h]`` frame
pixels, and the card's labels as categories.

``edgecloud examples agreement`` says from the store's side what the agents count live (docs/design.md
§12): per device, edge model version and reason, the rows the cloud answered in time and the share
whose top class (argmax of the stored cloud output) is the edge's prediction. Audited rows (reason
``audit``) estimate the edge's accuracy on what it answers alone; escalated ones (``low_confidence``,
``forced``) how often the cloud overrules it where it was unsure. Replayed rows (``deferred``) are left
out, as the device counts none of them; so are a detector's rows, whose edge prediction is its boxes
(the agent compares those itself).
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from cloud_gateway.coco import DetectionExport
from cloud_gateway.hard_examples import (
    Answer,
    HardExample,
    HardExampleStore,
    tally_agreement,
    write_training_set,
)
from edgecloud.errors import ConfigError, EdgecloudError
from edgecloud_tools.output import table

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: an RFC 3339 time (``2024-05-01T00:00:00Z``; no zone = UTC) or an age such as
    ``90m``, ``12h`` or ``7d``; returns UNIX seconds."""
    match = _AGE.match(text.strip())
    if match:
        return (time.time() if now is None else now) - float(match[1]) * _SECONDS[match[2]]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since {text!r}: expected an RFC 3339 time (2024-05-01T00:00:00Z) or an "
                          "age (90m, 12h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _check_stores(stores: list[Path]) -> None:
    for store in stores:
        if not store.is_file():
            raise ConfigError(f"--store {store}: no such store (the gateway's [store] path)")


def run_export(args: argparse.Namespace) -> int:
    _check_stores(args.store)
    since = parse_since(args.since) if args.since else None
    detection = DetectionExport.from_card(args.detection_card) if args.detection_card else None
    examples: dict[tuple[str, str, int, str], HardExample] = {}
    try:
        for path in args.store:  # one store per gateway replica; a row stored twice (same key) counts once
            with HardExampleStore(path) as store:
                for example in store.examples(since, args.reason, args.model):
                    examples.setdefault(example.key, example)
        rows = sorted(examples.values(), key=lambda e: e.created_at)
        count = write_training_set(rows, args.out, detection)
    except (OSError, sqlite3.Error) as e:
        raise EdgecloudError(f"export to {args.out} failed: {e}") from e
    print(f"exported {count} hard examples from {len(args.store)} store(s) to {args.out}", file=sys.stderr)
    return 0


def run_agreement(args: argparse.Namespace) -> int:
    _check_stores(args.store)
    since = parse_since(args.since) if args.since else None

    def answers() -> Iterator[Answer]:
        for path in args.store:  # one store per gateway replica; a row stored twice counts once
            with HardExampleStore(path) as store:
                yield from store.answers(since, args.model)

    try:
        rows, unpredicted = tally_agreement(answers(), args.output)
    except sqlite3.Error as e:
        raise EdgecloudError(f"reading {', '.join(map(str, args.store))} failed: {e}") from e
    if args.json:
        print(json.dumps({"rows": [r.to_dict() for r in rows], "without_edge_prediction": unpredicted},
                         indent=2))
        return 0
    if rows:
        print(table(("DEVICE", "VERSION", "REASON", "ROWS", "AGREE", "SHARE"),
                    [(r.device, r.edge_model_version, r.reason, str(r.rows), str(r.agree), f"{r.share:.1%}")
                     for r in rows], justify=("left", "left", "left", "right", "right", "right")))
    else:
        print("no stored rows with an edge prediction" + (" since then" if since is not None else ""))
    if unpredicted:
        print(f"{unpredicted} rows without an edge prediction (a detector's) left out", file=sys.stderr)
    return 0


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, required=True, action="append",
                   help="a gateway's hard-example store (SQLite); repeat for every replica's store")
    p.add_argument("--since", help="only rows stored since: RFC 3339 time or an age (12h, 7d)")
    p.add_argument("--model", help="only rows answered by this cloud model (needed when several are stored)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("examples", help="hard examples the cloud labelled for the next training round",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="examples_action", required=True, metavar="ACTION")
    e = actions.add_parser("export", help="write stored hard examples as a training set (.npz)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_selection(e)
    e.add_argument("--out", type=Path, required=True, help="training set to write (.npz)")
    e.add_argument("--reason", help="only rows sent for this reason: low_confidence, audit, empty_frame, "
                   "forced")
    e.add_argument("--detection-card", type=Path, help="the cloud detector's model card: also write the "
                   "cloud's boxes of the frames as COCO JSON (coco.json beside the images)")
    e.set_defaults(func=run_export)
    a = actions.add_parser("agreement", help="how often the cloud answered as the edge predicted, per "
                           "device, edge model version and reason", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_selection(a)
    a.add_argument("--output", help="the cloud output whose argmax is its answer (default: the first stored; "
                   "the edge model's score output)")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.set_defaults(func=run_agreement)
