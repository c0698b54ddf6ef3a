"""The fleet as its retained topics describe it: one row per device (online, group, last seen) with
a state per model it serves (active version, update state, escalation rate, agreement with the cloud),
folded from status, reported and telemetry messages, and the releases desired for groups and devices
with where each stands. Read by the fleet collector and by ``edgecloud fleet status``.

Status and reported are retained, so every device that ever spoke shows up at once; telemetry is
not, so the escalation rate and the agreement appear only for devices that report during the
listening window. Telemetry without a model's ``quality`` (an older agent) or with one that does not
read leaves its agreement unknown, never taken for agreement (docs/design.md §12).
A desired release is shown as published (its signature is the devices' to check), and each model of
a device counts for the release its agent follows (docs/design.md §7). A release on the
shared topic that its model's own topic holds as well is listed once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgecloud.clock import parse_time
from edgecloud.mqtt.client import Message
from edgecloud.mqtt.payloads import Quality
from edgecloud.mqtt.topics import FleetTopics, ParsedTopic, TopicKind
from edgecloud.release import Envelope, ReleasePayload, ReleaseRejected

log = logging.getLogger(__name__)


@dataclass
class ModelState:
    """Where one model of a device stands: the version it serves and its update."""

    name: str
    active_version: int | None = None
    ready: bool | None = None
    update_state: str | None = None
    update_version: int | None = None
    update_progress: float | None = None
    update_reason: str | None = None
    escalation_rate: float | None = None
    #: whether telemetry of this model was heard (its ``quality`` may still be unknown)
    heard: bool = False
    #: the agreement its telemetry last reported, for the version active then; None: unknown
    quality: Quality | None = None

    @property
    def audit_agreement(self) -> tuple[int, int] | None:
        """(audited rows the cloud answered as the edge did, audited rows) of the active version since
        it became active; None when unknown (no quality, or one of another version than the active)."""
        quality = self.quality
        if quality is None or self.active_version not in (None, quality.version):
            return None
        return quality.totals.audit_agree, quality.totals.audited

    def fold_quality(self, value: Any) -> None:
        """A telemetry message's ``quality`` of this model: kept when it reads, else unknown."""
        self.heard = True
        try:
            self.quality = None if value is None else Quality.model_validate(value)
        except ValueError:
            log.debug("event=fleet_quality_unreadable model=%s", self.name)
            self.quality = None

    @property
    def update(self) -> str:
        if self.update_state is None:
            return "-"
        text = self.update_state
        if self.update_version is not None:
            text += f" v{self.update_version}"
        if self.update_state == "downloading" and self.update_progress is not None:
            text += f" {self.update_progress:.0%}"
        if self.update_reason:
            text += f" ({self.update_reason})"
        return text

    def fold_report(self, body: dict[str, Any]) -> None:
        self.update_state, self.update_version = body.get("state"), body.get("version")
        self.update_progress, self.update_reason = body.get("progress"), body.get("reason")
        if body.get("active_version") is not None:
            self.active_version = body["active_version"]


@dataclass
class DeviceRow:
    """One device: online, group, last seen, and its models (``model`` names the first that serves,
    whose figures the row's own ``active_version`` and ``update`` are)."""

    device: str
    online: bool | None = None
    group: str | None = None
    model: str | None = None
    escalation_rate: float | None = None
    last_seen: datetime | None = None
    models: dict[str, ModelState] = field(default_factory=dict)

    def seen(self, at: Any) -> None:
        try:
            moment = parse_time(at)
        except ValueError:
            return
        if self.last_seen is None or moment > self.last_seen:
            self.last_seen = moment

    def state(self, model: str | None) -> ModelState:
        """The state of ``model`` (made on first sight); the first model's for None."""
        name = model or self.model or next(iter(self.models), "")
        return self.models.setdefault(name, ModelState(name))

    @property
    def primary(self) -> ModelState | None:
        return self.models.get(self.model or "") or next(iter(self.models.values()), None)

    @property
    def active_version(self) -> int | None:
        return self.primary.active_version if self.primary else None

    @property
    def update(self) -> str:
        return self.primary.update if self.primary else "-"


def _named(value: Any) -> list[dict[str, Any]]:
    """The JSON objects with a name of a list (a message's ``models``); [] for anything else."""
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, dict) and isinstance(v.get("name"), str) and v["name"]]


def json_object(message: Message) -> dict[str, Any] | None:
    """The message's JSON object; None (logged at debug) for an empty, unreadable or non-object one."""
    if not message.payload:
        return None
    try:
        body = json.loads(message.payload)
    except ValueError:
        log.debug("event=fleet_message_unreadable topic=%s", message.topic)
        return None
    return body if isinstance(body, dict) else None


