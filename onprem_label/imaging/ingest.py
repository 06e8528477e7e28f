"""Storing prepared files as items: duplicates, series stacks, blobs, linkage and audit events."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, BinaryIO, Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import exists, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.engine import read_only
from onprem_label.db.models import Annotation, Blob, DeidLink, Item, ItemImage, Project, Task, User
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.prepare import (Prepared, PrepareOptions, PreparedImage, prepare_or_reject,
                                          source_digest)
from onprem_label.storage import BlobRef, EncryptedBlobStore

IMPORTED, DUPLICATE, REJECTED = "imported", "duplicate", "rejected"
PUT_THREADS = 4  # blob writes in flight at once during a batch (each mostly waits for fsync)


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
class KnownFile:
    """A file whose bytes are already an item of the project: found by its digest, never decoded."""

    digest: str
    item_id: int


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
        read_only(db)  # a read: no write lock may be held while the file decodes (minutes, maybe)
        duplicate = find_duplicate(db, target.project_id, digest)
        db.rollback()
        if duplicate is not None:  # known bytes: no need to decode them again
            return record_duplicate(db, target, name, duplicate, now=now)
        if prepare is None:
            prepared = prepare_or_reject(stream, options, digest=digest)
        else:
            prepared = prepare(stream, digest)
    except Rejected as exc:
        return store_batch(db, store, target, [(name, exc)], now=now)[0]
    return store_prepared(db, store, target, prepared, name, now=now)


def find_duplicate(db: Session, project_id: int, digest: str) -> int | None:
    """The item a file with this digest already became in the project, if any."""
    return db.scalar(select(ItemImage.item_id).where(ItemImage.project_id == project_id,
                                                     ItemImage.source_digest == digest).limit(1))


def record_duplicate(db: Session, target: IngestTarget, name: str, item_id: int, *,
                     now: datetime) -> IngestResult:
    """Audit a file that was already imported into the project and commit."""
    db.rollback()
    _audit(db, target, AuditAction.ITEM_DUPLICATE, item_id, "success", {}, now)
    db.commit()
    return _duplicate(name, item_id)


def store_prepared(db: Session, store: EncryptedBlobStore, target: IngestTarget, prepared: Prepared,
                   name: str, *, now: datetime) -> IngestResult:
    """Store one prepared file as an item (or report it a duplicate), committed with its audit event."""
    return store_batch(db, store, target, [(name, prepared)], now=now)[0]


def store_batch(db: Session, store: EncryptedBlobStore, target: IngestTarget,
                files: list[tuple[str, Prepared | Rejected | KnownFile]], *, now: datetime) -> list[IngestResult]:
    """Store prepared files and audit rejected and known ones, in one transaction; results in order.

    One transaction for many files is what makes bulk ingest fast: one commit (one fsync of
    the database log) and a few multi-row statements instead of a dozen each. Blobs are written
    first: a crash in between leaves at worst blobs without rows, which `doctor --storage`
    reports, never a row without its blob. The blobs are encrypted and synced before the write
    transaction begins (on SQLite no other writer waits for the disk), and the files are sorted out
    again inside it. If another writer stored one of the files meanwhile (a unique index says so),
    the batch is rolled back and each file is stored alone; should one of those fail, the results of
    the files stored before it come with the error (BatchInterrupted).
    """
    try:
        refs = _put_fresh(db, store, target.project_id, files)
        slots = _store_all(db, store, target, files, now, refs)
        db.commit()
    except IntegrityError:
        db.rollback()
        if len(files) > 1:
            return _one_by_one(db, store, target, files, now)
        name, prepared = files[0]
        dup = _existing_item(db, target.project_id, prepared)
        if dup is None:
            raise
        return [record_duplicate(db, target, name, dup, now=now)]
    return [slot.result() for slot in slots]


class BatchInterrupted(Exception):
    """Storing files one by one stopped at an unexpected error; `results` are the files stored before it."""

    def __init__(self, results: list[IngestResult]):
        super().__init__(f"ingest stopped after {len(results)} files of the batch")
        self.results = results


def _one_by_one(db: Session, store: EncryptedBlobStore, target: IngestTarget, files: list, now: datetime):
    results: list[IngestResult] = []
    for one in files:
        try:
            results.extend(store_batch(db, store, target, [one], now=now))
        except BatchInterrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the results already committed
            raise BatchInterrupted(results) from exc
    return results


def _put_fresh(db: Session, store: EncryptedBlobStore, project_id: int, files: list) -> dict[int, list[BlobRef]]:
    """Put the images of the files that look new (a read transaction); {id(prepared): its refs}.

    A file that turns out to be a duplicate after all (another writer was quicker) leaves its blob
    without a row only when its bytes differ from the stored copy's; `doctor --storage` finds those.
    """
    read_only(db)
    fresh = [slot.outcome for slot in _sorted_out(db, project_id, files) if slot.status == IMPORTED]
    db.rollback()
    refs = iter(_put_all(store, [image.data for prepared in fresh for image in prepared.images]))
    return {id(prepared): [next(refs) for _ in prepared.images] for prepared in fresh}


@dataclass
class _Slot:
    """One file of a batch on its way: what it is, and the item it became or repeats."""

    name: str
    outcome: Prepared | Rejected
    status: str
    item: Item | None = None       # what an imported file became
    item_id: int | None = None     # the item a duplicate repeats, when it was stored before
    same_as: _Slot | None = None   # the file of this batch a duplicate repeats
    note: str | None = None
    frames: int = 0                # the item's frames once this file was added

    def target_id(self) -> int | None:
        """The id of the item this file became or repeats (once the batch is flushed)."""
        if self.same_as is not None:
            return self.same_as.item.id
        return self.item.id if self.item is not None else self.item_id

    def result(self) -> IngestResult:
        """The file's report line."""
        item_id = self.target_id()
        if self.status == REJECTED:
            return IngestResult(self.name, REJECTED, code=self.outcome.code, reason=self.outcome.reason)
        if self.status == DUPLICATE:
            return _duplicate(self.name, item_id)
        return IngestResult(self.name, IMPORTED, item_id=item_id, kind=self.outcome.kind, frames=self.frames,
                            needs_pixel_check=self.item.needs_pixel_check, reason=self.note)


