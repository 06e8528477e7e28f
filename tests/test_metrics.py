"""Annotation agreement: IoU, Dice, distances, greedy one-to-one matching, per-class counts, item scores."""

from __future__ import annotations

import json
import math

import pytest

from onprem_label.workflow import metrics
from onprem_label.workflow.metrics import (ItemScore, Thresholds, bbox_iou, mask_dice, point_distance,
                                           polygon_iou, polyline_distance, score_item, shapes_match,
                                           similarity)


def box(x, y, width, height, label="lesion", frame=0):
    return {"type": "bbox", "label": label, "frame": frame, "x": x, "y": y, "width": width, "height": height}


def rect(x, y, width, height, label="lesion", frame=0):
    """The bbox as a polygon, vertices clockwise from the top left."""
    points = [[x, y], [x + width, y], [x + width, y + height], [x, y + height]]
    return {"type": "polygon", "label": label, "frame": frame, "points": points}


def polygon(points, label="lesion", frame=0):
    return {"type": "polygon", "label": label, "frame": frame, "points": points}


def point(x, y, label="vessel", frame=0):
    return {"type": "point", "label": label, "frame": frame, "x": x, "y": y}


def polyline(points, label="vessel", frame=0):
    return {"type": "polyline", "label": label, "frame": frame, "points": points}


def mask(counts, size=(2, 3), label="organ", frame=0):
    return {"type": "mask", "label": label, "frame": frame, "rle": {"size": list(size), "counts": counts}}


# (a, b, IoU): exact values worked out by hand.
BOX_CASES = [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (20, 20, 10, 10), 0.0),
    ((0, 0, 10, 10), (10, 0, 10, 10), 0.0),  # sharing an edge is no overlap
    ((0, 0, 10, 10), (5, 0, 10, 10), 50 / 150),  # half of each: 50 in common of 150
    ((0, 0, 20, 20), (5, 5, 10, 10), 100 / 400),
    ((0, 0, 10, 1), (1, 0, 19, 1), 9 / 20),
]
# Two 2x3 masks (h=2, w=3, 6 pixels): A is pixels 1-3, B is pixels 2-4, C is pixels 4-5.
MASK_A, MASK_B, MASK_C, EMPTY = [1, 3, 2], [2, 3, 1], [4, 2], [6]
SHAPE_OF_EACH_TYPE = [box(10, 12, 30, 20), rect(10, 12, 30, 20), point(5, 5),
                      polyline([[0, 0], [10, 0]]), mask(MASK_A)]


@pytest.mark.parametrize("a, b, expected", BOX_CASES)
def test_bbox_iou_of_known_boxes(a, b, expected):
    """bbox IoU is exact: 1 for identical boxes, 0 for disjoint or touching ones, the overlap share else."""
    assert bbox_iou(box(*a), box(*b)) == expected
    assert bbox_iou(box(*b), box(*a)) == expected


@pytest.mark.parametrize("a, b, expected", BOX_CASES)
def test_polygon_iou_of_a_rectangle_is_its_bbox_iou(a, b, expected):
    """A rectangle polygon's rasterized IoU is within 2% of the exact bbox IoU."""
    assert polygon_iou(rect(*a), rect(*b)) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("a, b, expected", [
    # A triangle on the top right half of a square far from the origin.
    ([[20000, 20000], [20100, 20000], [20100, 20100]], [[20000, 20000], [20100, 20000], [20100, 20100],
                                                        [20000, 20100]], 0.5),
    # A polygon as large as a whole slide against its left half.
    ([[0, 0], [20000, 0], [20000, 20000], [0, 20000]], [[0, 0], [10000, 0], [10000, 20000], [0, 20000]], 0.5),
    # Small rectangles half overlapping at a 20000-pixel offset.
    ([[20000, 20000], [20010, 20000], [20010, 20010], [20000, 20010]],
     [[20005, 20000], [20015, 20000], [20015, 20010], [20005, 20010]], 1 / 3),
])
def test_polygon_iou_draws_only_around_the_polygons(monkeypatch, a, b, expected):
    """Polygons at huge coordinates get the right IoU from a small drawing, never one the image's size."""
    sizes = []
    new = metrics.Image.new

    def spy(mode, size, *args, **kwargs):
        sizes.append(size)
        return new(mode, size, *args, **kwargs)

    monkeypatch.setattr(metrics.Image, "new", spy)
    assert polygon_iou(polygon(a), polygon(b)) == pytest.approx(expected, rel=0.02)
    assert sizes and max(max(size) for size in sizes) <= 1024


