"""What telemetry and the agent's ``/metrics`` read of the running agent: live figures behind getters,
built by the app (``edge_agent/app.py``), so neither depends on how the agent is put together and
each says, by what it is given, what it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent.cloud.circuit import CLOSED, HALF_OPEN, OPEN

if TYPE_CHECKING:
    from edge_agent.cloud.link import CloudLink
    from edge_agent.serving.quality import Quality
    from edgecloud.protocol.admission import AdmissionFigures

#: circuit state reported when there is no usable cloud (none configured, or its contract differs)
DISABLED = "disabled"


def circuit_state(link: CloudLink | None) -> str:
    """The breaker's state, or ``disabled`` without a cloud or when the cloud's contract differs."""
    if link is None:
        return DISABLED
    state = link.state
    return DISABLED if state.compatible is False else state.circuit


class Backlog(Protocol):
    """A bounded disk queue's figures (the spool of cases for the cloud)."""

    @property
    def dropped(self) -> int: ...

    def depth(self) -> int: ...


@dataclass(frozen=True)
class ModelReadings:
    """One served model's figures (docs/design.md §10: each model has its own)."""

    #: the name it is served under
    name: str
    #: its cascade's stats over the agent's life (``Stats.snapshot``)
    snapshot: Callable[[], dict[str, Any]]
    #: its stats since the previous call (``Stats.interval``): telemetry's alone to take
    interval: Callable[[], dict[str, Any]]
    #: the version serving now; None while the model does not serve
    version: Callable[[], str | None]
    #: whether it serves; a model that did not load does not
    ready: Callable[[], bool]
    #: why it does not serve, else None
    error: Callable[[], str | None]
    #: ``closed``, ``open``, ``half_open`` or ``disabled``
    circuit_state: Callable[[], str]
    #: its cases waiting for the cloud; None without a cloud
    spool: Backlog | None = None
    #: its agreement with the cloud per version (docs/design.md §12); None while it does not serve
    quality: Quality | None = None


@dataclass(frozen=True)
class AgentReadings:
    """The running agent's figures, read when a message is built or ``/metrics`` is scraped."""

    #: every served model, in configuration order (one in the single-model form)
    models: tuple[ModelReadings, ...]
    #: the device's totals over all models (``Stats.snapshot``)
    snapshot: Callable[[], dict[str, Any]]
    #: the device's totals since the previous call (``Stats.interval``): telemetry's alone to take
    interval: Callable[[], dict[str, Any]]
    #: calls in flight and queued at the local API, and those refused
    admission: Callable[[], AdmissionFigures]
    #: whether the fleet's broker is connected; None outside a fleet
    mqtt_connected: Callable[[], bool] | None = None

    @property
    def primary(self) -> ModelReadings:
        """The model the device-level fields name: the first that serves, else the first."""
        return next((m for m in self.models if m.ready()), self.models[0])

    def spool_depth(self) -> int:
        return sum(m.spool.depth() for m in self.models if m.spool is not None)

    def circuit_state(self) -> str:
        """The device's worst circuit: open, half_open, closed, then disabled (no usable cloud)."""
        states = {m.circuit_state() for m in self.models}
        return next((s for s in (OPEN, HALF_OPEN, CLOSED) if s in states), DISABLED)
