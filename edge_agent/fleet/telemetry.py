"""Telemetry over MQTT (docs/design.md §8): every ``interval_s`` one message of ``telemetry.schema.json``.

Each message gets a ``seq`` that is persisted before use, so a restart never reuses one, and is written
to a bounded disk buffer before anything is sent. A worker thread delivers the buffer oldest first while
the broker is connected (QoS 1, a file is deleted only once the broker acknowledged it), so a broker
outage or an agent restart delays telemetry without losing it until the bound is hit; then the oldest
messages go first, counted. Circuit breaker changes are published as ``circuit.changed`` events.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.config import TelemetrySection
from edge_agent.disk_queue import DiskQueue
from edge_agent.fleet.link import FleetLink, as_int_version
from edge_agent.fleet.readings import AgentReadings, ModelReadings
from edge_agent.fleet.sysinfo import SystemMonitor
from edgecloud.files import atomic_write
from edgecloud.mqtt import payloads
from edgecloud.mqtt.client import ConnectionState, MqttError, MqttTimeout, NotConnected, encode_payload

log = logging.getLogger(__name__)

#: how long one publish waits for the broker's PUBACK before the message is retried later
PUBLISH_TIMEOUT_S = 5.0


def system_figures(sample: dict[str, Any]) -> dict[str, Any]:
    """A :class:`SystemMonitor` sample in the schema's shape: percentages and bytes, null when unknown."""
    cpu, memory = sample.get("cpu", {}), sample.get("memory", {})
    usage, gpu = cpu.get("usage"), sample.get("gpu_load")
    figures = {"cpu_percent": None if usage is None else round(usage * 100, 2),
               "memory_used_bytes": memory.get("used_bytes"), "memory_total_bytes": memory.get("total_bytes"),
               "temperatures_c": sample.get("temperatures_c", {}),
               "gpu_load_percent": None if gpu is None else round(gpu * 100, 2)}
    if "power_mw" in sample:  # Jetson power rails
        figures["power_mw"] = sample["power_mw"]
    return figures


