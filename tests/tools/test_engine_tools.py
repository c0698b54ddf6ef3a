"""Engine toolchain parts that need no GPU: sidecar, compatibility check, precision by TensorRT version,
optimization profile, trtexec command, budget, cache, ONNX Runtime TensorRT-EP options, CLI."""

from __future__ import annotations

import json
import os
import shlex
import sys

import numpy as np
import pytest

from edgecloud.backends.ort_session import OrtBackend, OrtConfig
from edgecloud.engine.builder import (
    BuildOptions,
    build_engine,
    build_flags,
    check_budget,
    onnx_inputs,
    precision_plan,
    profile_shapes,
    trtexec_command,
)
from edgecloud.engine.cache import EngineCache
from edgecloud.engine.ort_trt_options import PROVIDERS, tensorrt_provider_options
from edgecloud.engine.sidecar import (
    EngineSidecar,
    check_compatible,
    check_plan_target,
    device_model,
    read_sidecar,
    sidecar_path,
    tensorrt_release,
    write_sidecar,
)
from edgecloud.errors import BackendUnavailable, ModelLoadError
from edgecloud.files import file_sha256
from edgecloud_tools import cli, engine_cli
from tests.support.onnx_models import linear_classifier, reference_logits

ORIN = "NVIDIA Jetson AGX Orin Developer Kit"


# ---------------------------------------------------------------- sidecar


def test_sidecar_round_trip_and_forward_compatible(tmp_path):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"plan")
    sidecar = EngineSidecar(tensorrt="10.3.0", device=ORIN, precision="int8+fp16", onnx_sha256="ab" * 32,
                            build_flags=("INT8", "FP16"), max_batch=8)
    path = write_sidecar(engine, sidecar)
    assert path == sidecar_path(engine) == tmp_path / "m.plan.meta.json"
    data = json.loads(path.read_text())
    assert data["created_at"].endswith("Z") and data["schema"] == 1
    assert read_sidecar(engine) == sidecar
    data["added_later"] = True  # a newer writer's key is ignored
    path.write_text(json.dumps(data))
    assert read_sidecar(engine) == sidecar


