"""deploy/cloud checked structurally (no container engine or cluster here): parse, required fields,
and the pieces agree with each other."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "cloud"


def _docs():
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_gateway_has_grpc_health_probes_and_volumes():
    docs = _docs()
    gateway = docs[("StatefulSet", "cloud-gateway")]
    spec = gateway["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert container["livenessProbe"]["grpc"]["port"] == ports["grpc"]
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


def test_service_and_hpa_point_at_the_gateway():
    docs = _docs()
    gateway = docs[("StatefulSet", "cloud-gateway")]
    service = docs[("Service", "cloud-gateway")]
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["clusterIP"] == "None"  # per-call gRPC balancing across replicas
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["appProtocol"] == "grpc"
    hpa = docs[("HorizontalPodAutoscaler", "cloud-gateway")]
    assert gateway["spec"]["serviceName"] == service["metadata"]["name"]
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
