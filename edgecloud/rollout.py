"""Signed wave commands (docs/design.md §12): what moves a release with waves from one share of the fleet
to the next, or halts it.

A command is retained on ``edgecloud/{fleet}/models/{model}/rollout`` in the same envelope as a release
(``{"payload", "key_id", "signature"}``, Ed25519 over the RFC 8785 payload). A device takes a command
only for a release it holds, signed by a key trusted for that release (:func:`command_keys`), naming a
wave inside the release's signed plan, and not older than the last command it took for that version;
anything else is refused with a :class:`CommandRefused` reason and the device keeps what it serves.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ConfigDict, Field, GetPydanticSchema, TypeAdapter, ValidationError

from edgecloud.clock import format_time
from edgecloud.errors import EdgecloudError
from edgecloud.jsontypes import Int, Str
from edgecloud.release import NAME_PATTERN, Envelope, ReleasePayload, Time
from edgecloud.signing import KEY_ID_PATTERN, TrustStore, key_id, sign, verify

SCHEMA_VERSION = 1
WaveState = Literal["advancing", "halted", "complete"]
#: the reason a device reports when a halt rolls it back
ROLLOUT_HALTED = "rollout_halted"


class CommandReason(str, Enum):
    """Why a device refuses a wave command (reported in an ``rollout.command_refused`` event)."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNTRUSTED_KEY = "untrusted_key"
    UNKNOWN_VERSION = "unknown_version"
    NO_WAVES = "no_waves"
    OUTSIDE_PLAN = "outside_plan"
    OUT_OF_ORDER = "out_of_order"


class CommandRefused(EdgecloudError):
    """A wave command a device does not take; ``reason`` is the code, ``detail`` says what exactly."""

    def __init__(self, reason: CommandReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class WaveCommand:
    """The signed payload: which release (model, version), which wave of its plan, and in what state.
    ``advancing`` to wave k widens the share to ``waves[k]``; ``complete`` is the last wave done;
    ``halted`` rolls back every device that activated the version."""

    model: Annotated[Str, Field(pattern=NAME_PATTERN.pattern)]
    version: Annotated[Int, Field(ge=0)]
    wave: Annotated[Int, Field(ge=0, description="0-based index into the release's rollout.waves")]
    state: WaveState
    issued_at: Time
    reason: Str = ""
    schema: Annotated[Int, Field(ge=1)] = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "model": self.model, "version": self.version, "wave": self.wave,
                "state": self.state, "reason": self.reason, "issued_at": format_time(self.issued_at)}

    @classmethod
    def from_dict(cls, data: Any) -> WaveCommand:
        try:
            return _COMMAND.validate_python(data)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            key = ".".join(["payload", *(str(part) for part in first["loc"])])
            raise CommandRefused(CommandReason.MALFORMED, f"{key}: {first['msg']}") from None


_COMMAND = TypeAdapter(WaveCommand)
#: the payload exactly as it was signed, described by WaveCommand
SignedCommand = Annotated[Mapping[str, Any], GetPydanticSchema(lambda _type, handler: handler(WaveCommand))]


@dataclass(frozen=True)
class CommandEnvelope(Envelope):
    """Retained on edgecloud/{fleet}/models/{model}/rollout: a release's envelope (same signing, same
    parsing) whose payload is a :class:`WaveCommand`; ``protos/schemas/rollout.schema.json`` is
    generated from it."""

    __pydantic_config__ = ConfigDict(title="edgecloud signed wave command",
                                     json_schema_extra={"additionalProperties": False})

    payload: SignedCommand


def sign_command(command: WaveCommand, key: Ed25519PrivateKey) -> CommandEnvelope:
    data = command.to_dict()
    kid, signature = sign(key, data)
    return CommandEnvelope(data, kid, signature)


def public_key_b64(key: Ed25519PublicKey) -> str:
    """A public key as ``rollout.controller_public_key`` carries it: standard base64 of the raw 32 bytes."""
    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode("ascii")


def command_keys(release: ReleasePayload, trust: TrustStore) -> dict[str, Ed25519PublicKey]:
    """The keys allowed to drive ``release``: the one its rollout names (from the device's trust store,
    or the public key the signed release carries for it), else every trusted key."""
    named = release.rollout.controller_key
    if named is None:
        return {kid: key for kid, key in trust.keys.items() if not trust.is_revoked(kid)}
    if trust.is_revoked(named):
        return {}
    if (known := trust.public_key(named)) is not None:
        return {named: known}
    carried = release.rollout.controller_public_key
    if carried is None:
        return {}
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(carried, validate=True))
    except (binascii.Error, ValueError):
        return {}
    return {named: key} if key_id(key) == named else {}


def verify_command(envelope: Envelope, release: ReleasePayload, trust: TrustStore,
                   last: WaveCommand | None = None) -> WaveCommand:
    """Check a wave command against the verified release it drives and the last command taken for that
    release (None: none yet); the command, or CommandRefused naming why not."""
    kid = envelope.key_id
    if not KEY_ID_PATTERN.match(kid):
        raise CommandRefused(CommandReason.MALFORMED, f"key_id {kid!r} is not 16 lowercase hex digits")
    keys = command_keys(release, trust)
    if kid not in keys:
        allowed = release.rollout.controller_key or "the device's trusted keys"
        raise CommandRefused(CommandReason.UNTRUSTED_KEY,
                             f"signed by key {kid}; release {release.model} v{release.version} is driven "
                             f"by {allowed}")
    if not verify(keys[kid], envelope.payload, envelope.signature):
        raise CommandRefused(CommandReason.BAD_SIGNATURE, f"signature does not match the payload (key {kid})")
    command = WaveCommand.from_dict(dict(envelope.payload))
    if (command.model, command.version) != (release.model, release.version):
        raise CommandRefused(CommandReason.UNKNOWN_VERSION,
                             f"command for {command.model} v{command.version}; the release held is "
                             f"{release.model} v{release.version}")
    waves = release.rollout.waves
    if waves is None:
        raise CommandRefused(CommandReason.NO_WAVES,
                             f"release {release.model} v{release.version} has no waves")
    if command.wave >= len(waves):
        raise CommandRefused(CommandReason.OUTSIDE_PLAN,
                             f"wave {command.wave} outside the signed plan {list(waves)}")
    if last is not None and (command.issued_at < last.issued_at or (
            command.state != "halted" and last.state != "halted" and command.wave < last.wave)):
        raise CommandRefused(CommandReason.OUT_OF_ORDER,
                             f"wave {command.wave} ({command.state}, issued "
                             f"{format_time(command.issued_at)}) after wave {last.wave} ({last.state}, "
                             f"issued {format_time(last.issued_at)})")
    return command


def share(release: ReleasePayload, command: WaveCommand | None) -> float:
    """The percent of devices inside ``release``'s rollout now: the first wave (or the plain percent)
    until a command says otherwise, 0 once halted, 100 once complete."""
    if command is None or release.rollout.waves is None:
        return release.rollout.percent
    if command.state == "halted":
        return 0.0
    if command.state == "complete":
        return 100.0
    return release.rollout.wave_percent(command.wave)
