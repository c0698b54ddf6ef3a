"""Recovery after a cloud outage: the cloud link reconnects on its own while the cloud is away, and
the moment it is connected again the open circuit lets the next escalation through, instead of
waiting out gRPC's grown backoff or the circuit's ``reset_s``."""

from __future__ import annotations

import logging

import numpy as np

from edgecloud.protocol.parameters import AgentResponse
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
