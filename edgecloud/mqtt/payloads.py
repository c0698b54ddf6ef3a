"""The JSON bodies of the device topics as typed models (docs/design.md §8): the agent builds these and
nothing else, and ``protos/schemas/{status,reported,events,telemetry}.schema.json`` are generated from them
(``python -m edgecloud.mqtt.schemas``), so the schemas say what is really sent.

A field marked ``Omitted`` is left out of the body when None; every other field is always there (null
when it has no value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, model_validator

from edgecloud.mqtt.topics import ID_PATTERN
from edgecloud.release import Omitted, Time, format_time, utc_now

UpdateState = Literal["downloading", "verifying", "staged", "active", "failed", "rolled_back"]
UPDATE_STATES = get_args(UpdateState)
Severity = Literal["info", "warning", "error"]
SEVERITIES = get_args(Severity)
CircuitState = Literal["closed", "open", "half_open", "disabled"]

DeviceId = Annotated[str, Field(pattern=ID_PATTERN.pattern)]
#: a moment, published as format_time writes it
At = Annotated[Time, PlainSerializer(format_time, return_type=str)]
Count = Annotated[int, Field(ge=0)]
Version = Annotated[int, Field(ge=0)]


class Body(BaseModel):
    """A device topic's JSON body, immutable once built."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as published."""
        return self.model_dump(mode="json", by_alias=True)


class ServedModel(Body):
    """One model a device serves, on its status (docs/design.md §10: several models per device)."""

    name: str = Field(min_length=1, description="the name it is served under")
    active_version: Version | None = Field(description="release version serving now; null when not serving")
    ready: bool = Field(description="false for a model that did not load: the others serve on")
    error: str | None = Field(None, description="why it does not serve")


class Status(Body):
    """Retained on edgecloud/{fleet}/devices/{device}/status: online as the birth message on every
    connect; offline as the Last Will and on clean shutdown."""

    model_config = ConfigDict(title="edgecloud device status")

    device: DeviceId
    state: Literal["online", "offline"]
    at: At = Field(default_factory=utc_now)
    agent_version: str
    model: str | None = Field(description="served model name")
    active_version: Version | None = Field(description="release version serving now")
    models: Annotated[tuple[ServedModel, ...] | None, Omitted] = Field(
        None, description="every served model (model and active_version above name the first that serves)")
    group: Annotated[str | None, Field(pattern=ID_PATTERN.pattern,
                                       description="the group whose desired release it follows"),
                     Omitted] = None


class Reported(Body):
    """Retained on edgecloud/{fleet}/devices/{device}/model/reported. version is the release being
    handled, active_version the one serving. States: downloading (progress) -> verifying -> staged ->
    active, or failed (reason) / rolled_back (reason)."""

    model_config = ConfigDict(title="edgecloud update state", json_schema_extra={"allOf": [
        {"if": {"properties": {"state": {"enum": ["failed", "rolled_back"]}}},
         "then": {"properties": {"reason": {"type": "string"}}}},
        {"if": {"properties": {"state": {"const": "downloading"}}},
         "then": {"properties": {"progress": {"type": "number"}}}}]})

    device: DeviceId
    model: str = Field(min_length=1)
    version: Version | None = Field(description="the release being handled; null, with state failed, for a "
                                                "desired message that names none (e.g. not JSON: malformed)")
    state: UpdateState
    progress: float | None = Field(None, ge=0, le=1, description="fraction of the download done, 0 to 1")
    reason: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*(: .*)?$",
                               description="reason code (e.g. bad_signature, expired, sha256_mismatch), "
                                           "optionally followed by ': ' and details")
    active_version: Version | None
    at: At = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _failure_has_reason(self) -> Reported:
        if self.state in ("failed", "rolled_back") and not self.reason:
            raise ValueError(f"update state {self.state} needs a reason")
        return self


