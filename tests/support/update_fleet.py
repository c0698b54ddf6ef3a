"""The update rig of the agent's fleet tests: a real broker, a gateway holding the releases, a signing key,
agents, and a watcher that schema-checks every reported and event message as it arrives."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import jsonschema
import numpy as np
import pytest

from edge_agent.app import EdgeAgent
from edgecloud.mqtt.client import Message, MqttClient
from edgecloud.mqtt.topics import FleetTopics, Topic, TopicKind
from edgecloud.release import Envelope, ReleasePayload, sign_release
from edgecloud.signing import load_private_key, write_keypair
from edgecloud_tools.fleet.publish import Published, ReleaseRequest, publish_release
from edgecloud_tools.rig.services import ServiceProcess
from tests.support.fleet import FLEET, schema
from tests.support.net import free_port, wait_for
from tests.support.onnx_models import linear_classifier
from tests.support.services import Client, GatewayCloud, start_agent

if TYPE_CHECKING:
    from edgecloud_tools.rig.broker import LocalBroker

GROUP, NAME = "line-a", "inspection"
TOPICS = FleetTopics(FLEET)
SCHEMA = {TopicKind.REPORTED: schema("reported"), TopicKind.EVENTS: schema("events"),
          TopicKind.STATUS: schema("status")}
X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)


@dataclass(frozen=True)
class Key:
    private: Path
    public: Path
    kid: str


class Watcher:
    """Every reported and event message of the fleet, schema-checked on arrival; tests wait on it."""

    def __init__(self, broker: LocalBroker) -> None:
        self._lock = threading.Lock()
        self.messages: list[tuple[TopicKind, str, dict]] = []
        self.invalid: list[str] = []
        self.client = MqttClient(broker.mqtt_config(), on_message=self._receive).start()
        self.client.wait_connected(5)
        for kind in SCHEMA:
            self.client.subscribe(TOPICS.every(kind))

    def _receive(self, message: Message) -> None:
        parsed = TOPICS.parse(message.topic)
        if parsed is None or not message.payload:
            return
        body = message.json()
        try:
            jsonschema.validate(body, SCHEMA[parsed.kind])
        except jsonschema.ValidationError as e:
            self.invalid.append(f"{message.topic}: {e.message}")
        with self._lock:
            self.messages.append((parsed.kind, parsed.device, body))

    def of(self, kind: TopicKind, device: str) -> list[dict]:
        with self._lock:
            return [body for k, d, body in self.messages if k is kind and d == device]

    def reports(self, device: str) -> list[dict]:
        return self.of(TopicKind.REPORTED, device)

    def status_says(self, device: str, active_version: int) -> bool:
        """Wait until the device's latest retained status names ``active_version``."""
        return wait_for(lambda: (self.of(TopicKind.STATUS, device) or [{}])[-1].get("active_version")
                        == active_version)

    def states(self, device: str, version: int) -> list[str]:
        """The states reported for ``version``, repeats (progress) collapsed."""
        states = [r["state"] for r in self.reports(device) if r["version"] == version]
        return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]

    def wait_report(self, device: str, state: str, version: int | None, timeout: float = 20.0,
                    after: int = 0) -> dict:
        """The first report (from index ``after`` on) of ``state`` for ``version``."""
        def found() -> dict | None:
            return next((r for r in self.reports(device)[after:]
                         if r["state"] == state and r["version"] == version), None)

        assert wait_for(lambda: found() is not None, timeout), \
            f"{device}: no {state} report for version {version}; got {self.reports(device)}"
        assert not self.invalid, self.invalid
        return found()  # type: ignore[return-value]

    def wait_event(self, device: str, event_type: str, timeout: float = 20.0) -> dict:
        def found() -> dict | None:
            return next((e for e in self.of(TopicKind.EVENTS, device) if e["type"] == event_type), None)

        assert wait_for(lambda: found() is not None, timeout), \
            f"{device}: no {event_type} event; got {self.of(TopicKind.EVENTS, device)}"
        return found()  # type: ignore[return-value]

    def close(self) -> None:
        self.client.close()


