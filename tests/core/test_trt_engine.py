"""TensorRT backend.

Without a GPU, the backend runs against stand-ins for ``tensorrt`` and ``pycuda.driver`` that follow
the documented TensorRT 10 / pycuda calls and emulate a linear classifier on "device" memory: I/O
discovery, profile limits, chunking and padding, pinned-buffer reuse, the CUDA thread, sidecar checks
and release are all exercised. The tests marked ``gpu`` run the real thing on a Jetson or NVIDIA GPU.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgecloud.backends import backend_class, backend_key_for, trt_engine
from edgecloud.backends.trt_engine import (
    IOTensor,
    TrtBackend,
    TrtConfig,
    batch_chunks,
    kserve_datatype_of_trt,
)
from edgecloud.engine.sidecar import EngineSidecar, write_sidecar
from edgecloud.errors import BackendUnavailable, InvalidInput, ModelLoadError, ModelUnavailable
from tests.conftest import EDGE_INT8

FEATURES, CLASSES = 6, 3
DEVICE = "NVIDIA Jetson AGX Orin Developer Kit"


# ---------------------------------------------------------------- pure parts


def test_tensorrt_datatypes_map_to_kserve():
    member = SimpleNamespace(name="HALF")  # pybind11 enum members carry .name
    assert kserve_datatype_of_trt(member) == "FP16"
    assert kserve_datatype_of_trt("DataType.FLOAT") == "FP32"
    expected = {"FLOAT": "FP32", "HALF": "FP16", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64",
                "BOOL": "BOOL", "UINT8": "UINT8"}
    assert {name: kserve_datatype_of_trt(name) for name in expected} == expected
    for unsupported in ("BF16", "FP8", "INT4", "FP4"):
        with pytest.raises(ModelLoadError, match=unsupported):
            kserve_datatype_of_trt(unsupported)


def test_batches_are_split_at_the_profile_maximum():
    assert batch_chunks(20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert batch_chunks(8, 8) == [(0, 8)]
    assert batch_chunks(1, 8) == [(0, 1)]
    assert batch_chunks(0, 8) == []


def test_shapes_are_checked_against_the_profile():
    tensor = IOTensor("image", "FP32", (-1, 3, -1, -1), min_shape=(1, 3, 32, 32), opt_shape=(1, 3, 64, 64),
                      max_shape=(8, 3, 128, 128))
    assert tensor.spec.shape == (-1, 3, -1, -1)
    tensor.check_fits((8, 3, 128, 32))
    for bad in ((9, 3, 64, 64), (1, 3, 16, 64), (1, 3, 64)):
        with pytest.raises(InvalidInput, match="image"):
            tensor.check_fits(bad)


def test_backend_chosen_by_file_suffix_or_config():
    assert backend_key_for(Path("m.plan")) == "tensorrt"
    assert backend_key_for(Path("m.engine")) == "tensorrt"
    assert backend_key_for(Path("m.onnx")) == "onnxruntime"
    assert backend_key_for(Path("m.onnx"), "tensorrt") == "tensorrt"
    assert backend_class("tensorrt") is TrtBackend


def test_missing_runtime_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(BackendUnavailable) as e:
        TrtBackend().load(tmp_path / "m.plan")
    assert str(e.value) == ("backend tensorrt unavailable: needs JetPack's TensorRT and "
                            "`pip install edgecloud[jetson]`")


# ---------------------------------------------------------------- stand-ins for tensorrt and pycuda

ENGINE_BYTES = b"fake serialized engine"


class FakeCuda:
    """pycuda.driver as the backend uses it; device memory is bytes keyed by address."""

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.threads: set[int] = set()
        self.pinned: list[np.ndarray] = []
        self.freed: list[int] = []
        self.context_stack: list[str] = []
        self.detached = 0
        self.copies_from_pinned = 0
        self._next = 0x1000

    def _seen(self) -> None:
        self.threads.add(threading.get_ident())

    def init(self) -> None:
        self._seen()

    def Device(self, number):  # noqa: N802 (pycuda's name)
        cuda = self

        class Context:
            def push(self):
                cuda._seen()
                cuda.context_stack.append(f"primary:{number}")

            @staticmethod
            def pop():
                cuda._seen()
                cuda.context_stack.pop()

            def detach(self):
                cuda.detached += 1

        return SimpleNamespace(retain_primary_context=lambda: (self._seen(), Context())[1])

    def Stream(self):  # noqa: N802
        self._seen()
        return SimpleNamespace(handle=0xBEEF, synchronize=self._seen)

    def pagelocked_empty(self, size, dtype):
        self._seen()
        array = np.full(size, 7, dtype=dtype)  # garbage, like real uninitialised memory
        self.pinned.append(array)
        return array

    def mem_alloc(self, nbytes):
        self._seen()
        address, self._next = self._next, self._next + nbytes + 256
        self.memory[address] = bytearray(nbytes)
        cuda = self

        class Allocation:
            def __int__(self):
                return address

            def free(self):
                cuda._seen()
                cuda.freed.append(address)

        return Allocation()

    def memcpy_htod_async(self, dest, src, stream):
        self._seen()
        assert stream.handle == 0xBEEF
        if any(np.shares_memory(src, p) for p in self.pinned):
            self.copies_from_pinned += 1
        self.memory[int(dest)][:src.nbytes] = src.tobytes()

    def memcpy_dtoh_async(self, dest, src, stream):
        self._seen()
        assert any(np.shares_memory(dest, p) for p in self.pinned), "outputs land in the pinned buffer"
        dest[...] = np.frombuffer(bytes(self.memory[int(src)][:dest.nbytes]), dest.dtype)


class FakeEngine:
    """A linear classifier ``logits = x @ W + b`` with input ``x`` and output ``logits``."""

    def __init__(self, cuda: FakeCuda, batch: int | None, max_batch: int, out_dtype: str = "FLOAT"):
        self.cuda, self.batch, self.max_batch, self.out_dtype = cuda, batch, max_batch, out_dtype
        rng = np.random.default_rng(0)
        self.w = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
        self.b = rng.standard_normal(CLASSES).astype(np.float32)
        self.num_io_tensors = 2
        self.runs: list[int] = []
        self.fail_execute = False

    def get_tensor_name(self, index):
        return ["x", "logits"][index]

    def get_tensor_mode(self, name):
        return "INPUT" if name == "x" else "OUTPUT"

    def get_tensor_shape(self, name):
        batch = -1 if self.batch is None else self.batch
        return [batch, FEATURES] if name == "x" else [batch, CLASSES]

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name="FLOAT" if name == "x" else self.out_dtype)

    def get_tensor_profile_shape(self, name, profile):
        assert (name, profile) == ("x", 0)
        return [[1, FEATURES], [1, FEATURES], [self.max_batch, FEATURES]]

    def create_execution_context(self):
        self.cuda._seen()
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        self.engine.cuda._seen()
        low = self.engine.batch or 1
        high = self.engine.batch or self.engine.max_batch
        if not low <= shape[0] <= high or tuple(shape[1:]) != (FEATURES,):
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        self.engine.cuda._seen()
        assert self.shape is not None, "output shapes are read after set_input_shape"
        return [self.shape[0], FEATURES] if name == "x" else [self.shape[0], CLASSES]

    def set_tensor_address(self, name, address):
        self.engine.cuda._seen()
        self.addresses[name] = address

    def execute_async_v3(self, stream_handle):
        cuda, engine = self.engine.cuda, self.engine
        cuda._seen()
        assert stream_handle == 0xBEEF, "runs on the backend's own stream"
        if engine.fail_execute:
            return False
        rows = self.shape[0]
        x = np.frombuffer(bytes(cuda.memory[self.addresses["x"]][:rows * FEATURES * 4]), np.float32)
        y = (x.reshape(rows, FEATURES) @ engine.w + engine.b).astype(np.float32)
        cuda.memory[self.addresses["logits"]][:y.nbytes] = y.tobytes()
        engine.runs.append(rows)
        return True


class FakeLogger:
    WARNING = "warning"

    def __init__(self, severity) -> None:
        self.severity = severity


def fake_tensorrt(engine: FakeEngine) -> SimpleNamespace:
    class Runtime:
        def __init__(self, logger):
            assert isinstance(logger, FakeLogger)

        def deserialize_cuda_engine(self, data):
            engine.cuda._seen()
            return engine if data == ENGINE_BYTES else None

    def init_libnvinfer_plugins(logger, namespace):
        assert isinstance(logger, FakeLogger) and namespace == ""

    return SimpleNamespace(__version__="10.3.0.30", TensorIOMode=SimpleNamespace(INPUT="INPUT"),
                           Logger=FakeLogger, Runtime=Runtime,
                           init_libnvinfer_plugins=init_libnvinfer_plugins)


@pytest.fixture
def device_file(tmp_path) -> Path:
    path = tmp_path / "model"
    path.write_bytes(DEVICE.encode() + b"\0")
    return path


def make_engine_file(tmp_path: Path, tensorrt: str = "10.3.0", device: str = DEVICE,
                     content: bytes = ENGINE_BYTES) -> Path:
    path = tmp_path / "edge.plan"
    path.write_bytes(content)
    write_sidecar(path, EngineSidecar(tensorrt=tensorrt, device=device, precision="int8+fp16",
                                      onnx_sha256="ab" * 32, max_batch=8))
    return path


def fake_runtime(monkeypatch, batch=None, max_batch=8, out_dtype="FLOAT"):
    cuda = FakeCuda()
    engine = FakeEngine(cuda, batch, max_batch, out_dtype)
    monkeypatch.setattr(trt_engine, "_import_runtime", lambda: (fake_tensorrt(engine), cuda))
    return cuda, engine


def reference(engine: FakeEngine, x: np.ndarray) -> np.ndarray:
    return x @ engine.w + engine.b


# ---------------------------------------------------------------- the backend on the stand-ins


def test_runs_the_engine_by_name_on_one_cuda_thread(monkeypatch, tmp_path, device_file):
    cuda, engine = fake_runtime(monkeypatch, max_batch=8)
    backend = TrtBackend(TrtConfig(device_model_path=device_file))
    backend.load(make_engine_file(tmp_path))
    try:
        assert [(s.name, s.datatype, s.shape) for s in backend.inputs] == [("x", "FP32", (-1, FEATURES))]
        assert [(s.name, s.datatype, s.shape) for s in backend.outputs] == [("logits", "FP32", (-1, CLASSES))]
        assert cuda.context_stack == ["primary:0"]
        pinned = list(cuda.pinned)
        assert [p.size for p in pinned] == [8 * FEATURES, 8 * CLASSES]  # sized for the profile's max

        rng = np.random.default_rng(1)
        x = rng.standard_normal((3, FEATURES)).astype(np.float32)
        out = backend.infer({"x": x})
        np.testing.assert_allclose(out["logits"], reference(engine, x), rtol=1e-5, atol=1e-5)
        assert engine.runs == [3]

        big = rng.standard_normal((20, FEATURES)).astype(np.float32)
        out = backend.infer({"x": big})
        assert engine.runs[1:] == [8, 8, 4]
        np.testing.assert_allclose(out["logits"], reference(engine, big), rtol=1e-5, atol=1e-5)

        backend.warmup(2)
        assert cuda.pinned == pinned, "pinned buffers are allocated once and reused"
        assert cuda.copies_from_pinned == len(engine.runs)
        assert len(cuda.threads) == 1 and threading.get_ident() not in cuda.threads
    finally:
        backend.close()
    assert sorted(cuda.freed) == sorted(cuda.memory)
    assert cuda.context_stack == [] and cuda.detached == 1
    backend.close()  # twice is fine
    with pytest.raises(ModelLoadError, match="after close"):
        backend.infer({"x": np.zeros((1, FEATURES), np.float32)})


def test_concurrent_calls_share_the_engine_safely(monkeypatch, tmp_path, device_file):
    cuda, engine = fake_runtime(monkeypatch, max_batch=4)
    backend = TrtBackend(TrtConfig(device_model_path=device_file))
    backend.load(make_engine_file(tmp_path))
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((n % 7 + 1, FEATURES)).astype(np.float32) for n in range(24)]
    results: dict[int, np.ndarray] = {}

    def call(i):
        results[i] = backend.infer({"x": batches[i]})["logits"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backend.close()
    for i, x in enumerate(batches):
        np.testing.assert_allclose(results[i], reference(engine, x), rtol=1e-5, atol=1e-5)
    assert len(cuda.threads) == 1


def test_static_batch_engine_pads_the_last_chunk(monkeypatch, tmp_path, device_file):
    _, engine = fake_runtime(monkeypatch, batch=4)
    backend = TrtBackend(TrtConfig(device_model_path=device_file))
    backend.load(make_engine_file(tmp_path))
    x = np.random.default_rng(3).standard_normal((6, FEATURES)).astype(np.float32)
    out = backend.infer({"x": x})
    backend.close()
    assert engine.runs == [4, 4]
    assert out["logits"].shape == (6, CLASSES)
    np.testing.assert_allclose(out["logits"], reference(engine, x), rtol=1e-5, atol=1e-5)
    assert backend.inputs[0].shape == (-1, FEATURES)


def test_engine_for_another_tensorrt_or_device_is_refused_before_any_cuda_call(monkeypatch, tmp_path,
                                                                               device_file):
    cuda, _ = fake_runtime(monkeypatch)
    backend = TrtBackend(TrtConfig(device_model_path=device_file))
    with pytest.raises(ModelLoadError, match=r"TensorRT 8\.6\.2.*edgecloud engine build"):
        backend.load(make_engine_file(tmp_path, tensorrt="8.6.2"))
    with pytest.raises(ModelLoadError, match=r"Orin Nano.*edgecloud engine build"):
        backend.load(make_engine_file(tmp_path, device="NVIDIA Jetson Orin Nano Developer Kit"))
    assert not cuda.threads


def test_sidecar_is_required_unless_configured_otherwise(monkeypatch, tmp_path, device_file):
    fake_runtime(monkeypatch)
    path = tmp_path / "bare.plan"
    path.write_bytes(ENGINE_BYTES)
    with pytest.raises(ModelLoadError, match=r"no sidecar bare\.plan\.meta\.json"):
        TrtBackend(TrtConfig(device_model_path=device_file)).load(path)
    backend = TrtBackend(TrtConfig(device_model_path=device_file, require_sidecar=False))
    backend.load(path)
    backend.close()


def test_undeserializable_engine_is_a_load_error_and_releases_the_context(monkeypatch, tmp_path,
                                                                         device_file):
    cuda, _ = fake_runtime(monkeypatch)
    with pytest.raises(ModelLoadError, match=r"cannot deserialize.*rebuild"):
        TrtBackend(TrtConfig(device_model_path=device_file)).load(make_engine_file(tmp_path, content=b"x"))
    assert cuda.context_stack == [] and cuda.detached == 1


def test_unsupported_io_type_names_the_tensor(monkeypatch, tmp_path, device_file):
    cuda, _ = fake_runtime(monkeypatch, out_dtype="BF16")
    with pytest.raises(ModelLoadError, match=r"'logits'.*BF16"):
        TrtBackend(TrtConfig(device_model_path=device_file)).load(make_engine_file(tmp_path))
    assert cuda.context_stack == []


def test_failed_execution_is_unavailable(monkeypatch, tmp_path, device_file):
    _, engine = fake_runtime(monkeypatch)
    backend = TrtBackend(TrtConfig(device_model_path=device_file))
    backend.load(make_engine_file(tmp_path))
    engine.fail_execute = True
    with pytest.raises(ModelUnavailable, match="execute_async_v3"):
        backend.infer({"x": np.zeros((1, FEATURES), np.float32)})
    backend.close()


def test_cuda_errors_become_edgecloud_errors(monkeypatch, tmp_path, device_file):
    cuda, _ = fake_runtime(monkeypatch)

    def no_device():
        raise RuntimeError("cuInit failed: no CUDA-capable device is detected")

    monkeypatch.setattr(cuda, "init", no_device)
    with pytest.raises(ModelLoadError, match=r"cannot open .* on CUDA device 0: cuInit failed"):
        TrtBackend(TrtConfig(device_model_path=device_file)).load(make_engine_file(tmp_path))

    cuda, _ = fake_runtime(monkeypatch)
    backend = TrtBackend(TrtConfig(device_model_path=device_file))
    backend.load(make_engine_file(tmp_path))

    def fault(*args):
        raise RuntimeError("cuMemcpyHtoDAsync failed: unspecified launch failure")

    monkeypatch.setattr(cuda, "memcpy_htod_async", fault)
    with pytest.raises(ModelUnavailable, match="launch failure"):
        backend.infer({"x": np.zeros((1, FEATURES), np.float32)})
    for tensor in backend._session.inputs:  # after a fault, freeing may fail too
        tensor.device.free = fault
    backend.close()
    assert cuda.context_stack == [] and cuda.detached == 1  # the context is let go regardless


# ---------------------------------------------------------------- on a real GPU


def _gpu() -> bool:
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


needs_gpu = pytest.mark.skipif(not _gpu(), reason="needs an NVIDIA GPU and TensorRT")


@pytest.mark.gpu
@needs_gpu
def test_engine_matches_onnxruntime_within_int8_tolerance(tmp_path):
    """Build from the demo edge model on this GPU and compare with ONNX Runtime on the CPU."""
    if not EDGE_INT8.exists():
        pytest.skip(f"demo edge model not built yet: {EDGE_INT8}")
    from edgecloud.backends.ort_session import OrtBackend
    from edgecloud.engine.builder import BuildOptions, build_engine

    engine = tmp_path / "edge.plan"
    result = build_engine(EDGE_INT8, engine, BuildOptions(max_batch=8))
    assert result.size <= 1_000_000_000 and engine.with_name("edge.plan.meta.json").exists()

    ort = OrtBackend()
    ort.load(EDGE_INT8)
    trt = TrtBackend()
    trt.load(engine)
    try:
        spec = ort.inputs[0]
        rng = np.random.default_rng(0)
        x = rng.random((20, *spec.row_shape)).astype(np.float32)  # more rows than the profile's max
        expected = ort.infer({spec.name: x})
        got = trt.infer({spec.name: x})
        for name, want in expected.items():
            assert got[name].shape == want.shape
            scale = float(np.abs(want).max()) or 1.0
            assert float(np.abs(got[name] - want).mean()) <= 0.05 * scale
            if want.ndim == 2:
                agree = np.mean(got[name].argmax(1) == want.argmax(1))
                assert agree >= 0.95, f"top-1 agrees on {agree:.0%} of rows"
    finally:
        trt.close()
        ort.close()
