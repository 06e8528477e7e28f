"""Pre-labels: a model's predictions attached to open tasks as draft revisions, and how many labelers keep.

An imported revision has kind "import", no author and the source "import:<name>"; the labeler who
leases the task sees it as the current labels and corrects it, and every save after that is a new
revision of their own (the import stays in the history). Only work tasks nobody has labeled yet
take drafts: a task under way, handed in or accepted is never changed, gold and test tasks never
get hints. Predictions find their item by what the file carries (exchange.predictions): the item's
de-identified SOP Instance UIDs or its pictures' keyed digests (so a file exported from another
project on this install matches), or the item id when the file came from this project.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any, Iterable

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import Annotation, ItemImage, Task
from onprem_label.workflow import taskrows
from onprem_label.workflow.errors import Invalid
from onprem_label.workflow.quality import proportion
from onprem_label.workflow.shapes import ShapeError, validate_annotation

A, IMAGES, T = Annotation.__table__, ItemImage.__table__, Task.__table__
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BATCH = 200  # predictions per transaction: a long import never holds the writer lock for long
MAX_EXAMPLES = 20
# Handed in: the labeler has decided about every draft shape (kept, changed or deleted it).
DECIDED = ("submitted", "reviewing", "rework", "escalated", "accepted")


def check_name(name: Any) -> str:
    """The import's name (the model or run), as `source` says it: import:<name>; Invalid otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise Invalid("The import needs a name: 1 to 64 letters, digits, dots, dashes or underscores.",
                      errors=[{"field": "name", "message": "1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"}])
    return name


@dataclass
class ImportSummary:
    """What one import did: tasks given drafts, shapes attached, and everything left out, by reason."""

    name: str
    predictions: int = 0
    tasks: int = 0
    shapes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)

    def skip(self, reason: str, where: str, message: str | None = None, n: int = 1) -> None:
        """Count `n` of something left out."""
        self.skipped[reason] += n
        if len(self.examples) < MAX_EXAMPLES:
            # A validation message can quote the file's own keys: kept storable for the audit event.
            text = message.encode("utf-8", "replace").decode().replace("\x00", "?")[:300] if message else None
            self.examples.append({"where": where, "reason": reason, **({"message": text} if text else {})})

    def to_json(self) -> dict:
        """For the API, the CLI and the audit event."""
        return {"name": self.name, "source": f"import:{self.name}", "predictions": self.predictions,
                "tasks": self.tasks, "shapes": self.shapes, "skipped": dict(self.skipped), "examples": self.examples}


class _Items:
    """The project's items by the keys predictions carry: instance UIDs, digests, ids; their frame layout."""

    def __init__(self, conn, project_id: int):
        self.layout: dict[int, list] = {}
        self.by_uid: dict[str, int] = {}
        self.by_digest: dict[str, int] = {}
        for image in conn.execute(select(IMAGES.c.item_id, IMAGES.c.instance_uid, IMAGES.c.source_digest,
                                         IMAGES.c.source_page, IMAGES.c.frames)
                                  .where(IMAGES.c.project_id == project_id)
                                  .order_by(IMAGES.c.item_id, IMAGES.c.position)):
            self.layout.setdefault(image.item_id, []).append(image)
            if image.instance_uid:
                self.by_uid[image.instance_uid] = image.item_id
            else:
                self.by_digest[f"{image.source_digest}:{image.source_page}"] = image.item_id

    def _uids(self, item_id: int) -> tuple:
        return tuple(i.instance_uid for i in self.layout.get(item_id, []))

    def _digests(self, item_id: int) -> tuple:
        return tuple(f"{i.source_digest}:{i.source_page}" for i in self.layout.get(item_id, []))

    def _instance_at(self, item_id: int, frame: int) -> str | None:
        seen = 0
        for image in self.layout.get(item_id, []):
            if frame < seen + image.frames:
                return image.instance_uid
            seen += image.frames
        return None

    def find(self, pred, project_id: int) -> tuple[int | None, str]:
        """(item id, "") for a prediction, or (None, why not)."""
        if pred.instance_uids:
            item = self.by_uid.get(pred.instance_uids[0])
            if item is None:
                return None, "unknown_item"
            return (item, "") if self._uids(item) == tuple(pred.instance_uids) else (None, "item_differs")
        if pred.digests:
            item = self.by_digest.get(pred.digests[0])
            if item is None:
                return None, "unknown_item"
            return (item, "") if self._digests(item) == tuple(pred.digests) else (None, "item_differs")
        if pred.item_id is not None and pred.project_id in (None, project_id) and pred.item_id in self.layout:
            return pred.item_id, ""
        if pred.frame_instances:  # another project's export (or one that does not say): by instance
            items = {self.by_uid.get(uid) for uid in pred.frame_instances.values()}
            if None in items or len(items) != 1:
                return None, "unknown_item"
            item = items.pop()
            if any(self._instance_at(item, f) != uid for f, uid in pred.frame_instances.items()):
                return None, "item_differs"  # the frames are laid out otherwise here (series stacking)
            return item, ""
        return None, "unknown_item"  # only an item id, from another project


