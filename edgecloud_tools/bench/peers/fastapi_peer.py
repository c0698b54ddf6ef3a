"""Peer: the edge model behind FastAPI + uvicorn, KServe v2's JSON over HTTP, as a team would write it.

Runs in its own venv (made by the bench) by path: ``python fastapi_peer.py --model M --port P``. The
handler is a plain ``def`` (FastAPI runs it in its thread pool, as ONNX Runtime calls should be), the
request is validated by pydantic, the session uses ONNX Runtime's default options; access logs are off.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[Tensor]


def build_app(model: str) -> FastAPI:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, request: InferRequest) -> dict:
        feeds = {t.name: np.asarray(t.data, dtype=np.float32).reshape(t.shape) for t in request.inputs}
        results = session.run(outputs, feeds)
        return {"model_name": name, "outputs": [
            {"name": n, "datatype": "FP32", "shape": list(r.shape), "data": r.ravel().tolist()}
            for n, r in zip(outputs, results)]}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help=".onnx file")
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    args = p.parse_args()
    uvicorn.run(build_app(args.model), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