class FleetView:
    """Folds status, reported and telemetry messages into device rows."""

    def __init__(self, fleet: str) -> None:
        self.topics = FleetTopics(fleet)
        self.rows: dict[str, DeviceRow] = {}
        self.desired: dict[Target, Desired] = {}

    def apply(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            return
        if parsed.kind.desired:
            self.fold_desired(parsed, message.payload)
            return
        body = json_object(message)
        if body is not None and parsed.device:
            self.fold(parsed.kind, parsed.device, body, parsed.model)

    def fold_desired(self, parsed: ParsedTopic, payload: bytes) -> None:
        """A retained desired message: a release for the group or device, or cleared (empty)."""
        target = Target(parsed.kind.scope == "groups", parsed.group or parsed.device, parsed.model)
        if not payload:
            self.desired.pop(target, None)
            return
        try:
            release = ReleasePayload.from_dict(Envelope.from_json(payload).payload)
        except ReleaseRejected as e:
            log.debug("event=fleet_desired_unreadable topic=%s reason=%s", target, e)
            return
        self.desired[target] = Desired(target, release.model, release.version, release.allow_downgrade,
                                       release.issued_at)

    def fold(self, kind: TopicKind, device: str, body: dict[str, Any], model: str = "") -> None:
        """Fold one decoded message of ``kind`` from ``device`` (about ``model``, for a per-model
        topic) into its row."""
        row = self.rows.setdefault(device, DeviceRow(device))
        row.seen(body.get("at"))
        if kind is TopicKind.STATUS:
            row.online = body.get("state") == "online"
            row.group = body.get("group", row.group)
            row.model = body.get("model", row.model)
            row.state(None).active_version = body.get("active_version")
            listed = _named(body.get("models"))
            for served in listed:
                state = row.state(served["name"])
                state.active_version, state.ready = served.get("active_version"), served.get("ready")
            if listed:  # the status says what it serves: no line for a model only a refusal named
                names = {m["name"] for m in listed} | {row.model}
                row.models = {name: state for name, state in row.models.items() if name in names}
        elif kind is TopicKind.MODEL_REPORTED:
            row.state(model).fold_report(body)
        elif kind is TopicKind.REPORTED:  # the shared topic: a report on a model not served here is the
            # first model's refusal (and all there is from an agent that predates the per-model topics)
            named = body.get("model")
            row.state(named if named in row.models or not row.models else None).fold_report(body)
        elif kind is TopicKind.TELEMETRY:
            row.escalation_rate = body.get("escalation_rate", row.escalation_rate)
            for served in _named(body.get("models")):
                state = row.state(served["name"])
                state.escalation_rate = served.get("escalation_rate")
                state.fold_quality(served.get("quality"))

    def sorted_rows(self) -> list[DeviceRow]:
        return [self.rows[d] for d in sorted(self.rows)]

    def releases(self) -> list[Standing]:
        """Each desired release with the devices it applies to, by where they stand with it: groups
        first, then devices, by name and model."""
        shown = {t: self._twin(t) for t in self.desired}
        devices: dict[Target, dict[str, list[str]]] = {t: {} for t in set(shown.values())}
        for row in self.sorted_rows():
            for state in row.models.values():
                desired = self._followed(row, state.name)
                if desired is not None:
                    devices[shown[desired.target]].setdefault(desired.standing(state), []).append(row.device)
        return [Standing(self.desired[t], {s: tuple(d) for s, d in devices[t].items()})
                for t in sorted(devices, key=lambda t: (not t.group, t.name, t.model))]

    def _twin(self, target: Target) -> Target:
        """The model's own topic of a shared topic's release that it holds too; else ``target``."""
        desired = self.desired[target]
        twin = Target(target.group, target.name, desired.model)
        if not target.model and twin in self.desired and self.desired[twin].same_release(desired):
            return twin
        return target

    def _followed(self, row: DeviceRow, model: str) -> Desired | None:
        """The release a device follows for ``model``, as its agent picks it: the device's over its
        group's; at one level, the later issued of the model's own topic and the shared one (the
        model's own on a tie), the shared one only when it names the model (or the device serves one)."""
        for group, name in [(False, row.device)] + ([(True, row.group)] if row.group else []):
            own = self.desired.get(Target(group, name, model)) if model else None
            shared = self.desired.get(Target(group, name, ""))
            if shared is not None and model and shared.model != model and len(row.models) > 1:
                shared = None  # another model's: its follower takes it
            if own is not None and shared is not None:
                return own if own.issued_at >= shared.issued_at else shared
            if own is not None or shared is not None:
                return own or shared
        return None


@dataclass(frozen=True)
class Target:
    """Whom a desired topic addresses: a group, or one device."""

    group: bool
    name: str
    model: str = ""  # the model's own topic; "" for the one its models share

    def __str__(self) -> str:
        return f"{'group' if self.group else 'device'} {self.name}"


#: where a device stands with the release desired for it
STANDINGS = ("active", "pending", "rolled_back", "failed")


@dataclass(frozen=True)
class Desired:
    """A release retained on a desired topic, as published."""

    target: Target
    model: str
    version: int
    rollback: bool
    issued_at: datetime

    def same_release(self, other: Desired) -> bool:
        return (self.model, self.version, self.issued_at) == (other.model, other.version, other.issued_at)

    def standing(self, state: ModelState) -> str:
        """``active`` once the model serves this version, ``rolled_back`` / ``failed`` when its report
        for this version says so, else ``pending`` (not taken yet, or on its way)."""
        if state.active_version == self.version and state.name in ("", self.model):
            return "active"
        if state.update_version == self.version and state.update_state in ("rolled_back", "failed"):
            return state.update_state
        return "pending"


@dataclass(frozen=True)
class Standing:
    """A desired release and the devices it applies to, by standing (one of :data:`STANDINGS`)."""

    release: Desired
    devices: Mapping[str, tuple[str, ...]]
