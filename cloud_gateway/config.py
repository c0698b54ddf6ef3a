"""The gateway's TOML configuration (``gateway.toml``) and a repository model's ``config.toml``.

Validation does no I/O: files named here (repository, store, certificates, tokens) are checked by the
code that opens them, which raises ConfigError naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from edgecloud.backends.options import BackendOptions, required_keys, section_name
from edgecloud.config import (
    AdmissionSection,
    HealthSection,
    MetricsSection,
    RestSection,
    Section,
    build,
    cert_key_pair,
    merge,
)
from edgecloud.endpoint import parse_endpoint
from edgecloud.mqtt.client import MqttConfig
from edgecloud.mqtt.topics import check_id
from edgecloud.preprocess import DEFAULT_MAX_PIXELS, Preprocess

#: loopback, so a gateway started without TLS is never reachable from the network by accident
DEFAULT_LISTEN = "127.0.0.1:9001"


class ModelConfig(Section):
    """A model's ``<repo>/<name>/config.toml``, over the gateway's ``[model_defaults]``."""

    platform: str | None = Field(None, description="backend key (onnxruntime, …); default: by file suffix")
    max_batch_size: int = Field(32, ge=0, description="rows per merged batch; 0 = each request runs alone")
    max_queue_delay_us: int = Field(1000, ge=0, description="how long a batch waits for more requests")
    max_queue_size: int = Field(256, gt=0, description="requests waiting per model before RESOURCE_EXHAUSTED")
    concurrent_runs: int = Field(2, ge=1, description="model runs (batches) in flight at once: the next "
                                 "batch runs while one is in flight; more for a remote backend")
    warmup_rows: int = Field(1, ge=1, description="batch size of the warm-up run at load")
    labels: tuple[str, ...] = Field((), description="class labels for the classification extension")
    preprocess: Preprocess | None = Field(None, description="how encoded frames become the model's input; "
                                          "default: the model card's preprocess (docs/design.md §10)")
    max_frame_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="largest frame (width x height) "
                                  "decoded; a larger header is refused before decoding")
    backend: BackendOptions

    @model_validator(mode="after")
    def _platform_has_its_section(self) -> ModelConfig:
        if self.platform and getattr(self.backend, self.platform, None) is None:
            needs = required_keys(self.platform)
            if needs:
                raise ValueError(f"platform {self.platform!r} needs [{section_name(self.platform)}] with "
                                 f"{' and '.join(needs)}")
        return self


class GatewaySection(Section):
    """``[gateway]``: the model repository and the gRPC endpoint."""

    model_repository: Path | None = Field(None, description="Triton layout: <name>/<version>/model.onnx")
    listen: str = Field(DEFAULT_LISTEN, description="HOST:PORT or unix:/path")
    max_message_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest accepted request")
    workers: int = Field(16, gt=0, description="threads for calls other than inference (health, metadata, "
                         "artifact transfers); inference calls wait for their batch without one")
    added_latency_ms: float = Field(0.0, ge=0, description="sleep before answering (emulates a WAN link)")
    allow_upload: bool | None = Field(None, description="accept release uploads (fleet publish); "
                                      "default: only on loopback or with client authentication")

    @field_validator("listen")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parse_endpoint(value)  # raises ValueError with the reason
        return value


class GatewayAdmissionSection(AdmissionSection):
    """``[admission]``: a waiting call costs the gateway no thread, only its request's memory, so the
    bounds are wide enough for 256 devices sending one row at a time, twice over."""

    max_in_flight: int = Field(256, gt=0, description="ModelInfer calls in flight at once")
    max_queue: int = Field(256, ge=0, description="calls waiting for a turn beyond those")


class StoreSection(Section):
    """``[store]``: the hard-example store; without a path, escalations are logged but not kept."""

    path: Path | None = Field(None, description="SQLite file")
    max_rows: int = Field(1_000_000, gt=0, description="oldest rows are pruned beyond this")
    retention_days: float = Field(90.0, gt=0, description="rows older than this are pruned")


class TLSSection(Section):
    """``[tls]``: server certificate and key; with ``client_ca``, clients need a certificate (mTLS)."""

    cert: Path | None = Field(None, description="server certificate chain (PEM)")
    key: Path | None = Field(None, description="server private key (PEM)")
    client_ca: Path | None = Field(None, description="CA of device certificates; their CN is the device id")

    _pair = model_validator(mode="after")(cert_key_pair)

    @model_validator(mode="after")
    def _mutual_needs_server_pair(self) -> TLSSection:
        if self.client_ca is not None and self.cert is None:
            raise ValueError("client_ca needs cert and key (mutual TLS is TLS first)")
        return self


class AuthSection(Section):
    """``[auth]``: bearer tokens (when set, every call but health checks needs a known token) and the
    identities that are operators (see ``auth.py``)."""

    tokens_file: Path | None = Field(None, description="lines of '<sha256 hex of token> <name> [<fleet>]'")
    operators: tuple[str, ...] = Field((), description="identities (certificate CN or a token's name) that "
                                       "may upload releases and download every fleet's")

    @field_validator("operators")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_id("operator", name) for name in value)


class CollectorSection(Section):
    """``[collector]``: per-device metrics from a fleet's status and telemetry topics."""

    fleet: str | None = Field(None, description="fleet id whose devices are watched; unset = off")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="the fleet's broker")

    @field_validator("fleet")
    @classmethod
    def _fleet(cls, value: str | None) -> str | None:
        return value if value is None else check_id("fleet", value)


class GatewayConfig(Section):
    """The whole gateway configuration."""

    gateway: GatewaySection = Field(default_factory=GatewaySection)
    admission: GatewayAdmissionSection = Field(default_factory=GatewayAdmissionSection)
    store: StoreSection = Field(default_factory=StoreSection)
    tls: TLSSection = Field(default_factory=TLSSection)
    health: HealthSection = Field(default_factory=HealthSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    model_defaults: ModelConfig = Field(default_factory=ModelConfig)
    collector: CollectorSection = Field(default_factory=CollectorSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    rest: RestSection = Field(default_factory=RestSection)

    @model_validator(mode="after")
    def _operators_are_authenticated(self) -> GatewayConfig:
        if self.auth.operators and self.tls.client_ca is None and self.auth.tokens_file is None:
            raise ValueError("auth.operators needs client authentication: tls.client_ca and/or "
                             "auth.tokens_file")
        return self

    @model_validator(mode="after")
    def _collector_is_scraped(self) -> GatewayConfig:
        if self.collector.fleet and not self.metrics.listen:
            raise ValueError("collector.fleet needs metrics.listen: its figures are only served on /metrics")
        return self


def gateway_config(model_repository: Path, *, listen: str = DEFAULT_LISTEN, store: Path | None = None,
                   **sections: Any) -> GatewayConfig:
    """A validated config for in-process use (demo, tests); ``sections`` deep-merge over the rest."""
    data: dict[str, Any] = {"gateway": {"model_repository": str(model_repository), "listen": listen},
                            "store": {"path": None if store is None else str(store)}}
    return build(GatewayConfig, merge(data, sections), "gateway config")
