"""``edgecloud fleet controller`` and ``edgecloud fleet rollout status|halt|resume``: the service that
drives releases with waves, and the operator's view of and hand on it (docs/design.md §12).

``halt`` publishes a signed ``halted`` command for the wave the rollout is in (devices that activated
the version roll back; they count as outside the share); ``resume`` publishes ``advancing`` for the
wave it was halted at, issued later, which puts those devices back in the share and tells a running
controller (it follows the retained command) to judge that wave afresh. Both sign with ``--key``: the
operator's key, or the controller's when the release names one (``rollout.controller_key``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgecloud.clock import format_time, utc_now
from edgecloud.config import build, merge, read_toml
from edgecloud.errors import ConfigError, EdgecloudError
from edgecloud.logs import setup_logging
from edgecloud.mqtt.client import MqttClient, MqttConfig
from edgecloud.release import Gates
from edgecloud.rollout import WaveCommand, command_keys, sign_command
from edgecloud.signing import TrustStore, key_id, load_private_key
from edgecloud_tools.fleet.controller import Controller, ControllerConfig
from edgecloud_tools.fleet.controller_state import STATE_FILE, LeaseHeld, SqliteState
from edgecloud_tools.fleet.gates import figure_pairs, judge
from edgecloud_tools.fleet.publish import mqtt_arguments, mqtt_config_from_args, mqtt_overrides
from edgecloud_tools.fleet.rollout_view import RolloutView
from edgecloud_tools.fleet.status import listen
from edgecloud_tools.output import table

log = logging.getLogger(__name__)

#: flag dest → key of ``[controller]`` in the TOML file
_CONTROLLER_FLAGS = {"fleet": "fleet", "state_dir": "state_dir", "key": "key", "trusted_key": "trusted_keys",
                     "controller_id": "controller_id", "judge_interval": "judge_interval_s"}


def register(actions: argparse._SubParsersAction) -> None:
    controller = actions.add_parser(
        "controller", help="drive every release with waves: soak, judge the gates, advance or halt",
        description="A long-running service. Flags override --config FILE (TOML sections [mqtt] and "
                    "[controller]). Exit codes: 0 stopped (SIGTERM/SIGINT), 2 bad configuration, 1 another "
                    "controller holds the fleet's lease, or a failure.")
    controller.add_argument("--config", type=Path, help="TOML config file")
    controller.add_argument("--key", type=Path, help="Ed25519 private key that signs wave commands")
    controller.add_argument("--state-dir", type=Path, help="where the state database and its lock live")
    controller.add_argument("--trusted-key", action="append", type=Path, metavar="PEM",
                            help="public key to verify releases with (repeatable; default: the "
                                 "public half of --key)")
    controller.add_argument("--controller-id", help="lease holder name, the same across restarts "
                                                    "(default: the host name)")
    controller.add_argument("--judge-interval", type=float, metavar="SECONDS", help="default 1")
    controller.add_argument("--log-level", default="INFO")
    controller.add_argument("--log-format", choices=("kv", "json"), default="kv")
    mqtt_arguments(controller, required=False)
    controller.set_defaults(func=run_controller)

    rollout = actions.add_parser("rollout", help="show, halt or resume staged rollouts")
    verbs = rollout.add_subparsers(dest="rollout_command", required=True, metavar="VERB")
    status = verbs.add_parser("status", help="each rollout: wave, state, devices, gate figures",
                              description="Read the retained desired, rollout, status and reported topics "
                                          "and telemetry for --wait seconds; with --state-dir, the "
                                          "controller's decisions too.")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--state-dir", type=Path, help="the controller's state directory (read only)")
    status.add_argument("--trusted-key", action="append", type=Path, metavar="PEM",
                        help="show only releases and commands that verify with these keys")
    status.add_argument("--wait", type=float, default=0.5, metavar="SECONDS", help="default 0.5")
    mqtt_arguments(status)
    status.set_defaults(func=run_status)
    for verb, what in (("halt", "publish a signed halted command: devices roll back"),
                       ("resume", "publish advancing for the wave a rollout was halted at")):
        parser = verbs.add_parser(verb, help=what, description=what + ".")
        parser.add_argument("model")
        parser.add_argument("version", type=int)
        parser.add_argument("--key", required=True, type=Path, help="Ed25519 private key that signs it")
        parser.add_argument("--reason", required=verb == "halt", default="resumed by the operator",
                            help="why (carried in the command)")
        parser.add_argument("--wait", type=float, default=1.0, metavar="SECONDS",
                            help="how long to read the retained topics (default 1)")
        mqtt_arguments(parser)
        parser.set_defaults(func=run_operator_command, verb=verb)


# -- controller -----------------------------------------------------------------------------------------
def load_controller_config(args: argparse.Namespace) -> ControllerConfig:
    data: dict[str, Any] = read_toml(args.config) if args.config else {}
    flags = {key: getattr(args, dest) for dest, key in _CONTROLLER_FLAGS.items()}
    return build(ControllerConfig, merge(data, {"mqtt": mqtt_overrides(args), "controller": flags}),
                 str(args.config or "flags"))


def run_controller(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    controller = Controller(load_controller_config(args))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        controller.run(stop)
    except LeaseHeld as e:
        log.error("event=controller_lease_refused reason=%r", str(e))
        raise EdgecloudError(f"not driving: {e}") from None
    return 0


# -- reading the fleet ------------------------------------------------------------------------------------
def gather(config: MqttConfig, view: RolloutView, listen_s: float, timeout_s: float,
           telemetry: bool = True) -> RolloutView:
    """Fold what the view's topics hold (retained) and bring in ``listen_s`` seconds into ``view``."""
    listen(config, view.filters(telemetry), view.apply, listen_s, timeout_s)
    return view


