"""The fleet as its retained topics describe it: one row per device (online, model, update state,
escalation rate, last seen), folded from status, reported and telemetry messages. Read by the fleet
collector and by ``edgecloud fleet status``.

Status and reported are retained, so every device that ever spoke shows up at once; telemetry is
not, so the escalation rate appears only for devices that report during the listening window.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edgecloud.clock import parse_time
from edgecloud.mqtt.client import Message
from edgecloud.mqtt.topics import FleetTopics, TopicKind

log = logging.getLogger(__name__)


@dataclass
class DeviceRow:
    device: str
    online: bool | None = None
    model: str | None = None
    active_version: int | None = None
    update_state: str | None = None
    update_version: int | None = None
    update_progress: float | None = None
    update_reason: str | None = None
    escalation_rate: float | None = None
    last_seen: datetime | None = None

    def seen(self, at: Any) -> None:
        try:
            moment = parse_time(at)
        except ValueError:
            return
        if self.last_seen is None or moment > self.last_seen:
            self.last_seen = moment

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

    def apply(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None or not parsed.device:
            return
        body = json_object(message)
        if body is not None:
            self.fold(parsed.kind, parsed.device, body)

    def fold(self, kind: TopicKind, device: str, body: dict[str, Any]) -> None:
        """Fold one decoded message of ``kind`` from ``device`` into its row."""
        row = self.rows.setdefault(device, DeviceRow(device))
        row.seen(body.get("at"))
        if kind is TopicKind.STATUS:
            row.online = body.get("state") == "online"
            row.model = body.get("model", row.model)
            row.active_version = body.get("active_version", row.active_version)
        elif kind is TopicKind.REPORTED:
            row.update_state, row.update_version = body.get("state"), body.get("version")
            row.update_progress, row.update_reason = body.get("progress"), body.get("reason")
            if body.get("active_version") is not None:
                row.active_version = body["active_version"]
        elif kind is TopicKind.TELEMETRY:
            row.escalation_rate = body.get("escalation_rate", row.escalation_rate)

    def sorted_rows(self) -> list[DeviceRow]:
        return [self.rows[d] for d in sorted(self.rows)]
