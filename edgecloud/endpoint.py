"""``--listen`` / ``--cloud`` addresses: ``HOST:PORT``, ``[v6]:PORT`` or ``unix:/path``; a client's target
may also be ``dns:///HOST:PORT`` (or ``dns://DNS-SERVER/HOST:PORT``): gRPC then resolves every address of
the name and the channel's ``round_robin`` spreads calls over them, e.g. every pod behind a headless
Kubernetes Service (docs/design.md §5)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed address; ``grpc_target`` is what grpc's server and channel APIs take."""

    host: str
    port: int = 0
    unix_path: str = ""
    #: ``dns:///`` or ``dns://DNS-SERVER/`` when a client target names its resolver, else ""
    resolver: str = ""

    @property
    def grpc_target(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.resolver}{host}:{self.port}"

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


def parse_endpoint(text: str, *, client: bool = False) -> Endpoint:
    """Parse ``HOST:PORT``, ``[v6]:PORT`` or ``unix:/path`` (and, with ``client``, those targets behind
    ``dns://[DNS-SERVER]/``); ValueError with the reason otherwise."""
    if text.startswith("dns:"):
        if not client:
            raise ValueError(f"{text!r}: a dns: target names servers to call, not an address to listen on")
        rest = text[len("dns:"):]
        if not rest.startswith("//") or "/" not in rest[2:]:
            raise ValueError(f"{text!r}: expected dns:///HOST:PORT or dns://DNS-SERVER/HOST:PORT")
        authority, _, address = rest[2:].partition("/")
        inner = parse_endpoint(address)
        if inner.unix_path:
            raise ValueError(f"{text!r}: a unix socket is not resolved by DNS")
        return Endpoint(inner.host, inner.port, resolver=f"dns://{authority}/")
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
