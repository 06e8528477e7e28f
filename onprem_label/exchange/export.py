"""Exporting a project: the formats, the audit event each export leaves, one path for the CLI and the API.

An export is two steps on one snapshot read connection (so the counts are what streams): `begin`
checks the format, counts what the filter takes and records the audit event (before a byte is sent,
so an export cut off midway still left its event); `chunks` then streams the file, a page of tasks
at a time.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Callable, Iterator

from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.exchange import archives, coco, selection, tabular
from onprem_label.exchange.selection import ExportFilter, FilterError

FORMATS = {  # name -> (media type, file suffix, passes over the tasks)
    "coco": ("application/json", "json", 2),
    "yolo": ("application/zip", "zip", 1),
    "voc": ("application/zip", "zip", 1),
    "csv": ("text/csv; charset=utf-8", "csv", 1),
    "jsonl": ("application/x-ndjson", "jsonl", 1),
}


def check_format(fmt: str) -> None:
    """FilterError naming `format` unless it is one of FORMATS."""
    if fmt not in FORMATS:
        raise FilterError("format", f"format is one of {', '.join(FORMATS)}")


def begin(db: Session, conn, project, fmt: str, flt: ExportFilter, *, now: datetime, actor=None,
          actor_name: str | None = None, context: AuditContext = CONSOLE) -> dict:
    """Count what the export takes and record it (format, filter, counts) in `db`; the counts."""
    check_format(fmt)
    counts = selection.count(conn, project.id, flt)
    record(db, AuditAction.EXPORT_PROJECT, actor=actor, actor_name=actor_name, object_type="project",
           object_id=project.id, details={"format": fmt, "filter": flt.as_dict(), **counts}, context=context, now=now)
    return counts


def file_name(project, fmt: str) -> str:
    """The export's download name."""
    return f"project-{project.id}-{fmt}.{FORMATS[fmt][1]}"


def chunks(conn, project, fmt: str, flt: ExportFilter, counts: dict, *, now: datetime,
           progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """The export file, chunk by chunk, read through `conn` (`progress(1)` per task per pass)."""
    check_format(fmt)
    schema = project.label_schema or {}
    info = {"project_id": project.id, "project": project.name, "format": fmt, "exported_at": now.isoformat(),
            "tasks": counts["tasks"], "withheld_pixel_check": counts["withheld_pixel_check"], "filter": flt.as_dict()}

    def rows(**options):
        for row in selection.rows(conn, project.id, flt, **options):
            if progress is not None:
                progress(1)
            yield row

    writer = {"coco": coco.export, "yolo": archives.yolo, "voc": archives.voc, "csv": tabular.csv_export,
              "jsonl": partial(tabular.jsonl_export, conn=conn, labels=flt.labels)}[fmt]
    return writer(rows, schema, info)
