"""Agreement of an answer with a reference annotation: shape metrics, one-to-one matching, an item score."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

# Polygons are drawn on a grid of this many cells a side laid over the union of their bounding boxes,
# each axis scaled on its own. IoU does not change when an axis is scaled, so the cost is the same for a
# polygon on a 20000-pixel slide as for one on a thumbnail, and a small polygon is drawn as finely as a
# large one. PIL fills the pixels an edge passes through, so each edge is off by about one cell:
# well under 1% for polygons a quarter of the grid across.
RASTER_SIDE = 512
# A polyline's vertex-to-vertex distances are taken this many at a time, so a long one needs little memory.
_DISTANCE_CHUNK = 1 << 20


@dataclass(frozen=True)
class Thresholds:
    """When two shapes of the same type, label and frame count as the same object."""

    iou: float = 0.5  # bbox and polygon match when IoU >= iou
    dice: float = 0.5  # masks match when Dice >= dice
    # Points match when their distance is <= this (pixels); polylines when polyline_distance is.
    point_distance: float = 10.0


@dataclass(frozen=True)
class ItemScore:
    """How far an answer agrees with the reference: the score and the counts behind it."""

    score: float
    correct: bool
    matched: int
    missed: int
    extra: int
    questions_right: int
    questions: int
    per_class: dict[str, dict[str, int]]

    def as_dict(self) -> dict[str, Any]:
        """The score as plain JSON-safe values (a deep copy)."""
        return asdict(self)


def bbox_iou(a: dict, b: dict) -> float:
    """Intersection over union of two bboxes; 0 when neither has any area."""
    return _box_iou(_box(a), _box(b))


def polygon_iou(a: dict, b: dict) -> float:
    """IoU of two polygons drawn on a fixed grid over their bounding boxes; 0 if either is degenerate."""
    return _polygon_iou(_vertices(a), _vertices(b))


def mask_dice(a: dict, b: dict) -> float:
    """Dice coefficient of two RLE masks of the same size; 0 when both are empty."""
    return _dice(_mask_pixels(a), _mask_pixels(b))


def point_distance(a: dict, b: dict) -> float:
    """Euclidean distance between two points, in pixels."""
    return math.hypot(float(a["x"]) - float(b["x"]), float(a["y"]) - float(b["y"]))


def polyline_distance(a: dict, b: dict) -> float:
    """Mean, over the vertices of both polylines, of the distance to the other one's nearest vertex."""
    return _polyline_distance(_vertices(a), _vertices(b))


def similarity(a: dict, b: dict) -> float:
    """How alike two shapes are, 0..1, for ranking matches: IoU (bbox, polygon), Dice (mask), or
    1 / (1 + distance in pixels) (point, polyline); 0 for shapes of different types."""
    if a.get("type") != b.get("type"):
        return 0.0
    kind = _kind(a)
    prepare, measure = _METRICS[kind]
    return _similarity_of(kind, measure(prepare(a), prepare(b)))


def shapes_match(a: dict, b: dict, t: Thresholds) -> bool:
    """True when both shapes have one type, label and frame and their metric passes its threshold."""
    if _slot(a) != _slot(b):
        return False
    kind = _kind(a)
    prepare, measure = _METRICS[kind]
    return _passes(kind, measure(prepare(a), prepare(b)), t)


def score_item(answer: dict, reference: dict, t: Thresholds = Thresholds()) -> ItemScore:
    """Score an answer against the reference: matched shapes plus right answers over what was to match."""
    ref_shapes = list(reference.get("shapes") or [])
    ans_shapes = list(answer.get("shapes") or [])
    pairs = _match(ref_shapes, ans_shapes, t)
    matched_ref = {i for i, _ in pairs}
    matched_ans = {j for _, j in pairs}

    per_class: dict[str, dict[str, int]] = {}

    def count(shape: dict, what: str) -> None:
        counts = per_class.setdefault(str(shape.get("label")), {"matched": 0, "missed": 0, "extra": 0})
        counts[what] += 1

    for i, shape in enumerate(ref_shapes):
        count(shape, "matched" if i in matched_ref else "missed")
    for j, shape in enumerate(ans_shapes):
        if j not in matched_ans:
            count(shape, "extra")

    right, asked = _questions(answer.get("classifications") or {}, reference.get("classifications") or {})
    total = max(len(ref_shapes), len(ans_shapes)) + asked
    score = (len(pairs) + right) / total if total else 1.0
    return ItemScore(score=score, correct=score == 1.0, matched=len(pairs),
                     missed=len(ref_shapes) - len(pairs), extra=len(ans_shapes) - len(pairs),
                     questions_right=right, questions=asked,
                     per_class={name: per_class[name] for name in sorted(per_class)})


def _match(ref_shapes: list[dict], ans_shapes: list[dict], t: Thresholds) -> list[tuple[int, int]]:
    """Greedy one-to-one matching: passing pairs in descending similarity, each shape used once."""
    by_slot: dict[tuple, list[int]] = defaultdict(list)
    for j, shape in enumerate(ans_shapes):
        by_slot[_slot(shape)].append(j)
    # Each shape is prepared once (a mask is decoded once), and only if something could match it.
    prepared: dict[tuple[str, int], Any] = {}

    def geometry(side: str, index: int, shape: dict) -> Any:
        if (side, index) not in prepared:
            prepared[side, index] = _METRICS[_kind(shape)][0](shape)
        return prepared[side, index]

    candidates = []
    for i, ref in enumerate(ref_shapes):
        for j in by_slot.get(_slot(ref), ()):
            kind = _kind(ref)  # raises on an unknown type, but only once there is something to compare
            value = _METRICS[kind][1](geometry("ref", i, ref), geometry("ans", j, ans_shapes[j]))
            if _passes(kind, value, t):
                # Ties fall back to list order (reference first), so the result is deterministic.
                candidates.append((-_similarity_of(kind, value), i, j))
    candidates.sort()
    pairs, used_ref, used_ans = [], set(), set()
    for _, i, j in candidates:
        if i not in used_ref and j not in used_ans:
            pairs.append((i, j))
            used_ref.add(i)
            used_ans.add(j)
    return pairs


