"""Remote backend: a model served by another KServe v2 server (a Triton cluster, another gateway).

With ``platform = "remote"`` in a model's ``config.toml`` the gateway stays a thin, horizontally scaled
front (auth, hard-example store, batching) and forwards inference; the remote server's ModelMetadata
describes the inputs and outputs, so nothing about them is configured twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
from pydantic import Field

from edgecloud.backends.base import Backend
from edgecloud.channel import ClientTLS, bearer_metadata, open_channel
from edgecloud.client import KServeClient
from edgecloud.config import Section
from edgecloud.errors import ModelLoadError, ModelUnavailable
from edgecloud.tensors import TensorSpec


class RemoteConfig(Section):
    """``[backend.remote]``: where the model really runs."""

    target: str = Field(..., description="HOST:PORT of the KServe v2 server")
    model: str = Field(..., min_length=1, description="model name there")
    model_version: str = Field("", description="version there; empty: its choice (latest)")
    timeout_s: float = Field(10.0, gt=0, description="deadline of each forwarded call")
    tls: ClientTLS | None = Field(None, description="TLS to the remote server; required off loopback")
    token_file: Path | None = Field(None, description="bearer token for the remote server")


class RemoteBackend(Backend):
    """Forwards each batch with one ModelInfer; a remote failure is the caller's UNAVAILABLE."""

    key = "remote"
    platform = "remote"
    config_model = RemoteConfig

    def __init__(self, config: RemoteConfig | None = None) -> None:
        if config is None:
            raise ModelLoadError("backend remote needs [backend.remote] with target and model")
        self.config = config
        self._client: KServeClient | None = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()

    def load(self, path: Path) -> None:
        """``path`` only names the model in messages; the remote server's metadata is the contract."""
        cfg = self.config
        channel = open_channel(cfg.target, cfg.tls, what="backend.remote.target")
        self._client = KServeClient(cfg.target, channel, bearer_metadata(cfg.token_file))
        try:
            meta = self._client.metadata(cfg.model, cfg.model_version, timeout=cfg.timeout_s)
        except grpc.RpcError as e:
            self.close()
            raise ModelLoadError(f"{path}: remote model {cfg.model!r} at {cfg.target}: "
                                 f"{e.code().name}: {e.details()}") from e
        self._inputs, self._outputs = meta.inputs, meta.outputs

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._client is None:
            raise ModelUnavailable("remote backend used before load() or after close()")
        cfg = self.config
        try:
            reply = self._client.infer(cfg.model, inputs, version=cfg.model_version, timeout=cfg.timeout_s)
        except grpc.RpcError as e:
            raise ModelUnavailable(f"remote model {cfg.model!r} at {cfg.target}: "
                                   f"{e.code().name}: {e.details()}") from e
        missing = [o.name for o in self._outputs if o.name not in reply.outputs]
        if missing:
            raise ModelUnavailable(f"remote model {cfg.model!r} answered without outputs {missing}")
        return {o.name: reply.outputs[o.name] for o in self._outputs}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