def _duplicate(name: str, item_id: int | None) -> IngestResult:
    return IngestResult(name, DUPLICATE, item_id=item_id, reason="already imported into this project")


def _store_all(db: Session, store: EncryptedBlobStore, target: IngestTarget,
               files: list[tuple[str, Prepared | Rejected | KnownFile]], now: datetime,
               put: dict[int, list[BlobRef]]) -> list[_Slot]:
    project = db.get(Project, target.project_id, with_for_update=True)  # serialises stack assembly
    if project is None:
        raise LookupError(f"project {target.project_id} does not exist")
    slots = _sorted_out(db, project.id, files)  # again: another writer may have stored some meanwhile
    fresh = [slot for slot in slots if slot.status == IMPORTED]
    refs = [ref for slot in fresh for ref in put.get(id(slot.outcome))
            or _put_all(store, [image.data for image in slot.outcome.images])]
    _insert_blob_rows(db, {ref.blob_id: ref.size for ref in refs}, now)
    stacks: dict[tuple, Item] = {}  # stacks begun or joined in this batch
    placed, new_items, blob_ids = [], {}, iter([ref.blob_id for ref in refs])
    with db.no_autoflush:  # nothing is written until every file has its place
        for slot in fresh:
            slot.item, slot.note = _item_for(db, project, slot.outcome, target, now, stacks)
            if slot.item.id is None:
                new_items[id(slot.item)] = slot.item
            images = [_add_image(slot.item, project.id, slot.outcome.digest, image, next(blob_ids), now)
                      for image in slot.outcome.images]
            slot.frames = slot.item.frames
            placed.append((slot, images))
    for item in {id(slot.item): slot.item for slot, _ in placed}.values():
        _renumber(item)
    db.flush()  # item and image ids, in a few multi-row statements
    copies = _consensus_k(project)
    for item in new_items.values():  # its labeling task(s), in the same transaction (a stack keeps its first)
        for slot in range(copies):  # consensus: k independent copies (workflow.consensus)
            db.add(Task(project_id=project.id, item_id=item.id, state="new", round=0, version=1, slot=slot,
                        active_seconds=0, created_at=now, updated_at=now))
    if target.link_key is not None:
        for slot, images in placed:
            for row, image in zip(images, slot.outcome.images):
                if image.link is not None:
                    db.add(DeidLink(image_id=row.id, sealed=seal_link(target.link_key, row.id, image.link),
                                    created_at=now))
    for slot in slots:
        _audit_slot(db, target, slot, now)
    return slots


