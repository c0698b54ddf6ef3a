"""The demo's update part: a local mosquitto, a signing key the agent trusts, and one signed release of
the better edge model published while the stream runs, through the same code as ``fleet publish``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecloud.errors import ConfigError
from edgecloud.modelcard import read_card, served_name
from edgecloud.mqtt.client import Message, MqttClient
from edgecloud.mqtt.topics import FleetTopics
from edgecloud.signing import write_keypair
from edgecloud_tools.fleet.publish import ReleaseRequest, publish_release
from edgecloud_tools.rig.broker import LocalBroker

FLEET, GROUP = "demo", "line-1"
SETTLED = ("active", "failed", "rolled_back")
#: the agent's watch window in the demo: long enough to judge the new model under the stream's load,
#: short enough to wait for (an agent stopped inside the window starts again on the previous model)
WATCH_S = 3.0


@dataclass
class UpdateOutcome:
    """How the release went, as the device reported it on ``model/reported``."""

    version: int
    published_at: float | None = None  # time.perf_counter() when publishing started
    settled_at: float | None = None  # time.perf_counter() when it was reported active, failed or rolled back
    state: str = "not published"
    reason: str | None = None
    watch: str = "unfinished"  # after ``active``: "passed", or "rolled back" with ``reason``
    error: str | None = None  # publishing itself failed


class DemoFleet:
    """Broker, key and reported-state watcher around one agent; a context manager."""

    def __init__(self, workdir: Path, device: str, model: Path, gateway: str) -> None:
        card = read_card(model)
        version = card.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ConfigError(f"{model}: its model card has no integer version, which the release needs")
        self.workdir = workdir
        self.device = device
        self.model = model
        self.name = served_name(model, card)
        self.gateway = gateway
        self.broker = LocalBroker(workdir / "broker")
        self.private_key, self.public_key, _ = write_keypair(workdir / "keys" / "release")
        self.outcome = UpdateOutcome(version=version)
        self._watcher: MqttClient | None = None
        self._publisher: threading.Thread | None = None

    def agent_flags(self) -> list[str]:
        config = self.workdir / "agent.toml"
        config.write_text(f"[update]\nwatch_s = {WATCH_S}\n")
        return ["--config", str(config), "--mqtt", self.broker.endpoint, "--fleet", FLEET, "--group", GROUP,
                "--trusted-key", str(self.public_key)]

    def __enter__(self) -> DemoFleet:
        self.broker.start()
        self._watcher = MqttClient(self.broker.mqtt_config(), on_message=self._received).start()
        self._watcher.wait_connected(5)
        topics = FleetTopics(FLEET)
        self._watcher.subscribe(topics.reported(self.device))
        self._watcher.subscribe(topics.events(self.device))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._publisher is not None:
            self._publisher.join(15)
        if self._watcher is not None:
            self._watcher.close()
        self.broker.stop()

    def _received(self, message: Message) -> None:
        if not message.payload:
            return
        body: dict[str, Any] = message.json()
        if body.get("type") == "update.watch_passed" and body["data"].get("version") == self.outcome.version:
            self.outcome.watch = "passed"
        elif "type" not in body and body.get("version") == self.outcome.version:  # model/reported
            self.outcome.state, self.outcome.reason = body.get("state", "?"), body.get("reason")
            if self.outcome.state in SETTLED and self.outcome.settled_at is None:
                self.outcome.settled_at = time.perf_counter()
            if self.outcome.state == "rolled_back":
                self.outcome.watch = "rolled back"

    def publish_in_background(self) -> None:
        """Sign and publish the release to the group without pausing the caller's stream."""
        request = ReleaseRequest(model=self.model, name=self.name, version=self.outcome.version,
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

    def wait_watched(self, timeout: float) -> None:
        """After ``active``: wait for the watch window's verdict, so the demo does not stop the agent
        inside it."""
        deadline = time.monotonic() + timeout
        while self.outcome.state == "active" and self.outcome.watch == "unfinished" \
                and time.monotonic() < deadline:
            time.sleep(0.05)

    def settled_or_timed_out(self, timeout: float) -> Callable[[], bool]:
        """A predicate: the device reported the release settled, publishing failed, or time is up."""
        deadline = time.monotonic() + timeout

        def done() -> bool:
            return (self.outcome.settled_at is not None or self.outcome.error is not None
                    or time.monotonic() > deadline)
        return done