@pytest.mark.parametrize("degenerate", [
    [[0, 0], [5, 5], [10, 10]],  # collinear
    [[3, 3], [3, 3], [3, 3], [3, 3]],  # one point repeated
    [[0, 0], [10, 0], [0, 0]],  # there and back
    [[20000.1, 20000.1], [20000.2, 20000.2], [20000.3, 20000.3]],  # collinear far from the origin
])
def test_degenerate_polygon_has_zero_iou(degenerate):
    """A polygon without area overlaps nothing, not even itself or a polygon around it."""
    around = [[-1, -1], [30000, -1], [30000, 30000], [-1, 30000]]
    assert polygon_iou(polygon(degenerate), polygon(degenerate)) == 0.0
    assert polygon_iou(polygon(degenerate), polygon(around)) == 0.0


def test_polygon_iou_of_non_rectangles():
    """Rasterized IoU follows the true areas of non-rectangular shapes, a self-crossing one included."""
    square = polygon([[0, 0], [4, 0], [4, 4], [0, 4]])
    triangle = polygon([[0, 0], [4, 0], [0, 4]])
    bowtie = polygon([[0, 0], [4, 4], [4, 0], [0, 4]])  # its signed area is 0, its drawn area half the square
    assert polygon_iou(square, triangle) == pytest.approx(0.5, rel=0.02)
    assert polygon_iou(square, bowtie) == pytest.approx(0.5, rel=0.02)
    assert polygon_iou(square, square) == 1.0


@pytest.mark.parametrize("metric, a, b", [
    (bbox_iou, box(0, 0, 10, 10), box(5, 0, 10, 10)),
    (polygon_iou, rect(0, 0, 10, 10), rect(5, 0, 10, 10)),
    (mask_dice, mask(MASK_A), mask(MASK_B)),
    (point_distance, point(0, 0), point(3, 4)),
    (polyline_distance, polyline([[0, 0], [1, 1]]), polyline([[0, 1], [1, 2]])),
    (similarity, mask(MASK_A), mask(MASK_B)),
])
def test_metrics_are_plain_floats(metric, a, b):
    """Every metric is a Python float, never a numpy scalar, so it goes straight into JSON."""
    assert type(metric(a, b)) is float


@pytest.mark.parametrize("a, b, expected", [
    (MASK_A, MASK_A, 1.0),
    (MASK_A, MASK_B, 2 * 2 / (3 + 3)),  # pixels 2 and 3 in common
    (MASK_B, MASK_C, 2 * 1 / (3 + 2)),  # pixel 4 in common
    (MASK_A, MASK_C, 0.0),
    (MASK_A, EMPTY, 0.0),
    (EMPTY, EMPTY, 0.0),  # nothing drawn on either side is no agreement on an object
])
def test_mask_dice_by_hand(a, b, expected):
    """Dice of decoded RLE masks equals the value counted by hand from their runs."""
    assert mask_dice(mask(a), mask(b)) == pytest.approx(expected)


def test_mask_dice_refuses_masks_of_different_sizes():
    """Masks of different sizes are not of one item: comparing them is an error, not a number."""
    with pytest.raises(ValueError, match="different sizes"):
        mask_dice(mask([0, 6], size=(2, 3)), mask([0, 6], size=(3, 2)))


@pytest.mark.parametrize("other, limit, matches", [
    (point(6, 8), 10.0, True),  # exactly 10 away: on the boundary, so a match
    (point(6, 8.001), 10.0, False),
    (point(0, 0), 0.0, True),
    (point(6, 8), 9.99, False),
    (point(6, 8), 20.0, True),
])
def test_point_distance_threshold_boundary(other, limit, matches):
    """Points match up to and including the threshold distance, and not a hair beyond."""
    origin = point(0, 0)
    assert point_distance(origin, point(6, 8)) == 10.0
    assert shapes_match(origin, other, Thresholds(point_distance=limit)) is matches


def test_polyline_distance_is_the_pooled_mean_of_nearest_vertex_distances():
    """Every vertex of both polylines counts once, by its distance to the other's nearest vertex."""
    a = polyline([[0, 0], [10, 0]])
    b = polyline([[0, 3], [10, 3], [20, 3]])
    # a to b: 3, 3; b to a: 3, 3 and sqrt(10^2 + 3^2) for the vertex at (20, 3).
    expected = (3 + 3 + 3 + 3 + math.sqrt(109)) / 5
    assert polyline_distance(a, b) == pytest.approx(expected)
    assert polyline_distance(b, a) == pytest.approx(expected)
    assert polyline_distance(a, a) == 0.0
    assert shapes_match(a, b, Thresholds(point_distance=4.5))
    assert not shapes_match(a, b, Thresholds(point_distance=4.4))