def _consensus_k(project) -> int:
    """How many independent labelers each item of the project gets (workflow.settings.consensus_k)."""
    value = (project.settings or {}).get("consensus_k", 1)
    return value if isinstance(value, int) and 1 <= value <= 10 else 1


def _sorted_out(db: Session, project_id: int,
                files: list[tuple[str, Prepared | Rejected | KnownFile]]) -> list[_Slot]:
    """Each file as rejected, a duplicate (of the project or of an earlier file here) or to import."""
    prepared = [outcome for _, outcome in files if isinstance(outcome, Prepared)]
    known_digests = _known(db, ItemImage.source_digest, project_id, {p.digest for p in prepared})
    known_uids = _known(db, ItemImage.instance_uid, project_id, {uid for p in prepared for uid in _uids(p)})
    slots, seen = [], {}  # seen: digest or instance UID -> the slot of this batch that brings it
    for name, outcome in files:
        if isinstance(outcome, Rejected):
            slots.append(_Slot(name, outcome, REJECTED))
            continue
        if isinstance(outcome, KnownFile):
            slots.append(_Slot(name, outcome, DUPLICATE, item_id=outcome.item_id))
            continue
        keys = [outcome.digest, *_uids(outcome)]
        known = next((k for k in [known_digests.get(outcome.digest), *map(known_uids.get, _uids(outcome))]
                      if k is not None), None)
        earlier = next((seen[k] for k in keys if k in seen), None)
        if known is not None or earlier is not None:
            slots.append(_Slot(name, outcome, DUPLICATE, item_id=known,
                               same_as=earlier if known is None else None))
            continue
        slots.append(slot := _Slot(name, outcome, IMPORTED))
        seen.update(dict.fromkeys(keys, slot))
    return slots


def _uids(prepared: Prepared) -> list[str]:
    return [image.instance_uid for image in prepared.images if image.instance_uid]


def _known(db: Session, column, project_id: int, values: set[str]) -> dict[str, int]:
    """{value: item id} of the values already in the project's images (digests or instance UIDs)."""
    found: dict[str, int] = {}
    values = sorted(values)
    for start in range(0, len(values), 500):  # well under every database's limit of bound values
        found.update(db.execute(select(column, ItemImage.item_id).where(
            ItemImage.project_id == project_id, column.in_(values[start:start + 500]))).all())
    return found


def _existing_item(db: Session, project_id: int, prepared: Prepared) -> int | None:
    """The item that already holds this file's bytes or one of its instances."""
    found = _known(db, ItemImage.source_digest, project_id, {prepared.digest})
    found = found or _known(db, ItemImage.instance_uid, project_id, set(_uids(prepared)))
    return next(iter(found.values()), None)


def _put_all(store: EncryptedBlobStore, datas: list[bytes]) -> list[BlobRef]:
    """Put each image into the store; a few at a time, since most of a put waits for the disk."""
    if len(datas) <= 1:
        return [store.put(io.BytesIO(data)) for data in datas]
    with ThreadPoolExecutor(min(PUT_THREADS, len(datas)), thread_name_prefix="ingest-put") as pool:
        return list(pool.map(lambda data: store.put(io.BytesIO(data)), datas))


