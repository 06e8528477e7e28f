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


def bounds(shape: dict) -> tuple[float, float, float, float] | None:
    """(x, y, width, height) of a shape; None for a point or an empty mask."""
    kind = shape["type"]
    if kind == "bbox":
        return float(shape["x"]), float(shape["y"]), float(shape["width"]), float(shape["height"])
    if kind in ("polygon", "polyline"):
        xs, ys = [p[0] for p in shape["points"]], [p[1] for p in shape["points"]]
        return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    if kind == "mask":
        pixels = rle_pixels(shape["rle"])
        rows, cols = np.nonzero(pixels)
        if not len(rows):
            return None
        return float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)
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
        return float(rle_pixels(shape["rle"]).sum())
    return 0.0
