"""Exporting a project: the formats, the audit event each export leaves, one path for the CLI and the API.

An export is two steps on one snapshot read connection (so the counts are what streams): `begin`
checks the format, counts what the filter takes and records the audit event (before a byte is sent,
so an export cut off midway still left its event); `chunks` then streams the file, a page of tasks
at a time. With `with_images` every format becomes a zip whose images/ holds the exported frames (PNG)
or DICOM files, read in one more pass.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from itertools import chain
from typing import Callable, Iterator

from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.exchange import archives, coco, dicom_seg, dicom_source, dicom_sr, images, selection, tabular
from onprem_label.exchange.selection import ExportFilter, FilterError
from onprem_label.storage import EncryptedBlobStore

FORMATS = {  # name -> (media type, file suffix, passes over the tasks)
    "coco": ("application/json", "json", 2),
    "yolo": ("application/zip", "zip", 1),
    "voc": ("application/zip", "zip", 1),
    "csv": ("text/csv; charset=utf-8", "csv", 1),
    "jsonl": ("application/x-ndjson", "jsonl", 1),
    "dicom-seg": ("application/zip", "zip", 1),
    "dicom-sr": ("application/zip", "zip", 1),
}
DICOM = ("dicom-seg", "dicom-sr")  # read the stored DICOM headers (and are audited as image reads)


def check_format(fmt: str) -> None:
    """FilterError naming `format` unless it is one of FORMATS."""
    if fmt not in FORMATS:
        raise FilterError("format", f"format is one of {', '.join(FORMATS)}")


def check_images(value: str | None) -> str | None:
    """The `images` choice (None: labels only); FilterError naming `images` unless png or dicom."""
    if value in (None, ""):
        return None
    if value not in images.KINDS:
        raise FilterError("images", f"images is one of {', '.join(images.KINDS)}")
    return value


def begin(db: Session, conn, project, fmt: str, flt: ExportFilter, *, now: datetime, actor=None,
          actor_name: str | None = None, context: AuditContext = CONSOLE, with_images: str | None = None) -> dict:
    """Count what the export takes and record it (format, filter, counts) in `db`; the counts. An export
    that reads stored images (`with_images`, or a DICOM format reading headers) also records one image
    read with the frames it covers, rather than one event per image."""
    check_format(fmt)
    check_images(with_images)
    counts = selection.count(conn, project.id, flt)
    details = {"format": fmt, "filter": flt.as_dict(), **counts, **({"images": with_images} if with_images else {})}
    record(db, AuditAction.EXPORT_PROJECT, actor=actor, actor_name=actor_name, object_type="project",
           object_id=project.id, details=details, context=context, now=now)
    if with_images or fmt in DICOM:
        record(db, AuditAction.IMAGE_READ, actor=actor, actor_name=actor_name, object_type="project",
               object_id=project.id, details={"export": fmt, "what": with_images or "dicom header",
                                              "tasks": counts["tasks"],
                                              "frames": selection.frames(conn, project.id, flt)},
               context=context, now=now)
    return counts


def media_type(fmt: str, with_images: str | None = None) -> str:
    """The export's media type: a zip whenever images ride along."""
    return "application/zip" if with_images else FORMATS[fmt][0]


def passes(fmt: str, with_images: str | None = None) -> int:
    """How many times the export reads the tasks (images take one more)."""
    return FORMATS[fmt][2] + (1 if with_images else 0)


def file_name(project, fmt: str, with_images: str | None = None) -> str:
    """The export's download name."""
    return f"project-{project.id}-{fmt}.{'zip' if with_images else FORMATS[fmt][1]}"


def chunks(conn, project, fmt: str, flt: ExportFilter, counts: dict, *, now: datetime,
           progress: Callable[[int], None] | None = None, store: EncryptedBlobStore | None = None,
           with_images: str | None = None) -> Iterator[bytes]:
    """The export file, chunk by chunk, read through `conn` (`progress(1)` per task per pass); `store`
    for the DICOM formats and `with_images`, which makes every format a zip with images/ in it."""
    check_format(fmt)
    schema = project.label_schema or {}
    info = {"project_id": project.id, "project": project.name, "format": fmt, "exported_at": now.isoformat(),
            "tasks": counts["tasks"], "withheld_pixel_check": counts["withheld_pixel_check"], "filter": flt.as_dict()}

    def rows(**options):
        for row in selection.rows(conn, project.id, flt, **options):
            if progress is not None:
                progress(1)
            yield row

    zipped = {"yolo": archives.yolo_files, "voc": archives.voc_files,
              "dicom-seg": partial(dicom_source.dicom_files, store=store, folder="seg",
                                   build=dicom_seg.segmentation),
              "dicom-sr": partial(dicom_source.dicom_files, store=store, folder="sr",
                                  build=dicom_sr.measurement_report)}
    if fmt in zipped:
        files = zipped[fmt](rows, schema, info)
    else:
        writer = {"coco": coco.export, "csv": tabular.csv_export,
                  "jsonl": partial(tabular.jsonl_export, conn=conn, labels=flt.labels)}[fmt]
        if not with_images:
            return writer(rows, schema, info)
        # The labels file as it is alone, streamed into the zip as labels.<suffix>.
        files = iter([(f"labels.{FORMATS[fmt][1]}", writer(rows, schema, info))])
    if with_images:
        files = chain(files, images.image_files(rows, store, with_images))
    return archives.zip_stream(files)
