"""``edgecloud faults``: every fault the system promises to survive, played on loopback against real
services (agents, gateways, mosquitto as child processes), each judged against its promise.

Faults, in order (one progress line each on stderr):
  gateway_kill    the gateway SIGKILLed under load and restarted
  slow_cloud      the cloud behind a 1 s delay proxy (over the agent's deadline)
  agent_kill      the agent kill -9ed with a full spool, and again mid-replay
  disk_full       a 1 MiB state directory (a tmpfs where mounting is allowed, else emulated)
  reconnect       the cloud away, then back: how soon the first cloud answer comes
  overload        an open loop at twice the agent's capacity
  nan_frames      frames holding NaN or ±Inf, and frames outside the model's declared range
  bytes_bomb      a near-16 MB request of 2-byte BYTES elements to a missing model, several at once
  duplicate_ids   two devices numbering their requests alike, and one app reusing one id
  identities      unauthenticated, wrong-CA, other-device and other-fleet calls at a mutual-TLS gateway
  broker_restart  the MQTT broker restarted while the agent sends telemetry
  bad_releases    releases the agent must refuse, each with its reason code, while it serves
  batch_mix       the same model re-released while the traffic moves from batch 1 to batch 64

For each: calls answered/failed/degraded, p99 against the deadline, cases stored exactly once, the
agent's memory, and a verdict (held, failed, or error when the fault could not be played). Prints a
table, writes faults.json; exits 1 when a promise did not hold. ``--quick`` is the same with small
counts (CI). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from edgecloud_tools.faults import fleet, identity, inputs, serving
from edgecloud_tools.faults.plan import FULL, QUICK, Faults, Models, Outcome, Promises, progress
from edgecloud_tools.output import columns, fmt_mb, fmt_ms
from edgecloud_tools.rig.clients import ClientPool, model_input
from edgecloud_tools.rig.machine import machine
from edgecloud_tools.toolchain import EDGE_INT8, EDGE_V2_INT8, REPOSITORY, models_dir

#: fault name → what plays it; the order of the run
FAULTS: dict[str, Callable[[Faults], Outcome]] = {
    "gateway_kill": serving.gateway_kill, "slow_cloud": serving.slow_cloud, "agent_kill": serving.agent_kill,
    "disk_full": serving.disk_full, "reconnect": serving.reconnect, "overload": serving.overload,
    "nan_frames": inputs.nan_frames, "bytes_bomb": inputs.bytes_bomb, "duplicate_ids": inputs.duplicate_ids,
    "identities": identity.identities, "broker_restart": fleet.broker_restart,
    "bad_releases": fleet.bad_releases, "batch_mix": fleet.batch_mix,
}
#: the bounds the verdicts are judged against
PROMISES = Promises()


def play(faults: Faults, name: str) -> Outcome:
    """One fault; one that cannot be played is recorded with its error (the others still run)."""
    progress(f"fault {name}")
    started = time.monotonic()
    try:
        outcome = FAULTS[name](faults)
    except Exception as e:  # one broken fault must not hide the others' figures
        (faults.workdir / f"{name}.error.txt").write_text(traceback.format_exc())
        outcome = Outcome(name, "", error=f"{type(e).__name__}: {e}")
    outcome.seconds = round(time.monotonic() - started, 1)
    progress(f"fault {name}: {outcome.verdict} ({outcome.seconds:g} s)"
             + (f": {outcome.error} (logs in {faults.workdir})" if outcome.error else ""))
    return outcome


def _n(v: int | None) -> str:
    return "-" if v is None else str(v)


def format_table(result: dict) -> str:
    head = ["fault", "answered", "failed", "degraded", "p99 ms", "deadline ms", "stored once", "RSS MB",
            "verdict"]
    rows, notes = [], []
    for o in result["faults"]:
        stored = "-" if o["expected"] is None else f"{o['stored']}/{o['expected']}"
        if o["figures"].get("spool_dropped"):
            stored += f" +{o['figures']['spool_dropped']} dropped"
        rss = "-" if o["rss_peak_bytes"] is None else \
            f"{fmt_mb(o['rss_before_bytes'])}->{fmt_mb(o['rss_peak_bytes'])}"
        rows.append([o["fault"], _n(o["answered"]), _n(o["failed"]), _n(o["degraded"]), fmt_ms(o["p99_ms"]),
                     fmt_ms(o["deadline_ms"]), stored, rss, o["verdict"]])
        if o["error"]:
            notes.append(f"  {o['fault']}: {o['error']}")
        notes += [f"  {o['fault']}: NOT HELD: {c['what']}: {c['figure']}"
                  for c in o["checks"] if not c["held"]]
    held = sum(o["verdict"] == "held" for o in result["faults"])
    return "\n".join([*columns(head, rows), "", f"  {held} of {len(result['faults'])} promises held", *notes,
                      ""])


def run_faults(args: argparse.Namespace) -> int:
    logger = logging.getLogger("edgecloud")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the watcher's reconnects are the fault's
    try:
        return _run_faults(args)
    finally:  # as it was, for what runs next in this process
        logger.setLevel(level)


def _run_faults(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    names = args.only or list(FAULTS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgecloud-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = Models(edge=args.edge, edge_v2=args.edge_v2, repository=args.repository)
    progress(f"{'quick' if plan.quick else 'full'} run: {', '.join(names)}; logs in {workdir}")
    result: dict = {"command": "edgecloud faults" + (" --quick" if plan.quick else ""), "quick": plan.quick,
                    "machine": machine(2), "plan": dataclasses.asdict(plan),
                    "promises": dataclasses.asdict(PROMISES)}
    with ClientPool(2, workdir / "clients") as pool:
        faults = Faults(plan, PROMISES, models, workdir, pool, model_input(models.edge))
        result["faults"] = [play(faults, name).as_dict() for name in names]
    print(format_table(result), end="")
    (out / "faults.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'faults.json'}")
    broken = [o["fault"] for o in result["faults"] if o["verdict"] != "held"]
    if broken:
        print(f"promises not held: {', '.join(broken)} (logs in {workdir})", file=sys.stderr)
        return 1
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    models = models_dir()
    p = sub.add_parser("faults", help="each fault the system promises to survive, with figures and verdicts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts (CI)")
    p.add_argument("--only", action="append", choices=list(FAULTS), help="play only this fault (repeatable)")
    p.add_argument("--edge", type=Path, default=models / EDGE_INT8, help="the agent's model (with its card)")
    p.add_argument("--edge-v2", type=Path, default=models / EDGE_V2_INT8, help="the next edge model")
    p.add_argument("--repository", type=Path, default=models / REPOSITORY, help="the gateway's repository")
    p.add_argument("--workdir", type=Path, help="keep logs and state here (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where faults.json goes")
    p.set_defaults(func=run_faults)
