"""Build a TensorRT engine from a QDQ INT8 ONNX model with TensorRT's Python builder.

INT8 is the explicit kind: the scales are the Q/DQ nodes of the ONNX graph (docs/design.md §11), so there is
no calibrator. TensorRT 10 still needs the INT8 (and FP16, for the layers left unquantized) builder
flags to consider those kernels; TensorRT 11 drops precision flags and builds every network strongly
typed, taking the precision from the graph alone, so the version decides which path is used.
Everything but :func:`build_engine` is pure and runs without TensorRT.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgecloud.engine.sidecar import EngineSidecar, device_model, tensorrt_major, write_sidecar
from edgecloud.errors import BackendUnavailable, ModelLoadError
from edgecloud.files import atomic_write, file_sha256

log = logging.getLogger(__name__)

#: the edge budget (docs/design.md §9) for a model file or engine: edgecloud.release's
#: DEFAULT_BUDGET_BYTES, not imported from there (release imports the backends, which import this)
EDGE_BUDGET_BYTES = 1_000_000_000
#: JetPack 6's TensorRT, assumed when the command line is printed where TensorRT is not installed
JETPACK6_TENSORRT = "10.3.0"
INSTALL_HINT = "backend tensorrt unavailable: needs JetPack's TensorRT and `pip install edgecloud[jetson]`"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuildOptions:
    """How to build. ``opt_batch`` defaults to 1: local apps mostly send one frame per call."""

    int8: bool = True
    fp16: bool = True
    max_batch: int = 8
    opt_batch: int | None = None
    dla_core: int | None = None
    workspace_mb: int = 1024
    budget_bytes: int = EDGE_BUDGET_BYTES

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.opt_batch is not None and not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"opt_batch must be within 1..{self.max_batch}, got {self.opt_batch}")
        if self.dla_core is not None and self.dla_core < 0:
            raise ValueError(f"dla_core must be >= 0, got {self.dla_core}")
        if self.workspace_mb < 1:
            raise ValueError(f"workspace_mb must be >= 1, got {self.workspace_mb}")


@dataclass(frozen=True)
class PrecisionPlan:
    """The network creation mode and builder flags a TensorRT version takes for the requested precision."""

    strongly_typed: bool
    flags: tuple[str, ...]

    @property
    def label(self) -> str:
        """The precision as recorded in the sidecar: ``int8+fp16``, ``fp32``, ``strongly-typed``…"""
        if self.strongly_typed:
            return "strongly-typed"
        return "+".join(f.lower() for f in self.flags) or "fp32"


@dataclass(frozen=True)
class BuildResult:
    engine: Path
    size: int
    sidecar: EngineSidecar
    trtexec: str


def precision_plan(trt_version: str, int8: bool, fp16: bool) -> PrecisionPlan:
    """TensorRT < 11: INT8/FP16 builder flags over a weakly typed network; >= 11: strongly typed, no flags."""
    if tensorrt_major(trt_version) >= 11:
        return PrecisionPlan(strongly_typed=True, flags=())
    return PrecisionPlan(strongly_typed=False,
                         flags=tuple(f for f, on in (("INT8", int8), ("FP16", fp16)) if on))


def profile_shapes(inputs: Mapping[str, Shape],
                   options: BuildOptions) -> dict[str, tuple[Shape, Shape, Shape]]:
    """min/opt/max shapes of every input whose batch dimension is dynamic (-1); the others need none.

    ``inputs`` maps input names to shapes. Only dim 0 may be dynamic: another dynamic dimension has no
    size to optimize for, so the model must be exported with fixed per-row shapes.
    """
    opt = options.opt_batch or 1
    profiles = {}
    for name, shape in inputs.items():
        rows = tuple(shape[1:])
        if any(d < 0 for d in rows):
            raise ModelLoadError(f"input {name!r} has shape {list(shape)}: only the batch dimension "
                                 "may be dynamic; export the model with fixed per-row dimensions")
        if shape and shape[0] < 0:
            profiles[name] = ((1, *rows), (opt, *rows), (options.max_batch, *rows))
    return profiles


def _dims(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(onnx: Path, engine: Path, inputs: Mapping[str, Shape], options: BuildOptions,
                    trt_version: str = JETPACK6_TENSORRT) -> str:
    """The ``trtexec`` command line that builds the same engine as :func:`build_engine`."""
    plan = precision_plan(trt_version, options.int8, options.fp16)
    args = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}"]
    args += [f"--{flag.lower()}" for flag in plan.flags]
    profiles = profile_shapes(inputs, options)
    if profiles:
        for key, index in (("minShapes", 0), ("optShapes", 1), ("maxShapes", 2)):
            spec = ",".join(f"{name}:{_dims(shapes[index])}" for name, shapes in profiles.items())
            args.append(f"--{key}={spec}")
    args.append(f"--memPoolSize=workspace:{options.workspace_mb}M")
    if options.dla_core is not None:
        args += [f"--useDLACore={options.dla_core}", "--allowGPUFallback"]
    return shlex.join(args)


def build_flags(plan: PrecisionPlan, options: BuildOptions) -> tuple[str, ...]:
    """Every choice that shaped the engine, for the sidecar."""
    flags = list(plan.flags)
    if plan.strongly_typed:
        flags.append("STRONGLY_TYPED")
    if options.dla_core is not None:
        flags += [f"DLA_CORE={options.dla_core}", "GPU_FALLBACK"]
    flags.append(f"WORKSPACE_MB={options.workspace_mb}")
    return tuple(flags)


def check_budget(size: int, budget: int, what: Path | str) -> None:
    """An engine over the edge budget is refused (docs/design.md §9)."""
    if size > budget:
        raise ModelLoadError(f"{what} is {size} bytes, over the edge budget of {budget} bytes; "
                             "lower --max-batch or quantize the model further")


def onnx_inputs(onnx: Path) -> dict[str, Shape]:
    """Input names and shapes (-1 = dynamic) of an ONNX model, read with ONNX Runtime on the CPU."""
    from edgecloud.backends.ort_session import OrtBackend

    backend = OrtBackend()
    backend.load(Path(onnx))
    try:
        return {spec.name: spec.shape for spec in backend.inputs}
    finally:
        backend.close()


def installed_tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None where it is not installed."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def build_engine(onnx: Path, out: Path, options: BuildOptions | None = None,
                 device: str | None = None) -> BuildResult:
    """Parse ``onnx``, build, check the budget, write ``out`` and its sidecar; needs TensorRT and a GPU."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(INSTALL_HINT) from e
    options = options or BuildOptions()
    onnx, out = Path(onnx), Path(out)
    plan = precision_plan(trt.__version__, options.int8, options.fp16)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(trt_logger, "")
    builder = trt.Builder(trt_logger)
    creation = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(creation)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelLoadError(f"TensorRT cannot parse {onnx}: {errors}")
    inputs = {t.name: tuple(t.shape) for t in (network.get_input(i) for i in range(network.num_inputs))}
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profiles = profile_shapes(inputs, options)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if options.dla_core is not None:
        if options.dla_core >= builder.num_DLA_cores:
            raise ModelLoadError(f"DLA core {options.dla_core} requested, this device has "
                                 f"{builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    trtexec = trtexec_command(onnx, out, inputs, options, trt.__version__)
    log.info("event=engine_build_start onnx=%s out=%s tensorrt=%s precision=%s max_batch=%d trtexec=%r",
             onnx, out, trt.__version__, plan.label, options.max_batch, trtexec)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelLoadError(f"TensorRT could not build an engine from {onnx}; see TensorRT's log above")
    size = int(serialized.nbytes)
    check_budget(size, options.budget_bytes, f"engine built from {onnx}")
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = EngineSidecar(tensorrt=trt.__version__, device=device or device_model(),
                            precision=plan.label, onnx_sha256=file_sha256(onnx),
                            build_flags=build_flags(plan, options),
                            max_batch=options.max_batch if profiles else min(s[0] for s in inputs.values()))
    write_sidecar(out, sidecar)
    atomic_write(out, memoryview(serialized))
    log.info("event=engine_built out=%s bytes=%d precision=%s device=%r", out, size, plan.label,
             sidecar.device)
    return BuildResult(out, size, sidecar, trtexec)