def _insert_blob_rows(db: Session, sizes: dict[str, int], now: datetime) -> None:
    """One row per blob; a blob another item already uses (same content) keeps its row."""
    if not sizes:
        return
    dialect = db.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    db.execute(insert(Blob).on_conflict_do_nothing(index_elements=["id"]),
               [{"id": blob_id, "size": size, "created_at": now} for blob_id, size in sizes.items()])


def _item_for(db: Session, project: Project, prepared: Prepared, target: IngestTarget, now: datetime,
              stacks: dict[tuple, Item]) -> tuple[Item, str | None]:
    """The stack this instance joins, or a new item; and a note when the stack could not be joined.

    A stack is joined only while its task is untouched (new, nothing saved): a new slice would
    renumber the frames under a labeler's shapes. A later instance then starts a new stack.
    """
    first, note = prepared.images[0], None
    stacking = prepared.kind == "dicom" and prepared.series_uid and stack_series(project)
    key = (prepared.series_uid, first.width, first.height)
    if stacking:
        stack = stacks.get(key)
        if stack is None:
            stack, note = _open_stack(db, project.id, *key)
        if stack is not None:
            stacks[key] = stack
            stack.is_stack = True
            _mark_pixel_check(stack, prepared.pixel_check_reasons)
            return stack, None
    item = Item(project_id=project.id, kind=prepared.kind, width=first.width, height=first.height,
                frames=0, modality=prepared.modality, study_uid=prepared.study_uid,
                series_uid=prepared.series_uid, is_stack=False, needs_pixel_check=False,
                pixel_check_reasons=[], source=target.source,
                created_by=target.actor.id if target.actor is not None else None, created_at=now)
    _mark_pixel_check(item, prepared.pixel_check_reasons)
    db.add(item)
    if stacking:
        stacks[key] = item
    return item, note


def _open_stack(db: Session, project_id: int, series_uid: str, width: int,
                height: int) -> tuple[Item | None, str | None]:
    """The series' newest stack of this size if its labeling has not begun; else why not."""
    touched = exists().where(Annotation.task_id == Task.id)
    # FOR UPDATE OF tasks: a lease of that task waits (or skips it) until this ingest commits, so
    # no labeler starts on a stack that is still growing (PostgreSQL; SQLite writers are serial).
    row = db.execute(select(Item, Task.state, touched).join(Task, Task.item_id == Item.id)
                     .where(Item.project_id == project_id, Item.series_uid == series_uid,
                            Item.width == width, Item.height == height)
                     .order_by(Item.id.desc()).limit(1).with_for_update(of=Task)).first()
    if row is None:
        return None, None
    stack, state, saved = row
    if state == "new" and not saved:
        return stack, None
    return None, f"item {stack.id} of this series is already being labeled; this instance starts a new stack"


def _mark_pixel_check(item: Item, reasons: list[str]) -> None:
    if reasons:
        item.needs_pixel_check = True
        item.pixel_check_reasons = sorted(set(item.pixel_check_reasons or []) | set(reasons))
        item.pixel_check_cleared_by = item.pixel_check_cleared_at = None


def _add_image(item: Item, project_id: int, digest: str, image: PreparedImage, blob_id: str,
               now: datetime) -> ItemImage:
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


def _audit_slot(db: Session, target: IngestTarget, slot: _Slot, now: datetime) -> None:
    if slot.status == REJECTED:
        _audit(db, target, AuditAction.ITEM_REJECT, "", "failure",
               {"code": slot.outcome.code, "reason": slot.outcome.reason}, now)
    elif slot.status == DUPLICATE:
        _audit(db, target, AuditAction.ITEM_DUPLICATE, slot.target_id(), "success", {}, now)
    else:
        prepared, item = slot.outcome, slot.item
        details = {"kind": prepared.kind, "images": len(prepared.images),
                   "frames": sum(i.frames for i in prepared.images), "study_uid": prepared.study_uid or "",
                   "stack": item.is_stack, "needs_pixel_check": item.needs_pixel_check}
        if slot.note:
            details["note"] = slot.note
        _audit(db, target, AuditAction.ITEM_INGEST, item.id, "success", details, now)


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
