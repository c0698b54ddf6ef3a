"""deploy/cloud checked without a container engine or cluster: every manifest validates against the
Kubernetes schemas (kubernetes-validate, strict), and the pieces agree with each other and with the
gateway's own config rules (the ConfigMap's gateway.toml is loaded as the gateway loads it)."""

from __future__ import annotations

import queue
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from cloud_gateway.config import GatewayConfig
from edgecloud.config import build, read_toml
from edgecloud.endpoint import parse_endpoint
from edgecloud.mqtt.client import Message, MqttClient, MqttError
from edgecloud.mqtt.topics import FleetTopics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "cloud"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


def _docs():
    docs = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _container(docs) -> dict:
    (container,) = docs[("StatefulSet", "cloud-gateway")]["spec"]["template"]["spec"]["containers"]
    return container


def _gateway_toml(docs, tmp_path: Path) -> GatewayConfig:
    """The ConfigMap's gateway.toml, validated by the gateway's own config model."""
    path = tmp_path / "gateway.toml"
    path.write_text(docs[("ConfigMap", "cloud-gateway-config")]["data"]["gateway.toml"])
    return build(GatewayConfig, read_toml(path), str(path))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path: Path):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_probes_dial_the_plaintext_health_port_of_the_configmap(tmp_path):
    docs = _docs()
    container = _container(docs)
    config = _gateway_toml(docs, tmp_path)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert parse_endpoint(config.gateway.listen).port == ports["grpc"]
    assert parse_endpoint(config.health.listen).port == ports["health"] != ports["grpc"]
    assert parse_endpoint(config.metrics.listen).port == ports["metrics"]
    assert config.tls.cert is not None and config.tls.client_ca is not None  # TLS on the inference port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe  # kubelet's probes are plaintext


def test_configmap_paths_are_the_pods_mounts_and_the_secrets_keys(tmp_path):
    docs = _docs()
    container = _container(docs)
    config = _gateway_toml(docs, tmp_path)
    pod = docs[("StatefulSet", "cloud-gateway")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: PurePosixPath(m["mountPath"]) for m in container["volumeMounts"]}
    assert volumes["config"]["configMap"]["name"] == "cloud-gateway-config"
    args = container["args"]
    assert mounts["config"] / "gateway.toml" == PurePosixPath(args[args.index("--config") + 1])
    secret = docs[("Secret", volumes["tls"]["secret"]["secretName"])]
    for path in map(PurePosixPath, (config.tls.cert, config.tls.key, config.tls.client_ca)):
        assert path.parent == mounts["tls"] and path.name in secret["stringData"]
    assert PurePosixPath(config.gateway.model_repository) == mounts["models"]
    assert PurePosixPath(config.store.path).parent == mounts["store"]


def test_gateway_volumes_and_security():
    docs = _docs()
    gateway = docs[("StatefulSet", "cloud-gateway")]
    spec = gateway["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    per_replica = {t["metadata"]["name"] for t in gateway["spec"]["volumeClaimTemplates"]}
    assert set(mounts) <= set(volumes) | per_replica
    assert per_replica == {"store"}  # each replica its own SQLite store, never a shared file
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values()
              if "persistentVolumeClaim" in v}
    assert {("PersistentVolumeClaim", c) for c in claims} <= set(docs)
    assert mounts["models"] == "/models" and mounts["store"] == "/var/lib/edgecloud"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert gateway["spec"]["selector"]["matchLabels"].items() <= (
        gateway["spec"]["template"]["metadata"]["labels"].items())


