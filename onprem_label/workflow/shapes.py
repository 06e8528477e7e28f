"""An annotation body checked against its project's label schema and its item's size and frame count."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from onprem_label.workflow.schema import check_text, encoded_size, key_path, summarise

MAX_SHAPES = 10_000
MAX_POINTS = 100_000  # polygon and polyline vertices, over the whole annotation
# Compact UTF-8 JSON of the whole body. Every save is a new revision row, so this bounds what one save
# can add to the database; a dense full-resolution mask is the only thing that comes near it.
MAX_ANNOTATION_BYTES = 16 * 1024 * 1024
MAX_ATTRIBUTES_BYTES = 2 * 1024
MAX_ID_LENGTH = 64
MAX_ATTRIBUTE_KEY_LENGTH = 64
# A broken client can produce one problem per shape; past this many the rest are summed up in one line.
MAX_ERRORS = 1000
# Clients compute x + width and scaled vertices in floating point; a vertex a rounding error beyond the
# edge is still on it. Values are stored as sent, so readers may clamp.
EDGE_TOLERANCE = 1e-6

GEOMETRY_KEYS = {
    "bbox": ("x", "y", "width", "height"),
    "polygon": ("points",),
    "polyline": ("points",),
    "point": ("x", "y"),
    "mask": ("rle",),
}
COMMON_KEYS = ("id", "type", "label", "frame", "attributes")
MIN_POINTS = {"polygon": 3, "polyline": 2}
_MISSING = object()


class ShapeError(ValueError):
    """An annotation that cannot be saved; `.errors` lists every problem as
    {"shape": index or None, "field": "shapes[3].points", "message": text}."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors)  # the list in args, so the exception pickles with its errors
        self.errors = errors

    def __str__(self) -> str:
        return summarise("annotation", self.errors)


class _Item(NamedTuple):
    width: int
    height: int
    frames: int


class _Errors(list):
    """Problems collected while walking an annotation; `shape` is the index of the shape they belong to."""

    def add(self, shape: int | None, field: str, message: str) -> None:
        self.append({"shape": shape, "field": field, "message": message})

    def capped(self) -> list[dict[str, Any]]:
        if len(self) <= MAX_ERRORS:
            return list(self)
        return self[:MAX_ERRORS] + [{"shape": None, "field": "",
                                     "message": f"and {len(self) - MAX_ERRORS} more problems not listed"}]


