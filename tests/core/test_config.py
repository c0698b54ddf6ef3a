"""The config pieces both services share: a TLS certificate and key come as a pair, ``[metrics]``
listens on HOST:PORT or is off, ``[admission]`` bounds with each service's defaults; errors name the
key."""

from __future__ import annotations

import pytest

from cloud_gateway.config import GatewayConfig
from edge_agent.config import AgentConfig
from edgecloud.config import build
from edgecloud.errors import ConfigError

PAIR = "cert and key must be given together"


@pytest.mark.parametrize(("model", "data", "key"), [
    (AgentConfig, {"cloud": {"tls": {"cert": "device.pem"}}}, "cloud.tls"),
    (AgentConfig, {"mqtt": {"tls": {"key": "device.key"}}}, "mqtt.tls"),
    (GatewayConfig, {"tls": {"cert": "gateway.pem"}}, "tls"),
])
def test_a_certificate_without_its_key_names_the_section(model: type, data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config.toml: {key}: .*{PAIR}$"):
        build(model, data, "config.toml")


def test_mutual_tls_at_the_gateway_needs_its_own_pair() -> None:
    with pytest.raises(ConfigError, match=r"tls: .*client_ca needs cert and key"):
        build(GatewayConfig, {"tls": {"client_ca": "ca.pem"}})
    mutual = build(GatewayConfig, {"tls": {"cert": "g.pem", "key": "g.key", "client_ca": "ca.pem"}})
    assert mutual.tls.client_ca is not None


def test_metrics_defaults_empty_and_unix_socket() -> None:
    assert build(AgentConfig, {}).metrics.listen == "127.0.0.1:9108"  # the agent's are on by default
    assert build(AgentConfig, {"metrics": {}}).metrics.listen == "127.0.0.1:9108"
    assert build(GatewayConfig, {}).metrics.listen is None
    assert build(AgentConfig, {"metrics": {"listen": ""}}).metrics.listen is None
    with pytest.raises(ConfigError, match=r"metrics.listen: .*not a unix socket"):
        build(GatewayConfig, {"metrics": {"listen": "unix:/tmp/m.sock"}})


def test_gateway_operators_need_client_authentication_and_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"auth.operators needs client authentication"):
        build(GatewayConfig, {"auth": {"operators": ["ops"]}})
    with pytest.raises(ConfigError, match=r"auth.operators"):
        build(GatewayConfig, {"auth": {"operators": ["../ops"], "tokens_file": "tokens"}})
    config = build(GatewayConfig, {"auth": {"operators": ["ops"], "tokens_file": "tokens"}})
    assert config.auth.operators == ("ops",)


def test_admission_defaults_per_service_and_bad_bounds_name_the_key() -> None:
    agent, gateway = build(AgentConfig, {}).admission, build(GatewayConfig, {}).admission
    assert (agent.max_in_flight, agent.max_queue) == (4, 8)
    assert (gateway.max_in_flight, gateway.max_queue) == (256, 256)
    assert build(AgentConfig, {"admission": {"max_queue": 0}}).admission.max_queue == 0
    with pytest.raises(ConfigError, match=r"admission.max_in_flight: .*greater than 0"):
        build(AgentConfig, {"admission": {"max_in_flight": 0}})
    with pytest.raises(ConfigError, match=r"admission.max_queue: .*greater than or equal to 0"):
        build(GatewayConfig, {"admission": {"max_queue": -1}})
    with pytest.raises(ConfigError, match=r"admission.queue: unknown key"):
        build(GatewayConfig, {"admission": {"queue": 4}})
