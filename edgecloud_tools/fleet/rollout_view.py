"""Rollouts as the fleet's topics describe them (docs/design.md §12): the releases with waves retained
on desired topics, the wave command retained for each model, and the devices (online, group, version
served and update state per model) with their agreement counts per version from telemetry. Read by the
controller, which judges waves on it, and by ``edgecloud fleet rollout status``.

Every message is folded as it comes, in constant work per message: a telemetry message adds its
interval counts to the device's sums for the version it names (``models[].quality``), after dropping
a ``seq`` already seen (QoS 1 delivers at least once). Telemetry without ``quality`` (an older agent)
adds nothing: unknown, never agreement. With a trust store, releases and commands that do not verify
are left out (and logged); without one (``rollout status`` of an operator with no keys at hand) they
are shown as published. A group's devices are those whose status names the group (agents publish it);
a device whose status does not is counted for a release addressed to it by name only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgecloud.mqtt.client import Message
from edgecloud.mqtt.fleet_view import json_object
from edgecloud.mqtt.topics import FleetTopics, TopicKind, Wildcard
from edgecloud.release import Envelope, ReleasePayload, ReleaseRejected, verify_envelope
from edgecloud.rollout import ROLLOUT_HALTED, CommandRefused, WaveCommand, verify_command
from edgecloud.signing import TrustStore
from edgecloud_tools.fleet.gates import Cohorts, Counts

log = logging.getLogger(__name__)

#: the retained topics a rollout is read from (plain subscriptions: a shared one gets no retained message)
RETAINED_KINDS = (TopicKind.GROUP_DESIRED, TopicKind.GROUP_MODEL_DESIRED, TopicKind.DEVICE_DESIRED,
                  TopicKind.DEVICE_MODEL_DESIRED, TopicKind.ROLLOUT, TopicKind.STATUS, TopicKind.REPORTED,
                  TopicKind.MODEL_REPORTED)
_COUNT_KEYS = ("rows", "escalated", "audited", "audit_agree")


@dataclass(frozen=True)
class Plan:
    """A release with waves and where it is retained: ``groups`` and ``devices`` it addresses."""

    release: ReleasePayload
    groups: frozenset[str]
    devices: frozenset[str]

    @property
    def waves(self) -> tuple[float, ...]:
        return self.release.rollout.waves or ()


@dataclass
class Device:
    """One device as its retained topics and telemetry say: per model, the version it serves and its
    update report (version, state, reason), and the edge latency p95 of its latest interval."""

    online: bool = False
    group: str | None = None
    active: dict[str, int | None] = field(default_factory=dict)
    report: dict[str, tuple[int | None, str, str]] = field(default_factory=dict)
    p95: dict[str, tuple[int | None, float]] = field(default_factory=dict)
    seq: int = -1


def _listed(value: Any) -> list[dict[str, Any]]:
    """The JSON objects of a list (a message's ``models``); [] for anything else."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _field(value: Any, *keys: str) -> Any:
    """``value[k1][k2]…`` through JSON objects; None where one is missing or not an object."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def quality_counts(value: Any) -> tuple[int, Counts, Counts | None] | None:
    """A telemetry ``quality`` object as (version, interval counts, totals); None when absent or
    malformed (unknown)."""
    if not isinstance(value, Mapping) or not isinstance(value.get("version"), int):
        return None
    interval = _counts(value)
    if interval is None:
        return None
    return value["version"], interval, _counts(value.get("totals"))


def _counts(value: Any) -> Counts | None:
    if not isinstance(value, Mapping):
        return None
    numbers = [value.get(k) for k in _COUNT_KEYS]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        return None
    counts = Counts(*numbers)  # cloud answers may land an interval after their rows: no escalated <= rows
    return counts if counts.audit_agree <= counts.audited else None


class RolloutView:
    """Folds the fleet's messages into plans, commands and devices; see the module docstring."""

    def __init__(self, fleet: str, trust: TrustStore | None = None) -> None:
        self.topics = FleetTopics(fleet)
        self.trust = trust
        self.devices: dict[str, Device] = {}
        self._desired: dict[str, ReleasePayload] = {}
        self._targets: dict[str, tuple[bool, str]] = {}
        self._commands: dict[str, Envelope] = {}  # by model, as retained
        self.plans: dict[str, Plan] = {}  # by model: the newest release with waves
        #: by model: per (device, version), counts summed since :meth:`open_period`
        self.period: dict[str, dict[tuple[str, int], Counts]] = {}
        #: by model: the (device, version) entries of ``period`` changed since :meth:`take_changed`
        self._changed: dict[str, set[tuple[str, int]]] = {}
        #: by model: per (device, version), the totals of the latest telemetry
        self.totals: dict[str, dict[tuple[str, int], Counts]] = {}

    def filters(self, telemetry: bool = True) -> list[Wildcard]:
        kinds = RETAINED_KINDS + ((TopicKind.TELEMETRY,) if telemetry else ())
        return [self.topics.every(kind) for kind in kinds]

    # -- folding --------------------------------------------------------------------------------------
    def apply(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            return
        kind = parsed.kind
        if kind.desired:
            self._fold_desired(message, parsed.kind.scope == "groups", parsed.group or parsed.device)
        elif kind is TopicKind.ROLLOUT:
            self._fold_command(parsed.model, message.payload)
        elif (body := json_object(message)) is not None:
            device = self.devices.setdefault(parsed.device, Device())
            if kind is TopicKind.TELEMETRY:
                self._fold_telemetry(parsed.device, device, body)
            elif kind is TopicKind.STATUS:
                device.online = body.get("state") == "online"
                device.group = body.get("group", device.group)
                if isinstance(body.get("model"), str):
                    device.active[body["model"]] = body.get("active_version")
                for served in _listed(body.get("models")):
                    if isinstance(served.get("name"), str):
                        device.active[served["name"]] = served.get("active_version")
            else:
                model = parsed.model or body.get("model")
                if isinstance(model, str) and model:
                    self._fold_report(device, model, body)

    def _fold_report(self, device: Device, model: str, body: dict[str, Any]) -> None:
        version = body.get("version")
        device.report[model] = (version if isinstance(version, int) else None, str(body.get("state")),
                                str(body.get("reason") or ""))
        if isinstance(body.get("active_version"), int):
            device.active[model] = body["active_version"]

    def _fold_desired(self, message: Message, group: bool, name: str) -> None:
        topic = message.topic
        self._desired.pop(topic, None)
        if message.payload:
            try:
                envelope = Envelope.from_json(message.payload)
                release = (verify_envelope(envelope, self.trust) if self.trust is not None
                           else ReleasePayload.from_dict(envelope.payload))
            except ReleaseRejected as e:
                log.warning("event=rollout_release_ignored topic=%s reason=%r", topic, str(e))
            else:
                if release.rollout.waves is not None:
                    self._desired[topic] = release
                    self._targets[topic] = (group, name)
        self._plan()

    def _plan(self) -> None:
        """The newest release with waves per model, with every group and device it is retained for."""
        newest: dict[str, ReleasePayload] = {}
        for release in self._desired.values():
            held = newest.get(release.model)
            if held is None or (release.version, release.issued_at) > (held.version, held.issued_at):
                newest[release.model] = release
        plans = {}
        for model, release in newest.items():
            where = [self._targets[t] for t, r in self._desired.items()
                     if (r.model, r.version) == (model, release.version)]
            plans[model] = Plan(release, frozenset(n for g, n in where if g), frozenset(n for g, n in where
                                                                                        if not g))
        self.plans = plans

    def _fold_command(self, model: str, payload: bytes) -> None:
        if not payload:
            self._commands.pop(model, None)
            return
        try:
            self._commands[model] = Envelope.from_json(payload)
        except ReleaseRejected as e:
            log.warning("event=rollout_command_ignored model=%s reason=%r", model, str(e))

    def _fold_telemetry(self, name: str, device: Device, body: dict[str, Any]) -> None:
        seq = body.get("seq")
        if isinstance(seq, int):
            if seq <= device.seq and device.seq - seq < 1_000_000:  # a duplicate (far below: a reset)
                return
            device.seq = seq
        for served in _listed(body.get("models")):
            model = served.get("name")
            if not isinstance(model, str) or model not in self.plans:
                continue
            p95 = _field(served, "latency_ms", "edge", "p95")
            if isinstance(p95, (int, float)) and not isinstance(p95, bool):
                device.p95[model] = (served.get("model_version"), float(p95))
            found = quality_counts(served.get("quality"))
            if found is None:
                continue
            version, interval, totals = found
            if (period := self.period.get(model)) is not None:
                period.setdefault((name, version), Counts()).add(interval)
                self._changed.setdefault(model, set()).add((name, version))
            if totals is not None:
                self.totals.setdefault(model, {})[(name, version)] = totals

    # -- reading --------------------------------------------------------------------------------------
    def command(self, model: str) -> WaveCommand | None:
        """The command retained for ``model``'s plan, if it is for that release and verifies (with a
        trust store) or parses (without)."""
        plan, envelope = self.plans.get(model), self._commands.get(model)
        if plan is None or envelope is None:
            return None
        try:
            if self.trust is None:
                command = WaveCommand.from_dict(dict(envelope.payload))
                return command if command.version == plan.release.version else None
            return verify_command(envelope, plan.release, self.trust)
        except CommandRefused as e:
            log.debug("event=rollout_command_not_for_plan model=%s reason=%r", model, str(e))
            return None

    def open_period(self, model: str, counts: Mapping[tuple[str, int], Counts] | None = None) -> None:
        """Start summing ``model``'s telemetry afresh (a wave starts), or from ``counts`` (a restart)."""
        self.period[model] = dict(counts or {})
        self._changed.pop(model, None)

    def take_changed(self, model: str) -> dict[tuple[str, int], Counts]:
        """The entries of ``model``'s period changed since the last call."""
        period = self.period.get(model, {})
        return {key: period[key] for key in self._changed.pop(model, ())}

    def in_scope(self, plan: Plan) -> dict[str, Device]:
        """The devices the plan's release addresses: its devices, and those of its groups."""
        return {name: d for name, d in self.devices.items()
                if name in plan.devices or (d.group is not None and d.group in plan.groups)}

    def cohorts(self, plan: Plan, counts: Mapping[tuple[str, int], Counts]) -> Cohorts:
        """The new version's devices against the control (the plan's devices on another version), with
        ``counts`` per (device, version): since a wave started, or totals."""
        model, version = plan.release.model, plan.release.version
        scope = self.in_scope(plan)
        new: dict[str, Counts] = {}
        control: dict[str, Counts] = {}
        for (name, seen), c in counts.items():
            if name in scope:  # a device that moved during the period counts on both sides
                (new if seen == version else control).setdefault(name, Counts()).add(c)
        took = failed = active = 0
        p95_new: list[float] = []
        p95_control: list[float] = []
        for device in scope.values():
            serving = device.active.get(model)
            report = device.report.get(model)
            mine = report is not None and report[0] == version
            if serving == version or mine:
                took += 1
            if mine and report is not None and (report[1] == "failed" or (
                    report[1] == "rolled_back" and not report[2].startswith(ROLLOUT_HALTED))):
                failed += 1
            if device.online and serving == version:
                active += 1
            latency = device.p95.get(model)
            if device.online and latency is not None and latency[0] == serving and serving is not None:
                (p95_new if serving == version else p95_control).append(latency[1])
        return Cohorts(new, control, active, took, failed, tuple(p95_new), tuple(p95_control))

    def standings(self, plan: Plan) -> dict[str, int]:
        """Devices of the plan by where they stand with its version: active, pending, rolled_back,
        failed, and offline (of those in scope)."""
        model, version = plan.release.model, plan.release.version
        out = {"active": 0, "pending": 0, "rolled_back": 0, "failed": 0, "offline": 0}
        for device in self.in_scope(plan).values():
            report = device.report.get(model)
            if device.active.get(model) == version:
                out["active"] += 1
            elif report is not None and report[0] == version and report[1] in ("rolled_back", "failed"):
                out[report[1]] += 1
            else:
                out["pending"] += 1
            out["offline"] += not device.online
        return out