@pytest.mark.parametrize("shape", SHAPE_OF_EACH_TYPE, ids=lambda shape: shape["type"])
def test_wrong_label_never_matches(shape):
    """Identical geometry under another label is no match, and scores as one missed and one extra."""
    relabelled = {**shape, "label": "other"}
    assert shapes_match(shape, shape, Thresholds())
    assert not shapes_match(shape, relabelled, Thresholds(iou=0, dice=0, point_distance=math.inf))
    result = score_item({"shapes": [relabelled]}, {"shapes": [shape]})
    assert (result.matched, result.missed, result.extra) == (0, 1, 1)
    assert result.per_class == {shape["label"]: {"matched": 0, "missed": 1, "extra": 0},
                                "other": {"matched": 0, "missed": 0, "extra": 1}}


@pytest.mark.parametrize("shape", SHAPE_OF_EACH_TYPE, ids=lambda shape: shape["type"])
def test_different_frame_never_matches(shape):
    """Identical geometry on another frame is no match; a missing frame is frame 0."""
    assert not shapes_match(shape, {**shape, "frame": 1}, Thresholds(iou=0, dice=0, point_distance=math.inf))
    unframed = {key: value for key, value in shape.items() if key != "frame"}
    assert shapes_match(shape, unframed, Thresholds())
    assert score_item({"shapes": [{**shape, "frame": 2}]}, {"shapes": [shape]}).matched == 0


def test_different_types_never_match():
    """A bbox and the polygon of the same rectangle are different shapes: no match, similarity 0."""
    assert not shapes_match(box(0, 0, 10, 10), rect(0, 0, 10, 10), Thresholds(iou=0))
    assert similarity(box(0, 0, 10, 10), rect(0, 0, 10, 10)) == 0.0


def test_two_answers_near_one_reference_match_once():
    """Matching is one-to-one: two good answer boxes on one reference box give one match and one extra."""
    result = score_item({"shapes": [box(1, 0, 10, 10), box(0, 1, 10, 10)]}, {"shapes": [box(0, 0, 10, 10)]})
    assert (result.matched, result.missed, result.extra) == (1, 0, 1)
    assert result.per_class == {"lesion": {"matched": 1, "missed": 0, "extra": 1}}


def test_matching_takes_the_most_similar_pair_first():
    """Greedy by similarity, not by list order: the closest pair is taken first, leaving both matched."""
    # Answer (7, 0) is nearest reference (10, 0) (3 away) though (0, 0) comes first in the list and also
    # matches it (7 away); taking that pair first would leave (10, 0) with only (-8, 0), 18 away.
    result = score_item({"shapes": [point(7, 0), point(-8, 0)]}, {"shapes": [point(0, 0), point(10, 0)]})
    assert (result.matched, result.missed, result.extra) == (2, 0, 0)


def test_similarity_ranks_closer_shapes_higher():
    """similarity is 1 for identical shapes and falls, within 0..1, as the shapes move apart."""
    assert similarity(box(0, 0, 10, 10), box(0, 0, 10, 10)) == 1.0
    assert similarity(box(0, 0, 10, 10), box(5, 0, 10, 10)) == pytest.approx(1 / 3)
    assert similarity(mask(MASK_A), mask(MASK_B)) == pytest.approx(2 / 3)
    assert similarity(point(0, 0), point(0, 0)) == 1.0
    assert 0 < similarity(point(0, 0), point(0, 30)) < similarity(point(0, 0), point(0, 3)) < 1


def test_per_class_counts():
    """per_class counts each class's matched, missed and extra shapes, with every class reported."""
    reference = {"shapes": [box(0, 0, 10, 10), box(50, 50, 10, 10), point(5, 5), mask(MASK_A)]}
    answer = {"shapes": [box(0, 0, 10, 10), point(6, 5), point(90, 90), mask(MASK_C),
                         box(0, 0, 10, 10, label="cyst")]}
    result = score_item(answer, reference)
    assert result.per_class == {
        "cyst": {"matched": 0, "missed": 0, "extra": 1},
        "lesion": {"matched": 1, "missed": 1, "extra": 0},
        "organ": {"matched": 0, "missed": 1, "extra": 1},
        "vessel": {"matched": 1, "missed": 0, "extra": 1},
    }
    assert (result.matched, result.missed, result.extra) == (2, 2, 3)


