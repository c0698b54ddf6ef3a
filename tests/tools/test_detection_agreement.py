"""The export's check that ONNX Runtime and torch agree on a detector's answers: float noise and a
flipped near-tie pass, a real difference in a score, class or box does not."""

from __future__ import annotations

import numpy as np
import pytest

from edgecloud_tools.toolchain.detection.export import BOXES, CLASSES, SCORES, disagreement


def _answer(scores: list[float]) -> dict[str, np.ndarray]:
    s = np.array([scores], dtype=np.float32)
    k = s.shape[1]
    x = np.arange(k, dtype=np.float32)[None, :, None] * 6
    boxes = np.concatenate([x, x, x + 4, x + 4], axis=2)
    return {SCORES: s, CLASSES: np.arange(k, dtype=np.int64)[None, :] % 3, BOXES: boxes}


def test_the_same_answer_with_float_noise_agrees() -> None:
    want = _answer([0.9, 0.5, 0.05, 0.04, 0.03])
    got = {k: v.copy() for k, v in want.items()}
    got[SCORES] += 2e-5
    got[BOXES] += 0.01
    assert disagreement(got, want) is None


def test_a_near_tie_that_is_one_more_peak_in_one_runtime_agrees() -> None:
    """The case seen in a build: ORT kept both cells of a tie as peaks, torch one of them, so every
    later rank moved down one and torch's last score is one ORT's K cut off."""
    want = _answer([0.9, 0.05, 0.0157, 0.0150, 0.0120])
    got = _answer([0.9, 0.05, 0.0157, 0.0157, 0.0150])
    assert disagreement(got, want) is None
    assert disagreement(want, got) is None


@pytest.mark.parametrize("change", ["score", "tail score", "class", "box"])
def test_a_real_difference_is_reported(change: str) -> None:
    want = _answer([0.9, 0.5, 0.05, 0.04, 0.03])
    got = {k: v.copy() for k, v in want.items()}
    if change == "score":
        got[SCORES][0, 1] = 0.49
    elif change == "tail score":
        got[SCORES][0, 2] = 0.0465
    elif change == "class":
        got[CLASSES][0, 0] = 2
    else:
        got[BOXES][0, 1, 2] += 0.2
    problem = disagreement(got, want)
    assert problem is not None and "frame 0" in problem
