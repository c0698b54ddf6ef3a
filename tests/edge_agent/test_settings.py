"""Where a served model's settings come from: command-line flag > config file > release > model card >
default, each layer checked against the ones below it, through the agent's own config loading."""

from __future__ import annotations

from pathlib import Path

from edge_agent.cli import build_parser, load_config
from edge_agent.config import AgentConfig, CascadeSection
from edge_agent.serving.slot import load_edge_model
from tests.support.onnx_models import linear_classifier

CARD = {"name": "card-name", "version": 4, "labels": ["a", "b", "c", "d"],
        "calibration": {"threshold": 0.6, "temperature": 1.2, "policy": "entropy", "scores": "probabilities"}}
RELEASE = {"model": "inspection", "version": 5, "labels": ["w", "x", "y", "z"],
           "calibration": {"threshold": 0.7, "temperature": 1.5, "policy": "margin"}}


def _config(tmp_path: Path, model: Path, *flags: str, file: str = "") -> AgentConfig:
    config = tmp_path / "agent.toml"
    config.write_text(file)
    return load_config(build_parser().parse_args(["--config", str(config), "--model", str(model), *flags]))


def test_each_cascade_value_comes_from_the_highest_layer_that_sets_it(tmp_path: Path) -> None:
    model = linear_classifier(tmp_path / "m.onnx", card=CARD)
    file = "[cascade]\nthreshold = 0.8\ntemperature = 2.5\n"
    config = _config(tmp_path, model, "--threshold", "0.9", file=file)
    served = load_edge_model(config, model, "5", RELEASE)
    s = served.settings
    assert (s.threshold, s.temperature, s.policy_name, s.scores, s.score_output) == (
        0.9, 2.5, "margin", "probabilities", "logits")  # flag, file, release, card, default
    layers = [(_config(tmp_path, model, file=file).cascade, (0.8, 2.5, "margin")),  # without the flag
              (CascadeSection(), (0.7, 1.5, "margin")),  # no config: the release
              (CascadeSection(policy="max_prob"), (0.7, 1.5, "max_prob"))]
    for flags, expected in layers:  # a reload re-resolves under the [cascade] values then in force
        s = served.reconfigured(flags).settings
        assert (s.threshold, s.temperature, s.policy_name) == expected
    s = load_edge_model(_config(tmp_path, model), model).settings  # no flag, file or release: the card
    assert (s.threshold, s.temperature, s.policy_name, s.scores) == (0.6, 1.2, "entropy", "probabilities")
    bare = linear_classifier(tmp_path / "bare.onnx")
    s = load_edge_model(_config(tmp_path, bare), bare).settings  # nothing sets anything: the defaults
    assert (s.threshold, s.temperature, s.policy_name, s.scores, s.score_output) == (
        0.5, 1.0, "max_prob", "logits", "logits")


def test_name_version_and_labels(tmp_path: Path) -> None:
    model = linear_classifier(tmp_path / "m.onnx", card=CARD)
    bare = linear_classifier(tmp_path / "bare.onnx")
    named = '[model]\nname = "from-file"\n'
    cases = [(_config(tmp_path, model), None, None, ("card-name", "4", tuple(CARD["labels"]))),
             (_config(tmp_path, model, file=named), None, None, ("from-file", "4", tuple(CARD["labels"]))),
             (_config(tmp_path, model, "--name", "from-flag", file=named), None, None,
              ("from-flag", "4", tuple(CARD["labels"]))),
             (_config(tmp_path, model, "--name", "inspection"), "5", RELEASE,
              ("inspection", "5", tuple(RELEASE["labels"]))),
             (_config(tmp_path, bare), None, None, ("bare", "0", ()))]
    for config, version, release, expected in cases:
        served = load_edge_model(config, config.model.path, version, release)
        assert (served.name, served.version, served.labels) == expected
