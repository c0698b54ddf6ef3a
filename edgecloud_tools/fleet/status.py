"""``edgecloud fleet status``: the fleet's devices and the releases desired for them, collected by
listening to their retained topics for a moment, printed as two tables.

The devices' table says, per model, how often the cloud agreed with the active version on audited rows
since that version became active (``audit 93.1% of 412``, docs/design.md §12): ``unknown`` when its
telemetry carries no agreement (an older agent) or one of another version, ``-`` when no telemetry
came during the listening window.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence

from edgecloud.clock import format_time
from edgecloud.mqtt.client import Message, MqttClient, MqttConfig
from edgecloud.mqtt.fleet_view import STANDINGS, DeviceRow, FleetView, ModelState, Standing
from edgecloud.mqtt.topics import TopicKind, Wildcard
from edgecloud_tools.output import table


def listen(config: MqttConfig, filters: Sequence[Wildcard], apply: Callable[[Message], object],
           listen_s: float, connect_timeout_s: float) -> None:
    """Hand ``apply`` what ``filters`` hold retained and what arrives within ``listen_s`` seconds, one
    message at a time on this thread."""
    inbox: queue.Queue[Message] = queue.Queue()
    with MqttClient(config, on_message=inbox.put) as client:
        client.wait_connected(connect_timeout_s)
        for wildcard in filters:
            client.subscribe(wildcard)
        deadline = time.monotonic() + listen_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                apply(inbox.get(timeout=remaining))
            except queue.Empty:
                break
    while not inbox.empty():
        apply(inbox.get_nowait())


def collect(config: MqttConfig, fleet: str, listen_s: float = 2.0, connect_timeout_s: float = 10.0,
            filters: Sequence[Wildcard] = ()) -> FleetView:
    """Subscribe to the fleet's status, reported, telemetry and desired topics (or to ``filters``)
    for ``listen_s`` seconds."""
    view = FleetView(fleet)
    listen(config, filters or [view.topics.every(k) for k in TopicKind if k is not TopicKind.EVENTS],
           view.apply, listen_s, connect_timeout_s)
    return view


def agreement(state: ModelState) -> str:
    """The audit agreement of a model's active version, as the table shows it."""
    if not state.heard:
        return "-"
    figures = state.audit_agreement
    if figures is None:
        return "unknown"
    agree, audited = figures
    return f"audit {agree / audited:.1%} of {audited}" if audited else "audit - of 0"


def render_table(rows: list[DeviceRow]) -> str:
    """A line per device, or per model of a device that serves several (its first model first, each
    with its own escalation rate); each with its model's audit agreement."""
    header = ("DEVICE", "ONLINE", "MODEL", "ACTIVE", "UPDATE", "ESCALATION", "AGREEMENT", "LAST SEEN")
    lines = []
    for row in rows:
        online = "-" if row.online is None else ("yes" if row.online else "no")
        states = sorted(row.models.values(), key=lambda s: s is not row.primary) or [ModelState("")]
        for state in states:
            rate = state.escalation_rate if len(states) > 1 else row.escalation_rate
            lines.append((row.device, online, state.name or row.model or "-",
                          "-" if state.active_version is None else str(state.active_version), state.update,
                          "-" if rate is None else f"{rate:.1%}", agreement(state),
                          format_time(row.last_seen) if row.last_seen else "-"))
    return table(header, lines)


def render_releases(releases: list[Standing]) -> str:
    """One line per retained desired release: the devices it is active on, pending on (a rollback not
    taken yet included), and rolled back or failed on."""
    header = ("RELEASE", "MODEL", "VERSION", "ISSUED", *(s.upper().replace("_", " ") for s in STANDINGS))
    lines = []
    for standing in releases:
        r = standing.release
        lines.append((str(r.target), r.model, f"{r.version}{' (rollback)' if r.rollback else ''}",
                      format_time(r.issued_at),
                      *(", ".join(standing.devices.get(s, ())) or "-" for s in STANDINGS)))
    return table(header, lines)
