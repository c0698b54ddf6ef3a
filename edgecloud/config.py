"""TOML configuration: strict, frozen sections and errors that name the offending key.

Each service defines its config as :class:`Section` models; validation does no I/O (paths are
resolved, files read and hashed later, by the code that uses them). The pieces both services share
live here: the ``[metrics]``, ``[rest]`` and ``[admission]`` sections and the check that a TLS
section's certificate and key pair up.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgecloud.endpoint import parse_endpoint
from edgecloud.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

S = TypeVar("S", bound="Section")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _CertKey(Protocol):
    @property
    def cert(self) -> Path | None: ...
    @property
    def key(self) -> Path | None: ...


T = TypeVar("T", bound=_CertKey)


def cert_key_pair(section: T) -> T:
    """A TLS section's ``cert`` and ``key`` come both or neither: a certificate is only usable with its
    private key. Meant as ``_pair = model_validator(mode="after")(cert_key_pair)``."""
    if (section.cert is None) != (section.key is None):
        raise ValueError("cert and key must be given together")
    return section


class MetricsSection(Section):
    """``[metrics]``: Prometheus ``/metrics`` on HOST:PORT, off when unset or empty."""

    listen: str | None = Field(None, description="HOST:PORT; unset or empty = off")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        """HOST:PORT, or None for off; checked at load, so a bad value stops the service before it
        starts anything."""
        if not value:
            return None
        if parse_endpoint(value).unix_path:
            raise ValueError("/metrics needs HOST:PORT, not a unix socket")
        return value


class RestSection(Section):
    """``[rest]``: KServe v2 REST beside gRPC (``edgecloud.protocol.rest``), off when unset or empty.

    Off by default on both services: a device opens one local API unless asked for a second, and the
    gateway's REST is for clients that cannot speak gRPC. Plaintext only on loopback, as for gRPC.
    """

    listen: str | None = Field(None, description="HOST:PORT or unix:/path; unset or empty = off")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if not value:
            return None
        parse_endpoint(value)  # ValueError with the reason, named by the key
        return value


class HealthSection(Section):
    """``[health]``: a plaintext port serving only gRPC health checks, beside the main port
    (``edgecloud/protocol/health_port.py``): for probes that cannot speak the main port's TLS
    (kubelet's), and for probes that must not queue behind inference (a threaded server refuses any call
    beyond its threads in a flood, health checks too)."""

    listen: str | None = Field(None, description="HOST:PORT, e.g. 0.0.0.0:9002; unset = off")

    @field_validator("listen")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and parse_endpoint(value).unix_path:
            raise ValueError("a unix socket cannot be probed by kubelet; give HOST:PORT")
        return value


class AdmissionSection(Section):
    """``[admission]``: how many inference calls run at once and how many more may wait for a turn;
    a call beyond both gets RESOURCE_EXHAUSTED at once instead of a wait (docs/design.md §2).

    The defaults suit an edge device of 2 to 8 cores: 4 calls at once keep its cores busy (a call waiting
    on the cloud gives its slot back), and 8 waiting are a few milliseconds of work at the agent's rate,
    so a caller is either answered soon or told at once to retry. Each running or waiting call holds a
    server thread, and the fewer threads, the sooner a flood is refused instead of queued inside gRPC:
    measured on 2 cores at 1.5x the agent's capacity, with 16 in flight and 16 queued the answered
    calls' p99 was 0.9 s; with these, 0.23-0.32 s, refusing more of the flood.
    """

    max_in_flight: int = Field(4, gt=0, description="ModelInfer calls running at once")
    max_queue: int = Field(8, ge=0, description="calls waiting for a turn beyond those")


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` (e.g. command-line flags) over ``base``; None values are skipped."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, dict):
            out[key] = merge({}, value)
        else:
            out[key] = value
    return out


def build(model: type[S], data: dict[str, Any], source: str = "config") -> S:
    """Validate ``data`` into ``model``; errors become one ConfigError naming every bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            unknown = err["type"] in ("extra_forbidden", "unexpected_keyword_argument")
            msg = "unknown key" if unknown else err["msg"]
            problems.append(f"{key}: {msg}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def file_and_flags(args: Any, flag_keys: dict[str, tuple[str, str]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``--config`` file's data and the given flags as overrides, by ``flag_keys``
    (argparse dest -> (section, key)); flags left unset do not override."""
    data: dict[str, Any] = read_toml(args.config) if args.config else {}
    overrides: dict[str, dict[str, Any]] = {}
    for dest, (section, key) in flag_keys.items():
        value = getattr(args, dest)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return data, overrides


def host_port(flag: str, value: str) -> dict[str, Any]:
    """A ``HOST:PORT`` flag as ``{"host", "port"}`` keys of a section; ConfigError naming the flag."""
    try:
        endpoint = parse_endpoint(value)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None
    return {"host": endpoint.host, "port": endpoint.port}
