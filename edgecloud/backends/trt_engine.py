"""TensorRT backend: runs a serialized engine (``.plan`` / ``.engine``) built on this device.

Written against TensorRT 10's named-tensor API (JetPack 6 ships 10.3): I/O tensors are discovered by
name from the engine, shapes are set with ``set_input_shape`` and read back from the execution context,
buffers are bound once with ``set_tensor_address`` and the engine runs with ``execute_async_v3`` on its
own (non-default) stream.

CUDA work happens on one dedicated thread that keeps the device's *primary* context current for its
whole life, so no call ever runs without a context and the TensorRT builder (CUDA runtime API, e.g.
building an engine while staging an update) shares that same context. Page-locked host buffers and
device buffers are sized once for the optimization profile's largest shapes and reused by every call:
a batch larger than the profile allows is split into chunks, a smaller one than it needs is padded.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from edgecloud.backends.base import Backend
from edgecloud.config import Section
from edgecloud.engine.builder import INSTALL_HINT
from edgecloud.engine.sidecar import (
    DEVICE_TREE_MODEL,
    check_compatible,
    device_model,
    read_sidecar,
    rebuild_hint,
    sidecar_path,
)
from edgecloud.errors import (
    BackendUnavailable,
    EdgecloudError,
    InvalidInput,
    ModelLoadError,
    ModelUnavailable,
)
from edgecloud.protocol.datatypes import NUMPY_OF
from edgecloud.tensors import TensorSpec

log = logging.getLogger(__name__)

#: TensorRT ``DataType`` member names → KServe datatypes, for the types a host numpy buffer can carry
KSERVE_OF_TRT = {
    "FLOAT": "FP32", "HALF": "FP16", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64",
    "BOOL": "BOOL", "UINT8": "UINT8",
}

Shape = tuple[int, ...]


def kserve_datatype_of_trt(dtype: Any) -> str:
    """KServe datatype of a TensorRT ``DataType`` (or its member name); BF16, FP8, INT4… are refused."""
    name = getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]
    try:
        return KSERVE_OF_TRT[name]
    except KeyError:
        raise ModelLoadError(f"TensorRT type {name} cannot cross the API; build the engine with "
                             f"I/O tensors of {sorted(KSERVE_OF_TRT)}") from None


def batch_chunks(rows: int, max_batch: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of at most ``max_batch`` rows covering ``rows``."""
    return [(start, min(start + max_batch, rows)) for start in range(0, rows, max_batch)]


def volume(shape: Shape) -> int:
    return math.prod(shape)


@dataclass
class IOTensor:
    """One engine I/O tensor: its contract, its profile limits and its (reused) buffers."""

    name: str
    datatype: str
    shape: Shape  # as the engine declares it, -1 = dynamic
    min_shape: Shape = ()
    opt_shape: Shape = ()
    max_shape: Shape = ()
    host: Any = field(default=None, repr=False)  # page-locked numpy array, max_shape's volume
    device: Any = field(default=None, repr=False)  # device allocation of the same size

    @property
    def dtype(self) -> np.dtype:
        return NUMPY_OF[self.datatype]

    @property
    def spec(self) -> TensorSpec:
        """Served contract: any batch size (chunked or padded), other dimensions as the engine has them."""
        return TensorSpec(self.name, self.datatype, (-1, *self.shape[1:]))

    def check_fits(self, shape: Shape) -> None:
        """InvalidInput unless ``shape`` lies within the optimization profile."""
        fits = len(shape) == len(self.min_shape) and all(
            lo <= d <= hi for lo, d, hi in zip(self.min_shape, shape, self.max_shape))
        if not fits:
            raise InvalidInput(f"input {self.name!r}: shape {list(shape)} is outside the engine's profile "
                               f"{list(self.min_shape)}..{list(self.max_shape)}")


def discover_io(engine: Any, context: Any, trt: Any) -> tuple[list[IOTensor], list[IOTensor]]:
    """Inputs and outputs by name with profile 0's limits; outputs sized by the context at max inputs."""
    inputs, outputs = [], []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        try:
            datatype = kserve_datatype_of_trt(engine.get_tensor_dtype(name))
        except ModelLoadError as e:
            raise ModelLoadError(f"tensor {name!r}: {e}") from None
        tensor = IOTensor(name, datatype, shape)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            if any(d < 0 for d in shape):
                lo, opt, hi = (tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, 0))
            else:
                lo = opt = hi = shape
            tensor.min_shape, tensor.opt_shape, tensor.max_shape = lo, opt, hi
            inputs.append(tensor)
        else:
            outputs.append(tensor)
    if not inputs or not outputs:
        raise ModelLoadError(f"engine has {len(inputs)} inputs and {len(outputs)} outputs; needs both")
    for tensor in inputs:
        context.set_input_shape(tensor.name, tensor.max_shape)
    for tensor in outputs:
        tensor.max_shape = tuple(int(d) for d in context.get_tensor_shape(tensor.name))
        if any(d < 0 for d in tensor.max_shape):
            raise ModelLoadError(f"output {tensor.name!r} has a data-dependent shape "
                                 f"{list(tensor.max_shape)}, which this backend does not support")
    return inputs, outputs


