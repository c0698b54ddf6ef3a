"""Peer: a custom MLServer runtime serving an ONNX model with ONNX Runtime, as MLServer's docs show a
custom runtime (``MLModel`` with ``load`` and ``predict``, NumpyCodec for the tensors).

MLServer imports it from the model folder the bench writes (``implementation`` in model-settings.json
is ``mlserver_peer.OnnxRuntimeModel``); ``parameters.uri`` names the ``.onnx`` file. With adaptive
batching (``max_batch_size`` > 1) MLServer hands ``predict`` the merged requests and splits the answer.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        self._session = ort.InferenceSession(self.settings.parameters.uri, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        outputs = [NumpyCodec.encode_output(n, r) for n, r in zip(self._outputs, results)]
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
