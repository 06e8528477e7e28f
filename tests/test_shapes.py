"""Annotations: shapes checked against schema and item, by field path, with limits and every problem."""

from __future__ import annotations

import copy
import pickle

import pytest

from onprem_label.workflow.schema import validate_schema
from onprem_label.workflow.shapes import (MAX_ANNOTATION_BYTES, MAX_ERRORS, MAX_POINTS, MAX_SHAPES,
                                          ShapeError, validate_annotation)

W, H, FRAMES = 100, 80, 3
SCHEMA = validate_schema({
    "classes": [
        {"name": "lesion", "color": "#ff0000", "tools": ["bbox", "polygon"]},
        {"name": "vessel", "color": "#00ff00", "tools": ["polyline", "point"]},
        {"name": "organ", "color": "#0000ff", "tools": ["mask"]},
    ],
    "questions": [
        {"name": "quality", "type": "single", "options": ["good", "poor"], "required": True},
        {"name": "findings", "type": "multiple", "options": ["calcification", "mass", "none"]},
        {"name": "side", "type": "multiple", "options": ["left", "right"], "required": True},
    ],
})
BBOX = {"type": "bbox", "label": "lesion", "x": 10, "y": 12, "width": 30, "height": 20}
POLYGON = {"type": "polygon", "label": "lesion", "frame": 1, "points": [[0, 0], [50.5, 0], [50, 40.25]]}
POLYLINE = {"type": "polyline", "label": "vessel", "points": [[1, 1], [99, 79]]}
POINT = {"type": "point", "label": "vessel", "frame": 2, "x": 100, "y": 80}
MASK = {"type": "mask", "label": "organ", "rle": {"size": [H, W], "counts": [0, 4000, 4000]}}


def _validate(raw, **kwargs):
    return validate_annotation(raw, SCHEMA, width=W, height=H, frames=FRAMES, **kwargs)


def _errors(raw, **kwargs) -> list[dict]:
    with pytest.raises(ShapeError) as caught:
        _validate(raw, **kwargs)
    return caught.value.errors


def _with(shape: dict, **changes) -> dict:
    """A copy of `shape` with fields replaced; a value of ... deletes the field."""
    result = copy.deepcopy(shape)
    for key, value in changes.items():
        if value is ...:
            del result[key]
        else:
            result[key] = value
    return result


def test_rich_annotation_is_normalised():
    """Every shape type, ids, attributes and answers pass; frames filled in, choices put in schema order."""
    raw = {
        "shapes": [
            _with(BBOX, id="b-1", attributes={"confidence": 0.9, "note": "rim", "certain": True}),
            POLYGON, POLYLINE, POINT, _with(MASK, id="m-1"),
        ],
        "classifications": {"quality": "good", "findings": ["none", "calcification"], "side": None},
    }
    before = copy.deepcopy(raw)
    result = _validate(raw)
    assert result == {
        "shapes": [
            {"id": "b-1", "type": "bbox", "label": "lesion", "frame": 0, "x": 10, "y": 12, "width": 30,
             "height": 20, "attributes": {"confidence": 0.9, "note": "rim", "certain": True}},
            {"type": "polygon", "label": "lesion", "frame": 1, "points": [[0, 0], [50.5, 0], [50, 40.25]]},
            {"type": "polyline", "label": "vessel", "frame": 0, "points": [[1, 1], [99, 79]]},
            {"type": "point", "label": "vessel", "frame": 2, "x": 100, "y": 80},
            {"id": "m-1", "type": "mask", "label": "organ", "frame": 0,
             "rle": {"size": [H, W], "counts": [0, 4000, 4000]}},
        ],
        "classifications": {"quality": "good", "findings": ["calcification", "none"]},
    }
    assert raw == before
    result["shapes"][1]["points"][0][0] = 99
    assert raw == before


def test_empty_body_is_an_empty_annotation():
    """Both keys are optional: {} is a draft with no shapes and no answers."""
    assert _validate({}) == {"shapes": [], "classifications": {}}


def test_draft_may_skip_required_answers_but_submit_may_not():
    """Required questions may stay unanswered in a draft; a submit lists each one missing."""
    assert _validate({"shapes": [BBOX]})["shapes"][0]["frame"] == 0
    errors = _errors({"classifications": {"side": []}}, require_complete=True)
    assert [e["field"] for e in errors] == ["classifications.quality", "classifications.side"]
    assert all("required" in e["message"] and e["shape"] is None for e in errors)
    done = {"classifications": {"quality": "poor", "side": ["right"]}}
    assert _validate(done, require_complete=True)["classifications"] == {"quality": "poor", "side": ["right"]}


