"""``edgecloud engine build``: a TensorRT engine from a QDQ ONNX model, on the device that will run it;
``edgecloud engine sidecar``: the sidecar for an engine built with trtexec (deploy/jetson/build_engine.sh)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecloud.engine.builder import (
    EDGE_BUDGET_BYTES,
    INSTALL_HINT,
    JETPACK6_TENSORRT,
    BuildOptions,
    build_engine,
    check_budget,
    installed_tensorrt_version,
    onnx_inputs,
    trtexec_command,
)
from edgecloud.engine.sidecar import EngineSidecar, device_model, write_sidecar
from edgecloud.errors import BackendUnavailable, ConfigError
from edgecloud.files import file_sha256


def register(sub: argparse._SubParsersAction) -> None:
    engine = sub.add_parser("engine", help="TensorRT engines (Jetson)", description=__doc__)
    commands = engine.add_subparsers(dest="engine_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "build", help="build a TensorRT engine and its sidecar from an ONNX model",
        description="Build with TensorRT's Python builder (explicit INT8 from the model's Q/DQ nodes, FP16 "
                    "for the rest), check the engine against the edge budget, write <engine>.meta.json, "
                    "and print the equivalent trtexec command.")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument("--out", type=Path, help="engine path (default: MODEL with the suffix .plan)")
    p.add_argument("--int8", action="store_true", help="INT8 kernels (default: --int8 and --fp16)")
    p.add_argument("--fp16", action="store_true", help="FP16 kernels (default: --int8 and --fp16)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of the profile (default 8)")
    p.add_argument("--dla-core", type=int, help="build for this DLA core, with GPU fallback (Orin)")
    p.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit (default 1024)")
    p.add_argument("--budget-bytes", type=int, default=EDGE_BUDGET_BYTES,
                   help=f"refuse an engine larger than this (default {EDGE_BUDGET_BYTES})")
    p.add_argument("--print-trtexec", action="store_true",
                   help="only print the equivalent trtexec command (works without TensorRT; assumes "
                        f"TensorRT {JETPACK6_TENSORRT} when it is not installed)")
    p.set_defaults(func=run_build)

    s = commands.add_parser(
        "sidecar", help="write <engine>.meta.json for an engine built with trtexec",
        description="Record this device's TensorRT version and model, and the source ONNX's sha256, beside "
                    "an engine built on this device by other means (deploy/jetson/build_engine.sh).")
    s.add_argument("engine", type=Path, metavar="ENGINE.plan")
    s.add_argument("--onnx", type=Path, required=True, help="the ONNX model the engine was built from")
    s.add_argument("--precision", default="int8+fp16", help="e.g. int8+fp16, strongly-typed, fp32")
    s.add_argument("--max-batch", type=int, default=0, help="largest batch of the engine's profile")
    s.add_argument("--flag", action="append", default=[], dest="flags",
                   help="a build flag to record (repeatable), e.g. INT8, DLA_CORE=0")
    s.add_argument("--budget-bytes", type=int, default=EDGE_BUDGET_BYTES)
    s.set_defaults(func=run_sidecar)


def options_from(args: argparse.Namespace) -> BuildOptions:
    """Flags → BuildOptions; neither --int8 nor --fp16 means both. Bad values are ConfigErrors (exit 2)."""
    both = not (args.int8 or args.fp16)
    try:
        return BuildOptions(int8=args.int8 or both, fp16=args.fp16 or both, max_batch=args.max_batch,
                            dla_core=args.dla_core, workspace_mb=args.workspace_mb,
                            budget_bytes=args.budget_bytes)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run_build(args: argparse.Namespace) -> int:
    options = options_from(args)
    if not args.model.is_file():
        raise ConfigError(f"model: {args.model} does not exist")
    out = args.out or args.model.with_suffix(".plan")
    if args.print_trtexec:
        version = installed_tensorrt_version() or JETPACK6_TENSORRT
        print(trtexec_command(args.model, out, onnx_inputs(args.model), options, version))
        return 0
    result = build_engine(args.model, out, options)
    print(f"built {result.engine} ({result.size} bytes, {result.sidecar.precision}, "
          f"TensorRT {result.sidecar.tensorrt}, device {result.sidecar.device!r})")
    print(f"equivalent: {result.trtexec}")
    return 0


def run_sidecar(args: argparse.Namespace) -> int:
    for what, path in (("engine", args.engine), ("onnx", args.onnx)):
        if not path.is_file():
            raise ConfigError(f"{what}: {path} does not exist")
    version = installed_tensorrt_version()
    if version is None:
        raise BackendUnavailable(INSTALL_HINT)
    check_budget(args.engine.stat().st_size, args.budget_bytes, args.engine)
    sidecar = EngineSidecar(tensorrt=version, device=device_model(), precision=args.precision,
                            onnx_sha256=file_sha256(args.onnx), build_flags=tuple(args.flags),
                            max_batch=args.max_batch)
    print(f"wrote {write_sidecar(args.engine, sidecar)}")
    return 0
