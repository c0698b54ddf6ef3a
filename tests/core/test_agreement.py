"""The agreement rule (docs/design.md §12): a classifier's top class, a detector's greedy box match of
same-label boxes at IoU >= 0.5 that must leave no box of either side unmatched."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from edgecloud.agreement import MATCH_IOU, boxes_match, frames_agree, pairwise_iou, top1
from edgecloud.confidence import DetectionOutputs

LABELS = st.integers(0, 3)


@st.composite
def box_sets(draw, max_boxes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Boxes x1, y1, x2, y2 (any overlap, zero areas too) and a label each."""
    n = draw(st.integers(0, max_boxes))
    corner = st.floats(0, 100, allow_nan=False, width=32)
    size = st.floats(0, 60, allow_nan=False, width=32)
    boxes = [(x, y, x + w, y + h) for x, y, w, h in draw(st.lists(st.tuples(corner, corner, size, size),
                                                                    min_size=n, max_size=n))]
    labels = draw(st.lists(LABELS, min_size=n, max_size=n))
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(labels, dtype=np.int64)


@st.composite
def apart(draw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes in distinct cells of a grid (no two overlap), their labels, and a jitter of each corner
    of at most a tenth of the box's side (its IoU with the jittered box stays above 0.6)."""
    cells = draw(st.lists(st.integers(0, 15), min_size=1, max_size=6, unique=True))
    boxes = np.array([(c % 4 * 100 + 10, c // 4 * 100 + 10, c % 4 * 100 + 90, c // 4 * 100 + 90)
                      for c in cells], dtype=np.float64)
    labels = np.array(draw(st.lists(LABELS, min_size=len(cells), max_size=len(cells))), dtype=np.int64)
    jitter = np.array(draw(st.lists(st.floats(-8, 8, allow_nan=False), min_size=4 * len(cells),
                                    max_size=4 * len(cells)))).reshape(-1, 4)
    return boxes, labels, jitter


@given(box_sets(), st.randoms())
def test_a_set_of_boxes_matches_itself_in_any_order(side, random):
    boxes, labels = side
    order = list(range(len(labels)))
    random.shuffle(order)
    assert boxes_match(boxes, labels, boxes[order], labels[order])


@given(box_sets(), box_sets())
def test_the_match_does_not_depend_on_which_side_is_the_edge(a, b):
    assert boxes_match(*a, *b) == boxes_match(*b, *a)


@given(box_sets(), st.data())
def test_a_box_missing_or_relabelled_on_one_side_disagrees(side, data):
    boxes, labels = side
    if not len(labels):
        return
    k = data.draw(st.integers(0, len(labels) - 1))
    assert not boxes_match(boxes, labels, np.delete(boxes, k, axis=0), np.delete(labels, k))
    relabelled = labels.copy()
    relabelled[k] = 99  # a label no other box has
    assert not boxes_match(boxes, labels, boxes, relabelled)


@given(apart())
def test_boxes_moved_a_little_still_match_and_moved_away_do_not(case):
    boxes, labels, jitter = case
    assert boxes_match(boxes, labels, boxes + jitter, labels)
    moved = boxes.copy()
    moved[0] += 45  # its IoU with itself drops to 0.11, and none of the others comes near 0.5
    assert not boxes_match(boxes, labels, moved, labels)


def test_iou_at_the_threshold_matches_and_just_under_does_not():
    box, label = np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([2])
    assert pairwise_iou(box, [[0.0, 0.0, 10.0, 20.0]])[0, 0] == MATCH_IOU
    assert boxes_match(box, label, np.array([[0.0, 0.0, 10.0, 20.0]]), label)
    assert not boxes_match(box, label, np.array([[0.0, 0.0, 10.0, 21.0]]), label)
    assert boxes_match(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4)), np.zeros(0))  # both empty


def test_the_greedy_match_pairs_the_best_overlap_first():
    """Edge box A overlaps cloud box X best (0.90) and Y enough (0.54); edge box B overlaps X (0.74)
    but Y too little (0.33). Best first pairs A with X and leaves B without a match: they disagree,
    though pairing A with Y and B with X would have matched every box (the rule is greedy)."""
    edge = np.array([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    cloud = np.array([[0.5, 0.0, 10.5, 10.0], [-3.0, 0.0, 7.0, 10.0]])
    labels = np.array([1, 1])
    iou = pairwise_iou(edge, cloud)
    assert iou[0, 0] > iou[1, 0] >= MATCH_IOU and iou[0, 1] >= MATCH_IOU > iou[1, 1]
    assert not boxes_match(edge, labels, cloud, labels)


def test_frames_agree_reads_only_boxes_above_the_score_threshold():
    detection = DetectionOutputs("boxes", "scores", "classes", 0.5)
    boxes = np.array([[[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 10, 10], [0, 0, 0, 0]]], dtype=np.float32)
    edge = {"boxes": boxes, "scores": np.array([[0.9, 0.2], [0.8, 0.0]], dtype=np.float32),
            "classes": np.array([[1, 3], [1, 0]])}
    cloud = {"boxes": boxes + 1, "scores": np.array([[0.7, 0.0], [0.4, 0.0]], dtype=np.float32),
             "classes": np.array([[1, 0], [1, 0]])}
    # frame 0: the edge's second box scores under 0.5 and is not an answer; frame 1: the cloud found none
    assert frames_agree(detection, edge, cloud).tolist() == [True, False]


@pytest.mark.parametrize("shape", [(3, 4), (3, 1, 4)])
def test_top1_is_the_argmax_of_each_rows_scores(shape):
    scores = np.random.default_rng(1).standard_normal(shape)
    assert top1(scores).tolist() == scores.reshape(3, -1).argmax(axis=1).tolist()
