"""A small KServe v2 client on edgecloud's own stubs, for the operator tools, the demo and tests.

Local apps should use any stock KServe v2 client (tritonclient); this one exists so that edgecloud's
own tools need nothing beyond the runtime dependencies.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud._generated.inference import grpc_service_pb2_grpc as pb_grpc
from edgecloud.protocol.codec import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    RequestedOutput,
    decode_response,
    encode_request,
    metadata_from_pb,
)


class KServeClient:
    """Blocking client for one server; ``params`` become request parameters as given."""

    def __init__(self, target: str, channel: grpc.Channel | None = None,
                 call_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        """``channel`` defaults to plaintext (see :func:`edgecloud.channel.open_channel` for TLS);
        ``call_metadata`` goes with every call (e.g. an ``authorization`` bearer token)."""
        self.target = target
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.call_metadata = call_metadata

    def send(self, request: InferRequest, timeout: float = 10.0) -> InferResponse:
        """One ModelInfer; grpc.RpcError when the server refuses or does not answer in time."""
        reply = self.stub.ModelInfer(encode_request(request), timeout=timeout, metadata=self.call_metadata)
        return decode_response(reply)

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...] = (),
              params: Mapping[str, Any] | None = None, request_id: str = "", version: str = "",
              timeout: float = 10.0) -> InferResponse:
        request = InferRequest(model, dict(inputs), model_version=version, id=request_id,
                               parameters=dict(params or {}),
                               outputs=tuple(RequestedOutput(o) for o in outputs))
        return self.send(request, timeout)

    def metadata(self, model: str, version: str = "", timeout: float = 10.0) -> ModelMetadata:
        reply = self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), timeout=timeout,
                                        metadata=self.call_metadata)
        return metadata_from_pb(reply)

    def serving(self, timeout: float = 1.0) -> bool:
        """True when the server's grpc.health.v1 check says SERVING."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_serving(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serving():
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> KServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
