"""The JSON bodies of the device topics (docs/design.md §8), built in one place so they match
``protos/schemas/{status,reported,events}.schema.json`` (the tests check them against the schemas).

Telemetry has its own schema (``telemetry.schema.json``) and is built by the agent's collector.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from edgecloud.clock import format_time, utc_now

UPDATE_STATES = ("downloading", "verifying", "staged", "active", "failed", "rolled_back")
SEVERITIES = ("info", "warning", "error")


def _at(at: datetime | None) -> str:
    return format_time(at or utc_now())


def status_payload(device: str, state: Literal["online", "offline"], *, agent_version: str,
                   model: str | None, active_version: int | None,
                   at: datetime | None = None) -> dict[str, Any]:
    """Body of ``…/devices/{device}/status``: the birth (online), the Will and the goodbye (offline)."""
    if state not in ("online", "offline"):
        raise ValueError(f"status state {state!r} is not online or offline")
    return {"device": device, "state": state, "at": _at(at), "agent_version": agent_version,
            "model": model, "active_version": active_version}


def reported_payload(device: str, model: str, version: int, state: str, *, active_version: int | None,
                     progress: float | None = None, reason: str | None = None,
                     at: datetime | None = None) -> dict[str, Any]:
    """Body of ``…/devices/{device}/model/reported``: where the update of release ``version`` is.

    ``reason`` is a reason code (see :class:`edgecloud.release.Reason`), optionally followed by
    ``": "`` and details; ``progress`` is the downloaded fraction, 0 to 1.
    """
    if state not in UPDATE_STATES:
        raise ValueError(f"update state {state!r} is not one of {UPDATE_STATES}")
    if state in ("failed", "rolled_back") and not reason:
        raise ValueError(f"update state {state} needs a reason")
    if progress is not None and not 0 <= progress <= 1:
        raise ValueError(f"progress {progress} is not within [0, 1]")
    return {"device": device, "model": model, "version": version, "state": state,
            "progress": progress, "reason": reason, "active_version": active_version, "at": _at(at)}


def event_payload(device: str, event_type: str, *, severity: str = "info",
                  data: Mapping[str, Any] | None = None, at: datetime | None = None) -> dict[str, Any]:
    """Body of ``…/devices/{device}/events``: ``event_type`` is dotted, e.g. ``circuit.changed``."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r} is not one of {SEVERITIES}")
    return {"device": device, "at": _at(at), "type": event_type, "severity": severity,
            "data": dict(data or {})}