class SeqCounter:
    """Sequence numbers kept in one file holding the next number, rewritten atomically before a number
    is handed out: after a crash the file is at least one past every number used."""

    def __init__(self, path: Path, floor: int = 0) -> None:
        self.path = path
        stored = 0
        try:
            stored = int(path.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:  # never left half-written by us; someone else broke it
            log.error("event=telemetry_seq_unreadable path=%s error=%r fallback=%d", path, str(e), floor)
        self._next = max(stored, floor)

    def take(self) -> int:
        seq = self._next
        atomic_write(self.path, f"{seq + 1}\n".encode("ascii"))
        self._next = seq + 1
        return seq


class Telemetry:
    """The agent's telemetry worker: builds, buffers and delivers messages and events on one thread."""

    def __init__(self, agent: AgentReadings, fleet: FleetLink, settings: TelemetrySection,
                 state_dir: Path) -> None:
        self._agent = agent
        self._fleet = fleet
        self.interval_s = settings.interval_s
        self.topic = fleet.topics.telemetry(fleet.device)
        directory = Path(state_dir) / "telemetry"
        self.buffer = DiskQueue(directory / "buffer", settings.buffer_max_bytes, ".json", "telemetry")
        highest = self.buffer.highest()
        self.seq = SeqCounter(directory / "seq", floor=0 if highest is None else highest + 1)
        self.sent = 0
        self._system = SystemMonitor()
        self._events: queue.SimpleQueue[tuple[str, str, str]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._flush_s = 0.0
        self._held = True  # delivery waits for the broker; changes are logged once each way
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        fleet.client.add_state_listener(self._on_state)

    def start(self) -> Telemetry:
        self._thread.start()
        return self

    def stop(self, flush_s: float = 3.0) -> None:
        """Produce a last message and try to deliver the buffer for at most ``flush_s`` seconds; what is
        left stays on disk for the next start. Safe to call twice."""
        if self._stopping.is_set():
            return
        self._flush_s = flush_s
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(flush_s + PUBLISH_TIMEOUT_S)

    def circuit_changed(self, model: str, old: str, new: str) -> None:
        """CircuitBreaker hook of ``model``'s cloud link: runs under the breaker's lock on a request
        thread, so it only hands over."""
        self._events.put((model, old, new))
        self._wake.set()

    def _on_state(self, state: ConnectionState, _detail: str) -> None:  # paho's network thread
        if state is ConnectionState.CONNECTED:
            self._wake.set()

    # -- worker thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        due = time.monotonic()
        while not self._stopping.is_set():
            self._wake.clear()
            if time.monotonic() >= due:
                self._produce()
                due = max(due + self.interval_s, time.monotonic())
            self._send_events()
            self._deliver(due)
            self._wake.wait(max(0.0, due - time.monotonic()))
        self._produce()
        self._send_events()
        self._deliver(time.monotonic() + self._flush_s, final=True)
        self._system.close()
        log.info("event=telemetry_stopped sent=%d buffered=%d dropped=%d", self.sent, self.buffer.depth(),
                 self.buffer.dropped)

    def _message(self, seq: int) -> payloads.Telemetry:
        """One telemetry message: counters since start, the rest over the interval since the last one;
        the device's totals, and each model's own figures (docs/design.md §10)."""
        agent = self._agent
        primary = agent.primary
        return payloads.Telemetry(
            device=self._fleet.device, seq=seq, model=primary.name,
            model_version=as_int_version(primary.version()), **agent.interval(),
            spool_depth=agent.spool_depth(), circuit_state=agent.circuit_state(),
            system=system_figures(self._system.sample()),
            models=tuple(self._model(model) for model in agent.models))

    @staticmethod
    def _model(model: ModelReadings) -> payloads.ModelTelemetry:
        return payloads.ModelTelemetry(
            name=model.name, model_version=as_int_version(model.version()),
            ready=model.ready(), error=model.error(), **model.interval(),
            spool_depth=model.spool.depth() if model.spool else 0, circuit_state=model.circuit_state(),
            quality=Telemetry._quality(model))

    @staticmethod
    def _quality(model: ModelReadings) -> payloads.Quality | None:
        """The active version's agreement over the interval and since it became active; None (left
        out) for a model that does not serve, or whose version is not a number the topics can carry."""
        if model.quality is None:
            return None
        figures = model.quality.interval()
        version = as_int_version(figures.pop("version"))
        return None if version is None else payloads.Quality(version=version, **figures)

    def _produce(self) -> None:
        try:
            seq = self.seq.take()
            self.buffer.put(seq, encode_payload(self._message(seq)))
        except OSError as e:  # a full or read-only disk must not stop the agent
            log.error("event=telemetry_not_buffered error=%r", str(e))
            return
        except Exception:  # nor must a bad figure stop telemetry for good
            log.exception("event=telemetry_failed")
            return
        log.debug("event=telemetry_buffered seq=%d depth=%d", seq, self.buffer.depth())

    def _send_events(self) -> None:
        while True:
            try:
                model, old, new = self._events.get_nowait()
            except queue.Empty:
                return
            severity = "warning" if new == "open" else "info"
            self._fleet.event("circuit.changed", severity, **{"model": model, "from": old, "to": new})

    def _deliver(self, deadline: float, final: bool = False) -> None:
        """Publish buffered messages oldest first until the buffer is empty, the broker is away (kept
        for later) or ``deadline`` passes (so production keeps its schedule)."""
        while self._fleet.client.is_connected and (remaining := deadline - time.monotonic()) > 0:
            item = self.buffer.oldest()
            if item is None:
                return
            seq, data = item
            try:
                self._fleet.publish(self.topic, data,
                                    timeout=min(PUBLISH_TIMEOUT_S, remaining) if final else PUBLISH_TIMEOUT_S)
            except (NotConnected, MqttTimeout) as e:
                self._hold(str(e))
                return
            except MqttError as e:  # the broker refused it: retrying would block every later message
                log.error("event=telemetry_refused seq=%d error=%r", seq, str(e))
                self.buffer.remove(seq, dropped=True)
                continue
            self.buffer.remove(seq)
            self.sent += 1
            if self._held:
                self._held = False
                log.info("event=telemetry_delivering from_seq=%d buffered=%d", seq, self.buffer.depth())
        if not self._fleet.client.is_connected:
            self._hold(self._fleet.client.last_error or "not connected")

    def _hold(self, reason: str) -> None:
        if not self._held:
            self._held = True
            log.info("event=telemetry_held buffered=%d reason=%r", self.buffer.depth(), reason)
