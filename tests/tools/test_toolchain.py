"""The toolchain and what it shipped: data set, TensorRT rules of the INT8 graph, accuracy targets of the
committed models measured afresh with ONNX Runtime, and the ``calibrate`` command. No training here."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud_gateway.hard_examples import HardExample, write_training_set
from edgecloud.confidence import make_policy
from edgecloud.errors import ConfigError, EdgecloudError, InvalidInput, ModelLoadError
from edgecloud.modelcard import ModelCard, card_path
from edgecloud_tools.toolchain import MODELS_ENV, cli, models_dir, own_models_dir, packaged_models_dir
from edgecloud_tools.toolchain.dataset import LABELS, SIZE, make_split
from edgecloud_tools.toolchain.evaluate import accuracy, model_logits
from edgecloud_tools.toolchain.quantize import check_tensorrt_ready, quantize_int8
from tests.conftest import EDGE_INT8, EDGE_V2_INT8, MODELS, ROOT
from tests.support.onnx_models import linear_classifier

EDGE_FP32 = MODELS / "edge" / "inspection-edge-fp32.onnx"
CLOUD = MODELS / "repository" / "inspection" / "1" / "model.onnx"
SHIPPED = (EDGE_INT8, EDGE_FP32, EDGE_V2_INT8, CLOUD)
BUDGET_BYTES = 1_000_000_000
SAMPLE = 2000  # fresh held-out rows scored here; the cards were measured on more


# -- data set ----------------------------------------------------------------------------------------
def test_dataset_is_reproducible_balanced_and_well_formed() -> None:
    images, labels = make_split("test", 400)
    again, again_labels = make_split("test", 400)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    assert images.shape == (400, 1, SIZE, SIZE) and images.dtype == np.float32
    assert labels.shape == (400,) and labels.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.bincount(labels, minlength=len(LABELS)).tolist() == [100] * len(LABELS)
    prefix, prefix_labels = make_split("test", 37)  # a shorter run is the same stream's start
    assert np.array_equal(prefix, images[:37]) and np.array_equal(prefix_labels, labels[:37])
    other, _ = make_split("val", 400)
    assert not np.allclose(other, images)
    with pytest.raises(ValueError, match="unknown split"):
        make_split("holdout", 4)


def test_device_side_modules_do_not_need_torch() -> None:
    code = ("import sys, edgecloud_tools.toolchain.dataset, edgecloud_tools.toolchain.cli, "
            "edgecloud_tools.toolchain.quantize, edgecloud.calibration, edgecloud.modelcard; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- TensorRT readiness of a QDQ graph -----------------------------------------------------------------
def _qdq_conv(path: Path, *, act_zero_point: int = 0, zp_type: int = TensorProto.INT8,
              per_channel: bool = True, int32_bias: bool = False, opset: int = 17) -> Path:
    """x → Q → DQ → Conv(DQ(int8 weights), bias) → y, built by hand with onnx.helper."""
    w = np.array([[[[2]], [[-3]]], [[[1]], [[4]]], [[[-5]], [[6]]]], dtype=np.int8)  # [3, 2, 1, 1]
    w_scale = np.array([0.1, 0.2, 0.3], np.float32) if per_channel else np.array(0.2, np.float32)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
             helper.make_tensor("x_zp", zp_type, [], [act_zero_point]),
             numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), "w_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w", axis=0)]
    if int32_bias:
        inits += [numpy_helper.from_array(np.array([1, 2, 3], np.int32), "b_q"),
                  numpy_helper.from_array(np.array(0.005, np.float32), "b_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b"], name="dq_b"))
    else:
        inits.append(numpy_helper.from_array(np.zeros(3, np.float32), "b"))
    nodes.append(helper.make_node("Conv", ["x_dq", "w", "b"], ["y"], name="conv"))
    graph = helper.make_graph(nodes, "qdq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_check_tensorrt_ready_accepts_a_correct_graph(tmp_path: Path) -> None:
    assert check_tensorrt_ready(_qdq_conv(tmp_path / "ok.onnx")) == []


@pytest.mark.parametrize(("options", "expected"), [
    ({"act_zero_point": 3}, "zero point is not 0"),
    ({"zp_type": TensorProto.UINT8, "act_zero_point": 128}, "zero point is uint8"),
    ({"per_channel": False}, "per tensor"),
    ({"int32_bias": True}, "int32"),
    ({"opset": 19}, "opset 19 > 17"),
])
def test_check_tensorrt_ready_flags_what_tensorrt_rejects(tmp_path: Path, options: dict,
                                                          expected: str) -> None:
    problems = check_tensorrt_ready(_qdq_conv(tmp_path / "bad.onnx", **options))
    assert any(expected in p for p in problems), problems


def test_quantize_int8_writes_a_tensorrt_ready_graph(tmp_path: Path) -> None:
    """The recipe itself, on a small FP32 conv net built by hand (no torch)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalMaxPool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            ["N", 1, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    images, _ = make_split("train", 64)
    int8 = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", images)
    assert check_tensorrt_ready(int8) == []
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    ref, got = model_logits(tmp_path / "fp32.onnx", images).sets[0], model_logits(int8, images).sets[0]
    assert np.mean(ref.argmax(1) == got.argmax(1)) > 0.9


def test_model_logits_scores_several_sets_and_names_what_does_not_fit() -> None:
    images, _ = make_split("test", 40)
    run = model_logits(EDGE_INT8, images[:30], images[30:])
    assert [len(s) for s in run.sets] == [30, 10] and run.outputs[0].name == "logits"
    np.testing.assert_allclose(np.concatenate(run.sets), model_logits(EDGE_INT8, images).sets[0], rtol=1e-5)
    with pytest.raises(InvalidInput, match="datatype FP64"):
        model_logits(EDGE_INT8, images.astype(np.float64))
    with pytest.raises(InvalidInput, match="shape"):
        model_logits(EDGE_INT8, images[:, :, :8])
    with pytest.raises(ModelLoadError, match="no output 'probs'"):
        model_logits(EDGE_INT8, images, output="probs")


# -- the shipped models ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", SHIPPED, ids=lambda p: p.name if p != CLOUD else "cloud")
def test_shipped_models_are_loadable_by_older_runtimes(model: Path) -> None:
    proto = onnx.load(str(model))
    onnx.checker.check_model(proto)
    assert proto.ir_version <= 10
    assert all(o.version <= 17 for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("model", [EDGE_INT8, EDGE_V2_INT8], ids=lambda p: p.name)
def test_shipped_int8_models_fit_the_budget_and_tensorrt(model: Path) -> None:
    assert model.stat().st_size <= BUDGET_BYTES
    assert check_tensorrt_ready(model) == []


@pytest.fixture(scope="module")
def held_out() -> dict:
    """Logits of every shipped model on fresh held-out rows, and their labels."""
    images, labels = make_split("test", SAMPLE)
    return {"labels": labels, **{m: model_logits(m, images).sets[0] for m in SHIPPED}}


def _cascade(model: Path, held_out: dict) -> tuple[float, float]:
    """(accuracy, escalation) with the card's calibration, scored as the agent scores rows."""
    cal = ModelCard.load(model).calibration
    conf = make_policy(cal.policy, cal.score_output, cal.scores, cal.temperature)({"logits": held_out[model]})
    escalated = conf < cal.threshold
    answer = np.where(escalated, held_out[CLOUD].argmax(1), held_out[model].argmax(1))
    return float(np.mean(answer == held_out["labels"])), float(escalated.mean())


def test_accuracy_targets_hold_on_fresh_held_out_rows(held_out: dict) -> None:
    labels = held_out["labels"]
    int8, fp32, cloud = (accuracy(held_out[m], labels) for m in (EDGE_INT8, EDGE_FP32, CLOUD))
    assert int8 >= 0.90
    assert int8 >= fp32 - 0.01
    assert cloud >= 0.98
    card = ModelCard.load(EDGE_INT8).metrics
    assert card["accuracy_int8"] == pytest.approx(int8, abs=0.02)
    assert card["accuracy_fp32"] == pytest.approx(fp32, abs=0.02)
    assert ModelCard.load(CLOUD).metrics["accuracy"] == pytest.approx(cloud, abs=0.02)


@pytest.mark.parametrize("model", [EDGE_INT8, EDGE_V2_INT8], ids=lambda p: p.name)
def test_cascade_targets_hold_with_the_cards_calibration(held_out: dict, model: Path) -> None:
    acc, escalation = _cascade(model, held_out)
    assert acc >= 0.975
    assert escalation <= 0.20
    metrics = ModelCard.load(model).metrics
    assert metrics["cascade_accuracy"] == pytest.approx(acc, abs=0.02)
    assert metrics["escalation_rate"] == pytest.approx(escalation, abs=0.03)


def test_edge_v2_escalates_less_than_v1(held_out: dict) -> None:
    assert _cascade(EDGE_V2_INT8, held_out)[1] < _cascade(EDGE_INT8, held_out)[1]
    assert accuracy(held_out[EDGE_V2_INT8], held_out["labels"]) > accuracy(held_out[EDGE_INT8],
                                                                           held_out["labels"])


# -- edgecloud calibrate -----------------------------------------------------------------------------
def _calibrate(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(["calibrate", *argv])
    return args.func(args)


def test_calibrate_writes_and_updates_the_card(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    schema = json.loads((ROOT / "protos" / "schemas" / "model_card.schema.json").read_text())
    edge, cloud = tmp_path / "edge.onnx", tmp_path / "repo" / "inspection" / "1" / "model.onnx"
    cloud.parent.mkdir(parents=True)
    shutil.copyfile(EDGE_INT8, edge)
    shutil.copyfile(CLOUD, cloud)
    assert _calibrate("--model", str(edge), "--cloud", str(cloud), "--n", "400",
                      "--target-accuracy", "0.97") == 0
    assert "threshold" in capsys.readouterr().out
    first = ModelCard.load(edge)
    jsonschema.validate(json.loads(card_path(edge).read_text()), schema)
    assert (first.name, first.version, first.file_problems(edge)) == ("edge", 0, [])
    assert first.calibrated_on["cloud_model"] == "inspection"
    assert first.calibrated_on["accuracy"] >= 0.97 and first.calibrated_on["target_accuracy"] == 0.97

    assert _calibrate("--model", str(edge), "--cloud", str(cloud), "--n", "400",
                      "--target-escalation", "0.02", "--policy", "margin") == 0
    second = ModelCard.load(edge)
    jsonschema.validate(json.loads(card_path(edge).read_text()), schema)
    assert second.calibration.policy == "margin"
    assert second.calibrated_on["escalation_rate"] <= 0.02
    assert second.calibrated_on["target_escalation"] == 0.02 and "target_accuracy" not in second.calibrated_on
    assert second.metrics["threshold"] == second.calibration.threshold
    assert second.created_at == first.created_at and second.sha256 == first.sha256


def test_calibrate_keeps_the_cards_built_in_policy_and_dry_run_writes_nothing(tmp_path: Path) -> None:
    edge = tmp_path / "edge.onnx"
    shutil.copyfile(EDGE_INT8, edge)
    assert _calibrate("--model", str(edge), "--cloud", str(CLOUD), "--n", "400", "--policy", "entropy") == 0
    written = card_path(edge).read_text()
    assert _calibrate("--model", str(edge), "--cloud", str(CLOUD), "--n", "400", "--dry-run") == 0
    assert card_path(edge).read_text() == written
    assert _calibrate("--model", str(edge), "--cloud", str(CLOUD), "--n", "400",
                      "--target-escalation", "0.1") == 0
    assert ModelCard.load(edge).calibration.policy == "entropy"
    data = json.loads(card_path(edge).read_text())
    data["calibration"]["policy"] = "mypkg.policies:confidence"
    card_path(edge).write_text(json.dumps(data))
    with pytest.raises(EdgecloudError, match="not built-in"):
        _calibrate("--model", str(edge), "--cloud", str(CLOUD), "--n", "400", "--dry-run")


def test_calibrate_rejects_a_count_below_one() -> None:
    with pytest.raises(SystemExit) as exit_info:
        _calibrate("--model", "m.onnx", "--cloud", "c.onnx", "--n", "0")
    assert exit_info.value.code == 2


# -- edgecloud calibrate --data ----------------------------------------------------------------------
def _pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Any pair of classifiers (not the demo's: another input name and shape), and rows labelled by the
    cloud with a few labels flipped, so that neither model is always right."""
    edge = linear_classifier(tmp_path / "edge.onnx", features=6, seed=2, input_name="reading")
    cloud = linear_classifier(tmp_path / "cloud.onnx", features=6, seed=1, scale=3.0, input_name="reading")
    x = np.random.default_rng(5).standard_normal((600, 6)).astype(np.float32)
    labels = model_logits(cloud, x).sets[0].argmax(1)
    flipped = np.random.default_rng(6).random(600) < 0.05
    return edge, cloud, x, np.where(flipped, (labels + 1) % 4, labels)


def test_calibrate_on_own_data_writes_a_card_for_any_model_pair(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    edge, cloud, x, labels = _pair(tmp_path)
    data = tmp_path / "mine.npz"
    np.savez(data, inputs=x, labels=labels, label_names=np.array(["ok", "warm", "hot", "fault"]))
    plot = tmp_path / "plots" / "tradeoff.png"
    assert _calibrate("--model", str(edge), "--cloud", str(cloud), "--data", str(data), "--held-out", "0.25",
                      "--target-escalation", "0.4", "--plot", str(plot)) == 0
    out, err = capsys.readouterr()
    assert "mine.npz: 600 rows labelled by 'labels'; fitting on 450, measuring on 150" in err
    assert "scoring edge.onnx: 600/600 rows" in err and "scoring cloud.onnx: 600/600 rows" in err
    assert "mine.npz:held_out (n=150)" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard.load(edge)
    schema = json.loads((ROOT / "protos" / "schemas" / "model_card.schema.json").read_text())
    jsonschema.validate(json.loads(card_path(edge).read_text()), schema)
    assert card.labels == ("ok", "warm", "hot", "fault") and card.guards == ()
    assert card.inputs[0].name == "reading"
    assert (card.calibrated_on["split"], card.calibrated_on["n"]) == ("mine.npz:fit", 450)
    assert card.calibrated_on["escalation_rate"] <= 0.4
    assert (card.metrics["split"], card.metrics["n"]) == ("mine.npz:held_out", 150)
    assert card.metrics["cloud_accuracy"] < 1  # measured against the labels, not the cloud's answers
    again = card.calibration
    assert _calibrate("--model", str(edge), "--cloud", str(cloud), "--data", str(data), "--held-out", "0.25",
                      "--target-escalation", "0.4") == 0
    assert ModelCard.load(edge).calibration == again  # the same file splits the same way


def test_calibrate_takes_the_hard_examples_an_export_wrote(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    edge, cloud, x, _ = _pair(tmp_path)
    logits = model_logits(cloud, x).sets[0]
    exported = tmp_path / "hard.npz"
    write_training_set([HardExample(request_id=f"r{i}", row=0, inputs={"reading": row},
                                    cloud_outputs={"logits": logits[i]}, device="press-7",
                                    reason="low_confidence",
                                    deferred=False, edge_model_version="1", cloud_model="cloud",
                                    cloud_model_version="1", edge_prediction=0, edge_confidence=0.4,
                                    created_at=1.0e9 + i)
                        for i, row in enumerate(x[:200])], exported)
    assert _calibrate("--model", str(edge), "--cloud", str(cloud), "--data", str(exported),
                      "--target-escalation", "0.5", "--dry-run") == 0
    out, err = capsys.readouterr()
    assert "hard.npz: 200 rows labelled by 'cloud_prediction'; fitting on 100, measuring on 100" in err
    assert "cloud 100.00%" in out  # the cloud's own answers are the labels
    assert ModelCard.load(edge) is None  # --dry-run
    assert _calibrate("--model", str(edge), "--cloud", str(cloud), "--data", str(exported),
                      "--target-escalation", "0.5") == 0
    assert ModelCard.load(edge).labels == ("0", "1", "2", "3")  # no label_names: the model's class indices


def test_calibrate_says_what_is_wrong_with_the_data(tmp_path: Path) -> None:
    edge, cloud, x, labels = _pair(tmp_path)
    cases = {"no labels": ({"inputs": x}, "no labels"),
             "two candidates": ({"a": x, "b": x, "labels": labels}, "cannot tell which array"),
             "float labels": ({"inputs": x, "labels": labels.astype(np.float32)}, "must be integers"),
             "too few rows": ({"inputs": x[:1], "labels": labels[:1]}, "no rows to fit on")}
    for name, (arrays, message) in cases.items():
        data = tmp_path / f"{name}.npz"
        np.savez(data, **arrays)
        with pytest.raises(ConfigError, match=message):
            _calibrate("--model", str(edge), "--cloud", str(cloud), "--data", str(data), "--dry-run")
    with pytest.raises(ConfigError, match=r"not a readable \.npz"):
        _calibrate("--model", str(edge), "--cloud", str(cloud), "--data", str(tmp_path / "none.npz"))
    with pytest.raises(ConfigError, match=r"--cloud .*: not found"):
        _calibrate("--model", str(edge), "--cloud", str(tmp_path / "none.onnx"), "--dry-run")


def test_models_are_found_through_the_environment_then_here_then_the_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(MODELS_ENV, raising=False)
    packaged = packaged_models_dir()
    assert models_dir() == packaged and (packaged / "edge" / "inspection-edge-int8.onnx").is_file()
    assert own_models_dir() == Path("models")  # where models build writes by default
    (tmp_path / "models").mkdir()
    assert models_dir() == Path("models")
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "elsewhere"))
    assert models_dir() == own_models_dir() == tmp_path / "elsewhere"  # named, even before it exists