def _questions(answers: dict, expected: dict) -> tuple[int, int]:
    """(right, asked) over the reference's questions; questions only the answer has are ignored."""
    right = asked = 0
    for name, value in expected.items():
        if value is None:  # null is "not answered", as the annotation validator reads it
            continue
        asked += 1
        given = answers.get(name)
        if isinstance(value, list):
            # Multiple choice: the same options in any order.
            right += isinstance(given, list) and set(given) == set(value)
        else:
            right += given == value
    return right, asked


def _slot(shape: dict) -> tuple:
    """What two shapes must share to be compared at all."""
    return shape.get("type"), shape.get("label"), shape.get("frame", 0)


def _kind(shape: dict) -> str:
    kind = shape.get("type")
    if kind not in _METRICS:
        raise ValueError(f"unknown shape type {kind!r}")
    return kind


def _passes(kind: str, value: float, t: Thresholds) -> bool:
    if kind in ("bbox", "polygon"):
        return value >= t.iou
    if kind == "mask":
        return value >= t.dice
    return value <= t.point_distance


def _similarity_of(kind: str, value: float) -> float:
    if kind in ("point", "polyline"):
        return 1.0 / (1.0 + value)
    return value


def _box(shape: dict) -> tuple[float, float, float, float]:
    x, y = float(shape["x"]), float(shape["y"])
    return x, y, x + float(shape["width"]), y + float(shape["height"])


def _box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _vertices(shape: dict) -> np.ndarray:
    return np.asarray(shape["points"], dtype=np.float64).reshape(-1, 2)


def _degenerate(points: np.ndarray) -> bool:
    """Fewer than three vertices, or all of them (next to) one line or one point: no area to draw.

    The spread of the vertices is asked, not the shoelace area, which is 0 for a figure-eight too."""
    if len(points) < 3:
        return True
    # About their mean, so that 20000-pixel offsets do not swamp the spread in rounding error.
    spread = np.linalg.svd(points - points.mean(0), compute_uv=False)
    return not spread[1] > 1e-9 * spread[0]


def _polygon_iou(a: np.ndarray, b: np.ndarray) -> float:
    if _degenerate(a) or _degenerate(b):
        return 0.0
    if (np.maximum(a.min(0), b.min(0)) >= np.minimum(a.max(0), b.max(0))).any():
        return 0.0  # bounding boxes apart (or only touching): nothing in common to draw
    low = np.minimum(a.min(0), b.min(0))
    scale = (RASTER_SIDE - 1) / (np.maximum(a.max(0), b.max(0)) - low)
    fill_a, fill_b = _fill(a, low, scale), _fill(b, low, scale)
    union = int(np.count_nonzero(fill_a | fill_b))
    return int(np.count_nonzero(fill_a & fill_b)) / union if union else 0.0


def _fill(points: np.ndarray, low: np.ndarray, scale: np.ndarray) -> np.ndarray:
    image = Image.new("1", (RASTER_SIDE, RASTER_SIDE), 0)
    ImageDraw.Draw(image).polygon([(x, y) for x, y in ((points - low) * scale).tolist()], fill=1)
    return np.asarray(image, dtype=bool)


def _mask_pixels(shape: dict) -> tuple[tuple[int, int], np.ndarray]:
    """(size, flat foreground) of a COCO uncompressed RLE mask: runs of 0 then 1, alternating."""
    rle = shape["rle"]
    height, width = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    # Dice only counts pixels, so the flat column-major order serves as it is: no reshape needed.
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    pixels = np.zeros(height * width, dtype=bool)
    # Validated runs sum to h * w; anything else is cut or padded with background rather than misread.
    pixels[:min(flat.size, pixels.size)] = flat[:pixels.size]
    return (height, width), pixels


def _dice(a: tuple[tuple[int, int], np.ndarray], b: tuple[tuple[int, int], np.ndarray]) -> float:
    if a[0] != b[0]:
        raise ValueError(f"masks of different sizes cannot be compared: {list(a[0])} and {list(b[0])}")
    # Plain ints, so results are Python floats (JSON-safe, and `is True` works on comparisons of them).
    total = int(np.count_nonzero(a[1])) + int(np.count_nonzero(b[1]))
    return 2 * int(np.count_nonzero(a[1] & b[1])) / total if total else 0.0


def _nearest(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Distance from each vertex of src to the nearest vertex of dst."""
    rows = max(1, _DISTANCE_CHUNK // len(dst))
    squared = [((src[i:i + rows, None, :] - dst[None, :, :]) ** 2).sum(-1).min(1)
               for i in range(0, len(src), rows)]
    return np.sqrt(np.concatenate(squared))


def _polyline_distance(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 or len(b) == 0:
        return math.inf
    # Pooled over both polylines' vertices, as the average symmetric surface distance is.
    return float((_nearest(a, b).sum() + _nearest(b, a).sum()) / (len(a) + len(b)))


def _as_is(shape: dict) -> dict:
    return shape


# type -> (prepare a shape once, metric of two prepared shapes)
_METRICS: dict[str, tuple[Callable[[dict], Any], Callable[[Any, Any], float]]] = {
    "bbox": (_box, _box_iou),
    "polygon": (_vertices, _polygon_iou),
    "mask": (_mask_pixels, _dice),
    "point": (_as_is, point_distance),
    "polyline": (_vertices, _polyline_distance),
}