def test_services_reach_the_gateway_inside_and_outside_the_cluster():
    docs = _docs()
    gateway = docs[("StatefulSet", "cloud-gateway")]
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in _container(docs)["ports"]}
    headless = docs[("Service", "cloud-gateway")]
    external = docs[("Service", "cloud-gateway-external")]
    for service in (headless, external):
        assert service["spec"]["selector"].items() <= labels.items()
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
        assert "health" not in {p["targetPort"] for p in service["spec"]["ports"]}  # probes only
    assert headless["spec"]["clusterIP"] == "None"  # one address per pod: round_robin over dns:///
    assert gateway["spec"]["serviceName"] == headless["metadata"]["name"]
    assert external["spec"]["type"] == "LoadBalancer"  # layer 4: mutual TLS ends at the gateway
    (grpc_port,) = external["spec"]["ports"]
    assert grpc_port["targetPort"] == "grpc" and grpc_port["appProtocol"] == "grpc"


def test_hpa_points_at_the_gateway():
    docs = _docs()
    hpa = docs[("HorizontalPodAutoscaler", "cloud-gateway")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": "cloud-gateway"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_containerfile_runs_the_gateway_unprivileged():
    text = (DEPLOY / "Containerfile").read_text()
    lines = [line.split()[0] for line in text.splitlines() if line and not line.startswith("#")
             and line.split()[0].isupper()]
    assert lines[0] == "FROM" and "USER" in lines and "ENTRYPOINT" in lines
    assert 'ENTRYPOINT ["cloud-gateway"]' in text
    assert "constraints.txt" in text  # the image uses the pinned versions
    exposed = {int(port) for line in text.splitlines() if line.startswith("EXPOSE")
               for port in line.split()[1:]}
    assert {p["containerPort"] for p in _container(_docs())["ports"]} == exposed


def test_production_mosquitto_conf_is_tls_passwords_persistence():
    settings = {}
    for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings.setdefault(key, []).append(value.strip())
    assert settings["allow_anonymous"] == ["false"]
    assert settings["listener"] == ["8883"]
    assert {"cafile", "certfile", "keyfile", "password_file"} <= set(settings)
    assert settings["persistence"] == ["true"]


def test_the_acl_lets_a_device_read_every_release_desired_for_it_and_set_none(broker_factory) -> None:
    """deploy/cloud/acl.example on a real mosquitto: a device writes its own status, telemetry, events
    and reports, reads its own and its group's desired topics, shared and per model, reads no other
    device's, and cannot write a release for itself."""
    users = {"press-7": "device-secret", "operator": "operator-secret"}
    broker = broker_factory(users=users, acl_file=DEPLOY / "acl.example")
    topics = FleetTopics("plant-1")
    desired = [topics.device_desired("press-7", "weld"), topics.device_desired("press-7"),
               topics.group_desired("line-1", "weld"), topics.group_desired("line-1")]
    others = topics.device_desired("press-8", "weld")
    with MqttClient(broker.mqtt_config(username="operator", password=users["operator"])) as operator:
        operator.wait_connected(5)
        for i, topic in enumerate([*desired, others]):
            operator.publish(topic, f"release {i}".encode(), qos=1, retain=True, timeout=5)
    inbox: queue.Queue[Message] = queue.Queue()
    config = broker.mqtt_config(username="press-7", password=users["press-7"])
    with MqttClient(config, on_message=inbox.put) as device:
        device.wait_connected(5)
        for topic in [*desired, others]:
            device.subscribe(topic)
        for topic in (topics.status("press-7"), topics.telemetry("press-7"), topics.events("press-7"),
                      topics.reported("press-7"), topics.reported("press-7", "weld")):
            device.publish(topic, b"{}", qos=1, timeout=5)  # acknowledged: the broker took it
        with pytest.raises(MqttError, match="refused by broker: Not authorized"):
            device.publish(desired[0], b"set by the device itself", qos=1, retain=True, timeout=5)
        received: dict[str, list[bytes]] = {}
        while len(received) <= len(desired):  # the retained ones, and one it should not get
            try:
                message = inbox.get(timeout=1.5)
            except queue.Empty:
                break
            received.setdefault(message.topic, []).append(message.payload)
    assert received == {str(topic): [f"release {i}".encode()] for i, topic in enumerate(desired)}
