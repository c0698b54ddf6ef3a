"""A real mosquitto for tests (``edgecloud.broker``), with fixtures and generated certificates.

Use it as a pytest plugin (``pytest_plugins = ("tests.broker",)``): fixtures ``broker`` (anonymous),
``broker_factory`` (password file and/or TLS listener) and ``tls_files`` (a CA, a server certificate
for 127.0.0.1/localhost, and an unrelated CA). Persistence is on, so ``restart()`` keeps retained
messages and persistent sessions. Tests skip with the reason when mosquitto is not installed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgecloud.broker import HOST, INSTALL_HINT, BrokerTLS, LocalBroker, mosquitto_path


@dataclass(frozen=True)
class TLSFiles(BrokerTLS):
    other_ca: Path  # a CA that did not sign the broker's certificate


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _ca(name: str, directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_tls_files(directory: Path) -> TLSFiles:
    """A test CA, a server certificate for 127.0.0.1 and localhost signed by it, and another CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, ca_path = _ca("test-ca", directory)
    _, _, other_path = _ca("other-ca", directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address(HOST))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return TLSFiles(ca_path, cert_path, key_path, other_path)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., LocalBroker]]:
    """Start brokers with ``users={name: password}`` and/or ``tls=TLSFiles``; all stopped at teardown."""
    if mosquitto_path() is None:
        pytest.skip(f"mosquitto is not installed: {INSTALL_HINT}")
    started: list[LocalBroker] = []

    def start(**kwargs: Any) -> LocalBroker:
        broker = LocalBroker(tmp_path / f"broker{len(started)}", **kwargs).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., LocalBroker]) -> LocalBroker:
    """An anonymous mosquitto of this test's own (no retained messages from other tests)."""
    return broker_factory()


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path / "tls")
