"""The still-scene memory: same scene within the window reuses, a changed scene or an expired window does
not, streams and models are apart, and the number of streams kept is bounded."""

from __future__ import annotations

import numpy as np

from edge_agent.serving import streams
from edge_agent.serving.streams import StreamMemory


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


THUMB = np.full((16, 16), 120.0, dtype=np.float32)
ANSWER = {"logits": np.array([0.1, 2.0, 0.3], dtype=np.float32)}


def test_same_scene_within_the_window_reuses_and_nothing_else_does():
    clock = Clock()
    memory = StreamMemory(window_s=5.0, max_mad=2.0, clock=clock)
    key = ("cam", "1", "line-1")
    assert memory.reuse(key, THUMB) is None
    memory.remember(key, THUMB, ANSWER)
    np.testing.assert_array_equal(memory.reuse(key, THUMB + 1.9)["logits"], ANSWER["logits"])
    assert memory.reuse(key, THUMB + 2.0) is None  # a changed scene
    assert memory.reuse(("cam", "1", "line-2"), THUMB) is None  # another stream
    assert memory.reuse(("cam", "2", "line-1"), THUMB) is None  # another model version
    clock.now += 5.01
    assert memory.reuse(key, THUMB) is None  # the window has passed
    assert not StreamMemory(window_s=0.0, max_mad=2.0).enabled


def test_the_streams_kept_are_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(streams, "MAX_STREAMS", 3)
    memory = StreamMemory(window_s=5.0, max_mad=2.0)
    for name in "abc":
        memory.remember(("cam", "1", name), THUMB, ANSWER)
    assert memory.reuse(("cam", "1", "a"), THUMB) is not None  # a is now the most recent
    memory.remember(("cam", "1", "d"), THUMB, ANSWER)
    assert memory.reuse(("cam", "1", "b"), THUMB) is None
    assert all(memory.reuse(("cam", "1", n), THUMB) is not None for n in "acd")
