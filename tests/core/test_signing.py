"""Ed25519 keys as PEM, key ids, canonical JSON and the trust store (docs/design.md §6)."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgecloud.errors import ConfigError
from edgecloud.signing import (
    TrustStore,
    canonical_json,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    verify,
    write_keypair,
)


def test_canonical_json_is_the_design_bytes() -> None:
    obj = {"b": [1, 2.5, None], "a": {"z": True, "é": "ü"}, "c": "x y"}
    assert canonical_json(obj) == '{"a":{"z":true,"é":"ü"},"b":[1,2.5,null],"c":"x y"}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_keypair_files_formats_and_key_id(tmp_path: Path) -> None:
    private_path, public_path, kid = write_keypair(tmp_path / "release")
    assert private_path.name == "release.key" and public_path.name == "release.pub"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private_path.read_bytes()  # PKCS#8, unencrypted
    assert b"BEGIN PUBLIC KEY" in public_path.read_bytes()  # SubjectPublicKeyInfo
    public_key = load_public_key(public_path)
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32 and kid == hashlib.sha256(raw).hexdigest()[:16] == key_id(public_key)
    assert key_id(load_private_key(private_path).public_key()) == kid
    with pytest.raises(ConfigError, match="exists"):
        write_keypair(tmp_path / "release")
    assert write_keypair(tmp_path / "release", overwrite=True)[2] != kid


def test_sign_and_verify(tmp_path: Path) -> None:
    private_path, public_path, kid = write_keypair(tmp_path / "k")
    payload = {"model": "m", "version": 2, "labels": ["ok", "défaut"]}
    signed_kid, signature = sign(load_private_key(private_path), payload)
    assert signed_kid == kid and len(base64.b64decode(signature, validate=True)) == 64
    public_key = load_public_key(public_path)
    assert verify(public_key, dict(reversed(payload.items())), signature)  # key order is irrelevant
    assert not verify(public_key, {**payload, "version": 3}, signature)
    assert not verify(public_key, payload, "not base64!")
    assert not verify(public_key, payload, base64.b64encode(b"\0" * 64).decode())


def test_key_files_of_the_wrong_kind_are_config_errors(tmp_path: Path) -> None:
    rsa_like = tmp_path / "ec.key"
    rsa_like.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_private_key(rsa_like)
    with pytest.raises(ConfigError, match=r"missing\.pub"):
        load_public_key(tmp_path / "missing.pub")
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello")
    with pytest.raises(ConfigError, match=r"garbage\.pub"):
        load_public_key(garbage)


def test_trust_store_holds_several_keys_and_revocations(tmp_path: Path) -> None:
    _, old_pub, old_kid = write_keypair(tmp_path / "old")
    _, new_pub, new_kid = write_keypair(tmp_path / "new")
    store = TrustStore.from_files([old_pub, new_pub], revoked=[old_kid])
    assert store.public_key(new_kid) is not None
    assert store.is_revoked(old_kid) and store.public_key(old_kid) is None  # revoked wins
    assert store.public_key("0" * 16) is None and not store.is_revoked("0" * 16)
    with pytest.raises(ConfigError, match="16 lowercase hex"):
        TrustStore.from_files([new_pub], revoked=["ABC"])
