"""The gateway's inference host: validate a request, run it through the model's batcher, keep the rows
an edge device escalated in the hard-example store, and answer. Encoded frames are decoded with the
model's own preprocess, on a thread, and stored as they came (docs/design.md §10).

``infer`` is a coroutine on the server's event loop (``start_async_server``): a call waiting for its
batch holds no thread, and when the caller's deadline passes gRPC cancels it, so its request leaves
the batch queue unrun. Rows are stored before the answer leaves: an agent forgets a case once the
cloud has answered it, so a store that cannot write fails the call (UNAVAILABLE) and the agent keeps
the case in its spool.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Mapping

import numpy as np

from cloud_gateway.auth import TokenTable
from cloud_gateway.hard_examples import HardExample, HardExampleStore
from cloud_gateway.repository import ModelRepository, ServedModel
from edgecloud import __version__
from edgecloud.errors import ModelNotFound, ModelUnavailable
from edgecloud.guards import InputContract
from edgecloud.protocol.codec import InferRequest, InferResponse, ModelMetadata
from edgecloud.protocol.outputs import check_requested, select_outputs
from edgecloud.protocol.parameters import CloudResponse, Collaboration
from edgecloud.protocol.servicer import PeerInfo
from edgecloud.tensors import check_inputs

log = logging.getLogger(__name__)


class GatewayHost:
    """Serves every model of a repository; the asyncio KServe v2 servicer is its front.

    Device identity: the mutual-TLS client certificate's CN, else the device its bearer token belongs
    to, else what the caller claims in ``edgecloud.device_id``.
    """

    server_name = "edgecloud-cloud-gateway"
    server_version = __version__

    def __init__(self, repository: ModelRepository, store: HardExampleStore | None = None,
                 tokens: TokenTable | None = None, added_latency_s: float = 0.0) -> None:
        self.repository = repository
        self.store = store
        self.tokens = tokens
        self.added_latency_s = added_latency_s
        self.accepting = True

    def is_live(self) -> bool:
        return True

    def is_ready(self) -> bool:
        return self.accepting

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self.repository.get(name, version)
        except ModelNotFound:
            return False
        return self.accepting

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        return self.repository.metadata(name, version)

    def input_contract(self, name: str, version: str) -> InputContract:
        return self.repository.get(name, version).contract

    def model_index(self) -> tuple[tuple[str, str], ...]:
        repository = self.repository
        return tuple((name, str(v)) for name in repository.names for v in repository.versions(name))

    async def infer(self, request: InferRequest, peer: PeerInfo) -> InferResponse:
        if not self.accepting:
            raise ModelUnavailable("the gateway is shutting down")
        model = self.repository.get(request.model_name, request.model_version)
        rows = check_inputs(model.contract.expected(request.inputs), request.inputs, model.name)
        check_requested(model.name, request.outputs, [o.name for o in model.outputs])
        collab = Collaboration.read(request.parameters, request.id, rows)
        device = self._device(peer, collab.device_id)
        inputs, params = request.inputs, {}
        if model.preprocess is not None and model.preprocess.frames in inputs:
            inputs = await asyncio.to_thread(model.model_inputs, inputs)
            params[CloudResponse.INPUT_GEOMETRY] = str(model.preprocess.geometry)
        outputs = await model.run(inputs)
        if collab.summary is not None:  # SQLite writes: on a thread, off the event loop
            await asyncio.to_thread(self._keep, model, collab, device, request.inputs, outputs)
        else:
            log.debug("event=infer request_id=%s device=%s model=%s version=%d rows=%d", collab.request_id,
                      device, model.name, model.version, rows)
        if self.added_latency_s:
            await asyncio.sleep(self.added_latency_s)
        return InferResponse(model_name=model.name, model_version=str(model.version), id=request.id,
                             outputs=select_outputs(model.name, request.outputs,
                                                    {o.name: outputs[o.name] for o in model.outputs},
                                                    model.config.labels),
                             parameters=params)

    def _device(self, peer: PeerInfo, claimed: str) -> str:
        proven = peer.common_name  # the auth interceptor refused a token naming another device
        if not proven and self.tokens is not None:
            credential = self.tokens.lookup(peer.bearer_token)
            proven = credential.name if credential else ""
        if proven and claimed and claimed != proven:
            log.warning("event=device_id_mismatch device=%s claimed=%s peer=%s", proven, claimed, peer.peer)
        return proven or claimed

    def _keep(self, model: ServedModel, collab: Collaboration, device: str,
              inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Store each escalated row (once per device, request id, row and input: see hard_examples.py)
        and log the escalation."""
        summary = collab.summary
        stored = 0
        if self.store is not None:
            examples = [HardExample(
                request_id=collab.request_id, row=row, device=device,
                edge_model_version=collab.edge_model_version, cloud_model=model.name,
                cloud_model_version=str(model.version), reason=summary.reason, deferred=collab.deferred,
                edge_prediction=summary.prediction[i] if summary.prediction else None,
                edge_confidence=summary.confidence[i] if summary.confidence else None,
                inputs={k: v[i] for k, v in inputs.items()},
                cloud_outputs={k: v[i] for k, v in outputs.items()},
            ) for i, row in enumerate(summary.rows)]
            try:
                stored = self.store.add(examples)
            except sqlite3.Error as e:
                log.error("event=store_failed request_id=%s error=%r", collab.request_id, str(e))
                raise ModelUnavailable(f"hard-example store unavailable ({e}); keep the case and "
                                       "retry") from e
        log.info("event=escalation request_id=%s device=%s model=%s version=%d rows=%d stored=%d reason=%s "
                 "deferred=%s edge_model_version=%s", collab.request_id, device, model.name, model.version,
                 len(summary.rows), stored, summary.reason, collab.deferred, collab.edge_model_version)