def validate_annotation(raw: object, schema: dict[str, Any], *, width: int, height: int, frames: int,
                        require_complete: bool = False) -> dict[str, Any]:
    """A normalised copy of an annotation body, or ShapeError listing every problem.

    `schema` is a validated label schema; width, height and frames are the item's. A draft save may leave
    required questions unanswered; a submit passes require_complete=True. A body over a limit (shape or
    point count, encoded size) is refused with that problem alone; otherwise every problem is listed, up
    to MAX_ERRORS. Coordinates and values are kept as sent (ints stay ints).
    """
    for name, value in (("width", width), ("height", height), ("frames", frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, not {value!r}")
    if not isinstance(raw, dict):
        raise ShapeError([_whole("must be a JSON object with shapes and classifications")])
    limits = _over_limits(raw.get("shapes"))  # first: counting is cheaper than encoding
    if limits:
        raise ShapeError(limits)
    size = encoded_size(raw)
    if size is None:
        raise ShapeError([_whole("is not JSON (a cycle or a number too large)")])
    if size > MAX_ANNOTATION_BYTES:
        raise ShapeError([_whole(f"is {size} bytes as JSON; at most {MAX_ANNOTATION_BYTES}")])
    errors = _Errors()
    for key in raw:
        if key not in ("shapes", "classifications"):
            errors.add(None, key_path("", key), "unknown key; allowed: shapes, classifications")
    shapes = _shapes(raw.get("shapes", []), schema, _Item(width, height, frames), errors)
    classifications = _classifications(raw.get("classifications", {}), schema, require_complete, errors)
    if errors:
        raise ShapeError(errors.capped())
    return {"shapes": shapes, "classifications": classifications}


def _over_limits(shapes: object) -> list[dict[str, Any]]:
    """The count limits, checked before any shape is walked: walking an oversized body is the cost they
    exist to avoid, so a body over one is refused with that problem alone."""
    if not isinstance(shapes, list):
        return []
    problems = []
    if len(shapes) > MAX_SHAPES:
        problems.append({"shape": None, "field": "shapes",
                         "message": f"at most {MAX_SHAPES} shapes; this annotation has {len(shapes)}"})
    points = sum(len(shape["points"]) for shape in shapes
                 if isinstance(shape, dict) and isinstance(shape.get("points"), list))
    if points > MAX_POINTS:
        problems.append({"shape": None, "field": "shapes",
                         "message": f"at most {MAX_POINTS} points in all; this annotation has {points}"})
    return problems


def _whole(message: str) -> dict[str, Any]:
    return {"shape": None, "field": "", "message": message}


def _number(value: object) -> bool:
    """A JSON number: an int or a finite float, and never a bool (True is an int to Python)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _plain(value: int | float) -> int | float:
    return int(value) if isinstance(value, int) else float(value)


def _within(value: int | float, high: int) -> bool:
    return -EDGE_TOLERANCE <= value <= high + EDGE_TOLERANCE


def _shapes(value: object, schema: dict[str, Any], item: _Item, errors: _Errors) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        errors.add(None, "shapes", "must be a list")
        return []
    tools = {cls["name"]: cls["tools"] for cls in schema.get("classes", [])}
    ids: dict[str, str] = {}
    result = []
    for index, shape in enumerate(value):
        normalised = _shape(index, shape, tools, item, ids, errors)
        if normalised is not None:
            result.append(normalised)
    return result


def _shape(index: int, raw: object, tools: dict[str, list[str]], item: _Item, ids: dict[str, str],
           errors: _Errors) -> dict[str, Any] | None:
    """One shape normalised (frame filled in, keys in a fixed order), or None when it has no usable type."""
    path = f"shapes[{index}]"
    if not isinstance(raw, dict):
        errors.add(index, path, "must be an object")
        return None
    kind = raw.get("type", _MISSING)
    if not isinstance(kind, str) or kind not in GEOMETRY_KEYS:
        errors.add(index, f"{path}.type", "is required" if kind is _MISSING
                   else f"must be one of {', '.join(GEOMETRY_KEYS)}")
        return None
    for key in raw:
        if key not in COMMON_KEYS and key not in GEOMETRY_KEYS[kind]:
            errors.add(index, key_path(path, key), f"unknown key for a {kind}")
    out: dict[str, Any] = {}
    shape_id = raw.get("id", _MISSING)
    if shape_id is not _MISSING:
        problem = check_text(shape_id, MAX_ID_LENGTH)
        if problem:
            errors.add(index, f"{path}.id", problem)
        elif shape_id in ids:
            errors.add(index, f"{path}.id", f"repeats the id of {ids[shape_id]}")
        else:
            ids[shape_id] = path
        out["id"] = shape_id
    out["type"] = kind
    out["label"] = _label(index, path, raw.get("label", _MISSING), kind, tools, errors)
    out["frame"] = _frame(index, path, raw.get("frame", 0), item, errors)
    if kind == "bbox":
        out.update(_bbox(index, path, raw, item, errors))
    elif kind == "point":
        out.update(_point(index, path, raw, item, errors))
    elif kind == "mask":
        out["rle"] = _mask(index, f"{path}.rle", raw.get("rle", _MISSING), item, errors)
    else:
        out["points"] = _points(index, path, raw.get("points", _MISSING), kind, item, errors)
    if "attributes" in raw:
        out["attributes"] = _attributes(index, f"{path}.attributes", raw["attributes"], errors)
    return out


def _label(index: int, path: str, label: object, kind: str, tools: dict[str, list[str]],
           errors: _Errors) -> object:
    if label is _MISSING:
        errors.add(index, f"{path}.label", "is required")
    elif not isinstance(label, str) or label not in tools:
        errors.add(index, f"{path}.label", "is not a class of the project's schema")
    elif kind not in tools[label]:
        errors.add(index, f"{path}.type", f"class {label!r} does not allow {kind}; it allows "
                                          f"{', '.join(tools[label])}")
    return label


def _frame(index: int, path: str, frame: object, item: _Item, errors: _Errors) -> object:
    if isinstance(frame, bool) or not isinstance(frame, int):
        errors.add(index, f"{path}.frame", "must be an integer")
    elif not 0 <= frame < item.frames:
        errors.add(index, f"{path}.frame",
                   f"must be 0 to {item.frames - 1}: the item has {item.frames} frame(s)")
    else:
        return int(frame)
    return frame


def _numbers(index: int, path: str, raw: dict, keys: tuple[str, ...], errors: _Errors) -> dict[str, Any]:
    """The named fields of a shape, each a finite number, or {} when any is missing or is not one."""
    found = {}
    for key in keys:
        value = raw.get(key, _MISSING)
        if value is _MISSING:
            errors.add(index, f"{path}.{key}", "is required")
        elif not _number(value):
            errors.add(index, f"{path}.{key}", "must be a finite number")
        else:
            found[key] = _plain(value)
    return found if len(found) == len(keys) else {}


def _bbox(index: int, path: str, raw: dict, item: _Item, errors: _Errors) -> dict[str, Any]:
    box = _numbers(index, path, raw, GEOMETRY_KEYS["bbox"], errors)
    if not box:
        return {key: raw.get(key) for key in GEOMETRY_KEYS["bbox"]}
    for origin, extent, limit in (("x", "width", item.width), ("y", "height", item.height)):
        if not box[extent] > 0:
            errors.add(index, f"{path}.{extent}", "must be greater than 0")
        elif not _within(box[origin], limit):
            errors.add(index, f"{path}.{origin}", f"must be 0 to {limit}: the box starts outside the image")
        # Only now is the sum safe: both are small, so an int of 400 digits cannot overflow a float add.
        elif not box[origin] + box[extent] <= limit + EDGE_TOLERANCE:
            errors.add(index, f"{path}.{extent}",
                       f"{origin} + {extent} must be at most the image {extent}, {limit}")
    return box


def _point(index: int, path: str, raw: dict, item: _Item, errors: _Errors) -> dict[str, Any]:
    point = _numbers(index, path, raw, GEOMETRY_KEYS["point"], errors)
    if not point:
        return {key: raw.get(key) for key in GEOMETRY_KEYS["point"]}
    for axis, limit in (("x", item.width), ("y", item.height)):
        if not _within(point[axis], limit):
            errors.add(index, f"{path}.{axis}", f"must be 0 to {limit}: the point lies outside the image")
    return point


def _points(index: int, path: str, value: object, kind: str, item: _Item, errors: _Errors) -> list:
    field = f"{path}.points"
    if not isinstance(value, list):
        errors.add(index, field, "is required" if value is _MISSING else "must be a list of [x, y] points")
        return []
    if len(value) < MIN_POINTS[kind]:
        errors.add(index, field, f"a {kind} needs at least {MIN_POINTS[kind]} points; it has {len(value)}")
    malformed: list[int] = []
    outside: list[int] = []
    result = []
    for j, point in enumerate(value):
        if not (isinstance(point, list) and len(point) == 2 and _number(point[0]) and _number(point[1])):
            malformed.append(j)
            continue
        x, y = _plain(point[0]), _plain(point[1])
        if not (_within(x, item.width) and _within(y, item.height)):
            outside.append(j)
        result.append([x, y])
    # One line per kind of problem, naming the first point: a broken client gets every point wrong.
    if malformed:
        errors.add(index, f"{field}[{malformed[0]}]", "must be [x, y], two finite numbers" + _more(malformed))
    if outside:
        errors.add(index, f"{field}[{outside[0]}]",
                   f"lies outside the image (0..{item.width}, 0..{item.height})" + _more(outside))
    return result


def _more(indexes: list[int]) -> str:
    return f" (and {len(indexes) - 1} more points)" if len(indexes) > 1 else ""


def _mask(index: int, path: str, rle: object, item: _Item, errors: _Errors) -> object:
    """COCO uncompressed RLE: only the size and the run lengths' types and sum are checked."""
    if not isinstance(rle, dict):
        errors.add(index, path,
                   "is required" if rle is _MISSING else 'must be {"size": [h, w], "counts": [...]}')
        return rle
    for key in rle:
        if key not in ("size", "counts"):
            errors.add(index, key_path(path, key), "unknown key; allowed: size, counts")
    size = rle.get("size", _MISSING)
    # type() is int, here and below: 512.0 == 512 and True == 1 to Python, but neither is a JSON integer.
    exact = isinstance(size, list) and all(type(v) is int for v in size)
    if not (exact and size == [item.height, item.width]):
        errors.add(index, f"{path}.size",
                   f"must be [height, width] of the item: [{item.height}, {item.width}]")
    counts = rle.get("counts", _MISSING)
    pixels = item.height * item.width
    if not isinstance(counts, list):
        errors.add(index, f"{path}.counts", "is required" if counts is _MISSING
                   else "must be a list of run lengths (uncompressed RLE)")
        return rle
    # A dense mask has millions of runs: check them with C-speed builtins, and look for the index
    # of the first bad one only when there is one.
    if counts and not (set(map(type, counts)) == {int} and min(counts) >= 0):
        bad = next(j for j, run in enumerate(counts) if type(run) is not int or run < 0)
        errors.add(index, f"{path}.counts[{bad}]", "must be a non-negative integer")
    elif sum(counts) != pixels:
        errors.add(index, f"{path}.counts", f"run lengths sum to {sum(counts)}; the item has {pixels} pixels")
    return {"size": [item.height, item.width], "counts": list(counts)}


def _attributes(index: int, path: str, value: object, errors: _Errors) -> object:
    if not isinstance(value, dict):
        errors.add(index, path, "must be an object")
        return value
    size = encoded_size(value)
    if size is None or size > MAX_ATTRIBUTES_BYTES:
        errors.add(index, path, f"must be at most {MAX_ATTRIBUTES_BYTES} bytes as JSON")
        return value
    for key, item in value.items():
        problem = check_text(key, MAX_ATTRIBUTE_KEY_LENGTH)
        if problem:
            errors.add(index, key_path(path, key), f"the key {problem}")
        elif not (_number(item) or isinstance(item, bool) or _storable(item)):
            errors.add(index, key_path(path, key), "must be a string, a finite number or true/false")
    return {str(k): (_plain(v) if _number(v) else v) for k, v in value.items()}


def _storable(value: object) -> bool:
    """A string PostgreSQL's JSONB can hold: no NUL and no lone surrogate halves."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    return not any("\ud800" <= ch <= "\udfff" for ch in value)


def _classifications(value: object, schema: dict[str, Any], require_complete: bool,
                     errors: _Errors) -> dict[str, Any]:
    if not isinstance(value, dict):
        errors.add(None, "classifications", "must be an object")
        return {}
    questions = {q["name"]: q for q in schema.get("questions", [])}
    answers: dict[str, Any] = {}
    for key, answer in value.items():
        path = key_path("classifications", key)
        question = questions.get(key) if isinstance(key, str) else None
        if question is None:
            errors.add(None, path, "is not a question of the project's schema")
        elif answer is not None:  # null: not answered (yet), as when a draft clears an answer
            answers[key] = _answer(path, answer, question, errors)
    result = {}
    for name, question in questions.items():  # answers in schema order, multiple choices too
        if name in answers:
            result[name] = answers[name]
        if require_complete and question["required"] and answers.get(name) in (None, []):
            errors.add(None, key_path("classifications", name), "is required before the task is submitted")
    return result


def _answer(path: str, answer: object, question: dict[str, Any], errors: _Errors) -> object:
    options = question["options"]
    if question["type"] == "single":
        if not isinstance(answer, str) or answer not in options:
            errors.add(None, path, "must be one of the question's options (a string)")
        return answer
    if not isinstance(answer, list):
        errors.add(None, path, "must be a list of the question's options")
        return answer
    chosen: set[str] = set()
    for j, choice in enumerate(answer):
        if not isinstance(choice, str) or choice not in options:
            errors.add(None, f"{path}[{j}]", "is not one of the question's options")
        elif choice in chosen:
            errors.add(None, f"{path}[{j}]", f"{choice!r} is chosen twice")
        else:
            chosen.add(choice)
    return [option for option in options if option in chosen]
