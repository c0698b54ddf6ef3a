"""Signed model releases (docs/design.md §6): the payload and its envelope, verification that names a
reason for every rejection, and the pure rules an updater applies (rollout, version, size, target).

The envelope keeps the payload exactly as it was signed, unknown keys included, so a newer publisher
can add keys without breaking older devices' signature checks; :class:`ReleasePayload` is the typed
view of the keys this version understands.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from itertools import pairwise
from typing import Annotated, Any, Literal, get_args

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    Strict,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)

from edgecloud.backends import release_backends
from edgecloud.clock import format_time, parse_time, utc_now
from edgecloud.errors import EdgecloudError
from edgecloud.jsontypes import Bool, Int, Number, Str
from edgecloud.signing import KEY_ID_PATTERN, TrustStore, canonical_json, sign, verify

SCHEMA_VERSION = 1
DEFAULT_BUDGET_BYTES = 1_000_000_000
DEFAULT_CLOCK_SKEW_S = 300.0
#: a device clock before this is taken as unset (no RTC battery, no NTP yet)
CLOCK_SET_AFTER = datetime(2024, 1, 1, tzinfo=timezone.utc)
#: the release formats the registered backends can ship (the schema's enum; checks read the registry)
Format = Literal[tuple(release_backends())]  # type: ignore[valid-type]
Scores = Literal["logits", "probabilities"]
SCORES = get_args(Scores)
#: a model or artifact name: one safe path component
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: how :func:`format_time` writes a time (a fraction of a second is tolerated)
TIME_SCHEMA = {"description": "RFC 3339, UTC, with Z", "type": "string",
               "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z$"}


class Reason(str, Enum):
    """Why a release is refused: the code reported in ``model/reported`` (``reason``)."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"
    EXPIRED = "expired"
    NOT_NEWER = "not_newer"
    TOO_LARGE = "too_large"
    WRONG_TARGET = "wrong_target"
    BAD_URI = "bad_uri"
    BAD_NAME = "bad_name"  # a model name that is no safe single path component
    DOWNLOAD_FAILED = "download_failed"  # transient: the partial file is kept for a resume
    SIZE_MISMATCH = "size_mismatch"
    SHA256_MISMATCH = "sha256_mismatch"
    UNLOADABLE = "unloadable"
    CONTRACT_MISMATCH = "contract_mismatch"


class RollbackReason(str, Enum):
    """Why an active release was rolled back: the code reported with ``rolled_back``."""

    ERROR_RATE = "error_rate"
    LATENCY = "latency"
    CRASH_LOOP = "crash_loop"  # the agent restarted while watching the release


class ReleaseRejected(EdgecloudError):
    """A release, or its artifact, is refused; ``reason`` is the code, ``detail`` says what exactly."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


# -- payload --------------------------------------------------------------------------------------------
# The payload is parsed by pydantic from the annotations below, which also state what the JSON Schema
# of a release says (edgecloud.mqtt.schemas): one typed model for both. Scalars are strict
# (edgecloud.jsontypes), a key left out takes the model's default, and every refusal names its key and
# is reported as ``malformed``.
def _malformed(detail: str) -> ReleaseRejected:
    return ReleaseRejected(Reason.MALFORMED, detail)


def _refusal(error: ValidationError, where: str) -> ReleaseRejected:
    """The first of pydantic's complaints, naming the key (``payload.artifact.sha256: …``)."""
    first = error.errors(include_url=False)[0]
    key = ".".join([where, *(str(part) for part in first["loc"])])
    if first["type"] == "missing":
        return _malformed(f"{key} is missing")
    return _malformed(f"{key}: {first['msg'].removeprefix('Value error, ')} (got {first['input']!r:.40})")


def _time(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"must be an RFC 3339 time string, not {type(value).__name__}")
    return parse_time(value)


def _none(value: object) -> bool:
    return value is None


#: a time, written by format_time
Time = Annotated[datetime, BeforeValidator(_time), WithJsonSchema(TIME_SCHEMA)]
#: a key to_dict leaves out when it is None
Omitted = Field(exclude_if=_none)


def _stated(**keywords: Any) -> Any:
    """JSON Schema keywords the schema states and parsing leaves alone: a later check refuses the value
    with a reason code of its own (``bad_name``, ``bad_uri``), or it is not refused at all."""
    return Field(json_schema_extra=keywords)


@dataclass(frozen=True, slots=True)
class PlanTarget:
    """Plans only: where the engine was built, the only place it runs."""

    tensorrt: Str
    device: Str


