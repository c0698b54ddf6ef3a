"""Assembles the agent from its config: one serving unit per model (slot, cascade, cloud link, spool,
rate limit, stats, updater; ``edge_agent/host.py``), the gRPC server that routes to them, the fleet link,
telemetry and ``/metrics``."""

from __future__ import annotations

import logging
import threading

from edge_agent.config import AgentConfig
from edge_agent.fleet.link import FleetLink
from edge_agent.fleet.metrics import serve_metrics
from edge_agent.fleet.readings import AgentReadings
from edge_agent.fleet.telemetry import Telemetry
from edge_agent.host import ModelHost, ModelUnit
from edge_agent.serving.stats import Stats
from edge_agent.update.startup import load_startup
from edgecloud.endpoint import parse_endpoint
from edgecloud.errors import ModelLoadError
from edgecloud.heap import return_large_blocks
from edgecloud.metrics.exposition import MetricsServer
from edgecloud.protocol.admission import Admission
from edgecloud.protocol.health_port import HealthPort, start_health_port
from edgecloud.protocol.server import RestOptions, RunningServer, start_server

log = logging.getLogger(__name__)

#: how long the announcement of models that did not load waits for the broker
ANNOUNCE_WAIT_S = 10.0


class EdgeAgent:
    """One running agent. ``start()`` returns once its models are loaded, warmed up and served."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.totals = Stats()  # every model's calls
        self.units: list[ModelUnit] = []
        self.host: ModelHost | None = None
        self.server: RunningServer | None = None
        self.fleet: FleetLink | None = None
        self.telemetry: Telemetry | None = None
        self.metrics: MetricsServer | None = None
        self.health_port: HealthPort | None = None
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self.server.port if self.server else 0

    @property
    def primary(self) -> ModelUnit:
        """The first model that serves (the only one in the single-model form)."""
        return next(unit for unit in self.units if unit.slot is not None)

    def unit(self, name: str) -> ModelUnit:
        """The unit serving (or failing to serve) model ``name``."""
        return next(unit for unit in self.units if unit.name == name)

    @property
    def rest_port(self) -> int:
        return self.server.rest_port if self.server else 0

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
        self._open_units()
        self.host = ModelHost(self.units)
        # each call [admission] lets in has a thread of its own, and so does each escalation waiting on
        # the cloud, which gave its admission slot back: edge answers always find a slot and a thread
        rest = RestOptions(parse_endpoint(cfg.rest.listen)) if cfg.rest.listen else None
        escalating = sum(unit.config.cloud.max_in_flight for unit in self.units
                         if unit.slot is not None and unit.config.cloud.target)
        self.server = start_server(self.host, listen, admission=Admission("agent", cfg.admission),
                                   max_message_bytes=cfg.agent.max_message_bytes, workers=cfg.agent.workers,
                                   waiting=escalating, rest=rest)
        if cfg.health.listen:  # probes that never queue behind inference, even in a flood
            self.health_port = start_health_port(self.server.health, parse_endpoint(cfg.health.listen))
        for unit in self.units:
            unit.start()
        if cfg.fleet.name:
            self.fleet = FleetLink(cfg.mqtt, cfg.fleet.name, cfg.agent.device_id, self.host.served,
                                   cfg.fleet.group)
            for unit in self.units:  # each subscribes before the link connects
                unit.follow(self.fleet, self.host.owner(unit))
            self.fleet.start()
            self._announce_unloaded()
        readings = self._readings()
        if self.fleet is not None:
            self.telemetry = Telemetry(readings, self.fleet, cfg.telemetry, cfg.agent.state_dir).start()
        self.metrics = serve_metrics(cfg.metrics.listen, readings, self.telemetry)
        for unit in self.units:
            log.info("event=agent_ready device=%s model=%s version=%s listen=%s cloud=%s",
                     cfg.agent.device_id, unit.name, unit.version() or "none", listen,
                     unit.config.cloud.target or "none")

    def _open_units(self) -> None:
        """One unit per model. With several, one that does not load is reported and the others serve;
        the single model, or every one of several, not loading fails the start."""
        several = bool(self.config.models)
        decoding = threading.BoundedSemaphore(self.config.frames.max_decoding)  # the agent's, every model's
        for view in self.config.served():
            try:
                startup = load_startup(view)  # its update state's last good model, else the configured
            except Exception as e:  # ModelLoadError, or a runtime's own error during warm-up
                if not several:
                    raise
                self.units.append(ModelUnit.failed(view, self.totals, e))
                continue
            unit = ModelUnit.loaded(view, startup, self.totals)
            self.units.append(unit)  # released by stop() from here on, should the rest fail
            unit.build(self._circuit_changed, decoding)
        if not any(unit.slot for unit in self.units):
            raise ModelLoadError("no model loaded: " + "; ".join(f"{u.name}: {u.error}" for u in self.units))

    def _announce_unloaded(self) -> None:
        """A ``model.unloadable`` event for each model that did not load (the status says it too), sent
        once the broker is connected, off the start path."""
        failed = [unit for unit in self.units if unit.error]
        fleet = self.fleet
        if not failed or fleet is None:
            return

        def announce() -> None:
            try:
                fleet.client.wait_connected(ANNOUNCE_WAIT_S)
            except Exception as e:  # events are best effort
                log.warning("event=model_unloadable_not_announced error=%r", str(e))
                return
            for unit in failed:
                fleet.event("model.unloadable", "error", model=unit.name, reason=unit.error)

        threading.Thread(target=announce, name="announce-unloaded", daemon=True).start()

    def _readings(self) -> AgentReadings:
        """What telemetry and ``/metrics`` read of this agent, live."""
        fleet = self.fleet
        return AgentReadings(models=tuple(unit.readings() for unit in self.units),
                             snapshot=self.totals.snapshot, interval=self.totals.interval,
                             admission=self.server.admission.figures,
                             mqtt_connected=(lambda: fleet.client.is_connected) if fleet else None)

    def _circuit_changed(self, model: str, old: str, new: str) -> None:
        if self.telemetry:
            self.telemetry.circuit_changed(model, old, new)

    def reload_cascade(self, config: AgentConfig) -> None:
        """Apply new cascade settings (thresholds, temperature…) to every model without dropping a call."""
        views = {view.model.name: view for view in config.served()}
        for unit in self.units:
            view = views.get(unit.name) if config.models else config
            if unit.slot is not None and view is not None:
                unit.slot.reconfigure(view.cascade)
        self.config = config

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls, let in-flight ones finish, release everything; safe to call twice."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.host:
            self.host.accepting = False
        for unit in self.units:
            if unit.cascade:
                unit.cascade.accepting = False
        if self.server:
            self.server.stop(grace)  # health says NOT_SERVING on both ports from here
        if self.health_port is not None:
            self.health_port.stop()
        for unit in self.units:
            unit.stop()
        if self.telemetry:  # after the drain, so the last message counts every call
            self.telemetry.stop()
        if self.fleet is not None:
            self.fleet.stop()
        if self.metrics:
            self.metrics.stop()
        for unit in self.units:
            unit.release()
        log.info("event=agent_stopped device=%s", self.config.agent.device_id)

    def __enter__(self) -> EdgeAgent:
        return self if self.server else self.start()  # ``with start_agent(…)`` must not start twice

    def __exit__(self, *exc) -> None:
        self.stop()
