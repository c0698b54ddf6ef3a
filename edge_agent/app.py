"""Assembles the agent from its config: model slot, cloud link, spool, cascade, gRPC server."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from edge_agent.cloud.link import CloudLink
from edge_agent.cloud.ratelimit import TokenBucket
from edge_agent.cloud.replay import Replayer
from edge_agent.cloud.spool import Spool
from edge_agent.config import AgentConfig
from edge_agent.fleet.link import FleetLink, as_int_version
from edge_agent.fleet.metrics import serve_metrics
from edge_agent.fleet.readings import AgentReadings, circuit_state
from edge_agent.fleet.telemetry import Telemetry
from edge_agent.serving.cascade import Cascade
from edge_agent.serving.slot import ModelSlot
from edge_agent.update.startup import load_startup
from edge_agent.update.updater import Updater
from edgecloud.endpoint import parse_endpoint
from edgecloud.exposition import MetricsServer
from edgecloud.heap import return_large_blocks
from edgecloud.protocol.admission import Admission
from edgecloud.protocol.server import RunningServer, start_server

log = logging.getLogger(__name__)


class EdgeAgent:
    """One running agent. ``start()`` returns once the model is loaded, warmed up and served."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.slot: ModelSlot | None = None
        self.cascade: Cascade | None = None
        self.link: CloudLink | None = None
        self.spool: Spool | None = None
        self.replayer: Replayer | None = None
        self.server: RunningServer | None = None
        self.fleet: FleetLink | None = None
        self.updater: Updater | None = None
        self.telemetry: Telemetry | None = None
        self.metrics: MetricsServer | None = None
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self.server.port if self.server else 0

    def start(self) -> EdgeAgent:
        """Load, listen and join the fleet; on any failure, what already started is stopped again."""
        try:
            self._start()
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        listen = parse_endpoint(cfg.agent.listen)
        return_large_blocks()  # memory comes back after a large batch (edgecloud/heap.py)
        startup = load_startup(cfg)  # the last good model of the update state, else the configured one
        self.slot = ModelSlot(startup.model, cfg.cascade)
        bucket = None
        if cfg.cloud.target:
            self.link = CloudLink(cfg.cloud, on_circuit_change=self._circuit_changed)
            self.spool = Spool(Path(cfg.agent.state_dir) / "spool", cfg.spool.max_bytes,
                               cfg.spool.max_pending)
            bucket = TokenBucket(cfg.cloud.max_per_s, cfg.cloud.burst)
            self.replayer = Replayer(self.spool, self.link, self.slot, cfg.spool.replay_interval_s)
        self.cascade = Cascade(self.slot, cfg.agent.device_id, self.link, self.spool, bucket,
                               cfg.cloud.deadline_ms / 1000.0, cfg.cascade.audit_rate,
                               max_in_flight=cfg.cloud.max_in_flight)
        # each call [admission] lets in has a thread of its own, and escalations hold fewer admission
        # slots (cloud.max_in_flight) than there are: edge answers always find one
        self.server = start_server(self.cascade, listen, admission=Admission("agent", cfg.admission),
                                   max_message_bytes=cfg.agent.max_message_bytes, workers=cfg.agent.workers)
        if self.replayer:
            self.replayer.start()
        if cfg.fleet.name:
            self.fleet = FleetLink(cfg.mqtt, cfg.fleet.name, cfg.agent.device_id, self._model_info,
                                   cfg.fleet.group)
            self.updater = Updater(cfg, self.slot, self.fleet, startup).start()  # subscribes before connect
            self.fleet.start()
        readings = self._readings()
        if self.fleet is not None:
            self.telemetry = Telemetry(readings, self.fleet, cfg.telemetry, cfg.agent.state_dir).start()
        self.metrics = serve_metrics(cfg.metrics.listen, readings, self.telemetry)
        model = self.slot.model
        log.info("event=agent_ready device=%s model=%s version=%s listen=%s cloud=%s", cfg.agent.device_id,
                 model.name, model.version, listen, cfg.cloud.target or "none")

    def _readings(self) -> AgentReadings:
        """What telemetry and ``/metrics`` read of this agent, live."""
        stats, fleet = self.cascade.stats, self.fleet
        return AgentReadings(snapshot=stats.snapshot, interval=stats.interval, served=self._served,
                             circuit_state=lambda: circuit_state(self.link),
                             admission=self.server.admission.figures, spool=self.spool,
                             mqtt_connected=(lambda: fleet.client.is_connected) if fleet else None)

    def _served(self) -> tuple[str, str]:
        model = self.slot.model
        return model.name, model.version

    def _model_info(self) -> tuple[str | None, int | None]:
        model = self.slot.model if self.slot else None
        return (model.name, as_int_version(model.version)) if model else (None, None)

    def _circuit_changed(self, old: str, new: str) -> None:
        if self.telemetry:
            self.telemetry.circuit_changed(old, new)

    def reload_cascade(self, config: AgentConfig) -> None:
        """Apply new cascade settings (thresholds, temperature…) without dropping a call."""
        self.slot.reconfigure(config.cascade)
        self.config = config

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls, let in-flight ones finish, release everything; safe to call twice."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.cascade:
            self.cascade.accepting = False
        if self.server:
            self.server.stop(grace)
        if self.replayer:
            self.replayer.stop()
        if self.updater:
            self.updater.stop()
        if self.telemetry:  # after the drain, so the last message counts every call
            self.telemetry.stop()
        if self.fleet is not None:
            self.fleet.stop()
        if self.metrics:
            self.metrics.stop()
        self._release()
        log.info("event=agent_stopped device=%s", self.config.agent.device_id)

    def _release(self) -> None:
        """Close the cascade, then the spool (what its audits kept is written too), the link, the model."""
        if self.cascade:
            self.cascade.close()
        if self.spool:
            self.spool.close()
        if self.link:
            self.link.close()
        if self.slot:
            self.slot.model.backend.close()

    def __enter__(self) -> EdgeAgent:
        return self if self.server else self.start()  # ``with start_agent(…)`` must not start twice

    def __exit__(self, *exc) -> None:
        self.stop()
