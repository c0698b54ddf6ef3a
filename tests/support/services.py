"""Start real services on loopback for tests: edge agents and cloud gateways."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cloud_gateway import Gateway, gateway_config
from cloud_gateway.hard_examples import HardExampleStore
from edge_agent.app import EdgeAgent
from edge_agent.config import AgentConfig
from edgecloud.client import KServeClient
from edgecloud.config import build, merge
from edgecloud.protocol.codec import InferRequest, InferResponse, encode_request
from edgecloud.protocol.parameters import AgentRequest


def agent_config(state_dir: Path, model_path: Path, cloud_port: int | None = None,
                 **sections: Any) -> AgentConfig:
    """An agent config on free loopback ports (API and /metrics); ``sections`` deep-merge over the
    defaults."""
    data: dict[str, Any] = {"agent": {"listen": "127.0.0.1:0", "state_dir": str(state_dir)},
                            "model": {"path": str(model_path)}, "spool": {"replay_interval_s": 0.2},
                            "metrics": {"listen": "127.0.0.1:0"}}
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
              timeout: float = 10.0, request_id: str = "", **params: Any) -> InferResponse:
        return super().infer(model, inputs, outputs, {AgentRequest[k.upper()]: v for k, v in params.items()},
                             request_id=request_id, timeout=timeout)


class GatewayCloud:
    """A real cloud gateway over a one-model repository; stop and start it again on the same port to
    play a cloud outage. The hard-example store lives on across restarts."""

    def __init__(self, workdir: Path, model: Path, name: str, **sections: Any) -> None:
        self.repository = workdir / "repository"
        target = self.repository / name / "1" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model, target)
        self.store_path = workdir / "hard-examples.db"
        self.sections = sections
        self.port = 0
        self.gateway: Gateway | None = None

    def start(self) -> GatewayCloud:
        config = gateway_config(self.repository, listen=f"127.0.0.1:{self.port}", store=self.store_path,
                                **self.sections)
        self.gateway = Gateway(config).start()
        self.port = self.gateway.port
        return self

    def stored(self) -> list:
        """Every hard example the gateway stored so far."""
        with HardExampleStore(self.store_path) as store:
            return list(store.examples())

    def stop(self) -> None:
        if self.gateway:
            self.gateway.stop(grace=0)
            self.gateway = None


def fire(port: int, model: str, inputs: dict[str, np.ndarray], calls: int,
         timeout: float = 30.0) -> list[grpc.Future]:
    """``calls`` ModelInfer calls sent at once, none waiting for another (open loop): their futures."""
    client = KServeClient(f"127.0.0.1:{port}")
    request = encode_request(InferRequest(model, inputs))
    return [client.stub.ModelInfer.future(request, timeout=timeout) for _ in range(calls)]


def codes(calls: list[grpc.Future]) -> Counter:
    """How many of ``calls`` ended with each status code (OK for an answer)."""
    return Counter(grpc.StatusCode.OK if f.exception() is None else f.code() for f in calls)
