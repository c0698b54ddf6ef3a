"""Ed25519 signatures over canonical JSON (docs/design.md §6), and the set of keys a device trusts.

The canonical form is RFC 8785, the JSON Canonicalization Scheme (JCS): keys sorted by UTF-16 code
units, no spaces, UTF-8, numbers as ECMAScript writes them (``1.0`` is ``1``), so a publisher in any
language with a JCS library signs the same bytes.

Keys are PEM files: private keys in PKCS#8, public keys as SubjectPublicKeyInfo. A key is named by
its key id, the first 16 hex digits of sha256 over the raw 32-byte public key, so a release says
which key signed it and several keys can be trusted at once while signing keys rotate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgecloud.errors import ConfigError
from edgecloud.files import atomic_write

KEY_ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")


def canonical_json(obj: Any) -> bytes:
    """The bytes that get signed: RFC 8785 (JCS); ValueError for what JCS cannot write (NaN, infinities,
    integers beyond ±(2**53 - 1), keys that are not strings)."""
    return rfc8785.dumps(obj)  # its CanonicalizationError is a ValueError


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PKCS#8 PEM Ed25519 private key; ConfigError naming the file otherwise."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"signing key {path}: cannot read an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a SubjectPublicKeyInfo PEM Ed25519 public key; ConfigError naming the file otherwise."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"trusted key {path}: cannot read a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"trusted key {path}: not an Ed25519 key ({type(key).__name__})")
    return key


def write_secret(path: Path, data: bytes) -> None:
    """Write a private key atomically, mode 0600 from the first byte, also over an existing file with
    wider permissions (a missing directory is made 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, data, mode=0o600)


def write_keypair(prefix: Path, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Create ``PREFIX.key`` (mode 0600) and ``PREFIX.pub`` (and a missing directory, mode 0700);
    returns both paths and the key id."""
    prefix = Path(prefix)
    private_path = prefix.with_name(prefix.name + ".key")
    public_path = prefix.with_name(prefix.name + ".pub")
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise ConfigError(f"{path} exists; refusing to overwrite a key (use --force)")
    key = generate_key()
    write_secret(private_path, private_key_pem(key))
    atomic_write(public_path, public_key_pem(key.public_key()))
    return private_path, public_path, key_id(key.public_key())


def sign(key: Ed25519PrivateKey, payload: Any) -> tuple[str, str]:
    """Sign ``payload``'s canonical JSON; returns (key id, standard base64 signature)."""
    signature = key.sign(canonical_json(payload))
    return key_id(key.public_key()), base64.b64encode(signature).decode("ascii")


def verify(public_key: Ed25519PublicKey, payload: Any, signature_b64: str) -> bool:
    """Whether ``signature_b64`` signs ``payload``'s canonical JSON with ``public_key``."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public_key.verify(signature, canonical_json(payload))
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class TrustStore:
    """The public keys a device accepts releases from, by key id, and the key ids it no longer does.

    A revoked id wins over a trusted key with the same id, so revoking works even when the old
    public key file is still configured.
    """

    keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()

    @classmethod
    def from_files(cls, trusted: Iterable[Path], revoked: Iterable[str] = ()) -> TrustStore:
        keys = {}
        for path in trusted:
            public_key = load_public_key(path)
            keys[key_id(public_key)] = public_key
        bad = [r for r in revoked if not KEY_ID_PATTERN.match(r)]
        if bad:
            raise ConfigError(f"revoked key ids must be 16 lowercase hex digits: {bad}")
        return cls(keys, frozenset(revoked))

    def is_revoked(self, kid: str) -> bool:
        return kid in self.revoked

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        """The trusted key with this id; None when unknown or revoked."""
        return None if self.is_revoked(kid) else self.keys.get(kid)
