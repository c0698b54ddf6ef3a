"""deploy/pilot (compose) and the agent's image, checked without a container engine: the files parse,
every file they mount or copy exists (or is one the pilot's README makes outside the checkout), and
ports and paths agree with the gateway's, Prometheus', Grafana's and the broker's configs."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import yaml

from cloud_gateway.config import GatewayConfig
from edgecloud.config import build, read_toml
from edgecloud.endpoint import parse_endpoint

ROOT = Path(__file__).resolve().parents[2]
PILOT = ROOT / "deploy" / "pilot"
COMPOSE = yaml.safe_load((PILOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
#: made by the README's set-up commands, outside the checkout
OUTSIDE = re.compile(r"^\$\{EDGECLOUD_PILOT:\?[^}]*\}/(.+)$")


def mounts(service: str) -> dict[PurePosixPath, str]:
    """Bind mounts of ``service``: container path -> host source, as written."""
    out = {}
    for volume in SERVICES[service]["volumes"]:
        source, target = volume.split(":")[:2] if not volume.startswith("${") else _split_var(volume)
        out[PurePosixPath(target)] = source
    return out


def _split_var(volume: str) -> tuple[str, str]:
    end = volume.index("}") + 1
    rest = volume[end:].split(":")
    return volume[:end] + rest[0], rest[1]


def host_file(service: str, target: str) -> Path:
    return PILOT / mounts(service)[PurePosixPath(target)]


def gateway_config() -> GatewayConfig:
    path = host_file("gateway", "/etc/cloud-gateway/gateway.toml")
    return build(GatewayConfig, read_toml(path), str(path))


def published(service: str) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for spec in SERVICES[service].get("ports", []):
        *host, container = str(spec).split(":")
        out[int(container)] = int(host[-1]) if host else int(container)
    return out


def mosquitto_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in host_file("mosquitto", "/etc/mosquitto/mosquitto.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings.setdefault(key, []).append(value.strip())
    return settings


def test_the_pilot_runs_gateway_broker_prometheus_and_grafana():
    assert set(SERVICES) == {"gateway", "mosquitto", "prometheus", "grafana"}
    build_spec = SERVICES["gateway"]["build"]
    assert (PILOT / build_spec["context"] / build_spec["dockerfile"]).is_file()


def test_every_mounted_file_exists_or_is_made_outside_the_checkout():
    readme = (PILOT / "README.md").read_text().replace("$P/", "$EDGECLOUD_PILOT/pki/")  # P=… there
    named = set(COMPOSE["volumes"])
    for service in SERVICES:
        for target, source in mounts(service).items():
            outside = OUTSIDE.match(source)
            if outside:
                assert f"$EDGECLOUD_PILOT/{outside[1]}" in readme, (service, source)  # the README makes it
            elif source.startswith("."):
                assert (PILOT / source).exists(), (service, source)
            else:
                assert source in named, (service, source, target)


def test_gateway_ports_and_paths_agree_with_its_config():
    config = gateway_config()
    grpc_port = parse_endpoint(config.gateway.listen).port
    assert grpc_port in published("gateway")  # devices dial it
    health = parse_endpoint(config.health.listen).port
    assert health not in published("gateway") and metrics_port(config) not in published("gateway")
    assert f"127.0.0.1:{health}" in " ".join(SERVICES["gateway"]["healthcheck"]["test"])
    tls_mount = next(t for t in mounts("gateway") if str(t) == "/etc/cloud-gateway/tls")
    for path in (config.tls.cert, config.tls.key, config.tls.client_ca, config.collector.mqtt.tls.ca):
        assert PurePosixPath(path).parent == tls_mount
    assert PurePosixPath(config.gateway.model_repository) in mounts("gateway")
    assert (PILOT / mounts("gateway")[PurePosixPath(config.gateway.model_repository)]).is_dir()
    store = PurePosixPath(config.store.path).parent
    assert mounts("gateway")[store] in COMPOSE["volumes"]  # the store survives the container


def metrics_port(config: GatewayConfig) -> int:
    return parse_endpoint(config.metrics.listen).port


def test_prometheus_scrapes_the_gateway_and_grafana_reads_prometheus():
    config = gateway_config()
    scrape = yaml.safe_load(host_file("prometheus", "/etc/prometheus/prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"gateway:{metrics_port(config)}"]
    sources = yaml.safe_load(host_file("grafana", "/etc/grafana/provisioning/datasources/edgecloud.yaml")
                             .read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert 9090 in published("prometheus")  # Prometheus' own port


def test_broker_port_and_files_agree_with_mosquitto_conf_and_the_collector():
    settings = mosquitto_settings()
    (listener,) = settings["listener"]
    assert int(listener) in published("mosquitto")
    config = gateway_config()
    assert (config.collector.mqtt.host, config.collector.mqtt.port) == ("mosquitto", int(listener))
    assert config.collector.fleet and config.metrics.listen  # the collector's figures are scraped
    targets = mounts("mosquitto")
    for key in ("password_file", "acl_file", "cafile", "certfile", "keyfile"):
        (path,) = settings[key]
        assert any(PurePosixPath(path) == t or PurePosixPath(path).parent == t for t in targets), key
    (persistence,) = settings["persistence_location"]
    assert targets[PurePosixPath(persistence.rstrip("/"))] in COMPOSE["volumes"]


# -- the agent's image --------------------------------------------------------------------------------
AGENT_IMAGE = ROOT / "deploy" / "jetson" / "Containerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [(line.split()[0], line.split(maxsplit=1)[1]) for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def test_agent_image_builds_on_l4t_and_keeps_jetpacks_tensorrt():
    steps = instructions(AGENT_IMAGE)
    kinds = [kind for kind, _ in steps]
    assert kinds[:2] == ["ARG", "FROM"] and steps[1][1] == "${L4T_BASE}"
    assert "r36" in steps[0][1]  # JetPack 6 (L4T R36): TensorRT 10.3, Python 3.10
    run = " ".join(args for kind, args in steps if kind == "RUN")
    assert "venv --system-site-packages" in run  # sees the base image's TensorRT
    assert not re.search(r"pip install[^&]*\btensorrt\b", run)  # never PyPI's TensorRT
    assert "-c constraints.txt" in run and '".[jetson]"' in run and "numpy<2" in run
    for kind, args in steps:
        if kind == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
    assert "USER" in kinds and dict(steps)["USER"] != "0"
    assert dict(steps)["ENTRYPOINT"] == '["edge-agent"]'
    assert dict(steps)["CMD"] == '["--config", "/etc/edge-agent/agent.toml"]'  # install.sh's path
