"""Metric names: the prefix every edgecloud series carries (units in the name: ``_seconds``, ``_bytes``,
``_total``, docs/design.md §9) and the names of the cascade's counters, taken from the telemetry payload's
own fields so a device's figures carry the same names whether scraped from the agent or from the
gateway's fleet collector."""

from __future__ import annotations

from edgecloud.mqtt.payloads import Counters, Metric

PREFIX = "edgecloud_"

#: cascade counter (key of the agent's stats and of telemetry ``counters``) → (metric name, help)
COUNTERS = {key: (next(m.name for m in field.metadata if isinstance(m, Metric)), field.description or "")
            for key, field in Counters.model_fields.items()}
