"""Client-side gRPC channels to KServe v2 servers: TLS with an optional device certificate (mutual TLS),
plaintext only to loopback, gRPC's own retry policy for calls that never reached the server, a
reconnect backoff capped at a second (``RECONNECT_OPTIONS``), and ``round_robin`` over every address
the target resolves to (a ``dns:///`` name of a headless Service: one subchannel per pod, calls
spread over them; a single address behaves as before)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from pydantic import Field, model_validator

from edgecloud.config import Section, cert_key_pair
from edgecloud.endpoint import parse_endpoint
from edgecloud.errors import ConfigError

# round_robin: gRPC's default (pick_first) would send every call down one connection to one replica.
# One quick retry of a call that never reached the server (UNAVAILABLE), within the caller's deadline.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [{
    "name": [{"service": "inference.GRPCInferenceService"}],
    "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


#: While a server is away, gRPC retries the connection after a backoff that starts at 1 s and grows
#: x1.6 up to 120 s: after a 100 s outage the next try can be half a minute off, and a cloud that is
#: back goes unreached that long. These keep tries at most about a second apart (±20 % jitter),
#: starting at 250 ms; a try that hangs (a silent network) is given up after 5 s (gRPC's "min
#: reconnect backoff" is the connect timeout), enough for a TLS handshake over a slow uplink.
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 1000),
                     ("grpc.min_reconnect_backoff_ms", 5000))


class ClientTLS(Section):
    """TLS to a server: its CA, and this client's certificate and key (its identity, for mutual TLS)."""

    ca: Path | None = Field(None, description="CA that signed the server's certificate (default: system)")
    cert: Path | None = Field(None, description="client certificate (PEM): the device identity")
    key: Path | None = Field(None, description="client private key (PEM)")
    server_name: str | None = Field(None, description="override the TLS name checked on the server")

    _pair = model_validator(mode="after")(cert_key_pair)


def open_channel(target: str, tls: ClientTLS | None = None, *, what: str = "target",
                 max_message_bytes: int = 64 << 20) -> grpc.Channel:
    """A channel to ``target`` (``HOST:PORT`` or ``dns:///HOST:PORT``); ConfigError (naming ``what``) for
    a bad target or plaintext off loopback."""
    try:
        endpoint = parse_endpoint(target, client=True)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
    options = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1),
               ("grpc.keepalive_time_ms", 30000), ("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes), *RECONNECT_OPTIONS]
    if tls is None:
        if not endpoint.is_loopback:
            raise ConfigError(f"{what} {target}: plaintext is only allowed on loopback; configure TLS")
        return grpc.insecure_channel(endpoint.grpc_target, options=options)
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes() if tls.ca else None,
            private_key=tls.key.read_bytes() if tls.key else None,
            certificate_chain=tls.cert.read_bytes() if tls.cert else None)
    except OSError as e:
        raise ConfigError(f"{what} TLS: cannot read {e.filename}: {e.strerror}") from None
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(endpoint.grpc_target, creds, options=options)


def read_token(token_file: Path) -> str:
    """The bearer token in ``token_file`` (never logged); ConfigError naming the file if unreadable."""
    try:
        return Path(token_file).read_text().strip()
    except OSError as e:
        raise ConfigError(f"token_file: cannot read {token_file}: {e.strerror}") from None


def bearer_metadata(token_file: Path | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token in ``token_file`` (read once); () without one."""
    if token_file is None:
        return ()
    return (("authorization", f"Bearer {read_token(token_file)}"),)