# Work tasks nobody has begun, and an item's held-back task while it is gold: the drafts wait there
# for the hidden gold checks (gold.new_gold_task copies them), so those open like any other task.
_OPEN_TASKS = (select(T.c.id).where(T.c.item_id == bindparam("item_id"), T.c.purpose.in_(("work", "held")),
                                    T.c.state == "new").order_by(T.c.id))
_LABELED = select(A.c.id).where(A.c.task_id == bindparam("task_id"), A.c.kind != "import").limit(1)


def _same(latest, source: str, annotation: dict) -> bool:
    """The task's newest revision is already this import's, with these labels (a re-run changes nothing)."""
    return (latest is not None and latest.kind == "import" and latest.source == source
            and latest.shapes == annotation["shapes"] and latest.classifications == annotation["classifications"])


def attach(db: Session, project, predictions: Iterable, *, name: str, actor=None, actor_name: str | None = None,
           now: datetime, context: AuditContext = CONSOLE, skipped=None, batch: int = BATCH) -> ImportSummary:
    """Attach each prediction to its item's open work tasks as a draft revision; the summary.

    Commits every `batch` predictions; each task's draft is its own audited change, and the import as a
    whole is one `import:predictions` event with the counts (`skipped`: what the reader left out, with
    `.counts` and `.examples`) — with outcome failure, in a transaction of its own, when it stops midway.
    """
    name = check_name(name)
    source = f"import:{name}"
    summary = ImportSummary(name=name)
    if skipped is not None:
        summary.skipped.update(skipped.counts)
        summary.examples.extend(skipped.examples[:MAX_EXAMPLES])
    schema = project.label_schema or {}
    tools = {c["name"]: c["tools"] for c in schema.get("classes", [])}
    who = {"actor": actor, "actor_name": actor_name, "context": context, "now": now}
    done: set[int] = set()
    try:
        items = _Items(db.connection(), project.id)
        for pred in predictions:
            if isinstance(pred, tuple):  # (reason, where) of a line the reader could not use
                summary.skip(*pred)
                continue
            summary.predictions += 1
            _attach_one(db, project, pred, items, tools, summary, source, done, who)
            if summary.predictions % batch == 0:
                db.commit()
    except BaseException:
        db.rollback()  # this batch goes; the committed ones stay, and the trail says the import stopped
        record(db, AuditAction.IMPORT_PREDICTIONS, object_type="project", object_id=project.id, outcome="failure",
               details={**summary.to_json(), "stopped": True}, **who)
        db.commit()
        raise
    record(db, AuditAction.IMPORT_PREDICTIONS, object_type="project", object_id=project.id,
           details=summary.to_json(), **who)
    db.commit()
    return summary


def _valid(summary: ImportSummary, pred, shapes: list, item) -> dict | None:
    """The draft as a save would store it; shapes that fail validation are left out (and counted) rather
    than the whole item; None when even the rest cannot be saved."""
    body = {"shapes": shapes, "classifications": pred.classifications}
    for _ in range(2):
        try:
            return validate_annotation(body, item.schema, width=item.width, height=item.height, frames=item.frames,
                                       require_complete=False)
        except ShapeError as exc:
            bad = {e["shape"] for e in exc.errors if e.get("shape") is not None}
            whole = [e for e in exc.errors if e.get("shape") is None]
            summary.skip("invalid_shape" if bad and not whole else "invalid", pred.where, str(exc),
                         n=max(len(bad), 1))
            if whole or not bad:
                return None
            body = {**body, "shapes": [s for n, s in enumerate(body["shapes"]) if n not in bad]}
    return None


