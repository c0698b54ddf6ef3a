"""The agent's own ``/metrics``, scraped over real HTTP: counters that move with real calls (at the
edge and through a real gateway), latency histograms, model and circuit; off when unset, and a port that
cannot be bound never stops the agent from serving."""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tests.support.fleet import Scrape
from tests.support.onnx_models import linear_classifier
from tests.support.services import Client, GatewayCloud, start_agent

if TYPE_CHECKING:
    from pathlib import Path

X = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return linear_classifier(tmp_path / "edge.onnx", card={"name": "clf", "version": 3})


def test_counters_move_with_real_calls(tmp_path, model) -> None:
    cloud_model = linear_classifier(tmp_path / "cloud.onnx", seed=1)
    cloud = GatewayCloud(tmp_path / "cloud", cloud_model, "clf").start()
    try:
        with start_agent(tmp_path / "state", model, cloud.port) as agent, Client(agent.port) as client:
            before = Scrape(agent.metrics.port)
            assert before.content_type.startswith("text/plain")
            assert before.value("edgecloud_requests_total") == 0
            assert before.value("edgecloud_model_info", name="clf", version="3") == 1
            for _ in range(3):
                client.infer("clf", {"x": X}, escalate="never")
            client.infer("clf", {"x": X}, escalate="always")
            after = Scrape(agent.metrics.port)
    finally:
        cloud.stop()
    assert after.value("edgecloud_requests_total") == 4
    assert after.value("edgecloud_rows_total") == 16
    assert after.value("edgecloud_escalated_rows_total") == 4
    assert after.value("edgecloud_cloud_answers_total") == 4
    assert after.value("edgecloud_degraded_rows_total") == 0
    assert after.value("edgecloud_rate_limited_rows_total") == 0
    assert after.value("edgecloud_in_flight_limited_rows_total") == 0
    assert after.value("edgecloud_errors_total") == 0
    latency = "edgecloud_request_latency_seconds"
    assert after.value(latency + "_count", path="edge") == 3
    assert after.value(latency + "_count", path="escalated") == 1
    assert before.value(latency + "_count", path="escalated") == 0  # there before any call, at zero
    assert after.value(latency + "_bucket", path="edge", le="+Inf") == 3
    assert after.value(latency + "_bucket", path="escalated", le="5") == 1
    edge_buckets = [after.value(latency + "_bucket", path="edge", le=le) for le in ("0.0005", "0.01", "1")]
    assert edge_buckets == sorted(edge_buckets)  # cumulative
    assert after.value(latency + "_sum", path="edge") > 0
    assert after.value("edgecloud_circuit_state", state="closed") == 1
    assert after.value("edgecloud_circuit_state", state="open") == 0
    assert after.value("edgecloud_circuit_open") == 0
    assert after.value("edgecloud_spool_depth") == 0
    assert after.value("edgecloud_mqtt_connected") is None  # no fleet, no MQTT figures


def test_metrics_only_on_their_path(tmp_path, model) -> None:
    with start_agent(tmp_path / "state", model) as agent:
        base = f"http://127.0.0.1:{agent.metrics.port}"
        for path in ("/", "/favicon.ico", "/metrics/extra", "/v2/health/live"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=5)
            assert err.value.code == 404
        with urllib.request.urlopen(base + "/metrics", timeout=5) as page:
            assert b"edgecloud_requests_total" in page.read()
        with urllib.request.urlopen(base + "/metrics?name[]=edgecloud_requests_total", timeout=5) as page:
            assert page.status == 200  # a query string is still the metrics path


def test_off_when_unset_and_a_taken_port_does_not_stop_the_agent(tmp_path, model, caplog) -> None:
    with start_agent(tmp_path / "off", model, metrics={"listen": ""}) as agent:
        assert agent.metrics is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        caplog.set_level(logging.ERROR)
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with start_agent(tmp_path / "taken", model, metrics={"listen": listen}) as agent, \
                Client(agent.port) as client:
            assert agent.metrics is None
            assert client.infer("clf", {"x": X}).outputs["logits"].shape == (4, 4)
    assert "event=metrics_unavailable" in caplog.text
