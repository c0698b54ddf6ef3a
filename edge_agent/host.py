"""Several models on one agent (docs/design.md §10): each is a serving unit of its own, and the agent's
InferenceHost routes every call to the unit its model name names.

A unit is what one model is served with in the single-model form: its slot, its cascade, its cloud
link (its cloud model, circuit and contract check), its escalation rate limit, its spool and replayer,
its stats and, in a fleet, its updater. Units share the gRPC server, the admission gate and the fleet
link, and nothing else, so one model's traffic, cloud or update never touches another's. A model that
does not load is still a unit (its name and why): it is not ready, its calls are UNAVAILABLE naming
the reason, and the others serve on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from edge_agent.cloud.link import CloudLink
from edge_agent.cloud.ratelimit import TokenBucket
from edge_agent.cloud.replay import Replayer
from edge_agent.cloud.spool import Spool
from edge_agent.config import AgentConfig
from edge_agent.fleet.link import FleetLink, as_int_version
from edge_agent.fleet.readings import ModelReadings, circuit_state
from edge_agent.serving.cascade import Cascade
from edge_agent.serving.slot import ModelSlot
from edge_agent.serving.stats import CallRecord, Stats, confidence_bins
from edge_agent.update.report import one_line
from edge_agent.update.startup import Startup
from edge_agent.update.updater import Updater
from edgecloud import __version__
from edgecloud.errors import ModelNotFound, ModelUnavailable
from edgecloud.guards import InputContract
from edgecloud.mqtt.payloads import ServedModel
from edgecloud.protocol.codec import InferRequest, InferResponse, ModelMetadata
from edgecloud.protocol.servicer import PeerInfo

log = logging.getLogger(__name__)


class ModelStats(Stats):
    """A model's own stats, every figure also counted in the device's totals."""

    def __init__(self, totals: Stats) -> None:
        super().__init__()
        self.totals = totals

    def record(self, call: CallRecord, bins: Sequence[int] | None = None) -> None:
        bins = confidence_bins(call.confidences) if bins is None else bins
        self.add(call, bins)
        self.totals.add(call, bins)

    def error(self) -> None:
        super().error()
        self.totals.error()

    def audit(self) -> None:
        super().audit()
        self.totals.audit()

    def upstream(self, size: int) -> None:
        super().upstream(size)
        self.totals.upstream(size)


@dataclass
class ModelUnit:
    """One served model and everything that serves it; ``error`` (and no slot) when it did not load."""

    name: str
    config: AgentConfig
    stats: ModelStats
    slot: ModelSlot | None = None
    cascade: Cascade | None = None
    link: CloudLink | None = None
    spool: Spool | None = None
    replayer: Replayer | None = None
    startup: Startup | None = None
    updater: Updater | None = None
    error: str | None = None

    @classmethod
    def loaded(cls, config: AgentConfig, startup: Startup, totals: Stats) -> ModelUnit:
        """The unit of a model loaded at start (``load_startup``); :meth:`build` completes it."""
        return cls(startup.model.name, config, ModelStats(totals), ModelSlot(startup.model, config.cascade),
                   startup=startup)

    def build(self, on_circuit_change: Callable[[str, str, str], None],
              decoding: threading.Semaphore | None = None) -> None:
        """The cloud link, spool, rate limit, replayer and cascade that serve the loaded model;
        ``on_circuit_change(model, old, new)``: its cloud circuit changed; ``decoding``: the agent's
        bound on frame decoding, shared by its models."""
        config, cloud, slot = self.config, self.config.cloud, self.slot
        assert slot is not None, "build() needs a loaded model"
        bucket = None
        if cloud.target:
            self.link = CloudLink(cloud, on_circuit_change=partial(on_circuit_change, self.name))
            self.spool = Spool(Path(config.agent.state_dir) / "spool", config.spool.max_bytes,
                               config.spool.max_pending)
            bucket = TokenBucket(cloud.max_per_s, cloud.burst)
            self.replayer = Replayer(self.spool, self.link, slot, config.spool.replay_interval_s)
        self.cascade = Cascade(slot, config.agent.device_id, self.link, self.spool, bucket,
                               cloud.deadline_ms / 1000.0, stats=self.stats,
                               max_in_flight=cloud.max_in_flight, frames=config.frames, decoding=decoding)

    @classmethod
    def failed(cls, config: AgentConfig, totals: Stats, error: Exception) -> ModelUnit:
        name = config.model.name or str(config.model.path)
        reason = one_line(f"{type(error).__name__}: {error}")
        log.error("event=model_unloadable name=%s path=%s error=%r action=others_serve", name,
                  config.model.path, reason)
        return cls(name, config, ModelStats(totals), error=reason)

    @property
    def ready(self) -> bool:
        return self.cascade is not None and self.cascade.accepting

    def version(self) -> str | None:
        return self.slot.model.version if self.slot else None

    def served(self) -> ServedModel:
        """What the status topic says of this model."""
        return ServedModel(name=self.name, active_version=as_int_version(self.version()), ready=self.ready,
                           error=self.error)

    def readings(self) -> ModelReadings:
        return ModelReadings(name=self.name, snapshot=self.stats.snapshot, interval=self.stats.interval,
                             version=self.version, ready=lambda: self.ready, error=lambda: self.error,
                             circuit_state=lambda: circuit_state(self.link), spool=self.spool,
                             quality=self.cascade.quality if self.cascade else None)

    def follow(self, fleet: FleetLink, owns: Callable[[str | None], bool]) -> None:
        """Join the update path of the fleet (before the fleet link starts); a model that did not load
        takes no release."""
        if self.slot is not None and self.startup is not None:
            self.updater = Updater(self.config, self.slot, fleet, self.startup, owns=owns).start()

    def start(self) -> None:
        if self.link and self.slot:
            self.link.prepare(self.slot.model)
        if self.replayer:
            self.replayer.start()

    def stop(self) -> None:
        """Stop replaying and updating (once the server drained its calls)."""
        if self.replayer:
            self.replayer.stop()
        if self.updater:
            self.updater.stop()

    def release(self) -> None:
        """Close the cascade, then the spool (what its audits kept is written too), the link, the model."""
        if self.cascade:
            self.cascade.close()
        if self.spool:
            self.spool.close()
        if self.link:
            self.link.close()
        if self.slot:
            self.slot.model.backend.close()


class ModelHost:
    """The agent's InferenceHost: each call goes to the unit of the model it names.

    The server is ready while it accepts calls and one model at least serves; ModelReady says it of
    each model, false for one that did not load.
    """

    server_name = Cascade.server_name
    server_version = __version__

    def __init__(self, units: Sequence[ModelUnit]) -> None:
        self.units = tuple(units)
        self._by_name = {unit.name: unit for unit in self.units}
        self.accepting = True

    def unit(self, name: str) -> ModelUnit:
        unit = self._by_name.get(name)
        if unit is None:
            served = ", ".join(repr(u.name) for u in self.units)
            raise ModelNotFound(f"unknown model {name!r}; this agent serves {served}")
        return unit

    def _cascade(self, name: str) -> Cascade:
        unit = self.unit(name)
        if unit.cascade is None:
            raise ModelUnavailable(f"model {name!r} is not serving: {unit.error}")
        return unit.cascade

    def is_live(self) -> bool:
        return True

    def is_ready(self) -> bool:
        return self.accepting and any(unit.ready for unit in self.units)

    def model_ready(self, name: str, version: str) -> bool:
        unit = self._by_name.get(name)
        return bool(self.accepting and unit and unit.cascade and unit.cascade.model_ready(name, version))

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        return self._cascade(name).model_metadata(name, version)

    def input_contract(self, name: str, version: str) -> InputContract:
        return self._cascade(name).input_contract(name, version)

    def model_index(self) -> tuple[tuple[str, str], ...]:
        """The models serving now; one that did not load is absent (ModelReady says why not)."""
        return tuple(entry for unit in self.units if unit.cascade is not None
                     for entry in unit.cascade.model_index())

    def infer(self, request: InferRequest, peer: PeerInfo | None = None) -> InferResponse:
        return self._cascade(request.model_name).infer(request, peer)

    def served(self) -> tuple[ServedModel, ...]:
        return tuple(unit.served() for unit in self.units)

    def owner(self, unit: ModelUnit) -> Callable[[str | None], bool]:
        """Which desired messages ``unit``'s updater takes: those naming its model; the first unit's
        also those naming no model that serves here, to refuse them with a reason."""
        serving = {u.name for u in self.units if u.slot is not None}
        first = unit is next(u for u in self.units if u.slot is not None)
        return lambda model: model == unit.name or (first and model not in serving)