def _attach_one(db: Session, project, pred, items: _Items, tools: dict, summary: ImportSummary, source: str,
                done: set[int], who: dict) -> None:
    conn = db.connection()
    item_id, why = items.find(pred, project.id)
    if item_id is None:
        summary.skip(why, pred.where)
        return
    if item_id in done:  # one prediction per item and file: a second would silently replace the first
        summary.skip("duplicate_item", pred.where)
        return
    done.add(item_id)
    shapes = [s for s in pred.shapes if not isinstance(s, dict) or (isinstance(s.get("label"), str)
                                                                    and s["label"] in tools)]
    if len(shapes) < len(pred.shapes):
        summary.skip("unknown_label", pred.where, n=len(pred.shapes) - len(shapes))
    task_ids = [r.id for r in conn.execute(_OPEN_TASKS, {"item_id": item_id})]
    if not task_ids:
        summary.skip("task_started", pred.where, "the item's tasks are under way, handed in or done")
        return
    annotation = None
    for task_id in task_ids:
        task = taskrows.load_task(conn, task_id, lock=True)
        # Checked again under the lock: a lease or a gold mark may have come first.
        if (task is None or task.state != "new" or task.purpose not in ("work", "held")
                or conn.execute(_LABELED, {"task_id": task_id}).first()):
            summary.skip("task_started", pred.where)
            continue
        if annotation is None:
            annotation = _valid(summary, pred, shapes, SimpleNamespace(schema=task.project.label_schema or {},
                                                                       **vars(task.item)))
            if annotation is None:
                return
            if not annotation["shapes"] and not annotation["classifications"]:
                summary.skip("empty", pred.where)  # nothing to correct: the task opens empty anyway
                return
        if _same(taskrows.latest_annotation(conn, task_id), source, annotation):
            summary.skip("unchanged", pred.where)
            continue
        row = taskrows.add_annotation(conn, task=task, author_id=None, kind="import", source=source,
                                      schema_version=task.project.schema_version, annotation=annotation,
                                      now=who["now"])
        version = task.version
        task.version, task.updated_at = version + 1, who["now"]
        taskrows.write_task(conn, task, version)
        record(db, AuditAction.ANNOTATION_IMPORT, object_type="task", object_id=task_id,
               details={"project_id": project.id, "revision": row.revision, "shapes": len(row.shapes),
                        "source": source, "version": task.version}, **who)
        summary.tasks += 1
        summary.shapes += len(row.shapes)


def _key(shape: dict) -> str:
    """A shape as compared for 'kept unchanged': everything but its id, in one canonical text."""
    return json.dumps({k: v for k, v in shape.items() if k != "id"}, sort_keys=True)


def kept_unchanged(conn, project_id: int) -> dict:
    """Per project and per import: of the imported shapes on handed-in tasks, the share that the labeler's
    last revision still holds exactly (same type, label, frame, geometry and attributes); a reviewer's
    correction does not count against the labeler. Read one task at a time."""
    kept: Counter = Counter()
    total: Counter = Counter()
    tasks: Counter = Counter()

    def score(draft, final) -> None:
        if draft is None:
            return
        tasks[draft.source] += 1
        left = Counter(_key(s) for s in (final.shapes if final is not None else draft.shapes))
        for shape in draft.shapes:
            total[draft.source] += 1
            if left[_key(shape)] > 0:
                left[_key(shape)] -= 1
                kept[draft.source] += 1

    query = (select(A.c.task_id, A.c.kind, A.c.source, A.c.shapes)
             .join(T, T.c.id == A.c.task_id)
             .where(T.c.project_id == project_id, T.c.purpose == "work", T.c.state.in_(DECIDED),
                    A.c.kind.in_(("import", "label")),
                    T.c.id.in_(select(A.c.task_id).where(A.c.kind == "import")))
             .order_by(A.c.task_id, A.c.revision))
    current, draft, final = None, None, None
    for row in conn.execute(query):
        if row.task_id != current:
            score(draft, final)
            current, draft, final = row.task_id, None, None
        if row.kind == "import":
            draft, final = row, None  # a newer import replaced the drafts the labeler started from
        else:
            final = row
    score(draft, final)
    by_source = {s: {"tasks": tasks[s], "imported_shapes": total[s], "kept_unchanged": proportion(kept[s], total[s])}
                 for s in sorted(tasks)}
    return {"tasks": sum(tasks.values()), "imported_shapes": sum(total.values()),
            "kept_unchanged": proportion(sum(kept.values()), sum(total.values())), "by_source": by_source}
