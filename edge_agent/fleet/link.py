"""The agent's presence in its fleet over MQTT: retained status (birth ``online``, Last Will and
goodbye ``offline``), subscriptions with handlers, and publishing of reports and events.

Handlers run one at a time on the link's own worker thread, never on paho's network thread, so a
handler may block (an update downloads and self-tests inside one).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from edgecloud import __version__
from edgecloud.mqtt.client import Message, MqttClient, MqttConfig, MqttError, Outgoing
from edgecloud.mqtt.payloads import Event, ServedModel, Status
from edgecloud.mqtt.topics import FleetTopics, Topic, Wildcard

log = logging.getLogger(__name__)

Handler = Callable[[Message], None]
#: what the status message says about the served models, in configuration order
ModelInfo = Callable[[], tuple[ServedModel, ...]]


def as_int_version(version: str | None) -> int | None:
    """Model versions are integers on the fleet topics; a path-only model is version 0 (None: none
    serving)."""
    try:
        return int(version)
    except (TypeError, ValueError):
        return None


class FleetLink:
    """One MQTT connection for one device of one fleet."""

    def __init__(self, mqtt: MqttConfig, fleet: str, device: str, model_info: ModelInfo,
                 group: str | None = None) -> None:
        self.topics = FleetTopics(fleet)
        self.device = device
        self.group = group
        self._model_info = model_info
        if not mqtt.client_id:  # a stable id lets a persistent session survive reconnects
            mqtt = mqtt.model_copy(update={"client_id": f"edge-agent-{device}"})
        self.client = MqttClient(mqtt, on_message=self._enqueue, birth=lambda: self._status("online"),
                                 will=lambda: self._status("offline"))
        self._handlers: list[tuple[Wildcard, Handler]] = []
        self._queue: queue.Queue[Message | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="fleet-link", daemon=True)

    def _status(self, state: str) -> Outgoing:
        models = self._model_info()
        first = next((m for m in models if m.ready), models[0] if models else None)
        payload = Status(device=self.device, state=state, agent_version=__version__,
                         model=first.name if first else None,
                         active_version=first.active_version if first else None, models=models,
                         group=self.group)
        return Outgoing(self.topics.status(self.device), payload, qos=1, retain=True)

    def on(self, topic: Topic | Wildcard, handler: Handler) -> None:
        """Subscribe to ``topic`` (kept across reconnects) and call ``handler`` for its messages."""
        wildcard = topic if isinstance(topic, Wildcard) else Wildcard(str(topic))
        self._handlers.append((wildcard, handler))
        self.client.subscribe(wildcard)

    def _enqueue(self, message: Message) -> None:  # paho's network thread: never block here
        self._queue.put(message)

    def _work(self) -> None:
        while (message := self._queue.get()) is not None:
            for wildcard, handler in self._handlers:
                if wildcard.matches(message.topic):
                    try:
                        handler(message)
                    except Exception:  # one bad message must not stop the link
                        log.exception("event=fleet_handler_failed topic=%s", message.topic)

    def publish(self, topic: Topic, payload: Any, *, retain: bool = False, timeout: float = 5.0) -> None:
        """QoS 1 publish; raises NotConnected / MqttTimeout for the caller to buffer or log."""
        self.client.publish(topic, payload, qos=1, retain=retain, timeout=timeout)

    def announce(self) -> None:
        """Re-publish the retained ``online`` status: the served model changed since the birth message."""
        status = self._status("online")
        try:
            self.publish(status.topic, status.payload, retain=True)
        except MqttError as e:  # the next connect's birth message carries it
            log.warning("event=fleet_status_not_sent error=%r", str(e))

    def event(self, event_type: str, severity: str = "info", **data: Any) -> None:
        """Publish an event; events are best effort (logged when the broker is away)."""
        try:
            self.publish(self.topics.events(self.device),
                         Event(device=self.device, type=event_type, severity=severity, data=data))
        except MqttError as e:
            log.warning("event=fleet_event_not_sent type=%s error=%r", event_type, str(e))

    def start(self) -> FleetLink:
        self._worker.start()
        self.client.start()
        return self

    def stop(self) -> None:
        """Publish ``offline`` (retained) and disconnect cleanly; safe to call twice."""
        self.client.close(final=self._status("offline"))
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout=10)