class Event(Body):
    """Published (not retained) on edgecloud/{fleet}/devices/{device}/events: update steps, health
    changes (circuit breaker, contract mismatch, watchdog)."""

    model_config = ConfigDict(title="edgecloud device event")

    device: DeviceId
    at: At = Field(default_factory=utc_now)
    type: str = Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$",
                      description="dotted event name, e.g. update.state, update.rolled_back, circuit.changed")
    severity: Severity = "info"
    data: dict[str, Any] = Field(default_factory=dict, description="event details")


# -- telemetry --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """The Prometheus counter a telemetry counter is also exposed as (see edgecloud.metrics.names)."""

    name: str


class Counters(Body):
    """Totals since the agent started."""

    requests: Annotated[Count, Metric("requests_total")] = Field(description="Inference calls answered")
    rows: Annotated[Count, Metric("rows_total")] = Field(description="Rows answered")
    escalated: Annotated[Count, Metric("escalated_rows_total")] = Field(description="Rows sent to the cloud")
    cloud_answers: Annotated[Count, Metric("cloud_answers_total")] = Field(
        description="Rows answered by the cloud")
    degraded: Annotated[Count, Metric("degraded_rows_total")] = Field(
        description="Rows that wanted the cloud and got the edge's answer")
    rate_limited: Annotated[Count, Metric("rate_limited_rows_total")] = Field(
        description="Rows over the escalation rate limit, answered by the edge")
    in_flight_limited: Annotated[Count, Metric("in_flight_limited_rows_total")] = Field(
        description="Rows that wanted the cloud while cloud.max_in_flight escalations were waiting; "
                    "answered by the edge at once (degraded) and spooled")
    errors: Annotated[Count, Metric("errors_total")] = Field(description="Calls the edge model failed")
    audited: Annotated[Count, Metric("audits_total")] = Field(description="Audit calls the cloud answered")
    reused: Annotated[Count, Metric("reused_rows_total")] = Field(
        0, description="Unsure rows of a still stream answered with its last cloud answer, not re-sent")
    upstream_bytes: Annotated[Count, Metric("upstream_bytes_total")] = Field(
        0, description="Input bytes sent to the cloud in escalations (encoded frames as sent)")


class Percentiles(Body):
    """Milliseconds; null when there were no samples."""

    model_config = ConfigDict(extra="forbid")

    p50: float | None = Field(ge=0)
    p95: float | None = Field(ge=0)
    p99: float | None = Field(ge=0)


class Latency(Body):
    """Call latency percentiles over the interval, of calls answered at the edge and of escalated ones."""

    edge: Percentiles
    escalated: Percentiles


class PathBuckets(Body):
    """One path's latency buckets: cumulative counts, one per bound of ``le`` and the last for +Inf
    (every call), and the sum of the latencies in seconds."""

    counts: list[Count] = Field(min_length=2)
    sum_s: float = Field(ge=0)


class LatencyBuckets(Body):
    """Call latency as a Prometheus histogram since the agent started (totals like the counters), so a
    collector can sum devices; ``le`` are the buckets' upper bounds in seconds."""

    le: list[float] = Field(min_length=1)
    edge: PathBuckets
    escalated: PathBuckets

    @model_validator(mode="after")
    def _one_count_per_bucket(self) -> LatencyBuckets:
        for path in (self.edge, self.escalated):
            if len(path.counts) != len(self.le) + 1:
                raise ValueError(f"{len(path.counts)} counts for {len(self.le)} bounds and +Inf")
        return self


class Histogram(Body):
    """counts[i] rows had edges[i] <= confidence < edges[i+1] (the last bin includes its upper edge);
    len(edges) = len(counts) + 1."""

    edges: list[float] = Field(min_length=2)
    counts: list[Count] = Field(min_length=1)