@dataclass(frozen=True, slots=True)
class Artifact:
    """Where the model file is, and what it must hash to."""

    __pydantic_config__ = ConfigDict(json_schema_extra={
        "if": {"properties": {"format": {"enum": [fmt for fmt, backend in release_backends().items()
                                                  if backend.plan_target]}}},
        "then": {"required": ["target"]},
        "else": {"not": {"required": ["target"]}}})

    uri: Annotated[Str, _stated(pattern=r"^(grpcs?|https|file)://"), Field(
        description="grpc://HOST:PORT/<name>/<version>, grpcs://…, https://… or file://…")]
    sha256: Annotated[Str, Field(pattern=_SHA256.pattern)]
    size: Annotated[Int, Field(ge=0, description="bytes")]
    format: Format = "onnx"
    target: Annotated[PlanTarget | None, Omitted] = None

    def __post_init__(self) -> None:
        if not _SHA256.match(self.sha256):
            raise _malformed("artifact.sha256 must be 64 lowercase hex digits")
        if self.size < 0:
            raise _malformed("artifact.size must be >= 0")
        backends = release_backends()
        if self.format not in backends:
            raise _malformed(f"artifact.format {self.format!r} is not one of {tuple(backends)}")
        if backends[self.format].plan_target != (self.target is not None):
            plans = " or ".join(fmt for fmt, backend in backends.items() if backend.plan_target)
            raise _malformed(f"artifact.target is required for a {plans}, and only for it")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uri": self.uri, "sha256": self.sha256, "size": self.size,
                               "format": self.format}
        if self.target is not None:
            out["target"] = {"tensorrt": self.target.tensorrt, "device": self.target.device}
        return out


