"""A real mosquitto for tests, on a free loopback port with a generated config.

Use it as a pytest plugin (``pytest_plugins = ("tests.broker",)``): fixtures ``broker`` (anonymous),
``broker_factory`` (password file and/or TLS listener) and ``tls_files`` (a CA, a server certificate
for 127.0.0.1/localhost, and an unrelated CA). Persistence is on, so ``restart()`` keeps retained
messages and persistent sessions. Tests skip with the reason when mosquitto is not installed.

Traps handled (see TESTING notes): the generated config says ``user root`` so mosquitto started as
root does not drop to the ``mosquitto`` user and lose access to the temporary files; Debian puts the
binary in /usr/sbin; a listener needs ``allow_anonymous true`` for anonymous clients since 2.0.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgecloud.config import build
from edgecloud.mqtt.client import MqttConfig
from tests.support.net import free_port

HOST = "127.0.0.1"


def mosquitto_path() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def password_line(username: str, password: str) -> str:
    """A mosquitto 2 password file line (``$7$``: PBKDF2-SHA512, 101 rounds), as mosquitto_passwd writes."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"{username}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path
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


class Broker:
    """One mosquitto process; ``restart()`` brings it back on the same port with its persisted state."""

    def __init__(self, workdir: Path, *, users: Mapping[str, str] | None = None,
                 tls: TLSFiles | None = None) -> None:
        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError("mosquitto is not installed")
        self.exe = exe
        self.workdir = workdir
        self.users = dict(users or {})
        self.tls = tls
        self.host = HOST
        self.port = free_port()
        self.log_path = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self._write_config()

    def _write_config(self) -> Path:
        lines = ["user root", "persistence true", f"persistence_location {self.workdir}/",
                 "log_dest stderr", "log_type error", "log_type warning", "log_type notice",
                 "log_type information", f"listener {self.port} {HOST}",
                 f"allow_anonymous {'false' if self.users else 'true'}"]
        if self.users:
            password_file = self.workdir / "passwords"
            password_file.write_text("".join(password_line(u, p) + "\n" for u, p in self.users.items()))
            lines.append(f"password_file {password_file}")
        if self.tls:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 5.0) -> Broker:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps writing to it)
        self.process = subprocess.Popen([self.exe, "-c", str(self.config_path)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {HOST}:{self.port} within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        """Graceful stop (SIGTERM): mosquitto saves its persistence file first."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def restart(self) -> Broker:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the socket stays open but nothing is acknowledged."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def mqtt_config(self, **overrides: Any) -> MqttConfig:
        """A client config for this broker with fast reconnects (tests wait on state, not sleeps)."""
        data: dict[str, Any] = {"host": HOST, "port": self.port, "reconnect_min_delay_s": 0.1,
                                "reconnect_max_delay_s": 0.5, "connect_timeout_s": 2.0, "keepalive_s": 5}
        if self.tls:
            data["tls"] = {"ca": str(self.tls.ca)}
        data.update(overrides)
        return build(MqttConfig, data)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start brokers with ``users={name: password}`` and/or ``tls=TLSFiles``; all stopped at teardown."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed: apt-get install -y mosquitto (lands in /usr/sbin)")
    started: list[Broker] = []

    def start(**kwargs: Any) -> Broker:
        broker = Broker(tmp_path / f"broker{len(started)}", **kwargs).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """An anonymous mosquitto of this test's own (no retained messages from other tests)."""
    return broker_factory()


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path / "tls")
