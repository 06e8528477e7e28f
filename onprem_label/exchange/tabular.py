"""CSV (one row per shape) and JSON Lines (our whole model: every revision and review) exports."""

from __future__ import annotations

import csv
import io
import json
from typing import Callable, Iterator

from sqlalchemy import select

from onprem_label.audit.export import neutralise
from onprem_label.db.models import Annotation, Review
from onprem_label.exchange.selection import ExportRow, instance_of

A, R = Annotation.__table__, Review.__table__

CSV_COLUMNS = ["task_id", "item_id", "frame", "shape_id", "label", "type", "x", "y", "width", "height", "points",
               "rle", "classifications", "labeler_id", "accepted_at", "study_uid", "series_uid", "sop_instance_uid"]


def _cells(row: ExportRow, shape: dict | None) -> list[str]:
    shape = shape or {}
    frame = int(shape.get("frame", 0))
    values = {"task_id": row.task.id, "item_id": row.item.id, "frame": frame if shape else "",
              "shape_id": shape.get("id", ""), "label": shape.get("label", ""), "type": shape.get("type", ""),
              "x": shape.get("x", ""), "y": shape.get("y", ""), "width": shape.get("width", ""),
              "height": shape.get("height", ""),
              "points": json.dumps(shape["points"]) if "points" in shape else "",
              "rle": json.dumps(shape["rle"], separators=(",", ":")) if "rle" in shape else "",
              "classifications": json.dumps(row.classifications, sort_keys=True),
              "labeler_id": row.task.labeler_id or "",
              "accepted_at": row.task.accepted_at.isoformat() if row.task.accepted_at else "",
              "study_uid": row.item.study_uid or "", "series_uid": row.item.series_uid or "",
              "sop_instance_uid": instance_of(row, frame) or ""}
    return [neutralise(str(values[c])) for c in CSV_COLUMNS]


def csv_export(rows: Callable[[], Iterator[ExportRow]], schema: dict, info: dict) -> Iterator[bytes]:
    """A header, then one line per shape (a task without shapes: one line, so its answers are there too)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for n, row in enumerate(rows(), 1):
        for shape in row.shapes or [None]:
            writer.writerow(_cells(row, shape))
        if n % 200 == 0:
            yield out.getvalue().encode()
            out.seek(0)
            out.truncate()
    yield out.getvalue().encode()


def _stamp(value):
    return value.isoformat() if value is not None else None


def jsonl_export(rows: Callable[[], Iterator[ExportRow]], schema: dict, info: dict, *, conn,
                 labels: tuple[str, ...] = ()) -> Iterator[bytes]:
    """A first line describing the export, then one line per task: the task, its item (de-identified),
    every revision and every review, oldest first, and which revision is final."""
    yield (json.dumps({"onprem_label_export": 1, **info, "label_schema": schema}) + "\n").encode()
    for row in rows():
        t, item = row.task, row.item
        revisions = conn.execute(select(A).where(A.c.task_id == t.id).order_by(A.c.revision)).all()
        reviews = conn.execute(select(R).where(R.c.task_id == t.id).order_by(R.c.id)).all()
        line = {
            "task": {"id": t.id, "state": t.state, "round": t.round, "slot": t.slot, "labeler_id": t.labeler_id,
                     "reviewer_id": t.reviewer_id, "submitted_at": _stamp(t.submitted_at),
                     "accepted_at": _stamp(t.accepted_at), "active_seconds": t.active_seconds},
            "item": {"id": item.id, "kind": item.kind, "modality": item.modality, "width": item.width,
                     "height": item.height, "frames": item.frames, "study_uid": item.study_uid,
                     "series_uid": item.series_uid, "sop_instance_uids": [i.instance_uid for i in row.images],
                     # Keyed digests of the pictures as they arrived (per install, so the same file
                     # ingested into another project matches on import; the file is not in them).
                     "source_digests": [f"{i.source_digest}:{i.source_page}" for i in row.images
                                        if i.instance_uid is None]},
            "revisions": [{"revision": r.revision, "round": r.round, "kind": r.kind, "author_id": r.author_id, "source": r.source,
                           "schema_version": r.schema_version,
                           "shapes": [s for s in r.shapes if not labels or s.get("label") in labels],
                           "classifications": r.classifications, "created_at": _stamp(r.created_at)}
                          for r in revisions],
            "reviews": [{"round": r.round, "reviewer_id": r.reviewer_id, "decision": r.decision, "comment": r.comment,
                         "shape_id": r.shape_id, "annotation_revision": r.annotation_revision,
                         "created_at": _stamp(r.created_at)} for r in reviews],
            "final_revision": row.annotation.revision if row.annotation is not None else None,
        }
        yield (json.dumps(line, ensure_ascii=False) + "\n").encode()
