"""``--listen`` / ``--cloud`` addresses: ``HOST:PORT``, ``[v6]:PORT`` or ``unix:/path``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed address; ``grpc_target`` is what grpc's server and channel APIs take."""

    host: str
    port: int = 0
    unix_path: str = ""

    @property
    def grpc_target(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Unix sockets and loopback addresses: the only places plaintext is allowed."""
        if self.unix_path or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.grpc_target


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``HOST:PORT``, ``[v6]:PORT`` or ``unix:/path``; ValueError with the reason otherwise."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: a unix socket path must be absolute (unix:/run/x.sock)")
        return Endpoint(host="", unix_path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected HOST:PORT or unix:/path")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return Endpoint(host=host, port=int(port))


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for demos and tests that start services)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