@dataclass(frozen=True, slots=True)
class Calibration:
    """Cascade settings that travel with the model; a missing key leaves the model card or the default
    to decide."""

    policy: Annotated[Str | None, _stated(minLength=1), Omitted] = None
    temperature: Annotated[Number | None, Field(gt=0), Omitted] = None
    threshold: Annotated[Number | None, Field(ge=0, le=1), Omitted] = None
    score_output: Annotated[Str | None, _stated(minLength=1), Omitted] = None
    scores: Annotated[Scores | None, Omitted] = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not self.temperature > 0:
            raise _malformed("calibration.temperature must be > 0")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise _malformed("calibration.threshold must be within [0, 1]")
        if self.scores is not None and self.scores not in SCORES:
            raise _malformed(f"calibration.scores must be one of {SCORES}")

    def to_dict(self) -> dict[str, Any]:
        values = {"policy": self.policy, "temperature": self.temperature, "threshold": self.threshold,
                  "score_output": self.score_output, "scores": self.scores}
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Parse calibration keys (a None value is as if left out); ReleaseRejected(malformed) on bad ones."""
        try:
            return _CALIBRATION.validate_python({k: v for k, v in data.items() if v is not None})
        except ValidationError as e:
            raise _refusal(e, "calibration") from None


@dataclass(frozen=True, slots=True)
class Gates:
    """What a wave must show before the controller widens the rollout (docs/design.md §12); a gate
    left out is not judged. Shares are fractions of 1; ``max_escalation_rise`` is relative (0.5: the
    new version may escalate half as much again as the previous one)."""

    soak_s: Annotated[Number | None, Field(ge=0, description="seconds a wave runs before it is judged"),
                      Omitted] = None
    min_devices: Annotated[Int | None, Field(ge=1, description="devices active on the new version "
                                                               "before a wave is judged"), Omitted] = None
    max_failed_share: Annotated[Number | None, Field(ge=0, le=1), Omitted] = None
    max_agree_drop: Annotated[Number | None, Field(ge=0, le=1, description="audit agreement below the "
                                                   "previous version's, absolute"), Omitted] = None
    confidence: Annotated[Number | None, Field(gt=0, lt=1, description="of the one-sided tests (0.95 "
                                                                       "when left out)"), Omitted] = None
    max_escalation_rise: Annotated[Number | None, Field(ge=0), Omitted] = None
    max_p95_ratio: Annotated[Number | None, Field(gt=0), Omitted] = None

    def to_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in GATE_KEYS}
        return {k: v for k, v in values.items() if v is not None}


GATE_KEYS = ("soak_s", "min_devices", "max_failed_share", "max_agree_drop", "confidence",
             "max_escalation_rise", "max_p95_ratio")
#: the one-sided tests' confidence when the gates name none
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True, slots=True)
class Rollout:
    """The share of devices (0-100 %) that take the release, chosen by a hash of salt and device id.

    With ``waves`` (increasing percents ending at 100, docs/design.md §12) the share grows wave by wave
    as signed wave commands say, and ``percent`` is the first wave; ``controller_key`` names the only
    key allowed to sign those commands (16 hex digits; the device's trusted keys otherwise), and
    ``controller_public_key`` (standard base64 of the raw 32-byte key) lets a device trust that key for
    this release alone."""

    percent: Annotated[Number, Field(ge=0, le=100)] = 100.0
    salt: Str = ""
    waves: Annotated[tuple[Number, ...] | None, Field(min_length=1), Omitted] = None
    gates: Annotated[Gates | None, Omitted] = None
    controller_key: Annotated[Str | None, Field(pattern=KEY_ID_PATTERN.pattern), Omitted] = None
    controller_public_key: Annotated[Str | None, Field(pattern=r"^[A-Za-z0-9+/]{43}=$"), Omitted] = None

    def __post_init__(self) -> None:
        if not 0 <= self.percent <= 100:
            raise _malformed("rollout.percent must be within [0, 100]")
        if self.waves is not None:
            waves = self.waves
            if any(not 0 < w <= 100 for w in waves) or any(b <= a for a, b in pairwise(waves)):
                raise _malformed(f"rollout.waves must increase within (0, 100], got {list(waves)}")
            if waves[-1] != 100:
                raise _malformed(f"rollout.waves must end at 100, got {list(waves)}")
            if self.percent != waves[0]:
                raise _malformed(f"rollout.percent ({self.percent:g}) must be the first wave "
                                 f"({waves[0]:g})")

    def wave_percent(self, wave: int) -> float:
        """The share of wave ``wave`` (0-based); the plain percent without waves."""
        return self.percent if self.waves is None else self.waves[wave]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"percent": self.percent, "salt": self.salt}
        if self.waves is not None:
            out["waves"] = list(self.waves)
        if self.gates is not None:
            out["gates"] = self.gates.to_dict()
        if self.controller_key is not None:
            out["controller_key"] = self.controller_key
        if self.controller_public_key is not None:
            out["controller_public_key"] = self.controller_public_key
        return out


@dataclass(frozen=True, slots=True)
class ReleasePayload:
    """The signed payload: the keys this version understands (others are ignored, and signed all the same)."""

    model: Annotated[Str, _stated(pattern=NAME_PATTERN.pattern)]
    version: Annotated[Int, Field(ge=0)]
    publisher: Annotated[Str, _stated(minLength=1)]
    artifact: Artifact
    issued_at: Time
    expires_at: Time
    calibration: Calibration = field(default_factory=Calibration)
    rollout: Rollout = field(default_factory=Rollout)
    labels: Annotated[tuple[Str, ...] | None, Omitted] = None
    allow_downgrade: Bool = False
    #: a newer schema is read as far as this version understands it
    schema: Annotated[Int, Field(ge=1), WithJsonSchema({"const": SCHEMA_VERSION})] = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.version < 0:
            raise _malformed("payload.version must be >= 0")
        if self.expires_at <= self.issued_at:
            raise _malformed("payload.expires_at must be after issued_at")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": self.schema, "model": self.model, "version": self.version,
            "publisher": self.publisher, "artifact": self.artifact.to_dict(),
            "calibration": self.calibration.to_dict(),
            "rollout": self.rollout.to_dict(),
            "issued_at": format_time(self.issued_at), "expires_at": format_time(self.expires_at),
            "allow_downgrade": self.allow_downgrade,
        }
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReleasePayload:
        """Parse the keys this version knows, ignore the rest; ReleaseRejected(malformed) on bad ones."""
        try:
            return _PAYLOAD.validate_python(data)
        except ValidationError as e:
            raise _refusal(e, "payload") from None


_CALIBRATION = TypeAdapter(Calibration)
_PAYLOAD = TypeAdapter(ReleasePayload)


# -- envelope -------------------------------------------------------------------------------------------
#: the payload exactly as it was signed, described by ReleasePayload
SignedPayload = Annotated[Mapping[str, Any],
                          GetPydanticSchema(lambda _type, handler: handler(ReleasePayload))]


@dataclass(frozen=True)
class Envelope:
    """Retained on edgecloud/{fleet}/groups/{group}/model/desired and
    edgecloud/{fleet}/devices/{device}/model/desired. The signature is Ed25519 over the canonical JSON
    (RFC 8785) of payload; key_id is the first 16 hex digits of sha256 of the raw 32-byte public key.
    Unknown payload keys are ignored by devices, so the payload may grow.
    """

    __pydantic_config__ = ConfigDict(title="edgecloud signed release",
                                     json_schema_extra={"additionalProperties": False})

    payload: SignedPayload
    key_id: Annotated[str, Field(pattern=KEY_ID_PATTERN.pattern)]
    signature: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{86}==$",
                                    description="standard base64 of the 64-byte signature")]

    def to_dict(self) -> dict[str, Any]:
        return {"payload": dict(self.payload), "key_id": self.key_id, "signature": self.signature}

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> Envelope:
        """Parse an envelope; ReleaseRejected(malformed) for anything else (an empty retained message
        means "no release" and is the caller's to handle before this)."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise _malformed(f"release is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise _malformed("release is not a JSON object")
        try:
            wire = _ENVELOPE.validate_python(obj)
        except ValidationError as e:
            raise _refusal(e, "release") from None
        return cls(wire.payload, wire.key_id, wire.signature)


@dataclass(frozen=True, slots=True)
class _WireEnvelope:
    """An envelope's shape as parsed: the payload stays the object that was signed, checked after the
    signature (:func:`verify_envelope`)."""

    payload: Annotated[dict[str, Any], Strict()]
    key_id: Str
    signature: Str


_ENVELOPE = TypeAdapter(_WireEnvelope)


def sign_release(payload: ReleasePayload, key: Ed25519PrivateKey) -> Envelope:
    data = payload.to_dict()
    kid, signature = sign(key, data)
    return Envelope(data, kid, signature)


def verify_envelope(envelope: Envelope, trust: TrustStore, now: datetime | None = None,
                    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
                    newest_trusted_issued_at: datetime | None = None) -> ReleasePayload:
    """Check key, signature, shape and expiry; return the payload or raise ReleaseRejected.

    ``newest_trusted_issued_at`` is the latest ``issued_at`` this device has accepted: when its clock
    is clearly unset (before 2024) expiry is judged against that instead. With neither a clock nor a
    reference, expiry cannot be judged and the signature alone decides.
    """
    kid = envelope.key_id
    if not KEY_ID_PATTERN.match(kid):
        raise _malformed(f"key_id {kid!r} is not 16 lowercase hex digits")
    if trust.is_revoked(kid):
        raise ReleaseRejected(Reason.REVOKED_KEY, f"signed by revoked key {kid}")
    public_key = trust.public_key(kid)
    if public_key is None:
        raise ReleaseRejected(Reason.UNKNOWN_KEY, f"signed by key {kid}, which is not trusted here")
    if not verify(public_key, envelope.payload, envelope.signature):
        raise ReleaseRejected(Reason.BAD_SIGNATURE, f"signature does not match the payload (key {kid})")
    payload = ReleasePayload.from_dict(envelope.payload)
    now = now or utc_now()
    reference, basis = now, "device clock"
    if now < CLOCK_SET_AFTER and newest_trusted_issued_at is not None:
        reference, basis = newest_trusted_issued_at, "newest trusted issued_at (device clock unset)"
    if reference - timedelta(seconds=clock_skew_s) > payload.expires_at:  # no overflow at year 9999
        raise ReleaseRejected(Reason.EXPIRED, f"expired at {format_time(payload.expires_at)}; "
                              f"{basis} is {format_time(reference)}")
    return payload


# -- rules ----------------------------------------------------------------------------------------------
def in_rollout(device_id: str, percent: float, salt: str) -> bool:
    """Deterministic share of devices: the same answer for a device on every run (docs/design.md §6)."""
    digest = hashlib.sha256(f"{salt}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10000 < round(percent * 100)


def check_version(new: int, active: int | None, allow_downgrade: bool) -> None:
    """Refuse a version that is not above the active one, unless the release allows a downgrade.

    The active version itself is refused either way: there is nothing to do (an updater should
    skip a re-delivered retained release for its active version before calling this).
    """
    if active is None or new > active or (new < active and allow_downgrade):
        return
    why = "is the active version" if new == active else "is below the active version"
    raise ReleaseRejected(Reason.NOT_NEWER, f"version {new} {why} {active}"
                          + ("" if allow_downgrade else " and the release does not allow a downgrade"))


def check_size(size: int, budget: int = DEFAULT_BUDGET_BYTES) -> None:
    if size > budget:
        raise ReleaseRejected(Reason.TOO_LARGE, f"artifact is {size} bytes, over the edge budget of {budget}")


def check_target(artifact: Artifact, tensorrt_version: str | None, device: str | None) -> None:
    """A TensorRT plan runs only where it was built: same TensorRT version string, same device."""
    target = artifact.target
    if target is None:
        return
    if target.tensorrt != tensorrt_version or target.device != device:
        raise ReleaseRejected(Reason.WRONG_TARGET,
                              f"plan built for TensorRT {target.tensorrt} on {target.device}; this device "
                              f"has TensorRT {tensorrt_version or 'none'} on {device or 'unknown'}")
