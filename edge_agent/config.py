"""The agent's TOML configuration (``/etc/edge-agent/agent.toml``), one validated section per concern.

Precedence (docs/design.md §4): command-line flag > config file > release > model card > defaults.
``edge-agent`` lays its flags over the file before validation; release and card values fill the cascade
fields left unset (None) when a model is loaded, in ``edge_agent/serving/settings.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgecloud.artifacts import check_name
from edgecloud.backends.options import BackendOptions
from edgecloud.channel import ClientTLS
from edgecloud.config import AdmissionSection, HealthSection, MetricsSection, RestSection, Section
from edgecloud.endpoint import parse_endpoint
from edgecloud.mqtt.client import MqttConfig
from edgecloud.preprocess import DEFAULT_MAX_PIXELS
from edgecloud.release import DEFAULT_BUDGET_BYTES

DEFAULT_LISTEN = "127.0.0.1:8001"


def _endpoint(value: str) -> str:
    parse_endpoint(value)  # raises ValueError with the reason
    return value


def _client_target(value: str | None) -> str | None:
    if value is not None:
        parse_endpoint(value, client=True)
    return value


class AgentSection(Section):
    """``[agent]``: identity and the local API."""

    device_id: str = Field("edge-0", min_length=1, description="this device's id in the fleet")
    listen: str = Field(DEFAULT_LISTEN, description="HOST:PORT or unix:/path of the local API")
    state_dir: Path = Field(Path("/var/lib/edge-agent"), description="spool, slots, update state")
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0, description="largest accepted request")
    workers: int = Field(4, gt=0, description="gRPC threads for calls other than inference (health, "
                         "metadata, refusals); each call [admission] lets in, and each escalation "
                         "waiting on the cloud, has its own")

    _listen = field_validator("listen")(_endpoint)


class ModelSection(Section):
    """``[model]``: the edge model file and the name it is served under."""

    path: Path | None = Field(None, description=".onnx file (or .plan/.engine on Jetson)")
    name: str | None = Field(None, description="served name; default: the model card's, else the file stem")
    backend: str | None = Field(None, description="backend key; default: chosen by file suffix")
    warmup_rows: int = Field(1, ge=1, description="batch size of the warm-up run")
    budget_bytes: int = Field(DEFAULT_BUDGET_BYTES, gt=0, description="largest model file accepted")
    max_batch_rows: int | None = Field(None, ge=1, description="rows one request may carry; default: sized "
                                       "to the model (its fixed batch size, else 4 MiB of input)")
    allow_nonfinite: bool | None = Field(None, description="accept NaN and ±Inf in floating-point inputs; "
                                         "default: as the model card says, else refused")
    preprocess: dict[str, Any] | None = Field(None, description="overrides of the model card's "
                                              "preprocess (docs/design.md §10), for the pre-processing")


class CascadeSection(Section):
    """``[cascade]``: when a row goes to the cloud. Unset values come from the release or model card."""

    policy: str | None = Field(None, description="max_prob | margin | entropy | box_mean | box_low_share | "
                               "package.module:function; default: max_prob, box_mean for a detection card")
    threshold: float | None = Field(None, ge=0, le=1, description="escalate when confidence < threshold")
    temperature: float | None = Field(None, gt=0)
    score_output: str | None = Field(None, description="output holding the class scores")
    scores: Literal["logits", "probabilities"] | None = None
    audit_rate: float = Field(0.02, ge=0, le=1, description="share of confident rows also sent, in "
                              "background, inside the escalation rate limit: the live estimate of the edge's "
                              "accuracy (docs/design.md §12)")
    box_floor: float | None = Field(None, ge=0, le=1, description="box_low_share: boxes scoring below it are "
                                    "not counted at all; default 0.1")
    empty_audit_rate: float = Field(0.05, ge=0, le=1, description="detection: share of frames with no box "
                                    "scoring >= the card's score_threshold also sent, in background")
    escalate: Literal["auto", "always", "never", "background"] = Field(
        "auto", description="the model's default for requests that do not set edgecloud.escalate; "
        "background: the edge answers at once, unsure rows go to the cloud without waiting")


class FramesSection(Section):
    """``[frames]``: encoded frames (docs/design.md §10): how much one may decode to, how many decode at
    once, and when a still camera's frame reuses the cloud answer of its last escalated one."""

    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="largest frame (width x height) decoded; "
                            "a larger header is refused before decoding")
    max_decoding: int = Field(2, gt=0, description="requests decoding frames at once; others wait")
    reuse_window_s: float = Field(10.0, ge=0, description="how long a stream's last cloud answer may be "
                                  "reused for a nearly identical frame; 0 = never")
    reuse_max_mad: float = Field(2.0, ge=0, description="mean absolute difference (0-255) of 16x16 "
                                 "grayscale thumbnails under which two frames count as the same scene")


