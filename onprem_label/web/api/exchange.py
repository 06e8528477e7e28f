"""API: a project's export, streamed (`GET /api/v1/projects/<pid>/export?format=...`), and pre-label imports."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack

from flask import Response, jsonify, request, stream_with_context

from onprem_label.db.engine import read_connection
from onprem_label.exchange import export
from onprem_label.exchange.predictions import PredictionError, read
from onprem_label.exchange.selection import FilterError, parse_filter
from onprem_label.web.api import bp
from onprem_label.web.api.workflow import _user
from onprem_label.web.context import audit_context, db, now, services
from onprem_label.web.login import require
from onprem_label.workflow import members, prelabels
from onprem_label.workflow.errors import Invalid


@bp.get("/projects/<id:project_id>/export")
@require()
def export_project(project_id: int):
    """Managers: the project's labels as `?format=coco|yolo|voc|csv|jsonl|dicom-seg|dicom-sr`, filtered by
    `state` (comma-separated, default accepted), `since`, `until` (dates) and `label`, with `images=png|dicom`
    beside them in a zip; streamed."""
    dbs, user = db(), _user()
    project = members.get_project(dbs, project_id, user, "manager")
    fmt = request.args.get("format", "")
    try:
        export.check_format(fmt)
        with_images = export.check_images(request.args.get("images"))
        flt = parse_filter(request.args)
    except FilterError as exc:
        raise Invalid(str(exc), errors=[{"field": exc.field, "message": str(exc)}]) from None
    svc, moment = services(), now()
    # One snapshot for the count and the stream: what the audit event says is what leaves.
    reading = ExitStack()
    conn = reading.enter_context(read_connection(svc.engine, snapshot=True))
    try:
        counts = export.begin(dbs, conn, project, fmt, flt, now=moment, actor=user, context=audit_context(),
                              with_images=with_images)
        dbs.commit()
    except BaseException:
        reading.close()
        raise
    snapshot = {"id": project.id, "name": project.name, "label_schema": project.label_schema}

    def body():
        with reading:
            yield from export.chunks(conn, _Project(**snapshot), fmt, flt, counts, now=moment, store=svc.store,
                                     with_images=with_images)

    response = Response(stream_with_context(body()), mimetype=export.media_type(fmt, with_images), headers={
        "Content-Disposition": f'attachment; filename="{export.file_name(project, fmt, with_images)}"',
        "X-Export-Tasks": str(counts["tasks"]), "X-Export-Withheld": str(counts["withheld_pixel_check"]),
        "Cache-Control": "no-store"})
    response.call_on_close(reading.close)  # a download never begun still gives its connection back
    return response


class _Project:
    """What the stream needs of the project, copied before the request's session goes."""

    def __init__(self, id: int, name: str, label_schema: dict):  # noqa: A002 (the column's name)
        self.id, self.name, self.label_schema = id, name, label_schema


@bp.post("/projects/<id:project_id>/imports")
@require()
def import_predictions(project_id: int):
    """Managers: a model's predictions (the body: a COCO file or JSON Lines) as drafts on open tasks,
    `?format=coco|jsonl&name=<model>&min_score=`; the summary of what was attached and left out."""
    dbs, user = db(), _user()
    schema = members.get_project(dbs, project_id, user, "manager").label_schema or {}
    name = prelabels.check_name(request.args.get("name"))
    # The body is read to a private temporary file with no transaction open: on SQLite the request's
    # transaction holds the one writer lock, and a slow upload must not stop everyone's saves.
    dbs.rollback()
    with tempfile.TemporaryFile() as body:
        shutil.copyfileobj(request.stream, body, 1 << 20)
        body.seek(0)
        try:
            predictions, skipped = read(body, request.args.get("format", ""), schema,
                                        min_score=request.args.get("min_score", 0.0))
        except PredictionError as exc:
            raise Invalid(str(exc), errors=[{"field": exc.field, "message": str(exc)}]) from None
        project = members.get_project(dbs, project_id, user, "manager")
        summary = prelabels.attach(dbs, project, predictions, name=name, skipped=skipped, actor=user, now=now(),
                                   context=audit_context())
    return jsonify(summary.to_json())


@bp.get("/projects/<id:project_id>/imports")
@require()
def import_report(project_id: int):
    """Managers: of the imported shapes on handed-in tasks, the share labelers kept unchanged (per import)."""
    dbs, user = db(), _user()
    members.get_project(dbs, project_id, user, "manager")
    dbs.rollback()
    with read_connection(services().engine) as conn:  # a report: no writer lock
        return jsonify(prelabels.kept_unchanged(conn, project_id))
