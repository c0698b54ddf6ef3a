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
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from cloud_gateway.coco import DetectionExport
from cloud_gateway.hard_examples import HardExample, HardExampleStore, write_training_set
from edgecloud.errors import ConfigError, EdgecloudError

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


def run_export(args: argparse.Namespace) -> int:
    for store in args.store:
        if not store.is_file():
            raise ConfigError(f"--store {store}: no such store (the gateway's [store] path)")
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("examples", help="hard examples the cloud labelled for the next training round",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="examples_action", required=True, metavar="ACTION")
    e = actions.add_parser("export", help="write stored hard examples as a training set (.npz)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--store", type=Path, required=True, action="append",
                   help="a gateway's hard-example store (SQLite); repeat for every replica's store")
    e.add_argument("--out", type=Path, required=True, help="training set to write (.npz)")
    e.add_argument("--since", help="only rows stored since: RFC 3339 time or an age (12h, 7d)")
    e.add_argument("--reason", help="only rows sent for this reason: low_confidence, audit, empty_frame, "
                   "forced")
    e.add_argument("--model", help="only rows answered by this cloud model (needed when several are stored)")
    e.add_argument("--detection-card", type=Path, help="the cloud detector's model card: also write the "
                   "cloud's boxes of the frames as COCO JSON (coco.json beside the images)")
    e.set_defaults(func=run_export)
