"""Signed wave commands (docs/design.md §12): what a device takes, and every reason it refuses one."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgecloud.release import Artifact, Envelope, Gates, ReleasePayload, Rollout
from edgecloud.rollout import (
    CommandReason,
    CommandRefused,
    WaveCommand,
    command_keys,
    public_key_b64,
    share,
    sign_command,
    verify_command,
)
from edgecloud.signing import TrustStore, generate_key, key_id, public_key_pem, sign

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
OPERATOR, CONTROLLER, STRANGER = generate_key(), generate_key(), generate_key()


def release(**rollout: object) -> ReleasePayload:
    fields = {"percent": 5.0, "salt": "s", "waves": (5.0, 25.0, 100.0), **rollout}
    return ReleasePayload(model="inspection", version=3, publisher="ops",
                          artifact=Artifact("grpc://gw:8001/inspection/3", "0" * 64, 10),
                          issued_at=NOW - timedelta(hours=1), expires_at=NOW + timedelta(days=1),
                          rollout=Rollout(**fields))  # type: ignore[arg-type]


def command(wave: int = 1, state: str = "advancing", minutes: int = 0, **changes: object) -> WaveCommand:
    base = WaveCommand(model="inspection", version=3, wave=wave, state=state,  # type: ignore[arg-type]
                       issued_at=NOW + timedelta(minutes=minutes), reason="")
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def trust(tmp_path: Path) -> TrustStore:
    path = tmp_path / "operator.pub"
    path.write_bytes(public_key_pem(OPERATOR.public_key()))
    return TrustStore.from_files([path])


def refused(reason: CommandReason, envelope: Envelope, held: ReleasePayload, trust: TrustStore,
            last: WaveCommand | None = None) -> None:
    with pytest.raises(CommandRefused) as info:
        verify_command(envelope, held, trust, last)
    assert info.value.reason is reason, info.value


def test_a_signed_command_verifies_and_sets_the_share(trust: TrustStore) -> None:
    held = release(gates=Gates(soak_s=600, min_devices=3, max_agree_drop=0.02))
    assert share(held, None) == 5.0  # the first wave until a command says otherwise
    taken = verify_command(sign_command(command(1), OPERATOR), held, trust)
    assert taken == command(1) and share(held, taken) == 25.0
    assert share(held, command(1, "halted")) == 0.0 and share(held, command(2, "complete")) == 100.0
    assert held.rollout.gates is not None and held.rollout.gates.to_dict() == {
        "soak_s": 600, "min_devices": 3, "max_agree_drop": 0.02}
    again = Envelope.from_json(sign_command(command(2, minutes=5), OPERATOR).to_json())
    assert verify_command(again, held, trust, last=taken).wave == 2  # through its JSON, RFC 8785 bytes


def test_refusals_name_their_reason(trust: TrustStore) -> None:
    held = release()
    refused(CommandReason.UNTRUSTED_KEY, sign_command(command(), STRANGER), held, trust)
    tampered = sign_command(command(), OPERATOR)
    refused(CommandReason.BAD_SIGNATURE, Envelope({**tampered.payload, "wave": 2}, tampered.key_id,
                                                  tampered.signature), held, trust)
    refused(CommandReason.UNKNOWN_VERSION, sign_command(command(version=4), OPERATOR), held, trust)
    refused(CommandReason.OUTSIDE_PLAN, sign_command(command(3), OPERATOR), held, trust)
    refused(CommandReason.NO_WAVES, sign_command(command(0), OPERATOR),
            release(percent=100.0, waves=None), trust)
    last = command(2, minutes=10)
    refused(CommandReason.OUT_OF_ORDER, sign_command(command(1, minutes=20), OPERATOR), held, trust, last)
    refused(CommandReason.OUT_OF_ORDER, sign_command(command(2, minutes=5), OPERATOR), held, trust, last)
    # a halt may come at any wave after an advance, and an advance after a halt resumes
    halt = verify_command(sign_command(command(0, "halted", minutes=11), OPERATOR), held, trust, last)
    assert verify_command(sign_command(command(1, minutes=12), OPERATOR), held, trust, halt).wave == 1
    paused = {**command().to_dict(), "state": "paused"}
    refused(CommandReason.MALFORMED, Envelope(paused, *sign(OPERATOR, paused)), held, trust)


def test_a_release_can_name_the_only_key_that_drives_it(trust: TrustStore) -> None:
    public = CONTROLLER.public_key()
    kid = key_id(public)
    carried = release(controller_key=kid, controller_public_key=public_key_b64(public))
    assert list(command_keys(carried, trust)) == [kid]  # the operator's key no longer drives it
    assert verify_command(sign_command(command(), CONTROLLER), carried, trust).wave == 1
    refused(CommandReason.UNTRUSTED_KEY, sign_command(command(), OPERATOR), carried, trust)
    # named but neither trusted here nor carried: nobody drives it
    assert command_keys(release(controller_key=kid), trust) == {}
    # a carried key that is not the named one is not taken
    other = release(controller_key=kid, controller_public_key=public_key_b64(STRANGER.public_key()))
    assert command_keys(other, trust) == {}
    # the operator's own key named: trusted here already
    assert list(command_keys(release(controller_key=key_id(OPERATOR.public_key())), trust)) == [
        key_id(OPERATOR.public_key())]
    revoked = TrustStore(trust.keys, frozenset({kid}))
    assert command_keys(carried, revoked) == {}
