"""Options for ONNX Runtime's TensorRT execution provider: the other GPU path for the same QDQ model.

ONNX Runtime builds the TensorRT engine itself on first load; the engine and timing caches under the
agent's state dir make every later start fast. The result plugs into ``OrtConfig`` (ort_session.py):
``OrtConfig(providers=PROVIDERS, provider_options=tensorrt_provider_options(...))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

TENSORRT_EP = "TensorrtExecutionProvider"
#: TensorRT first; CUDA takes the nodes TensorRT cannot; CPU keeps a device without a GPU serving
PROVIDERS = (TENSORRT_EP, "CUDAExecutionProvider", "CPUExecutionProvider")
#: one directory level under the state dir: ONNX Runtime creates it but not its parents
CACHE_DIR = "ort-trt-cache"


def _flag(on: bool) -> str:
    return "True" if on else "False"


def _shapes(profile: Mapping[str, tuple[int, ...]], rows: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in (rows, *row_shape))}"
                    for name, row_shape in profile.items())


def tensorrt_provider_options(state_dir: Path, int8: bool = True, fp16: bool = True,
                              device_id: int = 0, workspace_mb: int = 1024,
                              row_shapes: Mapping[str, tuple[int, ...]] | None = None,
                              max_batch: int = 8, opt_batch: int = 1,
                              dla_core: int | None = None) -> dict[str, dict[str, str]]:
    """``OrtConfig.provider_options`` for the TensorRT EP.

    ``trt_int8_enable`` on a QDQ model takes the scales from its Q/DQ nodes (no calibration table).
    ``row_shapes`` (input name → per-row shape) adds an explicit batch profile 1..``max_batch``, so
    a new batch size never triggers an engine rebuild at serving time.
    """
    cache = str(Path(state_dir) / CACHE_DIR)
    options = {
        "device_id": str(device_id),
        "trt_int8_enable": _flag(int8),
        "trt_fp16_enable": _flag(fp16),
        "trt_max_workspace_size": str(workspace_mb << 20),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
    }
    if row_shapes:
        options["trt_profile_min_shapes"] = _shapes(row_shapes, 1)
        options["trt_profile_opt_shapes"] = _shapes(row_shapes, opt_batch)
        options["trt_profile_max_shapes"] = _shapes(row_shapes, max_batch)
    if dla_core is not None:
        options["trt_dla_enable"] = "True"
        options["trt_dla_core"] = str(dla_core)
    return {TENSORRT_EP: options}
