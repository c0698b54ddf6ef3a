"""The metadata sidecar of a TensorRT engine (``<engine>.meta.json``).

A serialized engine only loads on the TensorRT version and the device it was built on, and TensorRT's
own refusal is an opaque deserialization error. The sidecar records where and how the engine was made,
so the agent can refuse a foreign engine up front with a message that says how to rebuild it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecloud.clock import now_text
from edgecloud.errors import ModelLoadError
from edgecloud.files import atomic_write

SCHEMA = 1
#: where a Jetson (any device-tree Linux board) names its model, NUL-terminated
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
#: a device that has no device tree (x86 with a discrete GPU, CI)
UNKNOWN_DEVICE = "unknown"


def sidecar_path(engine: Path) -> Path:
    """``model.plan`` → ``model.plan.meta.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".meta.json")


def device_model(path: Path = DEVICE_TREE_MODEL) -> str:
    """The board's model string, e.g. ``NVIDIA Jetson AGX Orin Developer Kit``; ``unknown`` without one."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return UNKNOWN_DEVICE
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip() or UNKNOWN_DEVICE


def tensorrt_release(version: str) -> str:
    """``10.3.0.30`` → ``10.3.0``: engines are tied to major.minor.patch; the build number is not."""
    parts = str(version).strip().split(".")
    return ".".join(parts[:3])


def tensorrt_major(version: str) -> int:
    """``10.3.0`` → 10; an unparsable version raises ModelLoadError naming it."""
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError:
        raise ModelLoadError(f"cannot read the TensorRT version {version!r}") from None


@dataclass(frozen=True)
class EngineSidecar:
    """What an engine was built from, with what, and where."""

    tensorrt: str
    device: str
    precision: str
    onnx_sha256: str
    build_flags: tuple[str, ...] = ()
    max_batch: int = 0
    created_at: str = field(default_factory=now_text)
    schema: int = SCHEMA

    def to_json(self) -> str:
        data = asdict(self)
        data["build_flags"] = list(self.build_flags)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineSidecar:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["build_flags"] = tuple(known.get("build_flags") or ())
        return cls(**known)


def write_sidecar(engine: Path, sidecar: EngineSidecar) -> Path:
    """Write the sidecar beside ``engine`` atomically."""
    path = sidecar_path(engine)
    atomic_write(path, sidecar.to_json().encode())
    return path


def read_sidecar(engine: Path) -> EngineSidecar:
    """The sidecar of ``engine``; missing or unreadable → ModelLoadError saying how to rebuild."""
    path = sidecar_path(engine)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return EngineSidecar.from_dict(data)
    except FileNotFoundError:
        raise ModelLoadError(f"engine {engine} has no sidecar {path.name}: its TensorRT version and device "
                             f"are unknown; {rebuild_hint(engine)}") from None
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"engine sidecar {path} is unreadable ({e}); {rebuild_hint(engine)}") from None


def rebuild_hint(engine: Path) -> str:
    return (f"rebuild it on this device from its ONNX model: "
            f"edgecloud engine build MODEL.onnx --out {engine}")


def _differences(built_trt: str, built_device: str, running_trt: str, device: str) -> list[str]:
    problems = []
    built, running = tensorrt_release(built_trt), tensorrt_release(running_trt)
    if built != running:
        problems.append(f"built with TensorRT {built}, this device runs TensorRT {running}")
    if built_device != device:
        problems.append(f"built on device {built_device!r}, this device is {device!r}")
    return problems


def check_compatible(sidecar: EngineSidecar, runtime_trt_version: str, device: str,
                     engine: Path | str = "the engine") -> None:
    """Raise ModelLoadError when the engine was built for another TensorRT release or device."""
    problems = _differences(sidecar.tensorrt, sidecar.device, runtime_trt_version, device)
    if problems:
        raise ModelLoadError(f"engine {engine} does not fit this device: {'; '.join(problems)}; "
                             f"{rebuild_hint(Path(str(engine)))}")


def check_plan_target(target: Mapping[str, Any], runtime_trt_version: str, device: str) -> None:
    """Refuse a ``tensorrt-plan`` release whose ``artifact.target`` is another TensorRT or device."""
    problems = _differences(str(target.get("tensorrt", "")), str(target.get("device", "")),
                            runtime_trt_version, device)
    if problems:
        raise ModelLoadError(f"plan release does not fit this device: {'; '.join(problems)}; publish the "
                             "ONNX model instead (each device builds its own engine) or a plan built here")
