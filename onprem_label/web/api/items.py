"""API: upload images into a project, item metadata, rendered frames and thumbnails."""

from __future__ import annotations

import os

from flask import Response, jsonify, request
from flask_login import current_user
from sqlalchemy import func, select

from onprem_label.audit import AuditAction, record
from onprem_label.auth.roles import Permission
from onprem_label.db.models import Item
from onprem_label.imaging import renditions
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.ingest import DUPLICATE, IMPORTED, IngestTarget, ingest_stream
from onprem_label.imaging.isolation import prepare_staged, shared_pool
from onprem_label.imaging.render import RenderError, window_from_request
from onprem_label.storage import BlobNotFound, IntegrityError
from onprem_label.web.api import bp
from onprem_label.web.context import audit_context, db, now, services
from onprem_label.web.errors import error_response
from onprem_label.web.login import require
from onprem_label.workflow.errors import NotFound
from onprem_label.workflow.members import get_project, project_roles
from onprem_label.web.uploads import MalformedUpload, UploadTooLarge, stage_files, staging_store

PAGE_MAX = 500


def _user():
    return db().merge(current_user._get_current_object())


def item_json(item: Item, images=None) -> dict:
    """An item's de-identified description (no file names, no patient data).

    `item` is an Item or a row of the items table; `images` its image rows, when not item.images.
    """
    images = item.images if images is None else images
    return {"id": item.id, "project_id": item.project_id, "kind": item.kind, "width": item.width,
            "height": item.height, "frames": item.frames, "modality": item.modality,
            "study_uid": item.study_uid, "series_uid": item.series_uid, "is_stack": item.is_stack,
            "needs_pixel_check": item.needs_pixel_check, "pixel_check_reasons": item.pixel_check_reasons,
            "created_at": item.created_at.isoformat(),
            "images": [{"position": i.position, "frames": i.frames, "width": i.width, "height": i.height,
                        "instance_uid": i.instance_uid, "meta": i.meta, "deid_report": i.deid_report}
                       for i in images]}


@bp.post("/projects/<id:project_id>/items")
@require(Permission.MANAGE_PROJECTS)
def upload_items(project_id: int):
    """Multipart upload of one or more files; one result per file (200, or 422 when none was taken)."""
    svc, dbs = services(), db()
    get_project(dbs, project_id, _user(), "manager")
    dbs.rollback()  # no transaction held open while the body streams in
    user = _user()
    target = IngestTarget(project_id, "upload", actor=user, context=audit_context(), link_key=svc.link_key)
    with staging_store(svc.settings.data_path, svc.keyring) as staging:
        try:
            staged = stage_files(staging, svc.settings.upload_max_file_bytes)
        except UploadTooLarge as exc:
            return error_response(413, "too_large", f"{exc}; nothing was imported.")
        except MalformedUpload as exc:
            return error_response(400, "malformed_upload", str(exc))
        if not staged:
            return error_response(400, "no_files", "The request holds no file.")
        results = []
        for file in staged:
            with staging.open(file.blob_id) as stream:
                results.append(ingest_stream(dbs, svc.store, target, svc.ingest_options, stream, file.name,
                                             now=now(), prepare=_isolated(staging, file.blob_id)))
    body = {"results": [r.to_json() for r in results]}
    if not any(r.status in (IMPORTED, DUPLICATE) for r in results):
        body["error"] = {"code": "rejected", "message": "No file could be imported; see results."}
        return jsonify(body), 422
    return jsonify(body), 200


def _isolated(staging, blob_id: str):
    """prepare(stream, digest) for ingest_stream: decoding runs in a worker process."""
    svc = services()

    def prepare(_stream, digest: str):
        pool = shared_pool(svc.settings.ingest_workers or os.cpu_count() or 1)
        outcome = pool.run(prepare_staged, str(staging.root), svc.keyring, blob_id, svc.ingest_options, digest)
        if isinstance(outcome, Rejected):
            raise outcome
        return outcome

    return prepare


@bp.get("/projects/<id:project_id>/items")
@require(Permission.READ_ITEMS)
def list_items(project_id: int):
    """A page of the project's items: `?after=<id>&limit=<n>` (n <= 500)."""
    dbs = db()
    get_project(dbs, project_id, _user())
    try:
        after = int(request.args.get("after", 0))
        limit = min(int(request.args.get("limit", 100)), PAGE_MAX)
    except ValueError:
        return error_response(400, "bad_query", "after and limit are whole numbers.")
    if after < 0 or limit < 1:
        return error_response(400, "bad_query", "after >= 0 and limit >= 1.")
    items = dbs.scalars(select(Item).where(Item.project_id == project_id, Item.id > after)
                        .order_by(Item.id).limit(limit)).all()
    total = dbs.scalar(select(func.count()).select_from(Item).where(Item.project_id == project_id))
    record(dbs, AuditAction.ITEM_VIEW, actor=_user(), object_type="project", object_id=project_id,
           details={"items": [i.id for i in items]}, context=audit_context(), now=now())
    dbs.commit()
    return jsonify({"items": [item_json(i) for i in items], "total": total,
                    "next_after": items[-1].id if len(items) == limit else None})