@pytest.mark.parametrize("shape", [
    pytest.param(_with(BBOX, x=90, width=10), id="bbox-touches-right"),
    pytest.param(_with(BBOX, y=70, height=10), id="bbox-touches-bottom"),
    pytest.param(_with(BBOX, x=0, y=0, width=W, height=H), id="bbox-whole-image"),
    # 0.2 + 998 * 0.1 is 100.00000000000001 in floating point: a client's rounding, not a box over the edge.
    pytest.param(_with(BBOX, x=0.2, width=998 * 0.1, y=0.2, height=798 * 0.1), id="bbox-float-rounding"),
    pytest.param(_with(POLYLINE, points=[[0, 0], [0.2 + 998 * 0.1, 0.2 + 798 * 0.1]]),
                 id="vertex-float-rounding"),
    pytest.param(_with(BBOX, x=99.5, width=0.5, y=0, height=0.001), id="bbox-sub-pixel"),
    pytest.param(_with(POLYGON, points=[[0, 0], [W, 0], [W, H]]), id="polygon-3-points-on-corners"),
    pytest.param(_with(POLYLINE, points=[[0, H], [W, 0]]), id="polyline-2-points"),
    pytest.param(_with(POINT, x=0, y=0), id="point-origin"),
    pytest.param(_with(POINT, x=W, y=H), id="point-far-corner"),
    pytest.param(_with(BBOX, frame=FRAMES - 1), id="last-frame"),
    pytest.param(_with(MASK, rle={"size": [H, W], "counts": [W * H]}), id="mask-one-run"),
    pytest.param(_with(BBOX, id="x" * 64), id="id-64-chars"),
    pytest.param(_with(BBOX, attributes={}), id="attributes-empty"),
    pytest.param(_with(BBOX, attributes={"n": "x" * 2000}), id="attributes-under-2kib"),
])
def test_boundary_shapes_are_valid(shape):
    """Shapes right on the image edges, the last frame and the other limits are accepted."""
    assert _validate({"shapes": [shape]})["shapes"][0]["type"] == shape["type"]


NAN, INF = float("nan"), float("inf")

