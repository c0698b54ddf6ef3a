"""deploy/monitoring: the Prometheus alert rules pass ``promtool check rules`` and fire on the series
they are meant for (``promtool test rules``), and every metric the rules and the Grafana dashboard
query is one the agent, the gateway or the fleet collector really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cloud_gateway import Gateway, gateway_config
from cloud_gateway.collector import FleetCollector
from edge_agent.serving.quality import Quality
from edge_agent.serving.stats import CallRecord, Stats
from edgecloud.config import build
from edgecloud.mqtt.client import Message, MqttConfig
from edgecloud.mqtt.payloads import Status
from edgecloud.mqtt.topics import FleetTopics
from tests.support.fleet import Scrape
from tests.support.onnx_models import linear_classifier
from tests.support.services import Client, start_agent

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRIC = re.compile(r"\bedgecloud_[a-z0-9_]+")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: the "
                                    "prometheus package); the rules' names are still checked below")


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", ())]


@needs_promtool
def test_promtool_accepts_the_rules():
    proc = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_the_rules_fire_on_the_series_they_watch(tmp_path):
    labels = 'fleet="plant-a", device="press-7"'
    edge_fast = "_bucket{%s, path=\"edge\", le=\"%s\"}"
    agreement = ('edgecloud_device_model_agreement_rows_total{%s, model="clf", version="%s", reason="%s", '
                 'agree="%s"}')
    # per minute: version 3 agrees on 5 of 10 audits, version 2 on 19 of 20, version 4 on none, of too few
    audits = [{"series": agreement % (labels, version, reason, agree), "values": values}
              for version, reason, agree, values in (
                  ("3", "audit", "true", "0+5x30"), ("3", "audit", "false", "0+5x30"),
                  ("3", "escalated", "true", "0+0x30"), ("2", "audit", "true", "0+19x30"),
                  ("2", "audit", "false", "0+1x30"), ("4", "audit", "true", "0+0x30"),
                  ("4", "audit", "false", "0+1x30"))]
    low_agreement = {"exp_labels": {"severity": "critical", "fleet": "plant-a", "model": "clf",
                                    "version": "3"},
                     "exp_annotations": {
                         "summary": "Model clf v3: the cloud agrees with only 50% of its audited rows",
                         "description": _rule("EdgecloudAuditAgreementLow")["annotations"]["description"]}}
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": f"edgecloud_device_online{{{labels}}}", "values": "0x20"},
            {"series": "edgecloud_device_online{fleet=\"plant-a\", device=\"press-8\"}", "values": "1x20"},
            {"series": f"edgecloud_device_rows_total{{{labels}}}", "values": "0+100x30"},
            {"series": f"edgecloud_device_degraded_rows_total{{{labels}}}", "values": "0+20x30"},
            {"series": f"edgecloud_device_model_ready{{{labels}, model=\"weld\"}}", "values": "0x20"},
            {"series": f"edgecloud_device_model_ready{{{labels}, model=\"clf\"}}", "values": "1x20"},
            *({"series": "edgecloud_device_request_latency_seconds" + edge_fast % (labels, le), "values": v}
              for le, v in (("0.01", "0+0x30"), ("0.05", "0+0x30"), ("0.1", "0+50x30"), ("+Inf", "0+50x30"))),
            *audits,
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "EdgecloudDeviceOffline",
             "exp_alerts": [_alert("EdgecloudDeviceOffline", "press-7 of fleet plant-a is offline")]},
            {"eval_time": "3m", "alertname": "EdgecloudDeviceOffline", "exp_alerts": []},  # not yet 5 min
            {"eval_time": "25m", "alertname": "EdgecloudDegradedAnswers",
             "exp_alerts": [_alert("EdgecloudDegradedAnswers", "press-7: 20% of rows answered degraded")]},
            {"eval_time": "25m", "alertname": "EdgecloudEdgeLatencyHigh",
             "exp_alerts": [_alert("EdgecloudEdgeLatencyHigh", "press-7: p99 of edge answers is 99.5ms")]},
            {"eval_time": "25m", "alertname": "EdgecloudCircuitOpen", "exp_alerts": []},
            {"eval_time": "25m", "alertname": "EdgecloudAuditAgreementLow", "exp_alerts": [low_agreement]},
            {"eval_time": "8m", "alertname": "EdgecloudAuditAgreementLow", "exp_alerts": []},  # not 5 min yet
            {"eval_time": "10m", "alertname": "EdgecloudModelNotReady",
             "exp_alerts": [_alert("EdgecloudModelNotReady", "press-7: model weld is not serving",
                                   model="weld")]},
        ]}]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests))
    proc = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _rule(name: str) -> dict:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return next(r for g in groups for r in g["rules"] if r["alert"] == name)


def _alert(name: str, summary: str, **labels: str) -> dict:
    """The alert ``name`` for press-7 of plant-a (and ``labels``) as promtool must find it: its
    labels, the summary rendered, and its description as the rules file says it."""
    rule = _rule(name)
    annotations = {"summary": summary}
    if "description" in rule["annotations"]:
        annotations["description"] = rule["annotations"]["description"]
    return {"exp_labels": {**rule["labels"], "fleet": "plant-a", "device": "press-7", **labels},
            "exp_annotations": annotations}


def _sample_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def _collector_page() -> str:
    """The collector's page after one device's status and a telemetry message made by real Stats."""
    collector = FleetCollector(build(MqttConfig, {}), "plant-a")  # fed directly, never connected
    topics = FleetTopics("plant-a")
    stats = Stats()
    stats.record(CallRecord(rows=2, escalated_rows=1, cloud_rows=1, degraded_rows=0, rate_limited_rows=0,
                            in_flight_limited_rows=0, latency_s=0.03, confidences=(0.2, 0.9)))
    status = Status(device="press-7", state="online", agent_version="0", model="clf", active_version=1)
    collector.apply(Message(str(topics.status("press-7")), json.dumps(status.to_dict()).encode(), 1, True))
    quality = Quality("1")
    quality.answered("1", 2, [2, 9])
    quality.compared("1", audit=True, rows=1, agree=1)
    telemetry = {"device": "press-7", "seq": 0, "at": "2025-06-01T12:00:00Z", "model": "clf",
                 "model_version": 1, **stats.interval(), "spool_depth": 0, "circuit_state": "closed",
                 "models": [{"name": "clf", "model_version": 1, "ready": True, **stats.interval(),
                             "spool_depth": 0, "circuit_state": "closed",
                             "quality": {**quality.interval(), "version": 1}}]}
    collector.apply(Message(str(topics.telemetry("press-7")), json.dumps(telemetry).encode(), 1, False))
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_every_metric_queried_is_exposed(tmp_path):
    model = linear_classifier(tmp_path / "repo" / "clf" / "1" / "model.onnx")
    x = np.ones((1, 8), dtype=np.float32)
    with start_agent(tmp_path / "state", model) as agent, \
            Gateway(gateway_config(tmp_path / "repo", listen="127.0.0.1:0", store=tmp_path / "hard.db",
                                   metrics={"listen": "127.0.0.1:0"})) as gateway:
        with Client(gateway.port) as client:
            client.infer("clf", {"x": x})
        exposed = (_sample_names(Scrape(agent.metrics.port).text)
                   | _sample_names(Scrape(gateway.metrics.port).text) | _sample_names(_collector_page()))
    queried = {name for expr in (*_rule_exprs(), *_dashboard_exprs()) for name in METRIC.findall(expr)}
    assert queried and queried <= exposed, sorted(queried - exposed)


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels:
        for target in panel.get("targets", ()):
            assert target["datasource"]["uid"] == "${datasource}"
            used = set(re.findall(r"\$(\w+)", target["expr"]))
            assert used <= variables, (panel["title"], used - variables)
    histograms = [e for e in _dashboard_exprs() if "histogram_quantile" in e]
    assert histograms and all("_bucket" in e and "le" in e for e in histograms)