class ServedModelSection(ModelSection):
    """``[models.<name>]``: one of several models, served under ``<name>`` (docs/design.md §10). Its keys
    are ``[model]``'s, plus where its escalations go and how many; ``[models.<name>.cascade]`` overrides
    the keys it sets of ``[cascade]``, which holds for every model."""

    path: Path = Field(description=".onnx file (or .plan/.engine on Jetson)")
    cloud_model: str | None = Field(None, description="model name at the cloud; default: this model's name")
    max_per_s: float | None = Field(None, gt=0, description="this model's escalation rate limit (rows per "
                                    "second); default: ``cloud.max_per_s``")
    burst: float | None = Field(None, gt=0, description="its token bucket size; default: its max_per_s")
    cascade: CascadeSection = Field(default_factory=CascadeSection, description="overrides of [cascade]")


class CloudSection(Section):
    """``[cloud]``: the KServe v2 server escalations go to (edgecloud's gateway, Triton, …)."""

    target: str | None = Field(None, description="HOST:PORT, or dns:///HOST:PORT to spread calls over every "
                               "address of the name (a headless Service's pods); unset = never escalate")
    model: str | None = Field(None, description="cloud model name; default: the edge model's name")
    model_version: str = ""
    deadline_ms: int = Field(300, gt=0, description="per-call deadline for an escalation")
    max_in_flight: int = Field(8, gt=0, description="escalations waiting on the cloud at once, each on a "
                               "thread of its own and outside admission, so edge answers always find a "
                               "slot; a call beyond them is answered by the edge at once (degraded) and "
                               "spooled")
    max_per_s: float = Field(50.0, gt=0, description="escalation rate limit (rows per second)")
    burst: float | None = Field(None, gt=0, description="token bucket size; default: max_per_s")
    failure_threshold: int = Field(3, ge=1, description="consecutive failures that open the circuit")
    reset_s: float = Field(5.0, gt=0, description="how long the circuit stays open before a trial")
    token_file: Path | None = Field(None, description="bearer token sent as authorization metadata")
    tls: ClientTLS | None = Field(None, description="TLS to the cloud; cert/key = device identity")

    _target = field_validator("target")(_client_target)


class SpoolSection(Section):
    """``[spool]``: cases the cloud did not get in time, kept on disk and replayed later."""

    max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    replay_interval_s: float = Field(2.0, gt=0)
    max_pending: int = Field(64, gt=0, description="cases waiting in memory for the spool's writer; more "
                             "are dropped (counted), so a slow disk never holds a call")


class FleetSection(Section):
    """``[fleet]``: membership of a fleet over MQTT; without ``name`` the agent runs stand-alone."""

    name: str | None = Field(None, description="fleet id in the MQTT topics; unset = no MQTT")
    group: str = Field("default", description="the group whose desired release this device follows")
    trusted_keys: tuple[Path, ...] = Field((), description="Ed25519 public keys (PEM) that sign releases")
    revoked_keys: tuple[str, ...] = Field((), description="key ids (16 hex) no longer trusted")
    clock_skew_s: float = Field(300.0, ge=0, description="tolerance when checking release times")
    allowed_file_roots: tuple[Path, ...] = Field((), description="directories file:// release URIs may name")


