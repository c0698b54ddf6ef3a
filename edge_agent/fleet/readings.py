"""What telemetry and the agent's ``/metrics`` read of the running agent: live figures behind getters,
built by the app (``edge_agent/app.py``), so neither depends on how the agent is put together and
each says, by what it is given, what it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edge_agent.cloud.link import CloudLink
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
class AgentReadings:
    """The running agent's figures, read when a message is built or ``/metrics`` is scraped."""

    #: the cascade's stats over the agent's life (``Stats.snapshot``)
    snapshot: Callable[[], dict[str, Any]]
    #: its stats since the previous call (``Stats.interval``): telemetry's alone to take
    interval: Callable[[], dict[str, Any]]
    #: name and version of the model serving now
    served: Callable[[], tuple[str, str]]
    #: ``closed``, ``open``, ``half_open`` or ``disabled``
    circuit_state: Callable[[], str]
    #: calls in flight and queued at the local API, and those refused
    admission: Callable[[], AdmissionFigures]
    #: cases waiting for the cloud; None without a cloud
    spool: Backlog | None = None
    #: whether the fleet's broker is connected; None outside a fleet
    mqtt_connected: Callable[[], bool] | None = None
