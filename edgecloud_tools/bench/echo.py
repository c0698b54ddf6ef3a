"""The bench's floor servers, in one child process: a minimal KServe v2 server on edgecloud's own stubs
whose ModelInfer answers with its input (no model, no codec), and a bare gRPC echo of raw bytes. With
``--model NAME=FILE``, a call to model NAME runs FILE instead, in the handler, with nothing around it
(no cascade, guards, batching, statistics or admission): the least any Python server can do per call
with it.

Driven by the same client as the agent, they measure what gRPC, the KServe v2 messages and the model
cost by themselves, so the agent's figure can be read against them. All are synchronous gRPC servers
with a thread pool, like the agent's.

Run as ``python -m edgecloud_tools.bench.echo --port N [--workers W] [--model NAME=FILE.onnx …]``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Mapping
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2_grpc

from edgecloud._generated.inference import grpc_service_pb2 as pb
from edgecloud._generated.inference import grpc_service_pb2_grpc as pb_grpc
from edgecloud.backends import open_backend

#: the bare echo's service and method: raw bytes in, the same bytes out
BARE_SERVICE = "edgecloud.bench.Echo"
BARE_METHOD = f"/{BARE_SERVICE}/Echo"


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer returns every input tensor as an output of the same name, raw contents untouched; a
    call to one of ``models`` (name → file) runs it on its raw FP32 input instead."""

    def __init__(self, models: Mapping[str, Path] | None = None) -> None:
        # the agent's backend, with its defaults for few cores
        self._backends = {name: open_backend(path) for name, path in (models or {}).items()}

    def ServerLive(self, request, context):  # noqa: N802 - gRPC method names
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=True)

    def ModelInfer(self, request, context):  # noqa: N802
        reply = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        backend = self._backends.get(request.model_name)
        if backend is not None:
            shape = tuple(request.inputs[0].shape)
            x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(shape)
            for name, value in backend.infer({backend.inputs[0].name: x}).items():
                reply.outputs.add(name=name, datatype="FP32", shape=value.shape)
                reply.raw_output_contents.append(value.astype(np.float32, copy=False).tobytes())
            return reply
        for tensor in request.inputs:
            reply.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        reply.raw_output_contents.extend(request.raw_input_contents)
        return reply


def serve(port: int, workers: int, models: Mapping[str, Path] | None = None) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(models), server)
    bare = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(BARE_SERVICE, {"Echo": bare})])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"echo: cannot bind 127.0.0.1:{port}")
    server.start()
    return server


def _named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"echo: --model takes NAME=FILE, not {text!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgecloud_tools.bench.echo", description=__doc__)
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    p.add_argument("--workers", type=int, default=16, help="gRPC worker threads (the gateway's default)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=FILE",
                   help="also serve FILE (one FP32 input) as model NAME, bare (repeatable)")
    args = p.parse_args(argv)
    models = dict(_named(text) for text in args.model)
    server = serve(args.port, args.workers, models)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1.0).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