BAD_SHAPES = [
    ("not-object", [1, 2], "shapes[0]", "must be an object"),
    ("type-missing", _with(BBOX, type=...), "shapes[0].type", "required"),
    ("type-unknown", _with(BBOX, type="circle"), "shapes[0].type", "must be one of bbox"),
    ("type-list", _with(BBOX, type=["bbox"]), "shapes[0].type", "must be one of"),
    ("unknown-key", _with(BBOX, colour="red"), "shapes[0].colour", "unknown key for a bbox"),
    ("key-of-other-type", _with(BBOX, points=[]), "shapes[0].points", "unknown key"),
    ("comment-pin", _with(POINT, comment_pin=True), "shapes[0].comment_pin", "unknown key"),
    ("label-missing", _with(BBOX, label=...), "shapes[0].label", "required"),
    ("label-unknown", _with(BBOX, label="tumour"), "shapes[0].label", "not a class"),
    ("label-wrong-case", _with(BBOX, label="Lesion"), "shapes[0].label", "not a class"),
    ("label-bytes", _with(BBOX, label=b"lesion"), "shapes[0].label", "not a class"),
    ("tool-not-allowed", _with(POINT, label="lesion"), "shapes[0].type", "'lesion' does not allow point"),
    ("frame-negative", _with(BBOX, frame=-1), "shapes[0].frame", "0 to 2"),
    ("frame-past-end", _with(BBOX, frame=FRAMES), "shapes[0].frame", "0 to 2"),
    ("frame-float", _with(BBOX, frame=1.0), "shapes[0].frame", "integer"),
    ("frame-bool", _with(BBOX, frame=True), "shapes[0].frame", "integer"),
    ("frame-null", _with(BBOX, frame=None), "shapes[0].frame", "integer"),
    ("id-empty", _with(BBOX, id=""), "shapes[0].id", "1 to 64"),
    ("id-65", _with(BBOX, id="x" * 65), "shapes[0].id", "1 to 64"),
    ("id-number", _with(BBOX, id=7), "shapes[0].id", "must be a string"),
    ("id-control", _with(BBOX, id="a\x00"), "shapes[0].id", "printable"),
    # bbox
    ("bbox-x-missing", _with(BBOX, x=...), "shapes[0].x", "required"),
    ("bbox-x-string", _with(BBOX, x="10"), "shapes[0].x", "finite number"),
    ("bbox-x-nan", _with(BBOX, x=NAN), "shapes[0].x", "finite number"),
    ("bbox-y-inf", _with(BBOX, y=INF), "shapes[0].y", "finite number"),
    ("bbox-width-minus-inf", _with(BBOX, width=-INF), "shapes[0].width", "finite number"),
    ("bbox-height-bool", _with(BBOX, height=True), "shapes[0].height", "finite number"),
    ("bbox-width-zero", _with(BBOX, width=0), "shapes[0].width", "greater than 0"),
    ("bbox-height-negative", _with(BBOX, height=-5), "shapes[0].height", "greater than 0"),
    ("bbox-x-negative", _with(BBOX, x=-1), "shapes[0].x", "must be 0 to 100"),
    ("bbox-y-slightly-negative", _with(BBOX, y=-0.5), "shapes[0].y", "must be 0 to 80"),
    ("bbox-x-vast-int", _with(BBOX, x=10 ** 400), "shapes[0].x", "must be 0 to 100"),
    ("bbox-right-pixel-over", _with(BBOX, x=91, width=10), "shapes[0].width", "at most the image width, 100"),
    ("bbox-bottom-pixel-over", _with(BBOX, y=71, height=10), "shapes[0].height",
     "at most the image height, 80"),
    ("bbox-wider-than-image", _with(BBOX, x=0, width=W + 1), "shapes[0].width", "at most the image width"),
    # polygon and polyline
    ("polygon-2-points", _with(POLYGON, points=[[0, 0], [1, 1]]), "shapes[0].points", "at least 3 points"),
    ("polyline-1-point", _with(POLYLINE, points=[[0, 0]]), "shapes[0].points", "at least 2 points"),
    ("points-missing", _with(POLYGON, points=...), "shapes[0].points", "required"),
    ("points-string", _with(POLYGON, points="0,0 1,1 2,2"), "shapes[0].points", "list of [x, y]"),
    ("point-too-short", _with(POLYGON, points=[[0, 0], [1], [2, 2]]), "shapes[0].points[1]", "[x, y]"),
    ("point-too-long", _with(POLYGON, points=[[0, 0], [1, 1, 1], [2, 2]]), "shapes[0].points[1]", "[x, y]"),
    ("point-tuple", _with(POLYGON, points=[[0, 0], (1, 1), [2, 2]]), "shapes[0].points[1]", "[x, y]"),
    ("point-nan", _with(POLYGON, points=[[0, 0], [1, 1], [2, NAN]]), "shapes[0].points[2]", "finite numbers"),
    ("point-bool", _with(POLYLINE, points=[[True, 0], [1, 1]]), "shapes[0].points[0]", "finite numbers"),
    ("point-dict", _with(POLYLINE, points=[{"x": 0, "y": 0}, [1, 1]]), "shapes[0].points[0]", "[x, y]"),
    ("vertex-right-of-image", _with(POLYGON, points=[[0, 0], [W + 1, 0], [5, 5]]), "shapes[0].points[1]",
     "outside the image"),
    ("vertex-above-image", _with(POLYLINE, points=[[0, 0], [5, -0.5]]), "shapes[0].points[1]", "outside"),
    ("many-vertices-outside", _with(POLYGON, points=[[0, 0], [-1, 0], [-2, 0], [-3, 0]]),
     "shapes[0].points[1]",
     "(and 2 more points)"),
    # point
    ("point-x-over", _with(POINT, x=W + 1), "shapes[0].x", "must be 0 to 100"),
    ("point-y-negative", _with(POINT, y=-1), "shapes[0].y", "must be 0 to 80"),
    ("point-y-missing", _with(POINT, y=...), "shapes[0].y", "required"),
    ("point-x-inf", _with(POINT, x=INF), "shapes[0].x", "finite number"),
    # mask
    ("rle-missing", _with(MASK, rle=...), "shapes[0].rle", "required"),
    ("rle-string", _with(MASK, rle="eNpjYGBgAAAABQAB"), "shapes[0].rle", '{"size"'),
    ("rle-unknown-key", _with(MASK, rle={**MASK["rle"], "format": "coco"}), "shapes[0].rle.format",
     "unknown key"),
    ("rle-size-swapped", _with(MASK, rle={"size": [W, H], "counts": [W * H]}), "shapes[0].rle.size",
     "[80, 100]"),
    ("rle-size-floats", _with(MASK, rle={"size": [80.0, 100], "counts": [W * H]}), "shapes[0].rle.size",
     "[height, width]"),
    ("rle-size-missing", _with(MASK, rle={"counts": [W * H]}), "shapes[0].rle.size", "[height, width]"),
    ("rle-counts-missing", _with(MASK, rle={"size": [H, W]}), "shapes[0].rle.counts", "required"),
    ("rle-counts-compressed", _with(MASK, rle={"size": [H, W], "counts": "PPYo1"}), "shapes[0].rle.counts",
     "uncompressed"),
    ("rle-count-negative", _with(MASK, rle={"size": [H, W], "counts": [-1, 8001]}), "shapes[0].rle.counts[0]",
     "non-negative integer"),
    ("rle-count-float", _with(MASK, rle={"size": [H, W], "counts": [4000.0, 4000]}),
     "shapes[0].rle.counts[0]",
     "non-negative integer"),
    ("rle-count-bool", _with(MASK, rle={"size": [H, W], "counts": [7999, True]}), "shapes[0].rle.counts[1]",
     "non-negative integer"),
    ("rle-sum-one-short", _with(MASK, rle={"size": [H, W], "counts": [4000, 3999]}), "shapes[0].rle.counts",
     "sum to 7999; the item has 8000 pixels"),
    ("rle-sum-one-over", _with(MASK, rle={"size": [H, W], "counts": [4000, 4001]}), "shapes[0].rle.counts",
     "sum to 8001"),
    ("rle-empty-counts", _with(MASK, rle={"size": [H, W], "counts": []}), "shapes[0].rle.counts", "sum to 0"),
    # attributes
    ("attributes-list", _with(BBOX, attributes=["a"]), "shapes[0].attributes", "must be an object"),
    ("attribute-list-value", _with(BBOX, attributes={"a": [1]}), "shapes[0].attributes.a",
     "a string, a finite"),
    ("attribute-null", _with(BBOX, attributes={"a": None}), "shapes[0].attributes.a", "a string, a finite"),
    ("attribute-nan", _with(BBOX, attributes={"a": NAN}), "shapes[0].attributes.a", "a string, a finite"),
    ("attribute-nul", _with(BBOX, attributes={"a": "x\x00"}), "shapes[0].attributes.a", "a string, a finite"),
    ("attribute-surrogate", _with(BBOX, attributes={"a": "\udc00"}), "shapes[0].attributes.a", "a string"),
    ("attribute-empty-key", _with(BBOX, attributes={"": 1}), "shapes[0].attributes['']",
     "the key must be 1 to 64"),
    ("attribute-int-key", _with(BBOX, attributes={1: 1}), "shapes[0].attributes[1]",
     "the key must be a string"),
    ("attributes-over-2kib", _with(BBOX, attributes={"n": "x" * 2100}), "shapes[0].attributes", "2048 bytes"),
]


