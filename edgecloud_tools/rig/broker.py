"""A throwaway mosquitto on a free loopback port with a generated config, for the demo and the tests.

Production brokers are configured by hand (deploy/cloud/mosquitto.conf); this one exists so that a
fresh clone can show and test the fleet path with nothing but Debian's ``mosquitto`` package.

Traps handled: the generated config says ``user root`` so mosquitto started as root does not drop to
the ``mosquitto`` user and lose access to its temporary files (the option is ignored when not root);
Debian puts the binary in /usr/sbin, outside a normal user's PATH; a listener needs
``allow_anonymous true`` for anonymous clients since mosquitto 2.0. Persistence is on, so
``restart()`` keeps retained messages and persistent sessions.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecloud.config import build
from edgecloud.endpoint import free_loopback_port
from edgecloud.mqtt.client import MqttConfig

HOST = "127.0.0.1"
MOSQUITTO_ENV = "EDGECLOUD_MOSQUITTO"
INSTALL_HINT = "apt-get install -y mosquitto (Debian puts it in /usr/sbin)"


def mosquitto_path() -> str | None:
    """The mosquitto binary: ``$EDGECLOUD_MOSQUITTO`` when set, else looked for on PATH and where
    Debian installs it; None when absent."""
    if MOSQUITTO_ENV in os.environ:
        named = os.environ[MOSQUITTO_ENV]
        return named if os.access(named, os.X_OK) else None
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
class BrokerTLS:
    """The broker's TLS listener: the CA clients trust, and the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path


class LocalBroker:
    """One mosquitto process on ``HOST``; a context manager that starts and stops it."""

    def __init__(self, workdir: Path, *, users: Mapping[str, str] | None = None,
                 tls: BrokerTLS | None = None, acl_file: Path | None = None) -> None:
        """``users``: name → password (no anonymous clients then); ``acl_file``: mosquitto's
        ``acl_file``, what each user may read and write."""
        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError(f"mosquitto is not installed: {INSTALL_HINT}")
        self.exe = exe
        self.workdir = Path(workdir)
        self.users = dict(users or {})
        self.tls = tls
        self.acl_file = acl_file
        self.host = HOST
        self.port = free_loopback_port()
        self.log_path = self.workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir.mkdir(parents=True, exist_ok=True)
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
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 5.0) -> LocalBroker:
        """Start mosquitto and return once its port accepts connections."""
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
        raise RuntimeError(f"mosquitto did not listen on {self.endpoint} within {timeout}s:\n{self.log()}")

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

    def restart(self) -> LocalBroker:
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

    def mqtt_section(self, **overrides: Any) -> dict[str, Any]:
        """An ``[mqtt]`` section for this broker with fast reconnects (loopback: no reason to wait long)."""
        data: dict[str, Any] = {"host": HOST, "port": self.port, "reconnect_min_delay_s": 0.1,
                                "reconnect_max_delay_s": 0.5, "connect_timeout_s": 2.0, "keepalive_s": 5}
        if self.tls:
            data["tls"] = {"ca": str(self.tls.ca)}
        return {**data, **overrides}

    def mqtt_config(self, **overrides: Any) -> MqttConfig:
        return build(MqttConfig, self.mqtt_section(**overrides))

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
