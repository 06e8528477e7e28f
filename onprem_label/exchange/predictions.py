"""Model predictions read from a COCO or JSON Lines file, as shapes per item, for the pre-label import.

Reading knows files, not the database: each prediction says which item it is for in every way the
file can (the item's id in the exporting project, its de-identified SOP Instance UIDs, the keyed
digests of its pictures) and the workflow's import finds the task (workflow.prelabels). A file that
cannot be read at all is a PredictionError naming the problem; a single unusable entry is skipped
and counted by its reason, so one bad box never loses a whole model run.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Iterator


# COCO file names this server writes (exchange.selection.frame_name), with any picture suffix; digits
# enough for any id, few enough for int() to stay cheap.
_FRAME_FILE = re.compile(r"item-(\d{1,18})(?:-copy-(\d{1,4}))?-frame-(\d{1,9})(?:\.[A-Za-z0-9]{1,8})?")
MAX_SKIP_EXAMPLES = 20
MAX_RLE_SHIFT = 40  # 8 characters, 40 bits: runs up to 2**35 pixels


class PredictionError(ValueError):
    """A predictions file that cannot be read; `field` names the part at fault."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass
class Prediction:
    """A model's shapes for one item, with every key the file gives for finding the item."""

    where: str                                    # "annotations[12]" or "line 4", for messages
    item_id: int | None = None                    # the item's id in the project the file came from
    project_id: int | None = None                 # that project, when the file says
    instance_uids: tuple[str, ...] = ()           # JSON Lines: the item's instances, in order
    digests: tuple[str, ...] = ()                 # JSON Lines: "<keyed digest>:<page>" of its pictures
    frame_instances: dict[int, str] = field(default_factory=dict)  # COCO: frame -> instance holding it
    shapes: list[dict] = field(default_factory=list)
    classifications: dict = field(default_factory=dict)


@dataclass
class Skipped:
    """Entries left out and why (reason -> count), with the first few places for the message."""

    counts: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        """Count one entry left out."""
        self.counts[reason] += 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append({"where": where, "reason": reason})