@pytest.mark.parametrize("shape, field, fragment", [pytest.param(*c[1:], id=c[0]) for c in BAD_SHAPES])
def test_bad_shape_names_the_field(shape, field, fragment):
    """Each broken shape rule is reported at its field path, tagged with the shape's index."""
    errors = _errors({"shapes": [shape]})
    assert any(e["field"] == field and fragment in e["message"] and e["shape"] == 0 for e in errors), errors


BAD_BODIES = [
    ("top-unknown-key", {"shapes": [], "comments": []}, "comments", "unknown key"),
    ("shapes-object", {"shapes": {"0": BBOX}}, "shapes", "must be a list"),
    ("classifications-list", {"classifications": ["good"]}, "classifications", "must be an object"),
    ("unknown-question", {"classifications": {"colour": "red"}}, "classifications.colour", "not a question"),
    ("question-wrong-case", {"classifications": {"Quality": "good"}}, "classifications.Quality",
     "not a question"),
    ("single-not-an-option", {"classifications": {"quality": "fair"}}, "classifications.quality",
     "one of the"),
    ("single-given-a-list", {"classifications": {"quality": ["good"]}}, "classifications.quality",
     "one of the"),
    ("multiple-given-a-string", {"classifications": {"findings": "mass"}}, "classifications.findings",
     "must be a list"),
    ("multiple-unknown-option", {"classifications": {"findings": ["mass", "cyst"]}},
     "classifications.findings[1]",
     "not one of"),
    ("multiple-number", {"classifications": {"findings": [1]}}, "classifications.findings[0]", "not one of"),
    ("multiple-twice", {"classifications": {"findings": ["mass", "mass"]}}, "classifications.findings[1]",
     "chosen twice"),
    ("duplicate-ids", {"shapes": [_with(BBOX, id="a"), _with(POINT, id="a")]}, "shapes[1].id",
     "repeats the id of shapes[0]"),
]