class UpdateSection(Section):
    """``[update]``: how a new release is tried before it is trusted."""

    watch_s: float = Field(60.0, ge=0, description="how long a swapped-in model is watched")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="errors per call that trigger rollback")
    max_latency_factor: float = Field(3.0, gt=1, description="p50 latency vs the previous model that "
                                      "triggers rollback")
    self_test_rows: int = Field(4, ge=1, description="rows of the self-test run before a swap")


class TelemetrySection(Section):
    """``[telemetry]``: what the agent reports over MQTT and how much it keeps while the broker is away."""

    interval_s: float = Field(10.0, gt=0, description="seconds between telemetry messages")
    buffer_max_bytes: int = Field(16 * 1024 * 1024, gt=0, description="disk buffer bound; oldest dropped")


class AgentMetricsSection(MetricsSection):
    """``[metrics]``: on by default, on loopback, for a local Prometheus or node agent."""

    listen: str | None = Field("127.0.0.1:9108", description="HOST:PORT (loopback); empty = off")


class AgentConfig(Section):
    """The whole agent configuration."""

    agent: AgentSection = Field(default_factory=AgentSection)
    admission: AdmissionSection = Field(default_factory=AdmissionSection)
    model: ModelSection = Field(default_factory=ModelSection)
    backend: BackendOptions
    cascade: CascadeSection = Field(default_factory=CascadeSection)
    cloud: CloudSection = Field(default_factory=CloudSection)
    frames: FramesSection = Field(default_factory=FramesSection)
    spool: SpoolSection = Field(default_factory=SpoolSection)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    fleet: FleetSection = Field(default_factory=FleetSection)
    update: UpdateSection = Field(default_factory=UpdateSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    metrics: AgentMetricsSection = Field(default_factory=AgentMetricsSection)
    rest: RestSection = Field(default_factory=RestSection)
    health: HealthSection = Field(default_factory=HealthSection)
    models: dict[str, ServedModelSection] = Field(default_factory=dict, description="several models, "
                                                  "``[models.<name>]`` tables; instead of [model]")

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ServedModelSection]) -> dict[str, ServedModelSection]:
        for name, entry in models.items():
            check_name(name)  # ValueError names the bad one
            if entry.name not in (None, name):
                raise ValueError(f"[models.{name}] name {entry.name!r}: a model is served under its table's "
                                 "name; leave name out")
        return models

    @model_validator(mode="after")
    def _one_form(self) -> AgentConfig:
        if self.models and self.model.model_fields_set:
            keys = ", ".join(f"model.{key}" for key in sorted(self.model.model_fields_set))
            raise ValueError(f"{keys} and [models.<name>] tables both given: list every model as a "
                             "[models.<name>] table, or serve one with [model]")
        return self

    def served(self) -> tuple[AgentConfig, ...]:
        """One config per served model, each as the single-model form would say it: its ``[model]``,
        ``[cascade]`` (the model's overrides over the shared one), ``[cloud]`` (its cloud model and
        rate limit) and, with several models, a state dir of its own (``<state_dir>/served/<name>``:
        its spool, update state and slot files). The single-model form is itself."""
        if not self.models:
            return (self,)
        return tuple(self._model_view(name, entry) for name, entry in self.models.items())

    def _model_view(self, name: str, entry: ServedModelSection) -> AgentConfig:
        shared = set(ModelSection.model_fields)
        model = ModelSection(**{**entry.model_dump(include=shared), "name": name})
        overrides = entry.cascade.model_dump(exclude_unset=True)
        cascade = CascadeSection(**{**self.cascade.model_dump(), **overrides})
        own_limit = entry.max_per_s is not None or entry.burst is not None
        cloud = self.cloud.model_copy(update={
            "model": entry.cloud_model, "max_per_s": entry.max_per_s or self.cloud.max_per_s,
            "burst": entry.burst if own_limit else self.cloud.burst})
        agent = self.agent.model_copy(update={"state_dir": self.agent.state_dir / "served" / name})
        return self.model_copy(update={"agent": agent, "model": model, "cascade": cascade, "cloud": cloud,
                                       "models": {}})