class System(Body):
    """The device's own figures; null when unknown."""

    cpu_percent: float | None = Field(ge=0)
    memory_used_bytes: int | None = Field(ge=0)
    memory_total_bytes: int | None = Field(ge=0)
    temperatures_c: dict[str, float] = Field(description="thermal zone name to degrees Celsius")
    gpu_load_percent: float | None = Field(ge=0, le=100,
                                           description="Jetson GPU load (jtop or sysfs); null elsewhere")
    power_mw: Annotated[dict[str, float] | None, Omitted] = Field(
        None, description="Jetson power rails in milliwatts; absent elsewhere")


class AgreementCounts(Body):
    """Rows a model version answered, the rows the cloud answered in time, and how many of them the cloud
    answered as the edge did (docs/design.md §12)."""

    rows: Count = Field(description="rows the version answered")
    escalated: Count = Field(description="escalated rows (unsure, forced or background) the cloud answered "
                                         "in time")
    audited: Count = Field(description="audited rows (a random share of confident ones) the cloud answered")
    audit_agree: Count = Field(description="audited rows the cloud answered as the edge did")
    escalated_agree: Count = Field(description="escalated rows the cloud answered as the edge did")

    @model_validator(mode="after")
    def _agree_within_compared(self) -> AgreementCounts:
        if self.audit_agree > self.audited or self.escalated_agree > self.escalated:
            raise ValueError("more rows agree than the cloud answered")
        return self

    def by_reason(self) -> tuple[tuple[str, int, int], ...]:
        """(reason, rows the cloud answered, rows it answered as the edge did) for ``escalated`` and
        ``audit``: the ``reason`` of the ``*agreement_rows_total`` series."""
        return ("escalated", self.escalated, self.escalated_agree), ("audit", self.audited, self.audit_agree)


class Quality(AgreementCounts):
    """How well a model's active version answers, live: counts over the interval (since the previous
    message, or since the version became active) and ``totals`` since it became active. Audit agreement
    estimates the edge's accuracy against the cloud on the rows it answers alone."""

    version: Version = Field(description="the version counted (the model's active one)")
    confidence_hist: list[Count] = Field(min_length=10, max_length=10,
                                         description="rows of the interval per tenth of confidence, [0, 1]")
    totals: AgreementCounts = Field(description="counts since the version became active")


class ModelTelemetry(Body):
    """One served model's figures, as the device-level ones of :class:`Telemetry` (which total every
    model's) but its own."""

    name: str = Field(min_length=1)
    model_version: Version | None
    ready: bool
    error: str | None = None
    counters: Counters
    latency_ms: Latency
    escalation_rate: float | None = Field(ge=0, le=1)
    confidence_histogram: Histogram
    spool_depth: Count
    circuit_state: CircuitState
    quality: Annotated[Quality | None, Omitted] = Field(
        None, description="agreement with the cloud of the active version (older agents send none: unknown)")


class Telemetry(Body):
    """Published (not retained, QoS 1) on edgecloud/{fleet}/devices/{device}/telemetry every interval_s.
    seq increases per device and survives restarts, so a collector can count and deduplicate. Counters
    are totals since the agent started, and so are the latency buckets; latency percentiles and the
    confidence histogram cover the last interval."""

    model_config = ConfigDict(title="edgecloud device telemetry")

    schema_version: Literal[1] = Field(1, alias="schema")
    device: DeviceId
    seq: int = Field(ge=0)
    at: At = Field(default_factory=utc_now)
    model: str | None
    model_version: Version | None
    counters: Counters
    latency_ms: Latency
    latency_buckets: LatencyBuckets
    escalation_rate: float | None = Field(ge=0, le=1, description="escalated rows / rows over the interval; "
                                                                  "null without rows")
    confidence_histogram: Histogram
    spool_depth: Count = Field(description="cases waiting in the spool for the cloud")
    circuit_state: CircuitState
    system: System
    models: Annotated[tuple[ModelTelemetry, ...] | None, Omitted] = Field(
        None, description="each served model's own figures; the fields above total them (model: the first "
                          "that serves, circuit_state: the worst)")
