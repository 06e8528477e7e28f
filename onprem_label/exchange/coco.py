"""COCO (object detection) export: images per frame, boxes, polygons and RLE masks, streamed as JSON.

Every frame of an exported item is one COCO image (`file_name` item-<id>-frame-<n>.png); boxes
carry their box as a polygon too, polygons their points, masks their uncompressed RLE (iscrowd 0:
each is one object, as trainers and COCOeval expect; pycocotools decodes either). Points and polylines have no COCO detection form: they are counted in
info.skipped_shapes, not exported. Classifications and the task's ids ride along in each image's
"onprem_label" entry.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator

from onprem_label.exchange import geometry
from onprem_label.exchange.selection import ExportRow, frame_name, instance_of

CHUNK = 1 << 16


def categories(schema: dict) -> list[dict]:
    """COCO categories from the schema's classes, ids from 1 in schema order."""
    return [{"id": n, "name": c["name"], "supercategory": ""} for n, c in enumerate(schema.get("classes", []), 1)]


def annotation_of(shape: dict, ann_id: int, image_id: int, category_id: int) -> dict | None:
    """One shape as a COCO annotation, or None when COCO detection has no form for it."""
    box = geometry.bounds(shape)
    if shape["type"] not in ("bbox", "polygon", "mask") or box is None:
        return None
    if shape["type"] == "bbox":
        x, y, w, h = box
        segmentation, crowd = [[x, y, x + w, y, x + w, y + h, x, y + h]], 0
    elif shape["type"] == "polygon":
        segmentation, crowd = [[float(v) for point in shape["points"] for v in point]], 0
    else:
        # iscrowd 0: a mask is one object to learn and score (trainers and COCOeval ignore crowds).
        segmentation, crowd = {"size": list(shape["rle"]["size"]), "counts": list(shape["rle"]["counts"])}, 0
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(box),
            "area": geometry.area(shape), "segmentation": segmentation, "iscrowd": crowd,
            "onprem_label": {"shape_id": shape.get("id"), "type": shape["type"]}}


def export(rows: Callable[[], Iterator[ExportRow]], schema: dict, info: dict) -> Iterator[bytes]:
    """The COCO document in chunks: two passes over the rows (images, then annotations), never all in memory."""
    cats = categories(schema)
    by_name = {c["name"]: c["id"] for c in cats}
    buffer: list[str] = []
    size = 0

    def put(text: str):
        nonlocal size
        buffer.append(text)
        size += len(text)

    def flush() -> bytes:
        nonlocal size
        out = "".join(buffer).encode()
        buffer.clear()
        size = 0
        return out

    put('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": ' + json.dumps(cats) + ', "images": [')
    # The images' ids, kept from the first pass: a task accepted between the passes stays out of both.
    first, image_id, first_image = True, 0, {}
    for row in rows(shapes=False):  # the images pass needs answers, not shapes
        first_image[row.task.id] = image_id + 1
        for frame in range(row.item.frames):
            image_id += 1
            entry = {"id": image_id, "file_name": frame_name(row.item.id, frame, row.task.slot) + ".png",
                     "width": row.item.width,
                     "height": row.item.height, "onprem_label": {
                         "task_id": row.task.id, "item_id": row.item.id, "frame": frame,
                         "sop_instance_uid": instance_of(row, frame), "study_uid": row.item.study_uid,
                         "classifications": row.classifications}}
            put(("" if first else ", ") + json.dumps(entry))
            first = False
            if size >= CHUNK:
                yield flush()
    put('], "annotations": [')
    first, ann_id, skipped = True, 0, 0
    for row in rows():
        if row.task.id not in first_image:
            continue
        for shape in row.shapes:
            ann = annotation_of(shape, ann_id + 1, first_image[row.task.id] + int(shape.get("frame", 0)),
                                by_name.get(shape.get("label"), 0))
            if ann is None or not ann["category_id"]:
                skipped += 1
                continue
            ann_id += 1
            put(("" if first else ", ") + json.dumps(ann))
            first = False
            if size >= CHUNK:
                yield flush()
    put('], "skipped_shapes": ' + str(skipped) + "}")
    yield flush()
