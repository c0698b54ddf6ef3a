"""Recovery after a cloud outage: the cloud link reconnects on its own while the cloud is away, and
the moment it is connected again the open circuit lets the next escalation through, instead of
waiting out gRPC's grown backoff or the circuit's ``reset_s``."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from edge_agent.cloud.link import CloudError, CloudLink
from edgecloud.protocol.codec import InferRequest
from edgecloud.protocol.parameters import AgentResponse
from edgecloud_tools.rig.delay_proxy import DelayProxy
from tests.support.net import wait_for
from tests.support.onnx_models import linear_classifier
from tests.support.services import Client, GatewayCloud, start_agent

X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)


def test_the_first_cloud_answer_after_an_outage_comes_with_the_reconnect(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.cloud")
    edge = linear_classifier(tmp_path / "edge.onnx", seed=0, card={"name": "clf", "version": 1})
    cloud_model = linear_classifier(tmp_path / "cloud.onnx", seed=1)
    cloud = GatewayCloud(tmp_path / "cloud", cloud_model, "clf").start()
    # a circuit that would stay open for two minutes on its timer alone
    settings = {"cloud": {"reset_s": 120, "failure_threshold": 1, "max_per_s": 100000}}
    try:
        with start_agent(tmp_path / "agent", edge, cloud.port, **settings) as agent, \
                Client(agent.port) as client:
            def source() -> str:
                return client.infer("clf", {"x": X}, escalate="always").parameters[AgentResponse.SOURCE]

            assert source() == "cloud"
            cloud.stop()
            for _ in range(5):  # the outage: answered by the edge, spooled
                assert source() == "edge"
            assert agent.primary.link is not None and agent.primary.link.circuit.state == "open"
            cloud.start()  # the same port again
            assert wait_for(lambda: source() == "cloud", timeout=10, interval=0.05)
            assert agent.primary.link.circuit.state == "closed"
            spool = agent.primary.spool
            assert wait_for(lambda: spool.depth() == 0)  # the outage's cases reach the store too
    finally:
        cloud.stop()
    assert "event=circuit_probe reason=reconnected" in caplog.text
    assert len(cloud.stored()) >= 7  # the answered calls and the replayed ones, once each


def test_the_contract_is_checked_in_the_background_before_any_escalation(tmp_path) -> None:
    edge, cloud = _edge_and_cloud(tmp_path)
    try:
        with start_agent(tmp_path / "agent", edge, cloud.port) as agent:
            assert agent.primary.link is not None
            assert wait_for(lambda: agent.primary.link.state.compatible is True, timeout=10)
    finally:
        cloud.stop()


def test_an_escalation_checking_the_contract_inline_keeps_to_one_deadline(tmp_path) -> None:
    """ModelMetadata and ModelInfer share the escalation's deadline: a 150 ms cloud fits once in 250 ms,
    not twice."""
    edge, cloud = _edge_and_cloud(tmp_path)
    try:
        with DelayProxy(cloud.port, rtt_ms=150) as proxy, \
                start_agent(tmp_path / "agent", edge, proxy.port) as agent:
            link = CloudLink(agent.primary.config.cloud)  # a link of its own: nothing checked yet
            try:
                request = InferRequest("clf", {"x": X})
                with pytest.raises(CloudError, match="DEADLINE_EXCEEDED"):
                    link.ask(agent.primary.slot.model, request, timeout=0.25)
                # the check made it through meanwhile or now: the next ask needs one round trip
                assert wait_for(lambda: _answers(link, agent.primary.slot.model, request), timeout=10)
            finally:
                link.close()
    finally:
        cloud.stop()


def _answers(link: CloudLink, edge, request: InferRequest) -> bool:
    try:
        return link.ask(edge, request, timeout=0.25).outputs is not None
    except CloudError:
        return False


def _edge_and_cloud(tmp_path):
    edge = linear_classifier(tmp_path / "edge.onnx", seed=0, card={"name": "clf", "version": 1})
    cloud = GatewayCloud(tmp_path / "cloud", linear_classifier(tmp_path / "cloud.onnx", seed=1), "clf")
    return edge, cloud.start()


def test_closing_the_link_ends_its_background_check(tmp_path, caplog) -> None:
    """Contract checks waiting on a cloud 5 s away (the agent's own and a second link's) end when their
    links close, so no check outlives the agent and logs after it stopped."""
    caplog.set_level(logging.INFO, logger="edge_agent.cloud")
    edge, cloud = _edge_and_cloud(tmp_path)
    try:
        with DelayProxy(cloud.port, rtt_ms=5000) as proxy:
            with start_agent(tmp_path / "agent", edge, proxy.port) as agent:
                link = CloudLink(agent.primary.config.cloud)
                link.prepare(agent.primary.slot.model)
                assert _checks_alive() >= 2
                started = time.monotonic()
                link.close()
                closed_in = time.monotonic() - started
                assert link.state.compatible is None  # the check was cut short
            assert _checks_alive() == 0
    finally:
        cloud.stop()
    assert closed_in < 2.0, f"close() waited {closed_in:.1f} s for the check"
    assert "event=cloud_check_deferred" not in caplog.text


def _checks_alive() -> int:
    return sum(t.name == "cloud-contract" and t.is_alive() for t in threading.enumerate())
