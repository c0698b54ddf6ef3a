"""``edge-agent``: run the edge agent. Flags override ``--config FILE`` (TOML)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from edge_agent import systemd
from edge_agent.app import EdgeAgent
from edge_agent.config import AgentConfig
from edgecloud import __version__
from edgecloud.config import build, file_and_flags, host_port, merge
from edgecloud.errors import ConfigError, EdgecloudError, exit_status
from edgecloud.logs import setup_logging

log = logging.getLogger("edge_agent")

# flag dest → (section, key) in the TOML file
FLAG_KEYS = {
    "device_id": ("agent", "device_id"), "listen": ("agent", "listen"), "state_dir": ("agent", "state_dir"),
    "model": ("model", "path"), "name": ("model", "name"), "backend": ("model", "backend"),
    "policy": ("cascade", "policy"), "threshold": ("cascade", "threshold"),
    "temperature": ("cascade", "temperature"), "score_output": ("cascade", "score_output"),
    "scores": ("cascade", "scores"), "audit_rate": ("cascade", "audit_rate"),
    "cloud": ("cloud", "target"), "cloud_model": ("cloud", "model"), "deadline_ms": ("cloud", "deadline_ms"),
    "max_per_s": ("cloud", "max_per_s"), "fleet": ("fleet", "name"), "group": ("fleet", "group"),
    "trusted_key": ("fleet", "trusted_keys"), "metrics_listen": ("metrics", "listen"),
    "rest_listen": ("rest", "listen"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    p.add_argument("--config", type=Path, help="TOML config file (e.g. /etc/edge-agent/agent.toml)")
    p.add_argument("--model", help="edge model file (.onnx; .plan/.engine on Jetson)")
    p.add_argument("--name", help="name the model is served under")
    p.add_argument("--backend", help="backend key (default: by file suffix)")
    p.add_argument("--listen", help="HOST:PORT or unix:/path (default 127.0.0.1:8001)")
    p.add_argument("--device-id", help="this device's id")
    p.add_argument("--state-dir", help="spool and update state (default /var/lib/edge-agent)")
    p.add_argument("--cloud", help="HOST:PORT of the cloud KServe v2 server")
    p.add_argument("--cloud-model", help="model name at the cloud (default: the edge model's name)")
    p.add_argument("--policy", help="max_prob | margin | entropy | package.module:function")
    p.add_argument("--threshold", type=float, help="escalate rows whose confidence is below this")
    p.add_argument("--temperature", type=float, help="softmax temperature for calibration")
    p.add_argument("--score-output", help="output holding the class scores")
    p.add_argument("--scores", choices=("logits", "probabilities"), help="what the score output holds")
    p.add_argument("--deadline-ms", type=int, help="per-call deadline for escalations (default 300)")
    p.add_argument("--max-per-s", type=float, help="escalation rate limit, rows per second")
    p.add_argument("--audit-rate", type=float, help="share of confident rows also sent to the cloud, inside "
                   "the escalation rate limit (default 0.02; 0 turns audits off)")
    p.add_argument("--mqtt", help="HOST:PORT of the fleet's MQTT broker")
    p.add_argument("--fleet", help="fleet id (enables MQTT: status, updates, telemetry)")
    p.add_argument("--group", help="group whose releases this device follows")
    p.add_argument("--trusted-key", action="append", help="public key (PEM) releases may be signed with; "
                   "repeat for several")
    p.add_argument("--metrics-listen", help="HOST:PORT of the Prometheus /metrics endpoint")
    p.add_argument("--rest-listen", help="HOST:PORT or unix:/path of KServe v2 REST (default off; "
                   "e.g. 127.0.0.1:8000)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING…")
    p.add_argument("--log-format", choices=("kv", "json"), default="kv")
    return p


def load_config(args: argparse.Namespace) -> AgentConfig:
    """Config file merged under the flags, validated; errors name the key. The layers below, release
    and model card, come in when a model is loaded (``edge_agent/serving/settings.py``)."""
    data, overrides = file_and_flags(args, FLAG_KEYS)
    if args.mqtt:
        overrides["mqtt"] = host_port("--mqtt", args.mqtt)
    config = build(AgentConfig, merge(data, overrides), str(args.config or "flags"))
    if config.model.path is None and not config.models:
        raise ConfigError("model.path: no model given (--model, [model] path or [models.<name>] tables)")
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config(args)
        agent = EdgeAgent(config).start()
    except EdgecloudError as e:
        return exit_status("edge-agent", e)
    return serve(agent, args)


def serve(agent: EdgeAgent, args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT under systemd's notify protocol (a no-op outside systemd)."""
    done = threading.Event()

    def on_hup(*_):
        systemd.notify("RELOADING=1", "STATUS=reloading [cascade]")
        try:
            agent.reload_cascade(load_config(args))
            log.info("event=config_reloaded")
        except EdgecloudError as e:
            log.error("event=config_reload_failed error=%r", str(e))
        systemd.notify("READY=1", _status(agent))

    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGHUP, on_hup)
    watchdog = probe = None
    interval = systemd.watchdog_interval()
    if interval:
        # pings are earned by real inferences through the first served model (re-read after each swap)
        probe = systemd.InferenceProbe(lambda: agent.primary.slot.model.backend.warmup(1),
                                       period_s=min(5.0, interval / 6)).start()
        watchdog = systemd.Watchdog(interval, probe.progress).start()
    systemd.notify("READY=1", _status(agent))  # after load and warm-up: start() returned
    served = ", ".join(unit.name for unit in agent.units if unit.slot)
    print(f"edge-agent: serving {served} on port {agent.port}", flush=True)
    done.wait()
    systemd.notify("STOPPING=1", "STATUS=draining in-flight calls")
    for part in (watchdog, probe):
        if part:
            part.stop()
    agent.stop()
    return 0


def _status(agent: EdgeAgent) -> str:
    served = ", ".join(f"{unit.name} version {unit.version()}" for unit in agent.units if unit.slot)
    return f"STATUS=serving {served} on {agent.config.agent.listen}"


if __name__ == "__main__":
    sys.exit(main())
