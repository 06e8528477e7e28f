"""API for auditors: search the trail, export it (streamed, signed), verify the chain."""

from __future__ import annotations

from flask import Response, jsonify, request, stream_with_context
from flask_login import current_user

from onprem_label.audit import AuditAction, record
from onprem_label.audit.atna import iter_messages
from onprem_label.audit.chain import chain_of, head
from onprem_label.audit.export import FORMATS, signing_key, stream_export
from onprem_label.audit.search import FilterError, count_matching, parse_filter, parse_page, search, stream
from onprem_label.audit.verify import verify_and_record
from onprem_label.auth.roles import Permission
from onprem_label.db.engine import read_connection
from onprem_label.web.api import bp
from onprem_label.web.context import audit_context, db, now, services
from onprem_label.web.errors import error_response
from onprem_label.web.login import require

MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8",
               "dicom": "application/xml; charset=utf-8"}
EXPORT_FORMATS = (*FORMATS, "dicom")  # dicom: DICOM PS3.15 A.5 audit messages (audit.atna), unsigned


def _actor():
    return db().merge(current_user._get_current_object())


def filter_error(exc: FilterError):
    """A malformed search parameter: 422 naming it."""
    return error_response(422, "invalid", str(exc), errors=[{"field": exc.field, "message": str(exc)}])


@bp.get("/audit")
@require(Permission.READ_AUDIT)
def audit_search():
    """One page of events matching the filters, newest first; `next.before` fetches the next page."""
    try:
        flt = parse_filter(request.args)
        before, limit = parse_page(request.args)
    except FilterError as exc:
        return filter_error(exc)
    dbs = db()
    with read_connection(services().engine) as conn:  # a read: no SQLite write lock while it scans
        events, more = search(conn, flt, before=before, limit=limit)
    # Reading the trail is an event too (DICOM's "audit log used"), with what was asked.
    record(dbs, AuditAction.AUDIT_SEARCH, actor=_actor(), object_type="audit",
           details={"filters": flt.as_dict(), "before": before, "returned": len(events)},
           context=audit_context(), now=now())
    dbs.commit()
    return jsonify({"events": events, "next": {"before": more} if more else None})


@bp.get("/audit/export")
@require(Permission.READ_AUDIT)
def audit_export():
    """The filtered trail as CSV or JSON Lines (signed trailer) or DICOM audit messages, streamed."""
    fmt = request.args.get("format", "jsonl")
    if fmt not in EXPORT_FORMATS:
        return error_response(422, "invalid", f"'format' must be one of {', '.join(EXPORT_FORMATS)}",
                              errors=[{"field": "format", "message": f"one of {', '.join(EXPORT_FORMATS)}"}])
    try:
        flt = parse_filter(request.args)
    except FilterError as exc:
        return filter_error(exc)
    svc, dbs = services(), db()
    with read_connection(svc.engine) as conn:
        up_to, _ = head(conn)
        count = count_matching(conn, flt, up_to=up_to)
    # Recorded before a byte is sent: an export that is cut off midway still left its event.
    record(dbs, AuditAction.AUDIT_EXPORT, actor=_actor(), object_type="audit",
           details={"format": fmt, "filters": flt.as_dict(), "events": count, "up_to": up_to},
           context=audit_context(), now=now())
    dbs.commit()
    meta = {"filters": flt.as_dict(), "up_to": up_to, "exported_at": now().isoformat()}
    key = signing_key(svc.keyring)

    def body():
        with read_connection(svc.engine) as conn:
            events = stream(conn, flt, up_to=up_to)
            if fmt == "dicom":
                yield from iter_messages(events, source_id=svc.settings.audit_source_id)
            else:
                yield from stream_export(events, fmt, key, meta)

    stamp = now().strftime("%Y%m%dT%H%M%SZ")
    extension = "xml" if fmt == "dicom" else fmt
    return Response(stream_with_context(body()), mimetype=MEDIA_TYPES[fmt], headers={
        "Content-Disposition": f'attachment; filename="audit-{stamp}.{extension}"',
        "X-Audit-Events": str(count), "Cache-Control": "no-store"})


@bp.get("/audit/verify")
@require(Permission.READ_AUDIT)
def audit_verify():
    """Walk the chain and the checkpoints: `ok`, and the first bad event when not."""
    dbs = db()
    result = verify_and_record(dbs, services().engine, chain_of(dbs), actor=_actor(), context=audit_context(),
                               now=now())
    return jsonify(result.as_dict())
