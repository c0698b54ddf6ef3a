"""Ed25519 keys as PEM, key ids, canonical JSON (RFC 8785, checked against the RFC's own examples) and
the trust store (docs/design.md §6)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import struct
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


def test_canonical_json_is_rfc_8785_on_its_main_example() -> None:
    # RFC 8785 §3.2.2: the input, as a JSON text any parser reads, and its canonical output
    text = r'''{
      "numbers": [333333333.33333329, 1E30, 4.50,
                  2e-3, 0.000000000000000000000000001],
      "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
      "literals": [null, true, false]
    }'''
    expected = (r'''{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'''
                r'''"string":"€$\u000f\nA'B\"\\\\\"/"}''')
    assert canonical_json(json.loads(text)) == expected.encode("utf-8")


def test_canonical_json_sorts_keys_by_utf16_code_units() -> None:
    # RFC 8785 §3.2.3: the emoji's surrogate pair sorts before U+FB33, though its code point is above it
    text = r'''{
      "\u20ac": "Euro Sign",
      "\r": "Carriage Return",
      "\ufb33": "Hebrew Letter Dalet With Dagesh",
      "1": "One",
      "\ud83d\ude00": "Emoji: Grinning Face",
      "\u0080": "Control",
      "\u00f6": "Latin Small Letter O With Diaeresis"
    }'''
    expected = ('{"\\r":"Carriage Return","1":"One","\x80":"Control","ö":"Latin Small Letter O With '
                'Diaeresis","€":"Euro Sign","\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter '
                'Dalet With Dagesh"}')
    assert canonical_json(json.loads(text)) == expected.encode("utf-8")


#: RFC 8785 Appendix B: IEEE 754 doubles (hex) and how JCS writes them
APPENDIX_B = [
    ("0000000000000000", "0"), ("8000000000000000", "0"), ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"), ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"), ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"), ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"), ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"), ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"), ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"), ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"), ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"), ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"), ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "text"), APPENDIX_B)
def test_canonical_numbers_are_the_rfc_8785_samples(bits: str, text: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert canonical_json([value]) == f"[{text}]".encode()


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000"])  # NaN, Infinity
def test_non_finite_numbers_cannot_be_canonical(bits: str) -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": struct.unpack(">d", bytes.fromhex(bits))[0]})


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
