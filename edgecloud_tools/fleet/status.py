"""``edgecloud fleet status``: the fleet's devices, collected by listening to their retained topics for a
moment, printed as a table.
"""

from __future__ import annotations

import queue
import time

from edgecloud.clock import format_time
from edgecloud.mqtt.client import Message, MqttClient, MqttConfig
from edgecloud.mqtt.fleet_view import DeviceRow, FleetView
from edgecloud.mqtt.topics import TopicKind
from edgecloud_tools.output import table


def collect(config: MqttConfig, fleet: str, listen_s: float = 2.0,
            connect_timeout_s: float = 10.0) -> list[DeviceRow]:
    """Subscribe to the fleet's status, reported and telemetry topics for ``listen_s`` seconds."""
    view = FleetView(fleet)
    inbox: queue.Queue[Message] = queue.Queue()
    with MqttClient(config, on_message=inbox.put) as client:
        client.wait_connected(connect_timeout_s)
        for kind in (TopicKind.STATUS, TopicKind.REPORTED, TopicKind.TELEMETRY):
            client.subscribe(view.topics.every(kind))
        deadline = time.monotonic() + listen_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                view.apply(inbox.get(timeout=remaining))
            except queue.Empty:
                break
    while not inbox.empty():
        view.apply(inbox.get_nowait())
    return view.sorted_rows()


def render_table(rows: list[DeviceRow]) -> str:
    header = ("DEVICE", "ONLINE", "MODEL", "ACTIVE", "UPDATE", "ESCALATION", "LAST SEEN")
    lines = []
    for row in rows:
        online = "-" if row.online is None else ("yes" if row.online else "no")
        escalation = "-" if row.escalation_rate is None else f"{row.escalation_rate:.1%}"
        lines.append((row.device, online, row.model or "-",
                      "-" if row.active_version is None else str(row.active_version), row.update,
                      escalation, format_time(row.last_seen) if row.last_seen else "-"))
    return table(header, lines)
