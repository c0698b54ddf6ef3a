"""Start real services on loopback for tests: edge agents, and a plain KServe v2 "cloud"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.server import EdgeAgent
from edgecloud.client import KServeClient
from edgecloud.config import build, merge
from edgecloud.protocol.codec import InferResponse


def agent_config(state_dir: Path, model_path: Path, cloud_port: int | None = None,
                 **sections: Any) -> AgentConfig:
    """An agent config on a free loopback port; ``sections`` deep-merge over the defaults."""
    data: dict[str, Any] = {"agent": {"listen": "127.0.0.1:0", "state_dir": str(state_dir)},
                            "model": {"path": str(model_path)}, "spool": {"replay_interval_s": 0.2}}
    if cloud_port is not None:
        data["cloud"] = {"target": f"127.0.0.1:{cloud_port}"}
    return build(AgentConfig, merge(data, sections))


def start_agent(state_dir: Path, model_path: Path, cloud_port: int | None = None,
                **sections: Any) -> EdgeAgent:
    return EdgeAgent(agent_config(state_dir, model_path, cloud_port, **sections)).start()


class Client(KServeClient):
    """edgecloud's client with ``edgecloud.*`` parameters as keyword arguments."""

    def __init__(self, port: int) -> None:
        super().__init__(f"127.0.0.1:{port}")

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...] = (),
              timeout: float = 10.0, **params: Any) -> InferResponse:
        return super().infer(model, inputs, outputs, {f"edgecloud.{k}": v for k, v in params.items()},
                             timeout=timeout)


class AgentCloud:
    """A second agent (no cloud of its own) serving the cloud model: any KServe v2 server will do.

    It can be stopped and started again on the same port to play a cloud outage.
    """

    def __init__(self, state_dir: Path, model: Path, name: str) -> None:
        self.state_dir, self.model, self.name = state_dir, model, name
        self.port = 0
        self.agent: EdgeAgent | None = None

    def start(self) -> AgentCloud:
        listen = f"127.0.0.1:{self.port}"
        self.agent = start_agent(self.state_dir, self.model, agent={"listen": listen},
                                 model={"name": self.name})
        self.port = self.agent.port
        return self

    def stop(self) -> None:
        if self.agent:
            self.agent.stop(grace=0)
            self.agent = None
