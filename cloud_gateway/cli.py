"""``cloud-gateway``: serve a model repository over KServe v2 and keep the hard examples devices send;
``cloud-gateway collect`` only collects a fleet's telemetry into per-device Prometheus metrics.

Flags override ``--config FILE`` (TOML sections ``[gateway]``, ``[store]``, ``[tls]``, ``[auth]``,
``[model_defaults]``, ``[collector]``, ``[metrics]``). The default listen address is 127.0.0.1:9001,
loopback so that a gateway without TLS is never exposed by accident. Exit codes: 0 stopped cleanly
(SIGTERM/SIGINT), 2 bad usage or configuration (the message names the key), 1 any other failure,
e.g. a model that does not load.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from cloud_gateway.config import DEFAULT_LISTEN, GatewayConfig
from cloud_gateway.metrics import GatewayMetrics
from cloud_gateway.server import Gateway
from edgecloud import __version__
from edgecloud.config import build, file_and_flags, host_port, merge
from edgecloud.errors import EdgecloudError, exit_status
from edgecloud.logs import setup_logging

# flag dest → (section, key) in the TOML file
FLAG_KEYS = {
    "model_repository": ("gateway", "model_repository"), "listen": ("gateway", "listen"),
    "added_latency_ms": ("gateway", "added_latency_ms"), "store": ("store", "path"),
    "tls_cert": ("tls", "cert"), "tls_key": ("tls", "key"), "tls_client_ca": ("tls", "client_ca"),
    "tokens_file": ("auth", "tokens_file"), "collect_fleet": ("collector", "fleet"),
    "metrics_listen": ("metrics", "listen"), "rest_listen": ("rest", "listen"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cloud-gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"cloud-gateway {__version__}")
    p.add_argument("mode", nargs="?", choices=("serve", "collect"), default="serve",
                   help="serve models (default; collects too when a fleet is given) or only collect")
    p.add_argument("--config", type=Path, help="TOML config file (e.g. /etc/cloud-gateway/gateway.toml)")
    p.add_argument("--model-repository", help="directory in Triton's layout <name>/<version>/model.onnx")
    p.add_argument("--listen", help=f"HOST:PORT or unix:/path (default {DEFAULT_LISTEN})")
    p.add_argument("--store", help="hard-example store (SQLite file)")
    p.add_argument("--added-latency-ms", type=float, help="sleep before each answer (emulated WAN)")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA of device certificates: requires mutual TLS")
    p.add_argument("--tokens-file", help="bearer tokens: lines of '<sha256 hex> <device id>'")
    p.add_argument("--collect-mqtt", help="HOST:PORT of the fleet's MQTT broker, for the collector")
    p.add_argument("--collect-fleet", help="fleet whose devices' status and telemetry become metrics")
    p.add_argument("--metrics-listen", help="HOST:PORT of the Prometheus /metrics endpoint (default off)")
    p.add_argument("--rest-listen", help="HOST:PORT or unix:/path of KServe v2 REST (default off), with "
                   "the gRPC port's TLS and client authentication")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING…")
    p.add_argument("--log-format", choices=("kv", "json"), default="kv")
    return p


def load_config(args: argparse.Namespace) -> GatewayConfig:
    """Config file merged under the flags, validated; errors name the key."""
    data, overrides = file_and_flags(args, FLAG_KEYS)
    if args.collect_mqtt:
        overrides.setdefault("collector", {})["mqtt"] = host_port("--collect-mqtt", args.collect_mqtt)
    return build(GatewayConfig, merge(data, overrides), str(args.config or "flags"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config(args)
        service: Gateway | GatewayMetrics
        if args.mode == "collect":
            service = GatewayMetrics(config).start()
            print(f"cloud-gateway: collecting fleet {config.collector.fleet}, "
                  f"/metrics on port {service.port}", flush=True)
        else:
            service = Gateway(config).start()
            print(f"cloud-gateway: serving {', '.join(service.repository.names)} on port {service.port}",
                  flush=True)
    except EdgecloudError as e:
        return exit_status("cloud-gateway", e)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