def batch_limits(inputs: list[IOTensor]) -> tuple[int, int]:
    """(fewest, most) rows one run takes: the profile's batch range, or the fixed batch of a static engine."""
    low = max(t.min_shape[0] for t in inputs)
    high = min(t.max_shape[0] for t in inputs)
    if low > high:
        raise ModelLoadError(f"engine inputs disagree on the batch range: {low} > {high}")
    return low, high


class _Session:
    """The engine, its context, stream and buffers. Created, used and released on the CUDA thread only."""

    def __init__(self, trt: Any, cuda: Any, path: Path, device_id: int) -> None:
        self._cuda = cuda
        self._cuda_context = self._logger = self._runtime = self._engine = self._context = None
        self._stream = None
        self.inputs: list[IOTensor] = []
        self.outputs: list[IOTensor] = []
        cuda.init()
        self._cuda_context = cuda.Device(device_id).retain_primary_context()
        self._cuda_context.push()
        try:
            self._open(trt, path)
        except BaseException:
            self.release()
            raise

    def _open(self, trt: Any, path: Path) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime
        trt.init_libnvinfer_plugins(self._logger, "")  # engines that use TensorRT's stock plugins
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise ModelLoadError(f"TensorRT {trt.__version__} cannot deserialize {path} (built for another "
                                 f"TensorRT version or GPU, or damaged); {rebuild_hint(path)}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ModelLoadError(f"cannot create a TensorRT execution context for {path} "
                                 "(out of device memory?)")
        self._stream = self._cuda.Stream()
        self.inputs, self.outputs = discover_io(self._engine, self._context, trt)
        self.min_batch, self.max_batch = batch_limits(self.inputs)
        for tensor in self.inputs + self.outputs:
            tensor.host = self._cuda.pagelocked_empty(volume(tensor.max_shape), tensor.dtype)
            tensor.device = self._cuda.mem_alloc(max(tensor.host.nbytes, 1))
            self._context.set_tensor_address(tensor.name, int(tensor.device))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = int(next(iter(inputs.values())).shape[0])
        if rows == 0:
            return {t.name: np.zeros((0, *t.max_shape[1:]), t.dtype) for t in self.outputs}
        parts = [self._run_chunk({k: v[start:stop] for k, v in inputs.items()}, stop - start)
                 for start, stop in batch_chunks(rows, self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {t.name: np.concatenate([p[t.name] for p in parts]) for t in self.outputs}

    def _run_chunk(self, chunk: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        batch = max(rows, self.min_batch)  # a static engine (or a profile starting above 1) gets padding
        for tensor in self.inputs:
            array = np.asarray(chunk[tensor.name])
            shape = (batch, *array.shape[1:])
            tensor.check_fits(shape)
            staged = tensor.host[:volume(shape)]
            staged[:array.size] = array.reshape(-1)  # copy into the pinned buffer; never replace it
            staged[array.size:] = 0
            if not self._context.set_input_shape(tensor.name, shape):
                raise InvalidInput(f"input {tensor.name!r}: TensorRT refused shape {list(shape)}")
            self._cuda.memcpy_htod_async(tensor.device, staged, self._stream)
        if not self._context.execute_async_v3(self._stream.handle):
            raise ModelUnavailable("TensorRT execute_async_v3 failed; see TensorRT's log")
        shapes = {}
        for tensor in self.outputs:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(tensor.name))
            self._cuda.memcpy_dtoh_async(tensor.host[:volume(shape)], tensor.device, self._stream)
            shapes[tensor.name] = shape
        self._stream.synchronize()
        return {t.name: t.host[:volume(shapes[t.name])].reshape(shapes[t.name])[:rows].copy()
                for t in self.outputs}

    def release(self) -> None:
        """Free buffers, stream and TensorRT objects while the context is current, then let go of it.

        Best effort: after a GPU fault a step may fail, and the rest must still run.
        """
        for tensor in self.inputs + self.outputs:
            if tensor.device is not None:
                _quietly(f"free {tensor.name}", tensor.device.free)
            tensor.device = tensor.host = None
        self._stream = self._context = self._engine = self._runtime = self._logger = None
        if self._cuda_context is not None:
            _quietly("pop the CUDA context", self._cuda_context.pop)
            _quietly("release the CUDA context", self._cuda_context.detach)
            self._cuda_context = None


def _quietly(what: str, step: Callable[[], object]) -> None:
    try:
        step()
    except Exception as e:  # pycuda raises its own error types
        log.warning("event=tensorrt_release_step_failed step=%r error=%r", what, str(e))


def _import_runtime() -> tuple[Any, Any]:
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(INSTALL_HINT) from e
    return trt, cuda


class TrtConfig(Section):
    """The ``[backend.tensorrt]`` section.

    ``require_sidecar``: refuse an engine without ``<engine>.meta.json`` (its TensorRT version and
    device would be unknown). ``device_model_path`` is where the board names itself (Jetson: the device
    tree), compared with the device the engine was built on.
    """

    device_id: int = Field(0, description="CUDA device the engine runs on")
    require_sidecar: bool = Field(True, description="refuse an engine without <engine>.meta.json")
    device_model_path: Path = Field(DEVICE_TREE_MODEL, description="where the board names itself")


class TrtBackend(Backend):
    """Runs a TensorRT engine; every CUDA call happens on the backend's own thread, one call at a time."""

    key = "tensorrt"
    platform = "tensorrt_plan"
    suffixes = (".plan", ".engine")
    release_format = "tensorrt-plan"
    plan_target = True
    repository_file = "model.plan"
    config_model = TrtConfig

    def __init__(self, config: TrtConfig | None = None) -> None:
        self.config = config or TrtConfig()
        self._lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        self._session: _Session | None = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()

    def load(self, path: Path) -> None:
        trt, cuda = _import_runtime()
        path = Path(path)
        self._check_sidecar(path, str(trt.__version__))
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorrt-cuda")
        try:
            session = worker.submit(_Session, trt, cuda, path, self.config.device_id).result()
        except EdgecloudError:
            worker.shutdown(wait=True)
            raise
        except Exception as e:  # CUDA or TensorRT's own error types: no device, out of memory…
            worker.shutdown(wait=True)
            raise ModelLoadError(f"cannot open {path} on CUDA device {self.config.device_id}: {e}") from e
        with self._lock:
            self._worker, self._session = worker, session
            self._inputs = tuple(t.spec for t in session.inputs)
            self._outputs = tuple(t.spec for t in session.outputs)
        log.info("event=tensorrt_engine_loaded path=%s tensorrt=%s inputs=%s outputs=%s batch=%d..%d",
                 path, trt.__version__, [t.name for t in session.inputs], [t.name for t in session.outputs],
                 session.min_batch, session.max_batch)

    def _check_sidecar(self, path: Path, trt_version: str) -> None:
        if not sidecar_path(path).exists() and not self.config.require_sidecar:
            log.warning("event=tensorrt_engine_without_sidecar path=%s", path)
            return
        check_compatible(read_sidecar(path), trt_version, device_model(self.config.device_model_path), path)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            if self._session is None or self._worker is None:
                raise ModelLoadError("tensorrt backend used before load() or after close()")
            future = self._worker.submit(self._session.run, inputs)
        try:
            return future.result()
        except EdgecloudError:
            raise
        except Exception as e:  # a CUDA fault surfaces as pycuda's error types
            raise ModelUnavailable(f"TensorRT inference failed: {e}") from e

    def warmup(self, rows: int = 1) -> dict[str, np.ndarray]:
        """Run zeros shaped like the profile's optimum rows, so dynamic dimensions get a size that fits."""
        session = self._session
        if session is None:
            raise ModelLoadError("tensorrt backend used before load() or after close()")
        return self.infer({t.name: np.zeros((rows, *t.opt_shape[1:]), t.dtype) for t in session.inputs})

    def close(self) -> None:
        """Finish queued calls, then free everything on the CUDA thread; safe to call twice."""
        with self._lock:
            session, worker = self._session, self._worker
            self._session = self._worker = None
        if worker is None or session is None:
            return
        try:
            worker.submit(session.release).result()
        finally:
            worker.shutdown(wait=True)
        log.info("event=tensorrt_engine_closed")
