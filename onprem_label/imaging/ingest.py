"""Storing prepared files as items: duplicates, series stacks, blobs, linkage and audit events."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, BinaryIO, Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import Blob, DeidLink, Item, ItemImage, Project, Task, User
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.prepare import (Prepared, PrepareOptions, PreparedImage, prepare_or_reject,
                                          source_digest)
from onprem_label.storage import EncryptedBlobStore

IMPORTED, DUPLICATE, REJECTED = "imported", "duplicate", "rejected"


@dataclass
class IngestResult:
    """What became of one file; `to_json` is the per-file report line (no patient data)."""

    name: str
    status: str
    item_id: int | None = None
    kind: str | None = None
    frames: int | None = None
    needs_pixel_check: bool | None = None
    code: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The report line: None fields left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class IngestTarget:
    """Where files go and who brings them: a project, an actor, the channel and the options."""

    project_id: int
    source: str  # "upload" | "cli" | "dicom"
    actor: User | None = None
    actor_name: str = ""
    context: AuditContext = CONSOLE
    link_key: bytes | None = None  # set when the admin switched the linkage table on


def stack_series(project: Project) -> bool:
    """Whether the project groups the instances of one series into one stack item."""
    return bool((project.settings or {}).get("stack_series", False))


def ingest_stream(db: Session, store: EncryptedBlobStore, target: IngestTarget, options: PrepareOptions,
                  stream: BinaryIO, name: str, *, now: datetime,
                  prepare: Callable[[BinaryIO, str], Prepared] | None = None) -> IngestResult:
    """Prepare and store one file, committing it (or its rejection) with its audit event.

    `prepare(stream, digest)` does the decoding; the web passes one that runs in an isolated
    worker (imaging/isolation.py). By default it runs here, for trusted callers and tests.
    """
    try:
        digest = source_digest(stream, options.digest_key, options.max_bytes)
        duplicate = find_duplicate(db, target.project_id, digest)
        if duplicate is not None:
            return record_duplicate(db, target, name, duplicate, now=now)
        if prepare is None:
            prepared = prepare_or_reject(stream, options, digest=digest)
        else:
            prepared = prepare(stream, digest)
    except Rejected as exc:
        return record_rejection(db, target, name, exc, now=now)
    return store_prepared(db, store, target, prepared, name, now=now)


def find_duplicate(db: Session, project_id: int, digest: str) -> int | None:
    """The item a file with this digest already became in the project, if any."""
    return db.scalar(select(ItemImage.item_id).where(ItemImage.project_id == project_id,
                                                     ItemImage.source_digest == digest).limit(1))


def record_rejection(db: Session, target: IngestTarget, name: str, exc: Rejected, *,
                     now: datetime) -> IngestResult:
    """Audit a rejected file (code and reason only) and commit."""
    db.rollback()
    _audit(db, target, AuditAction.ITEM_REJECT, "", "failure", {"code": exc.code, "reason": exc.reason}, now)
    db.commit()
    return IngestResult(name, REJECTED, code=exc.code, reason=exc.reason)


def record_duplicate(db: Session, target: IngestTarget, name: str, item_id: int, *,
                     now: datetime) -> IngestResult:
    """Audit a file that was already imported into the project and commit."""
    db.rollback()
    _audit(db, target, AuditAction.ITEM_DUPLICATE, item_id, "success", {}, now)
    db.commit()
    return IngestResult(name, DUPLICATE, item_id=item_id, reason="already imported into this project")


def store_prepared(db: Session, store: EncryptedBlobStore, target: IngestTarget, prepared: Prepared,
                   name: str, *, now: datetime) -> IngestResult:
    """Put the images into the store and the rows into the database, in one transaction.

    Blobs are written first: a crash in between leaves at worst a blob without a row, which
    `doctor --storage` reports, never a row without its blob.
    """
    project = db.get(Project, target.project_id, with_for_update=True)  # serialises stack assembly
    if project is None:
        raise LookupError(f"project {target.project_id} does not exist")
    uids = [i.instance_uid for i in prepared.images if i.instance_uid]
    if uids and (dup := db.scalar(select(ItemImage.item_id).where(
            ItemImage.project_id == project.id, ItemImage.instance_uid.in_(uids)).limit(1))) is not None:
        return record_duplicate(db, target, name, dup, now=now)
    refs = [store.put(io.BytesIO(image.data)) for image in prepared.images]
    try:
        for ref in refs:
            _ensure_blob_row(db, ref.blob_id, ref.size, now)
        item = _item_for(db, project, prepared, target, now)
        is_new = item.id is None
        added = [_add_image(db, item, project.id, prepared.digest, image, ref.blob_id, now)
                 for image, ref in zip(prepared.images, refs)]
        _renumber(item)
        db.flush()
        if is_new:  # its labeling task, in the same transaction (a stack keeps its first task)
            db.add(Task(project_id=project.id, item_id=item.id, state="new", round=0, version=1,
                        active_seconds=0, created_at=now, updated_at=now))
        if target.link_key is not None:
            for row, image in zip(added, prepared.images):
                if image.link is not None:
                    db.add(DeidLink(image_id=row.id, sealed=seal_link(target.link_key, row.id, image.link),
                                    created_at=now))
        _audit(db, target, AuditAction.ITEM_INGEST, item.id, "success",
               {"kind": prepared.kind, "images": len(added), "frames": sum(i.frames for i in prepared.images),
                "study_uid": prepared.study_uid or "", "stack": item.is_stack,
                "needs_pixel_check": item.needs_pixel_check}, now)
        db.commit()
    except IntegrityError:
        # Another writer stored the same file or instance first: the blobs are shared content.
        db.rollback()
        dup = find_duplicate(db, target.project_id, prepared.digest)
        if dup is None and uids:
            dup = db.scalar(select(ItemImage.item_id).where(ItemImage.project_id == target.project_id,
                                                            ItemImage.instance_uid.in_(uids)).limit(1))
        if dup is None:
            raise
        return record_duplicate(db, target, name, dup, now=now)
    return IngestResult(name, IMPORTED, item_id=item.id, kind=prepared.kind, frames=item.frames,
                        needs_pixel_check=item.needs_pixel_check)


def _ensure_blob_row(db: Session, blob_id: str, size: int, now: datetime) -> None:
    if db.get(Blob, blob_id) is None:
        with db.begin_nested():
            db.add(Blob(id=blob_id, size=size, created_at=now))


def _item_for(db: Session, project: Project, prepared: Prepared, target: IngestTarget,
              now: datetime) -> Item:
    """The stack this instance joins, or a new item."""
    first = prepared.images[0]
    if prepared.kind == "dicom" and prepared.series_uid and stack_series(project):
        stack = db.scalar(select(Item).where(Item.project_id == project.id,
                                             Item.series_uid == prepared.series_uid,
                                             Item.width == first.width, Item.height == first.height)
                          .order_by(Item.id).limit(1))
        if stack is not None:
            stack.is_stack = True
            _mark_pixel_check(stack, prepared.pixel_check_reasons)
            return stack
    item = Item(project_id=project.id, kind=prepared.kind, width=first.width, height=first.height,
                frames=0, modality=prepared.modality, study_uid=prepared.study_uid,
                series_uid=prepared.series_uid, is_stack=False, needs_pixel_check=False,
                pixel_check_reasons=[], source=target.source,
                created_by=target.actor.id if target.actor is not None else None, created_at=now)
    _mark_pixel_check(item, prepared.pixel_check_reasons)
    db.add(item)
    return item


def _mark_pixel_check(item: Item, reasons: list[str]) -> None:
    if reasons:
        item.needs_pixel_check = True
        item.pixel_check_reasons = sorted(set(item.pixel_check_reasons or []) | set(reasons))
        item.pixel_check_cleared_by = item.pixel_check_cleared_at = None


def _add_image(db: Session, item: Item, project_id: int, digest: str, image: PreparedImage,
               blob_id: str, now: datetime) -> ItemImage:
    row = ItemImage(project_id=project_id, position=len(item.images), blob_id=blob_id,
                    source_digest=digest, source_page=image.page, instance_uid=image.instance_uid,
                    sort_key=image.sort_key, frames=image.frames, width=image.width, height=image.height,
                    meta=image.meta, deid_report=image.deid_report, created_at=now)
    item.images.append(row)
    item.frames += image.frames
    return row


def _renumber(item: Item) -> None:
    """Keep a stack in slice order; pages of a picture keep their page order."""
    if item.is_stack:
        item.images.sort(key=lambda i: (i.sort_key, i.instance_uid or ""))
    for position, image in enumerate(item.images):
        image.position = position


def seal_link(key: bytes, image_id: int, link: dict[str, str]) -> bytes:
    """Encrypt one image's original identifiers, bound to its row (nonce || ciphertext)."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, json.dumps(link).encode(), f"deid-link:{image_id}".encode())


def open_link(key: bytes, image_id: int, sealed: bytes) -> dict[str, str]:
    """Decrypt a linkage row (raises cryptography's InvalidTag for a wrong key or a moved row)."""
    return json.loads(AESGCM(key).decrypt(sealed[:12], sealed[12:], f"deid-link:{image_id}".encode()))


def _audit(db: Session, target: IngestTarget, action: AuditAction, object_id: Any, outcome: str,
           details: dict[str, Any], now: datetime) -> None:
    record(db, action, actor=target.actor, actor_name=target.actor_name, object_type="item",
           object_id=object_id, outcome=outcome, details={"project_id": target.project_id,
                                                          "source": target.source, **details},
           context=target.context, now=now)