@pytest.mark.parametrize("raw, field, fragment", [pytest.param(*c[1:], id=c[0]) for c in BAD_BODIES])
def test_bad_body_names_the_field(raw, field, fragment):
    """Problems outside a single shape's geometry are reported at their path too."""
    errors = _errors(raw)
    assert any(e["field"] == field and fragment in e["message"] for e in errors), errors


@pytest.mark.parametrize("raw", [[], "shapes", None, 1.5, b"{}"], ids=repr)
def test_body_that_is_not_an_object(raw):
    """Anything but a JSON object is refused as a whole."""
    assert [e["field"] for e in _errors(raw)] == [""]


def test_every_problem_is_listed_at_once():
    """One save reports all problems, in every shape and in the answers, each tagged with its shape."""
    raw = {"shapes": [BBOX, _with(BBOX, width=0, frame=9), _with(POLYGON, points=[[0, 0], [1, 1]]),
                      _with(MASK, label="vessel"), _with(POINT, x=NAN)],
           "classifications": {"quality": "fair"}, "extra": 1}
    got = [(e["shape"], e["field"]) for e in _errors(raw, require_complete=True)]
    assert got == [(None, "extra"), (1, "shapes[1].frame"), (1, "shapes[1].width"), (2, "shapes[2].points"),
                   (3, "shapes[3].type"), (4, "shapes[4].x"), (None, "classifications.quality"),
                   (None, "classifications.side")]


def test_shape_error_reads_well_and_pickles():
    """ShapeError is a ValueError naming the field, and keeps its errors when pickled."""
    with pytest.raises(ValueError) as caught:
        _validate({"shapes": [_with(BBOX, x=NAN)]})
    assert "shapes[0].x" in str(caught.value)
    assert pickle.loads(pickle.dumps(caught.value)).errors == caught.value.errors


def test_errors_are_capped_with_a_count_of_the_rest():
    """A client that gets every shape wrong receives the first problems and a count of the rest."""
    errors = _errors({"shapes": [_with(BBOX, label="nope")] * (MAX_ERRORS + 500)})
    assert len(errors) == MAX_ERRORS + 1
    assert errors[-1] == {"shape": None, "field": "", "message": "and 500 more problems not listed"}


@pytest.mark.parametrize("name, value", [("width", 0), ("height", -1), ("frames", 0), ("width", 1.5),
                                         ("frames", True)])
def test_bad_item_dimensions_are_a_programming_error(name, value):
    """Item sizes come from the database, so a bad one raises a plain ValueError, not a ShapeError."""
    item = {"width": W, "height": H, "frames": FRAMES, name: value}
    with pytest.raises(ValueError) as caught:
        validate_annotation({}, SCHEMA, **item)
    assert not isinstance(caught.value, ShapeError)


# --- limits: built cheaply from one shared shape -------------------------------------------------

def test_shape_count_limit():
    """10,000 shapes pass; one more is refused at `shapes`, alone, without walking the shapes."""
    assert len(_validate({"shapes": [BBOX] * MAX_SHAPES})["shapes"]) == MAX_SHAPES
    errors = _errors({"shapes": [BBOX] * MAX_SHAPES + [_with(BBOX, label="nope")]})
    assert errors == [{"shape": None, "field": "shapes",
                       "message": "at most 10000 shapes; this annotation has 10001"}]


def test_point_count_limit_counts_all_shapes():
    """100,000 polygon and polyline points pass in all; one more, spread over two shapes, is refused."""
    half = MAX_POINTS // 2
    fits = {"shapes": [_with(POLYGON, points=[[1, 1]] * half), _with(POLYLINE, points=[[2, 2]] * half)]}
    assert len(_validate(fits)["shapes"]) == 2
    over = {"shapes": [_with(POLYGON, points=[[1, 1]] * half), _with(POLYLINE, points=[[2, 2]] * (half + 1))]}
    assert [(e["field"], e["message"]) for e in _errors(over)] == [
        ("shapes", "at most 100000 points in all; this annotation has 100001")]


def test_body_size_limit():
    """A body over 16 MiB as JSON is refused whole, before any shape is looked at."""
    huge = {"shapes": [_with(BBOX, label="nope")], "classifications": {"quality": "x" * MAX_ANNOTATION_BYTES}}
    errors = _errors(huge)
    assert len(errors) == 1 and errors[0]["field"] == "" and "at most 16777216" in errors[0]["message"]


def test_body_that_cannot_be_json():
    """A cycle, or an integer too long to write, is refused as not JSON."""
    looped: dict = {"shapes": []}
    looped["shapes"].append(looped)
    assert "not JSON" in _errors(looped)[0]["message"]
    assert "not JSON" in _errors({"shapes": [_with(BBOX, x=10 ** 5000)]})[0]["message"]