def test_unreadable_or_missing_sidecar_says_how_to_rebuild(tmp_path):
    engine = tmp_path / "m.plan"
    with pytest.raises(ModelLoadError, match=r"no sidecar m\.plan\.meta\.json.*edgecloud engine build"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        read_sidecar(engine)


def test_device_model_from_the_device_tree(tmp_path):
    model = tmp_path / "model"
    model.write_bytes(ORIN.encode() + b"\0")
    assert device_model(model) == ORIN
    assert device_model(tmp_path / "absent") == "unknown"


def test_compatibility_is_tensorrt_release_and_device():
    sidecar = EngineSidecar(tensorrt="10.3.0.30", device=ORIN, precision="int8+fp16", onnx_sha256="0" * 64)
    check_compatible(sidecar, "10.3.0", ORIN)  # the build number does not matter
    assert tensorrt_release("10.3.0.30") == "10.3.0"
    with pytest.raises(ModelLoadError) as e:
        check_compatible(sidecar, "10.4.0", "NVIDIA Jetson Orin NX", "edge.plan")
    message = str(e.value)
    assert "TensorRT 10.3.0" in message and "TensorRT 10.4.0" in message
    assert "Orin NX" in message and "edgecloud engine build MODEL.onnx --out edge.plan" in message


def test_plan_release_for_another_target_is_refused():
    check_plan_target({"tensorrt": "10.3.0", "device": ORIN}, "10.3.0.30", ORIN)
    with pytest.raises(ModelLoadError, match=r"TensorRT 8\.6\.2.*publish the ONNX model"):
        check_plan_target({"tensorrt": "8.6.2", "device": ORIN}, "10.3.0", ORIN)
    with pytest.raises(ModelLoadError, match="built on device ''"):
        check_plan_target({"tensorrt": "10.3.0"}, "10.3.0", ORIN)


# ---------------------------------------------------------------- builder (pure parts)


def test_precision_follows_the_tensorrt_version():
    assert precision_plan("10.3.0", int8=True, fp16=True).flags == ("INT8", "FP16")
    assert precision_plan("10.3.0", int8=True, fp16=True).label == "int8+fp16"
    assert precision_plan("10.3.0", int8=False, fp16=True).flags == ("FP16",)
    assert precision_plan("10.3.0", int8=False, fp16=False).label == "fp32"
    for version in ("11.0.0", "11.4.1.2"):
        plan = precision_plan(version, int8=True, fp16=True)
        assert plan.strongly_typed and plan.flags == () and plan.label == "strongly-typed"


def test_profile_covers_the_dynamic_batch_only():
    options = BuildOptions(max_batch=16, opt_batch=4)
    shapes = profile_shapes({"image": (-1, 3, 64, 64), "fixed": (1, 10)}, options)
    assert shapes == {"image": ((1, 3, 64, 64), (4, 3, 64, 64), (16, 3, 64, 64))}
    assert profile_shapes({"x": (-1, 8)}, BuildOptions(max_batch=8))["x"][1] == (1, 8)  # opt defaults to 1
    with pytest.raises(ModelLoadError, match=r"'image'.*only the batch dimension"):
        profile_shapes({"image": (-1, 3, -1, -1)}, options)


def test_build_options_are_validated():
    for bad in ({"max_batch": 0}, {"opt_batch": 9}, {"dla_core": -1}, {"workspace_mb": 0}):
        with pytest.raises(ValueError):
            BuildOptions(**bad)


def test_trtexec_command_for_tensorrt_10_with_dla():
    options = BuildOptions(max_batch=8, dla_core=0, workspace_mb=512)
    command = trtexec_command("models/edge model.onnx", "/var/lib/edge-agent/models/edge.plan",
                              {"image": (-1, 3, 64, 64)}, options, "10.3.0")
    assert shlex.split(command) == [
        "trtexec", "--onnx=models/edge model.onnx", "--saveEngine=/var/lib/edge-agent/models/edge.plan",
        "--int8", "--fp16", "--minShapes=image:1x3x64x64", "--optShapes=image:1x3x64x64",
        "--maxShapes=image:8x3x64x64", "--memPoolSize=workspace:512M", "--useDLACore=0",
        "--allowGPUFallback"]
    assert build_flags(precision_plan("10.3.0", True, True), options) == (
        "INT8", "FP16", "DLA_CORE=0", "GPU_FALLBACK", "WORKSPACE_MB=512")


def test_trtexec_command_for_tensorrt_11_has_no_precision_flags():
    command = trtexec_command("m.onnx", "m.plan", {"a": (-1, 4), "b": (-1, 2)}, BuildOptions(max_batch=2),
                              "11.0.0")
    args = shlex.split(command)
    assert "--int8" not in args and "--fp16" not in args
    assert "--minShapes=a:1x4,b:1x2" in args and "--maxShapes=a:2x4,b:2x2" in args


def test_edge_budget_is_one_billion_bytes():
    check_budget(1_000_000_000, 1_000_000_000, "edge.plan")
    with pytest.raises(ModelLoadError, match="1000000001 bytes, over the edge budget of 1000000000"):
        check_budget(1_000_000_001, 1_000_000_000, "edge.plan")


def test_onnx_inputs_are_read_without_tensorrt(tmp_path):
    model = linear_classifier(tmp_path / "m.onnx", features=8, input_name="image")
    assert onnx_inputs(model) == {"image": (-1, 8)}


def test_build_without_tensorrt_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"pip install edgecloud\[jetson\]"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan")


# ---------------------------------------------------------------- cache


def fake_builder(calls: list, trt_version="10.3.0", device=ORIN):
    """A build function like builder.build_engine: writes the engine and its sidecar."""
    def build(onnx, out):
        calls.append((onnx, out))
        out.write_bytes(b"engine for " + onnx.read_bytes())
        write_sidecar(out, EngineSidecar(tensorrt=trt_version, device=device, precision="int8+fp16",
                                         onnx_sha256=file_sha256(onnx)))
    return build


def test_cache_builds_once_per_onnx_tensorrt_and_device(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"model v1")
    cache = EngineCache(tmp_path / "engines")
    calls: list = []
    first = cache.get_or_build(onnx, "10.3.0", ORIN, fake_builder(calls))
    again = cache.get_or_build(onnx, "10.3.0.30", ORIN, fake_builder(calls))
    assert first == again and len(calls) == 1
    assert first.read_bytes() == b"engine for model v1" and sidecar_path(first).exists()
    assert not list(cache.root.glob("*.building*"))
    assert first.name.startswith(file_sha256(onnx)[:16]) and "trt10.3.0" in first.name

    other = cache.get_or_build(onnx, "10.4.0", ORIN, fake_builder(calls, trt_version="10.4.0"))
    assert other != first and len(calls) == 2
    onnx.write_bytes(b"model v2")
    newer = cache.get_or_build(onnx, "10.3.0", ORIN, fake_builder(calls))
    assert newer not in (first, other) and len(calls) == 3
    assert cache.lookup(file_sha256(onnx), "10.3.0", "NVIDIA Jetson Orin Nano") is None


def test_cache_rebuilds_a_stale_entry_and_rejects_a_wrong_build(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"model")
    cache = EngineCache(tmp_path / "engines")
    calls: list = []
    path = cache.get_or_build(onnx, "10.3.0", ORIN, fake_builder(calls))
    sidecar_path(path).unlink()  # e.g. a crash between files
    assert cache.get_or_build(onnx, "10.3.0", ORIN, fake_builder(calls)) == path and len(calls) == 2
    with pytest.raises(ModelLoadError, match="built on device"):
        EngineCache(tmp_path / "other").get_or_build(onnx, "10.3.0", ORIN,
                                                     fake_builder(calls, device="somewhere else"))


def test_cache_prune_keeps_the_newest(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    calls: list = []
    paths = []
    for i in range(4):
        onnx = tmp_path / f"m{i}.onnx"
        onnx.write_bytes(f"model {i}".encode())
        paths.append(cache.get_or_build(onnx, "10.3.0", ORIN, fake_builder(calls)))
    for age, path in enumerate(reversed(paths)):
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    removed = cache.prune(keep=2)
    assert sorted(removed) == sorted(paths[:2])
    assert all(p.exists() for p in paths[2:]) and not any(sidecar_path(p).exists() for p in paths[:2])


# ---------------------------------------------------------------- ONNX Runtime's TensorRT EP


def test_ort_tensorrt_ep_options(tmp_path):
    options = tensorrt_provider_options(tmp_path, row_shapes={"image": (3, 64, 64)}, max_batch=8,
                                        dla_core=0)
    assert list(options) == ["TensorrtExecutionProvider"]
    trt = options["TensorrtExecutionProvider"]
    assert trt["trt_int8_enable"] == "True" and trt["trt_fp16_enable"] == "True"
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_timing_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str(tmp_path / "ort-trt-cache")
    assert trt["trt_profile_min_shapes"] == "image:1x3x64x64"
    assert trt["trt_profile_opt_shapes"] == "image:1x3x64x64"
    assert trt["trt_profile_max_shapes"] == "image:8x3x64x64"
    assert trt["trt_max_workspace_size"] == str(1024 << 20)
    assert trt["trt_dla_enable"] == "True" and trt["trt_dla_core"] == "0"
    assert all(isinstance(v, str) for v in trt.values())
    plain = tensorrt_provider_options(tmp_path, int8=False)["TensorrtExecutionProvider"]
    assert plain["trt_int8_enable"] == "False" and "trt_profile_min_shapes" not in plain


def test_ort_tensorrt_ep_options_plug_into_the_onnxruntime_backend(tmp_path):
    """Where the TensorRT EP is missing (here) the session falls back along PROVIDERS to the CPU."""
    model = linear_classifier(tmp_path / "m.onnx", features=8)
    config = OrtConfig(providers=PROVIDERS,
                       provider_options=tensorrt_provider_options(tmp_path, row_shapes={"x": (8,)}))
    backend = OrtBackend(config)
    backend.load(model)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(backend.infer({"x": x})["logits"], reference_logits(model, x), rtol=1e-4,
                               atol=1e-4)
    backend.close()


# ---------------------------------------------------------------- CLI


@pytest.fixture
def edgecloud_main():
    return cli.main


def test_cli_prints_the_trtexec_command_without_tensorrt(edgecloud_main, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(engine_cli, "installed_tensorrt_version", lambda: None)
    model = linear_classifier(tmp_path / "edge.onnx", features=8, input_name="image")
    assert edgecloud_main(["engine", "build", str(model), "--max-batch", "4", "--print-trtexec"]) == 0
    args = shlex.split(capsys.readouterr().out)
    assert args[:5] == ["trtexec", f"--onnx={model}", f"--saveEngine={tmp_path / 'edge.plan'}", "--int8",
                        "--fp16"]
    assert "--maxShapes=image:4x8" in args


def test_cli_precision_flags(edgecloud_main, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(engine_cli, "installed_tensorrt_version", lambda: None)
    model = linear_classifier(tmp_path / "edge.onnx", features=8)
    assert edgecloud_main(["engine", "build", str(model), "--fp16", "--print-trtexec"]) == 0
    args = shlex.split(capsys.readouterr().out)
    assert "--fp16" in args and "--int8" not in args


def test_cli_exit_codes(edgecloud_main, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    model = linear_classifier(tmp_path / "edge.onnx", features=8)
    assert edgecloud_main(["engine", "build", str(model), "--max-batch", "0"]) == 2
    assert edgecloud_main(["engine", "build", str(tmp_path / "absent.onnx")]) == 2
    assert edgecloud_main(["engine", "build", str(model)]) == 1
    assert "pip install edgecloud[jetson]" in capsys.readouterr().err
    engine = tmp_path / "edge.plan"
    engine.write_bytes(b"plan")
    assert edgecloud_main(["engine", "sidecar", str(engine), "--onnx", str(model)]) == 1


def test_cli_writes_a_sidecar_for_a_trtexec_engine(edgecloud_main, monkeypatch, tmp_path):
    monkeypatch.setattr(engine_cli, "installed_tensorrt_version", lambda: "10.3.0.30")
    monkeypatch.setattr(engine_cli, "device_model", lambda: ORIN)
    model = linear_classifier(tmp_path / "edge.onnx", features=8)
    engine = tmp_path / "edge.plan"
    engine.write_bytes(b"plan")
    assert edgecloud_main(["engine", "sidecar", str(engine), "--onnx", str(model), "--max-batch", "8",
                           "--flag", "INT8", "--flag", "FP16"]) == 0
    sidecar = read_sidecar(engine)
    assert (sidecar.tensorrt, sidecar.device, sidecar.precision) == ("10.3.0.30", ORIN, "int8+fp16")
    assert sidecar.onnx_sha256 == file_sha256(model) and sidecar.build_flags == ("INT8", "FP16")
    check_compatible(sidecar, "10.3.0", ORIN, engine)