class Fleet:
    """A broker, a gateway holding the releases, a signing key, the base model (v1) and agents."""

    def __init__(self, broker: LocalBroker, root: Path) -> None:
        self.broker, self.root = broker, root
        self.key = self.new_key("release")
        self.base = linear_classifier(root / "models" / "v1" / "inspection.onnx", seed=0,
                                      card={"name": NAME, "version": 1})
        self.cloud = GatewayCloud(root / "gateway", self.base, NAME).start()
        self.watcher = Watcher(broker)
        self.agents: list[EdgeAgent] = []
        self.processes: list[ServiceProcess] = []

    def new_key(self, name: str) -> Key:
        private, public, kid = write_keypair(self.root / "keys" / name)
        return Key(private, public, kid)

    def model(self, version: int, **kwargs: Any) -> Path:
        """A model with the serving contract of the base model, different weights."""
        return linear_classifier(self.root / "models" / f"v{version}" / "inspection.onnx", seed=version,
                                 **kwargs)

    def state_dir(self, device: str) -> Path:
        return self.root / "agents" / device

    def sections(self, device: str, fleet: dict | None = None, update: dict | None = None,
                 **sections: Any) -> dict[str, Any]:
        return {"agent": {"device_id": device},
                "fleet": {"name": FLEET, "group": GROUP, "trusted_keys": [str(self.key.public)],
                          **(fleet or {})},
                "mqtt": self.broker.mqtt_section(),
                "update": {"watch_s": 0.3, **(update or {})}, **sections}

    def agent(self, device: str = "edge-1", serving: Path | None = None, **kwargs: Any) -> EdgeAgent:
        """An agent serving ``serving`` (default: the base model) as version 1."""
        agent = start_agent(self.state_dir(device), serving or self.base, **self.sections(device, **kwargs))
        self.agents.append(agent)
        assert agent.fleet is not None
        agent.fleet.client.wait_connected(5)
        return agent

    def process_agent(self, device: str, env: dict[str, str] | None = None) -> ServiceProcess:
        """The agent as a child process, configured by a TOML file, as systemd runs it."""
        port = free_port()
        sections = self.sections(device)
        sections["agent"].update(listen=f"127.0.0.1:{port}", state_dir=str(self.state_dir(device)))
        sections["model"] = {"path": str(self.base)}
        sections["metrics"] = {"listen": "127.0.0.1:0"}
        config = self.root / f"{device}.toml"
        config.write_text(toml(sections))
        process = ServiceProcess("edge-agent", ["--config", str(config)], port,
                                 self.root / "logs" / f"{device}-{len(self.processes)}.log", env=env)
        self.processes.append(process)
        return process.start()

    def request(self, model: Path, version: int, key: Key | None = None, **kwargs: Any) -> ReleaseRequest:
        if "device" not in kwargs:
            kwargs.setdefault("group", GROUP)
        if "uri" not in kwargs:
            kwargs.setdefault("gateway", f"127.0.0.1:{self.cloud.port}")
        return ReleaseRequest(model=model, name=NAME, version=version, key=(key or self.key).private,
                              fleet=FLEET, **kwargs)

    def publish(self, model: Path, version: int, key: Key | None = None, now: datetime | None = None,
                **kwargs: Any) -> Published:
        return publish_release(self.request(model, version, key, **kwargs), self.broker.mqtt_config(),
                               now=now)

    def sign(self, payload: ReleasePayload) -> Envelope:
        return sign_release(payload, load_private_key(self.key.private))

    def send(self, topic: Topic, data: bytes) -> None:
        """Publish raw bytes retained (a crafted release, or b"" to clear a desired topic)."""
        with MqttClient(self.broker.mqtt_config()) as client:
            client.wait_connected(5)
            client.publish(topic, data, qos=1, retain=True)

    def close(self) -> None:
        for agent in self.agents:
            agent.stop(grace=0)
        for process in self.processes:
            process.stop()
        self.watcher.close()
        self.cloud.stop()


def toml(sections: dict[str, Any]) -> str:
    """The few TOML shapes an agent config needs (JSON strings are valid TOML basic strings)."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def fleet(broker: LocalBroker, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(broker, tmp_path)
    yield fleet
    fleet.close()
    assert not fleet.watcher.invalid, fleet.watcher.invalid


class Load:
    """A local app calling an agent in a loop; counts answers per model version and failed calls."""

    def __init__(self, port: int, x: np.ndarray = X) -> None:
        self.port, self.x = port, x
        self.versions: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(self.port) as client:
            while not self._stop.is_set():
                try:
                    self.versions[client.infer(NAME, {"x": self.x}).model_version] += 1
                except grpc.RpcError as e:
                    self.failures.append(f"{e.code().name}: {e.details()}")

    def wait(self, version: str, calls: int = 20) -> None:
        assert wait_for(lambda: self.versions[version] >= calls, 20), (self.versions, self.failures[-3:])

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def served_version(port: int) -> str:
    with Client(port) as client:
        return client.infer(NAME, {"x": X}).model_version


def state_file(fleet: Fleet, device: str) -> dict:
    return json.loads((fleet.state_dir(device) / "update" / "state.json").read_text())
