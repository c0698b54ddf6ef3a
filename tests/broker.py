"""A real mosquitto for tests (``edgecloud_tools.rig.broker``), with fixtures and generated certificates.

Use it as a pytest plugin (``pytest_plugins = ("tests.broker",)``): fixtures ``broker`` (anonymous),
``broker_factory`` (password file and/or TLS listener) and ``tls_files`` (a CA, a server certificate
for 127.0.0.1/localhost, and an unrelated CA). Persistence is on, so ``restart()`` keeps retained
messages and persistent sessions. Tests skip with the reason when mosquitto is not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgecloud_tools.certs import issue, make_ca
from edgecloud_tools.rig.broker import HOST, INSTALL_HINT, BrokerTLS, LocalBroker, mosquitto_path


@dataclass(frozen=True)
class TLSFiles(BrokerTLS):
    other_ca: Path  # a CA that did not sign the broker's certificate


def make_tls_files(directory: Path) -> TLSFiles:
    """A test CA, a server certificate for 127.0.0.1 and localhost signed by it, and another CA."""
    ca = make_ca(directory / "ca", "test-ca")
    server = issue(directory / "ca", directory / "server", "localhost", hosts=[HOST, "localhost"])
    other = make_ca(directory / "other", "other-ca")
    return TLSFiles(ca.cert, server.cert, server.key, other.cert)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., LocalBroker]]:
    """Start brokers with ``users={name: password}`` and/or ``tls=TLSFiles``; all stopped at teardown."""
    if mosquitto_path() is None:
        pytest.skip(f"mosquitto is not installed: {INSTALL_HINT}")
    started: list[LocalBroker] = []

    def start(**kwargs: Any) -> LocalBroker:
        broker = LocalBroker(tmp_path / f"broker{len(started)}", **kwargs).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., LocalBroker]) -> LocalBroker:
    """An anonymous mosquitto of this test's own (no retained messages from other tests)."""
    return broker_factory()


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path / "tls")