def rollout_rows(view: RolloutView, state: SqliteState | None) -> list[dict[str, Any]]:
    """Each plan as ``rollout status`` shows it: its wave and state from the retained command (the
    controller's state when given), devices by standing, and the gates judged now on each device's
    totals since its version became active (with the controller's last decision when given)."""
    rows = []
    stored = state.rollouts() if state is not None else {}
    for model, plan in sorted(view.plans.items()):
        release, command = plan.release, view.command(model)
        wave, where = (command.wave, command.state) if command is not None else (0, "advancing")
        reason = command.reason if command is not None else "no command yet: the first wave"
        verdict = judge(release.rollout.gates or Gates(), view.cohorts(plan, view.totals.get(model, {})))
        row: dict[str, Any] = {
            "model": model, "version": release.version, "waves": list(plan.waves), "wave": wave,
            "percent": plan.waves[wave], "state": where, "reason": reason,
            "issued_at": format_time(command.issued_at) if command is not None else None,
            "devices": view.standings(plan), "gates": release.rollout.gates.to_dict()
            if release.rollout.gates else {},
            "now": {"outcome": verdict.outcome, "reason": verdict.reason, "figures": verdict.figures}}
        if (record := stored.get((model, release.version))) is not None and state is not None:
            decisions = state.decisions(model, release.version)
            row["controller"] = {"wave": record.wave, "state": record.state, "wave_started": format_time(
                datetime.fromtimestamp(record.wave_started, timezone.utc)),
                "unpublished": record.outbox is not None,
                "last_decision": {"reason": decisions[-1].reason, "figures": decisions[-1].figures}
                if decisions else None}
        rows.append(row)
    return rows


def render_rollouts(rows: list[dict[str, Any]]) -> str:
    header = ("MODEL", "VERSION", "WAVE", "STATE", "ACTIVE", "PENDING", "ROLLED BACK", "FAILED", "OFFLINE",
              "GATES NOW", "FIGURES")
    lines = []
    for r in rows:
        d, now = r["devices"], r["now"]
        figures = figure_pairs(now["figures"])
        wave = f"{r['wave'] + 1}/{len(r['waves'])} ({r['percent']:g}%)"
        counts = (str(d[k]) for k in ("active", "pending", "rolled_back", "failed", "offline"))
        lines.append((r["model"], str(r["version"]), wave, r["state"], *counts, now["outcome"], figures))
    return table(header, lines)


def run_status(args: argparse.Namespace) -> int:
    trust = TrustStore.from_files(args.trusted_key) if args.trusted_key else None
    view = gather(mqtt_config_from_args(args), RolloutView(args.fleet, trust), args.wait, args.timeout)
    state = None
    if args.state_dir is not None:
        if not (args.state_dir / STATE_FILE).exists():
            raise ConfigError(f"--state-dir {args.state_dir}: no {STATE_FILE} in it")
        state = SqliteState(args.state_dir / STATE_FILE, read_only=True)
    try:
        rows = rollout_rows(view, state)
    finally:
        if state is not None:
            state.close()
    if args.json:
        print(json.dumps({"fleet": args.fleet, "rollouts": rows}, indent=2))
    elif rows:
        print(render_rollouts(rows))
    else:
        print(f"no release with waves is retained in fleet {args.fleet}")
    return 0


# -- halt and resume --------------------------------------------------------------------------------------
def run_operator_command(args: argparse.Namespace) -> int:
    key = load_private_key(args.key)
    mqtt = mqtt_config_from_args(args)
    view = gather(mqtt, RolloutView(args.fleet), args.wait, args.timeout, telemetry=False)
    plan = view.plans.get(args.model)
    if plan is None or plan.release.version != args.version:
        held = f"v{plan.release.version}" if plan is not None else "none"
        raise ConfigError(f"{args.model} v{args.version}: no such release with waves is retained "
                          f"(newest with waves: {held})")
    kid = key_id(key.public_key())
    named = plan.release.rollout.controller_key
    if named is not None and kid not in command_keys(plan.release, TrustStore()):
        raise ConfigError(f"--key {args.key}: the release names controller key {named}, devices refuse "
                          f"commands signed by {kid}")
    last = view.command(args.model)
    if args.verb == "resume" and (last is None or last.state != "halted"):
        raise ConfigError(f"{args.model} v{args.version} is not halted "
                          f"({'no command yet' if last is None else last.state})")
    issued = utc_now().replace(microsecond=0)
    if last is not None and issued <= last.issued_at:
        issued = last.issued_at + timedelta(seconds=1)
    command = WaveCommand(args.model, args.version, last.wave if last is not None else 0,
                          "halted" if args.verb == "halt" else "advancing", issued, args.reason)
    topic = view.topics.rollout(args.model)
    with MqttClient(mqtt) as client:
        client.wait_connected(args.timeout)
        client.publish(topic, sign_command(command, key).to_json(), qos=1, retain=True, timeout=args.timeout)
    print(f"{command.state} {args.model} v{args.version} at wave {command.wave + 1}/{len(plan.waves)} "
          f"(key {kid}, issued {format_time(issued)}) on {topic}")
    return 0