@bp.get("/items/<id:item_id>")
@require(Permission.READ_ITEMS)
def get_item(item_id: int):
    """One item's de-identified metadata (audited as a read of item metadata)."""
    item, refusal = _readable_item(item_id)
    if refusal is not None:
        return refusal
    record(db(), AuditAction.ITEM_VIEW, actor=_user(), object_type="item", object_id=item.id,
           details={"project_id": item.project_id}, context=audit_context(), now=now(), study_uid=item.study_uid)
    body = item_json(item)
    db().commit()
    return jsonify(body)


@bp.get("/items/<id:item_id>/image")
@require(Permission.READ_ITEMS)
def item_image(item_id: int):
    """A frame as PNG: `frame` (0-based), and `preset` or `window` + `level` (else the file's own)."""
    item, refusal = _readable_item(item_id)
    if refusal is not None:
        return refusal
    try:
        frame = int(request.args.get("frame", 0))
        window = window_from_request(request.args.get("preset"), request.args.get("level"),
                                     request.args.get("window"))
        renditions.locate_frame(item, frame)
    except ValueError as exc:
        return error_response(400, "bad_query", str(exc))
    return _png(item, "image", frame,
                lambda: renditions.frame_png(db(), services().store, item, frame, window, now=now()),
                {"frame": frame, "window": renditions.spec_of(window)})


@bp.get("/items/<id:item_id>/thumbnail")
@require(Permission.READ_ITEMS)
def item_thumbnail(item_id: int):
    """A small PNG of the item (its middle frame)."""
    item, refusal = _readable_item(item_id)
    if refusal is not None:
        return refusal
    return _png(item, "thumbnail", item.frames // 2,
                lambda: renditions.thumbnail_png(db(), services().store, item, now=now()), {})


@bp.post("/items/<id:item_id>/pixel-check")
@require(Permission.MANAGE_PROJECTS)
def clear_pixel_check(item_id: int):
    """A manager has looked at the pixels: no burned-in identifying text; the item may be exported."""
    dbs = db()
    item = dbs.get(Item, item_id)
    if item is None:
        raise NotFound("No such item.")  # audited as a refusal, like another project's item
    user = _user()
    get_project(dbs, item.project_id, user, "manager")
    item.needs_pixel_check = False
    item.pixel_check_cleared_by, item.pixel_check_cleared_at = user.id, now()
    record(dbs, AuditAction.ITEM_PIXEL_CHECK_CLEAR, actor=user, object_type="item", object_id=item.id,
           details={"project_id": item.project_id, "reasons": item.pixel_check_reasons},
           context=audit_context(), now=now(), study_uid=item.study_uid)
    body = item_json(item)
    dbs.commit()
    return jsonify(body)


def _png(item: Item, what: str, frame: int, make, details: dict):
    dbs = db()
    try:
        png = make()
    except (RenderError, BlobNotFound, IntegrityError) as exc:
        # The stored image is damaged or missing: a server-side fault, reported without a trace.
        record(dbs, AuditAction.IMAGE_READ, actor=_user(), object_type="item", object_id=item.id,
               outcome="failure", details={"what": what, "frame": frame, "error": type(exc).__name__},
               context=audit_context(), now=now(), study_uid=item.study_uid)
        dbs.commit()
        return error_response(500, "image_unavailable", "The stored image could not be read; "
                                                        "an operator should run 'onprem-label doctor --storage'.")
    record(dbs, AuditAction.IMAGE_READ, actor=_user(), object_type="item", object_id=item.id,
           details={"project_id": item.project_id, "what": what, **details}, context=audit_context(), now=now(),
           study_uid=item.study_uid)
    dbs.commit()
    return Response(png, mimetype="image/png")  # no-store comes with the security headers


def _readable_item(item_id: int):
    """(item, None); NotFound (a 404, audited as a refusal) also for another project's item."""
    item = db().get(Item, item_id)
    if item is None or not project_roles(db(), item.project_id, _user()):
        raise NotFound("No such item.")
    return item, None
