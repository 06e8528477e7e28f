"""Shape geometry the exports share: bounding boxes, areas, RLE masks (COCO uncompressed, column-major)."""

from __future__ import annotations

import numpy as np


def rle_pixels(rle: dict) -> np.ndarray:
    """The mask of an uncompressed COCO RLE as an h x w bool array."""
    h, w = rle["size"]
    flat = np.zeros(h * w, dtype=bool)
    at, value = 0, False
    for run in rle["counts"]:
        if value:
            flat[at:at + run] = True
        at += run
        value = not value
    return flat.reshape((w, h)).T  # column-major, as COCO counts it


def _runs(rle: dict) -> tuple[np.ndarray, np.ndarray]:
    """(first index, length) of every run of ones of a column-major RLE, without drawing the mask."""
    counts = np.asarray(rle["counts"], dtype=np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    ones = (np.arange(len(counts)) % 2 == 1) & (counts > 0)
    return starts[ones], counts[ones]


def _mask_bounds(rle: dict) -> tuple[float, float, float, float] | None:
    """A mask's (x, y, width, height) from its runs alone (a dense 512 x 512 frame costs 100 x more)."""
    h = int(rle["size"][0])
    starts, lengths = _runs(rle)
    if not len(starts):
        return None
    last = starts + lengths - 1
    c0, r0, c1, r1 = starts // h, starts % h, last // h, last % h
    # A run within one column covers rows r0..r1; one that crosses into the next column covers row
    # h - 1 of the first and row 0 of the next, so the mask's rows reach both edges.
    within = c0 == c1
    top = 0 if not within.all() else int(r0.min())
    bottom = h - 1 if not within.all() else int(r1.max())
    left, right = int(c0.min()), int(c1.max())
    return float(left), float(top), float(right - left + 1), float(bottom - top + 1)


def bounds(shape: dict) -> tuple[float, float, float, float] | None:
    """(x, y, width, height) of a shape; None for a point or an empty mask."""
    kind = shape["type"]
    if kind == "bbox":
        return float(shape["x"]), float(shape["y"]), float(shape["width"]), float(shape["height"])
    if kind in ("polygon", "polyline"):
        xs, ys = [p[0] for p in shape["points"]], [p[1] for p in shape["points"]]
        return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    if kind == "mask":
        return _mask_bounds(shape["rle"])
    return None


def area(shape: dict) -> float:
    """Area in pixels: a box's, a polygon's (shoelace), a mask's pixel count; 0 for points and lines."""
    kind = shape["type"]
    if kind == "bbox":
        return float(shape["width"]) * float(shape["height"])
    if kind == "polygon":
        pts = shape["points"]
        return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))) / 2
    if kind == "mask":
        return float(sum(shape["rle"]["counts"][1::2]))
    return 0.0