def rle_counts(counts: Any) -> list[int]:
    """Run lengths of a COCO RLE, compressed (pycocotools' string) or not (a list); ValueError if neither."""
    if isinstance(counts, list):
        return counts
    if not isinstance(counts, str):
        raise ValueError("counts is a list or a COCO compressed string")
    # The inverse of pycocotools' rleToString: 5 bits per character, a continuation bit, a sign bit,
    # and each run after the second stored as a difference from the run two before it.
    out: list[int] = []
    at = 0
    while at < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if at >= len(counts):
                raise ValueError("compressed counts end inside a number")
            c = ord(counts[at]) - 48
            if not 0 <= c < 64:
                raise ValueError("compressed counts hold a character outside COCO's alphabet")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            at, shift = at + 1, shift + 5
            if shift > MAX_RLE_SHIFT:  # no run of a frame needs more bits; a longer one is made up
                raise ValueError("compressed counts hold a number too long for any image")
            if not more and c & 0x10:
                value |= -1 << shift
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def _number(value: Any) -> bool:
    """A finite JSON number (not a boolean, not a 400-digit integer)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _shape_of(ann: dict, label: str, frame: int, tools: list[str]) -> tuple[list[dict], str | None]:
    """Our shapes for one COCO annotation, in the form the class allows; ([], reason) when none fits."""
    bbox = ann.get("bbox")
    box = None
    if isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox):
        box = {"type": "bbox", "x": bbox[0], "y": bbox[1], "width": bbox[2], "height": bbox[3]}
    seg = ann.get("segmentation")
    base = {"label": label, "frame": frame}
    if _number(ann.get("score")):
        base["attributes"] = {"score": float(ann["score"])}
    if isinstance(seg, dict) and "mask" in tools:
        try:
            rle = {"size": seg.get("size"), "counts": rle_counts(seg.get("counts"))}
        except ValueError:
            return [], "bad_segmentation"
        return [{**base, "type": "mask", "rle": rle}], None
    if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
        if any(len(p) % 2 or not all(_number(v) for v in p) for p in seg):
            return [], "bad_segmentation"
        polygons = [[[p[i], p[i + 1]] for i in range(0, len(p), 2)] for p in seg]
        if box is not None and "bbox" in tools and len(polygons) == 1 and _is_box(polygons[0], bbox):
            return [{**base, **box}], None  # our own export writes a box as its rectangle too
        if "polygon" in tools:
            return [{**base, "type": "polygon", "points": points} for points in polygons], None
    if box is not None and "bbox" in tools:
        return [{**base, **box}], None
    return [], "shape_not_allowed" if box is not None or seg else "no_geometry"


def _is_box(points: list, bbox: list) -> bool:
    x, y, w, h = bbox
    return len(points) == 4 and {tuple(p) for p in points} == {(x, y), (x + w, y), (x + w, y + h), (x, y + h)}


def _frame_of(image: dict) -> tuple[int | None, int, int]:
    """(item id, frame, consensus copy) of a COCO image: our own entry first, else the file name we gave it."""
    own = image.get("onprem_label")
    if isinstance(own, dict) and type(own.get("item_id")) is int and type(own.get("frame")) is int:
        return own["item_id"], own["frame"], 0
    name = image.get("file_name")
    match = _FRAME_FILE.fullmatch(name.rsplit("/", 1)[-1]) if isinstance(name, str) else None
    if match:
        return int(match.group(1)), int(match.group(3)), int(match.group(2) or 0)
    return None, 0, 0


def _key(value: Any) -> bool:
    """An id a COCO file may use to refer to an entry: a string or an integer (not a list, not true)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def read_coco(stream: IO[bytes], tools: dict[str, list[str]], *, min_score: float = 0.0
              ) -> tuple[list[Prediction], Skipped]:
    """Predictions per item from a COCO dataset file (images, categories, annotations), and what was
    left out: unknown images or labels, scores under `min_score`, shapes the class does not allow."""
    try:
        doc = json.load(stream)
    except RecursionError:
        raise PredictionError("file", "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PredictionError("file", f"not a JSON document: {exc}") from None
    if isinstance(doc, list):
        raise PredictionError("file", "a COCO results list has no images: put it as \"annotations\" into the "
                                      "COCO file exported from this project (its images and categories)")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations",
                                                                                    "categories")):
        raise PredictionError("file", "a COCO file is an object with lists images, annotations and categories")
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    project_id = info.get("project_id") if type(info.get("project_id")) is int else None
    names = {c["id"]: c["name"] for c in doc["categories"]
             if isinstance(c, dict) and _key(c.get("id")) and isinstance(c.get("name"), str)}
    skipped = Skipped()
    images: dict[Any, tuple[int | None, int, str | None]] = {}
    for number, image in enumerate(doc["images"]):
        if not isinstance(image, dict) or not _key(image.get("id")) or image["id"] in images:
            skipped.add("bad_image", f"images[{number}]")
            continue
        item_id, frame, copy = _frame_of(image)
        own = image.get("onprem_label") if isinstance(image.get("onprem_label"), dict) else {}
        uid = own.get("sop_instance_uid") if isinstance(own.get("sop_instance_uid"), str) else None
        if copy:
            # A consensus copy's picture is the same frame again: one set of drafts per item.
            skipped.add("consensus_copy", f"images[{number}]")
            continue
        if item_id is None and uid is None:
            skipped.add("unknown_image", f"images[{number}]")
            continue
        images[image["id"]] = (item_id, frame, uid)
    by_item: dict[Any, Prediction] = {}
    for n, ann in enumerate(doc["annotations"]):
        where = f"annotations[{n}]"  # positions, not the file's ids: those could be any JSON
        if not isinstance(ann, dict) or not _key(ann.get("image_id")) or ann["image_id"] not in images:
            skipped.add("unknown_image", where)
            continue
        score = ann.get("score")
        if score is not None and not _number(score):
            skipped.add("bad_score", where)
            continue
        if score is not None and score < min_score:
            skipped.add("low_score", where)
            continue
        label = names.get(ann.get("category_id")) if _key(ann.get("category_id")) else None
        if label not in tools:
            skipped.add("unknown_label", where)
            continue
        item_id, frame, uid = images[ann["image_id"]]
        shapes, reason = _shape_of(ann, label, frame, tools[label])
        if reason:
            skipped.add(reason, where)
            continue
        key = item_id if item_id is not None else uid
        pred = by_item.setdefault(key, Prediction(where=where, item_id=item_id, project_id=project_id))
        if uid is not None:
            pred.frame_instances[frame] = uid
        pred.shapes.extend(shapes)
    return list(by_item.values()), skipped


