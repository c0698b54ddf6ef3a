"""ONNX Runtime backend: CPU by default, execution providers from its config section."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydantic import Field

from edgecloud.backends.base import Backend
from edgecloud.config import Section
from edgecloud.errors import BackendUnavailable, ModelLoadError
from edgecloud.tensors import TensorSpec

# ONNX Runtime's type strings → KServe datatypes.
_KSERVE_OF_ORT = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class OrtConfig(Section):
    """The ``[backend.onnxruntime]`` section.

    ``providers`` are ONNX Runtime execution provider names in order of preference, e.g.
    ``["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]``;
    ``provider_options`` maps a provider name to its options (``trt_int8_enable``,
    ``trt_engine_cache_path``…).

    The thread defaults suit a small edge model on a device of few cores: one intra-op thread runs each
    call on the caller's thread, so calls in flight run side by side on the server's threads instead of
    queueing for one pool, and no pool thread spins for work against the gRPC threads (measured on
    2 cores with the demo model: the agent spent 0.61-0.96 ms of CPU per call with ONNX Runtime's own
    choice of a spinning pool, 0.51-0.57 ms with these defaults, at the same latency). A large model
    on many cores (a gateway's) may want more threads: 0 lets ONNX Runtime choose.
    """

    providers: tuple[str, ...] = Field(("CPUExecutionProvider",), description="in order of preference")
    provider_options: Mapping[str, Mapping[str, str]] = Field(default_factory=dict,
                                                              description="options by provider name")
    intra_op_threads: int = Field(1, ge=0, description="threads per operator; 0: ONNX Runtime chooses")
    inter_op_threads: int = Field(1, ge=0, description="threads across operators; 0: ONNX Runtime chooses")
    allow_spinning: bool = Field(False, description="let idle pool threads spin for work (lower latency "
                                                    "on idle cores, burnt CPU on busy ones)")
    cpu_mem_arena: bool = Field(False, description="keep ONNX Runtime's CPU memory arena: a little faster "
                                "for large batches, but it keeps the peak of the largest batch for good")


def _spec(arg) -> TensorSpec:
    try:
        datatype = _KSERVE_OF_ORT[arg.type]
    except KeyError:
        raise ModelLoadError(f"tensor {arg.name!r}: ONNX type {arg.type} is not supported") from None
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class OrtBackend(Backend):
    """Runs an ``.onnx`` file (FP32 or QDQ INT8) with ONNX Runtime."""

    key = "onnxruntime"
    platform = "onnxruntime_onnx"
    suffixes = (".onnx",)
    release_format = "onnx"
    repository_file = "model.onnx"
    config_model = OrtConfig

    def __init__(self, config: OrtConfig | None = None) -> None:
        self.config = config or OrtConfig()
        self._session = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._output_names: list[str] = []

    def load(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable("backend onnxruntime unavailable: pip install onnxruntime") from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.intra_op_threads
        options.inter_op_num_threads = self.config.inter_op_threads
        options.enable_cpu_mem_arena = self.config.cpu_mem_arena
        spinning = "1" if self.config.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        options.log_severity_level = 3
        available = set(ort.get_available_providers())
        providers = [p for p in self.config.providers if p in available]
        if not providers:
            raise BackendUnavailable(f"none of the execution providers {list(self.config.providers)} "
                                     f"is available; this onnxruntime has {sorted(available)}")
        provider_options = [dict(self.config.provider_options.get(p, {})) for p in providers]
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers,
                                                 provider_options=provider_options)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"cannot load {path}: {e}") from e
        self._inputs = tuple(_spec(a) for a in self._session.get_inputs())
        self._outputs = tuple(_spec(a) for a in self._session.get_outputs())
        self._output_names = [o.name for o in self._outputs]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise ModelLoadError("onnxruntime backend used before load() or after close()")
        feeds = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        return dict(zip(self._output_names, self._session.run(self._output_names, feeds)))

    def close(self) -> None:
        self._session = None
