"""Watching a fleet from a test: agent config sections for a broker, a thread-safe message recorder,
and a parsed ``/metrics`` scrape over real HTTP."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from edgecloud.mqtt.client import Message

if TYPE_CHECKING:
    from edgecloud_tools.rig.broker import LocalBroker

ROOT = Path(__file__).resolve().parents[2]
FLEET = "plant-1"


def schema(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "protos" / "schemas" / f"{name}.schema.json").read_text())


def fleet_sections(broker: LocalBroker, interval_s: float = 0.2, **telemetry: Any) -> dict[str, Any]:
    """Agent config sections that join ``FLEET`` on ``broker`` and report every ``interval_s``."""
    return {"mqtt": broker.mqtt_section(), "fleet": {"name": FLEET},
            "telemetry": {"interval_s": interval_s, **telemetry}}


class Recorder:
    """Keeps every message it is handed (from paho's thread), in arrival order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        with self._lock:
            self._messages.append(message)

    def bodies(self, topic: Any) -> list[Any]:
        with self._lock:
            return [m.json() for m in self._messages if m.topic == str(topic) and m.payload]

    def seqs(self, topic: Any) -> list[int]:
        return [body["seq"] for body in self.bodies(topic)]


class Scrape:
    """One ``GET /metrics``, parsed by prometheus_client's own parser (so the format is checked too)."""

    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            self.content_type = response.headers["Content-Type"]
            self.text = response.read().decode()
        self.samples = [s for family in text_string_to_metric_families(self.text) for s in family.samples]

    def value(self, metric: str, /, **labels: str) -> float | None:
        """The sample ``metric`` whose labels include ``labels``; None when absent."""
        for sample in self.samples:
            if sample.name == metric and labels.items() <= sample.labels.items():
                return sample.value
        return None
