"""The demo's update part: a local mosquitto, a signing key the agent trusts, and one signed release of
the better edge model published while the stream runs, through the same code as ``fleet publish``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecloud.broker import LocalBroker
from edgecloud.fleet.publish import ReleaseRequest, publish_release
from edgecloud.modelcard import read_card, served_name
from edgecloud.mqtt.client import Message, MqttClient
from edgecloud.mqtt.topics import FleetTopics
from edgecloud.signing import write_keypair

FLEET, GROUP = "demo", "line-1"
SETTLED = ("active", "failed", "rolled_back")


@dataclass
class UpdateOutcome:
    """How the release went, as the device reported it on ``model/reported``."""

    version: int
    published_at: float | None = None  # time.perf_counter() when publishing started
    settled_at: float | None = None  # time.perf_counter() when it was reported active, failed or rolled back
    state: str = "not published"
    reason: str | None = None
    error: str | None = None  # publishing itself failed


class DemoFleet:
    """Broker, key and reported-state watcher around one agent; a context manager."""

    def __init__(self, workdir: Path, device: str, model: Path, gateway: str) -> None:
        self.workdir = workdir
        self.device = device
        self.model = model
        self.gateway = gateway
        self.broker = LocalBroker(workdir / "broker")
        self.private_key, self.public_key, _ = write_keypair(workdir / "keys" / "release")
        self.outcome = UpdateOutcome(version=int(read_card(model).get("version", 2)))
        self._watcher: MqttClient | None = None
        self._publisher: threading.Thread | None = None

    def agent_flags(self) -> list[str]:
        return ["--mqtt", self.broker.endpoint, "--fleet", FLEET, "--group", GROUP,
                "--trusted-key", str(self.public_key)]

    def __enter__(self) -> DemoFleet:
        self.broker.start()
        self._watcher = MqttClient(self.broker.mqtt_config(), on_message=self._reported).start()
        self._watcher.wait_connected(5)
        self._watcher.subscribe(FleetTopics(FLEET).reported(self.device))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._publisher is not None:
            self._publisher.join(15)
        if self._watcher is not None:
            self._watcher.close()
        self.broker.stop()

    def _reported(self, message: Message) -> None:
        if not message.payload:
            return
        body: dict[str, Any] = message.json()
        if body.get("version") == self.outcome.version:
            self.outcome.state, self.outcome.reason = body.get("state", "?"), body.get("reason")
            if self.outcome.state in SETTLED and self.outcome.settled_at is None:
                self.outcome.settled_at = time.perf_counter()

    def publish_in_background(self) -> None:
        """Sign and publish the release to the group without pausing the caller's stream."""
        request = ReleaseRequest(model=self.model, name=served_name(self.model), version=self.outcome.version,
                                 key=self.private_key, fleet=FLEET, group=GROUP, gateway=self.gateway,
                                 publisher="edgecloud-demo")
        self.outcome.published_at = time.perf_counter()

        def publish() -> None:
            try:
                publish_release(request, self.broker.mqtt_config())
            except Exception as e:  # reported in the summary; the stream goes on either way
                self.outcome.error = f"{type(e).__name__}: {e}"

        self._publisher = threading.Thread(target=publish, name="demo-publish", daemon=True)
        self._publisher.start()

    def settled_or_timed_out(self, timeout: float) -> Callable[[], bool]:
        """A predicate: the device reported the release settled, publishing failed, or time is up."""
        deadline = time.monotonic() + timeout

        def done() -> bool:
            return (self.outcome.settled_at is not None or self.outcome.error is not None
                    or time.monotonic() > deadline)
        return done
