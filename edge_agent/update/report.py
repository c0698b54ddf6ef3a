"""What the fleet hears about updates (docs/design.md §7, §9): the retained ``model/reported`` state of the
release being handled, and an ``update.*`` event and a log line for each change. A desired message
too broken to name its release (not JSON, no model or version) is reported ``failed`` under the served
model's name with ``version`` null, so it shows on ``model/reported`` as well as in the events.

The report is retained, so the latest one is what matters: while the broker is away it is kept (only
the latest) and sent by :meth:`Reporter.flush`, which the update thread calls whenever it wakes, a
reconnect included. Events are best effort.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from edge_agent.fleet.link import FleetLink, as_int_version
from edge_agent.serving.slot import ModelSlot
from edgecloud.mqtt.client import ConnectionState, MqttError
from edgecloud.mqtt.payloads import Reported

log = logging.getLogger(__name__)

REASON_MAX_CHARS = 400


def one_line(text: str) -> str:
    """Runtime errors span lines; a reason is one line of bounded length."""
    return " ".join(str(text).split())[:REASON_MAX_CHARS]


def identity(payload: Mapping[str, Any]) -> tuple[str, int] | None:
    """Model and version of a release not (yet) verified, when it names them well enough to report."""
    model, version = payload.get("model"), payload.get("version")
    named = isinstance(model, str) and bool(model)
    numbered = isinstance(version, int) and not isinstance(version, bool) and version >= 0
    return (model, version) if named and numbered else None


class Reporter:
    """Reports and events of one device's updates; ``slot`` holds the model serving now."""

    def __init__(self, fleet: FleetLink, device: str, slot: ModelSlot) -> None:
        self.fleet = fleet
        self.device = device
        self._slot = slot
        self._lock = threading.Lock()
        self._unsent: Reported | None = None  # the latest report, until the broker has it
        self._connected = threading.Event()
        fleet.client.add_state_listener(self._connection)

    def _connection(self, state: ConnectionState, _detail: str) -> None:  # paho's thread: no blocking
        if state is ConnectionState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        """True once the broker is connected, False after ``timeout`` seconds without it."""
        return self._connected.wait(timeout)

    def _active_version(self) -> int | None:
        return as_int_version(self._slot.model.version)

    def enter(self, model: str, version: int | None, state: str, progress: float | None = None,
              reason: str | None = None) -> None:
        """A state change: one log line, one event, one retained report."""
        bad = state in ("failed", "rolled_back")
        log.log(logging.WARNING if bad else logging.INFO,
                "event=update_state device=%s model=%s version=%s state=%s progress=%s reason=%r",
                self.device, model, version, state, progress, reason)
        self.fleet.event("update.state", "warning" if bad else "info", model=model, version=version,
                         state=state, progress=progress, reason=reason, active_version=self._active_version())
        self.report(model, version, state, progress, reason)
        if state in ("active", "rolled_back"):  # the served model changed
            self.fleet.announce()

    def failed(self, ident: tuple[str, int] | None, reason: str) -> None:
        """A release refused: reported under its name and version, or, when it names neither, under
        the served model's name with no version."""
        model, version = ident if ident is not None else (self._slot.model.name, None)
        self.enter(model, version, "failed", reason=reason)

    def event(self, event_type: str, severity: str = "info", **data: Any) -> None:
        self.fleet.event(event_type, severity, **data)

    def report(self, model: str, version: int | None, state: str, progress: float | None = None,
               reason: str | None = None) -> None:
        """The retained report alone (download progress is no state change)."""
        payload = Reported(device=self.device, model=model, version=version, state=state,
                           active_version=self._active_version(), progress=progress, reason=reason)
        with self._lock:
            self._unsent = payload
        self.flush()

    def flush(self) -> None:
        """Publish the latest report (retained) on the model's own topic, then on the one the models
        share (which tools that predate the topics per model read); kept for the next connect when the
        broker is away. A report on a release for a model not served here (refused) goes on the shared
        topic only: the model's own keeps its last state."""
        with self._lock:
            payload = self._unsent
        if payload is None:
            return
        model = self._slot.model.name
        topics = [self.fleet.topics.reported(self.device, model)] if payload.model == model else []
        try:
            for topic in (*topics, self.fleet.topics.reported(self.device)):
                self.fleet.publish(topic, payload, retain=True)
        except MqttError as e:
            log.warning("event=update_report_not_sent device=%s state=%s error=%r", self.device,
                        payload.state, str(e))
            return
        with self._lock:
            if self._unsent is payload:
                self._unsent = None