@pytest.mark.parametrize("expected, given, right", [
    ("good", "good", True),
    ("good", "poor", False),
    ("good", None, False),  # not answered
    ("good", ["good"], False),
    (["mass", "calcification"], ["calcification", "mass"], True),  # multiple choice: order does not matter
    (["mass", "calcification"], ["mass"], False),
    (["mass"], ["mass", "calcification"], False),
    (["mass"], "mass", False),
    ([], [], True),  # "none of these" agreed on
    ([], ["mass"], False),
])
def test_classification_questions(expected, given, right):
    """A question is right when the answer equals the reference exactly; multiple choice compares sets."""
    answer = {"classifications": {} if given is None else {"q": given}}
    result = score_item(answer, {"classifications": {"q": expected}})
    assert (result.questions_right, result.questions) == (int(right), 1)
    assert result.correct is right


def test_questions_only_in_the_answer_are_ignored():
    """Answering a question the reference leaves out costs and earns nothing."""
    result = score_item({"classifications": {"quality": "good", "extra": "x"}},
                        {"classifications": {"quality": "good"}})
    assert (result.questions_right, result.questions, result.score) == (1, 1, 1.0)


@pytest.mark.parametrize("answer, reference", [
    ({}, {}),
    ({"shapes": [], "classifications": {}}, {"shapes": [], "classifications": {}}),
    ({"shapes": []}, {"classifications": {}}),
])
def test_empty_against_empty_is_correct(answer, reference):
    """Nothing to find and nothing found scores 1.0 and correct; missing keys mean empty."""
    result = score_item(answer, reference)
    assert result == ItemScore(score=1.0, correct=True, matched=0, missed=0, extra=0, questions_right=0,
                               questions=0, per_class={})


def test_score_formula_on_a_mixed_example():
    """score = (matched + right answers) / (max(reference, answer shapes) + reference questions)."""
    reference = {"shapes": [box(0, 0, 10, 10), rect(0, 0, 10, 10), point(0, 0), mask(MASK_A)],
                 "classifications": {"quality": "good", "findings": ["a", "b"], "side": "left"}}
    answer = {"shapes": [box(0, 0, 10, 10), point(3, 4), polyline([[0, 0], [1, 1]])],
              "classifications": {"quality": "good", "findings": ["b", "a"], "side": "right"}}
    result = score_item(answer, reference)
    assert (result.matched, result.missed, result.extra) == (2, 2, 1)
    assert (result.questions_right, result.questions) == (2, 3)
    assert result.score == 4 / 7
    assert result.correct is False
    assert json.loads(json.dumps(result.as_dict())) == {
        "score": 4 / 7, "correct": False, "matched": 2, "missed": 2, "extra": 1, "questions_right": 2,
        "questions": 3, "per_class": {"lesion": {"matched": 1, "missed": 1, "extra": 0},
                                      "organ": {"matched": 0, "missed": 1, "extra": 0},
                                      "vessel": {"matched": 1, "missed": 0, "extra": 1}}}


def test_a_perfect_answer_is_correct():
    """Every shape matched, nothing extra and every question right is a score of exactly 1.0."""
    reference = {"shapes": [box(0, 0, 10, 10), point(0, 0)], "classifications": {"quality": "good"}}
    answer = {"shapes": [point(1, 1), box(0, 0, 10, 9)], "classifications": {"quality": "good"}}
    result = score_item(answer, reference)
    assert (result.score, result.correct) == (1.0, True)


@pytest.mark.parametrize("a, b, thresholds, matches", [
    (box(0, 0, 10, 1), box(1, 0, 19, 1), Thresholds(iou=0.5), False),  # IoU 0.45
    (box(0, 0, 10, 1), box(1, 0, 19, 1), Thresholds(iou=0.4), True),
    (box(0, 0, 10, 1), box(1, 0, 19, 1), Thresholds(iou=0.45), True),  # IoU >= threshold
    (rect(0, 0, 10, 1), rect(1, 0, 19, 1), Thresholds(iou=0.5), False),
    (rect(0, 0, 10, 1), rect(1, 0, 19, 1), Thresholds(iou=0.4), True),
    (mask(MASK_A), mask(MASK_B), Thresholds(dice=0.7), False),  # Dice 2/3
    (mask(MASK_A), mask(MASK_B), Thresholds(dice=0.6), True),
    (point(0, 0), point(0, 15), Thresholds(), False),
    (point(0, 0), point(0, 15), Thresholds(point_distance=15), True),
])
def test_thresholds_are_honoured(a, b, thresholds, matches):
    """Each type's metric is held to its own threshold, in shapes_match and in score_item alike."""
    assert shapes_match(a, b, thresholds) is matches
    assert score_item({"shapes": [b]}, {"shapes": [a]}, thresholds).matched == int(matches)


def test_unknown_shape_type_is_an_error():
    """A shape type the metrics do not know is refused rather than silently scored."""
    with pytest.raises(ValueError, match="unknown shape type"):
        shapes_match({"type": "ellipse", "label": "x"}, {"type": "ellipse", "label": "x"}, Thresholds())