def _strings(value: Any) -> tuple[str, ...] | None:
    """A list of strings as a tuple (nulls left out: a picture has no SOP Instance UID); None when it is
    something else."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
        return None
    return tuple(v for v in value if v is not None)


def _line_prediction(line: dict, where: str, project_id: int | None) -> Prediction | tuple[str, str]:
    """One JSON Lines object as a prediction, or (reason, where)."""
    if isinstance(line.get("revisions"), list):
        final = line.get("final_revision")
        labels = next((r for r in line["revisions"] if isinstance(r, dict) and r.get("revision") == final), None)
    elif "revisions" in line:
        return "malformed", where
    else:
        labels = line if "shapes" in line or "classifications" in line else None
    if labels is None:
        return "no_labels", where
    item = line.get("item") if isinstance(line.get("item"), dict) else {}
    uids, digests = _strings(item.get("sop_instance_uids")), _strings(item.get("source_digests"))
    shapes, classifications = labels.get("shapes", []), labels.get("classifications", {})
    if uids is None or digests is None or not isinstance(shapes, list) or not isinstance(classifications, dict):
        return "malformed", where
    item_id = item.get("id") if type(item.get("id")) is int else None
    if not (uids or digests or item_id is not None):
        return "unknown_item", where
    return Prediction(where=where, item_id=item_id, project_id=project_id, instance_uids=uids, digests=digests,
                      shapes=shapes, classifications=classifications)


def read_jsonl(stream: IO[bytes]) -> Iterator[Prediction | tuple[str, str]]:
    """Predictions from JSON Lines, one per line: our own export (its final revision) or a model's
    `{"item": {...}, "shapes": [...], "classifications": {...}}`; an unusable line yields (reason, where)."""
    project_id = None
    for number, raw in enumerate(stream, 1):
        where = f"line {number}"
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            yield "not_json", where
            continue
        if not isinstance(line, dict):
            yield "not_an_object", where
            continue
        if "onprem_label_export" in line:  # our export's first line: where the file came from
            project_id = line.get("project_id") if type(line.get("project_id")) is int else None
            continue
        yield _line_prediction(line, where, project_id)


IMPORT_FORMATS = ("coco", "jsonl")


def read(stream: IO[bytes], fmt: str, schema: dict, *, min_score: Any = 0.0) -> tuple[Any, Skipped]:
    """The predictions of a file in `fmt` for a project of `schema`, and what reading left out."""
    if fmt not in IMPORT_FORMATS:
        raise PredictionError("format", f"format is one of {', '.join(IMPORT_FORMATS)}")
    try:
        score = float(min_score)
    except (TypeError, ValueError):
        score = float("nan")
    if not 0.0 <= score <= 1.0:
        raise PredictionError("min_score", "min_score is a number from 0 to 1")
    if fmt == "jsonl":
        return read_jsonl(stream), Skipped()
    tools = {c["name"]: c["tools"] for c in schema.get("classes", [])}
    return read_coco(stream, tools, min_score=score)
