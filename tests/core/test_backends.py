"""The backend registry: what each class declares, the tables derived from it, and the ``[backend]``
sections each backend's own config model validates (a user's dotted-path backend included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecloud.backends import backend_key_for, open_backend, registered, release_backends, repository_files
from edgecloud.backends.options import BackendOptions, options_model, section_name
from edgecloud.backends.ort_session import OrtConfig
from edgecloud.backends.remote import RemoteConfig
from edgecloud.backends.trt_engine import TrtConfig
from edgecloud.config import Section, build, read_toml
from edgecloud.errors import ConfigError, ModelLoadError
from tests.conftest import ROOT
from tests.plugins.backends import SlowOrtBackend
from tests.support.onnx_models import linear_classifier

USER = "tests.plugins.backends:SlowOrtBackend"


class Config(Section):
    """A service config with nothing but the ``[backend]`` table."""

    backend: BackendOptions


def test_importing_every_backend_leaves_the_runtimes_unloaded() -> None:
    code = ("import sys\n"
            "from edgecloud.backends import registered\n"
            "from edgecloud.backends.options import options_model\n"
            "registered(), options_model()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnxruntime', 'tensorrt', 'pycuda'}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_declarations_agree_with_the_registry() -> None:
    classes = registered()
    suffixes = [s for cls in classes.values() for s in cls.suffixes]
    assert len(suffixes) == len(set(suffixes)) and all(s.startswith(".") and s == s.lower() for s in suffixes)
    formats = [cls.release_format for cls in classes.values() if cls.release_format is not None]
    assert len(formats) == len(set(formats))
    for key, cls in classes.items():
        assert cls.key == key and issubclass(cls.config_model, Section)
        if cls.release_format is not None:  # the agent names its slot file by suffix, the gateway by file
            assert cls.suffixes and cls.repository_file
        assert not cls.plan_target or cls.release_format is not None
    assert [backend_key_for(Path(f"m{s}")) for s in (".onnx", ".PLAN", ".engine")] == [
        "onnxruntime", "tensorrt", "tensorrt"]
    assert repository_files()[:2] == ("model.onnx", "model.plan")  # in order of preference
    with pytest.raises(ModelLoadError, match=r"no backend for suffix '\.pt'; known: \['\.engine', '\.onnx'"):
        backend_key_for(Path("m.pt"))


def test_the_committed_release_schema_lists_the_registry_formats() -> None:
    schema = json.loads((ROOT / "protos" / "schemas" / "release.schema.json").read_text())
    artifact = schema["properties"]["payload"]["properties"]["artifact"]
    assert artifact["properties"]["format"]["enum"] == list(release_backends())
    plans = [fmt for fmt, cls in release_backends().items() if cls.plan_target]
    assert artifact["if"]["properties"]["format"]["enum"] == plans


def test_each_section_is_validated_by_its_backends_model() -> None:
    config = build(Config, {"backend": {"onnxruntime": {"intra_op_threads": 2, "providers": ["A", "B"]}}})
    assert config.backend.onnxruntime == OrtConfig(intra_op_threads=2, providers=("A", "B"))
    assert config.backend.tensorrt == TrtConfig() and config.backend.remote is None  # remote needs a target
    assert build(Config, {}).backend == options_model()()
    remote = build(Config, {"backend": {"remote": {"target": "h:1", "model": "m"}}}).backend.remote
    assert isinstance(remote, RemoteConfig) and remote.target == "h:1"
    assert config.model_dump(exclude_unset=True) == {"backend": {"onnxruntime": {
        "intra_op_threads": 2, "providers": ("A", "B")}}}
    with pytest.raises(ConfigError) as err:
        build(Config, {"backend": {"onnxruntime": {"threads": 2}, "tensorrt": {"device_id": "x"},
                                   "cuda": {}, "remote": {"target": "h:1"}}})
    message = str(err.value)
    for problem in ("backend.onnxruntime.threads: unknown key", "backend.tensorrt.device_id: Input should be",
                    "backend.cuda: unknown key", "backend.remote.model: Field required"):
        assert problem in message


def test_a_dotted_backend_gets_its_section_validated_by_its_own_model(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[{section_name(USER)}]\nintra_op_threads = 1\n')
    assert section_name(USER) == f'backend."{USER}"' and section_name("onnxruntime") == "backend.onnxruntime"
    config = build(Config, read_toml(toml))
    section = getattr(config.backend, USER)
    assert isinstance(section, OrtConfig) and section.intra_op_threads == 1
    linear_classifier(tmp_path / "m.onnx")
    backend = open_backend(tmp_path / "m.onnx", USER, section)
    try:
        assert isinstance(backend, SlowOrtBackend) and backend.config.intra_op_threads == 1
    finally:
        backend.close()
    with pytest.raises(ConfigError, match=rf"backend\.{USER}\.intra_op: unknown key"):
        build(Config, {"backend": {USER: {"intra_op": 1}}})
    with pytest.raises(ConfigError, match=r"backend: Value error, backend 'tests\.plugins\.nope:X' cannot be "
                                          r"imported"):
        build(Config, {"backend": {"tests.plugins.nope:X": {}}})


def test_onnxruntime_defaults_suit_small_models_and_answer_as_its_own_choice() -> None:
    """One intra-op thread and no spinning by default (configurable); the answers are those of a session
    whose threads ONNX Runtime chooses: identical argmax, values within float rounding."""
    path = ROOT / "models" / "edge" / "inspection-edge-int8.onnx"
    lean = open_backend(path, "onnxruntime", OrtConfig())
    chosen = open_backend(path, "onnxruntime", OrtConfig(intra_op_threads=0, inter_op_threads=0,
                                                         allow_spinning=True))
    try:
        options = lean._session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert chosen._session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning") == "1"
        rows = np.random.default_rng(4).random((64, 1, 32, 32), dtype=np.float32)
        name = lean.inputs[0].name
        for batch in (rows[:1], rows):
            got, want = lean.infer({name: batch}), chosen.infer({name: batch})
            for output, values in want.items():
                np.testing.assert_array_equal(got[output].argmax(-1), values.argmax(-1))
                np.testing.assert_allclose(got[output], values, rtol=1e-4, atol=1e-4)
    finally:
        lean.close()
        chosen.close()
