"""Gold items: marking reference answers, handing out hidden gold checks, scoring answers against them."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, insert, or_, select, update
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import User
from onprem_label.db.quality import GoldCheck, GoldItem
from onprem_label.workflow import matching, taskrows
from onprem_label.workflow.errors import Conflict, Invalid, NotFound
from onprem_label.workflow.members import require_role
from onprem_label.workflow.metrics import ItemScore, Thresholds, score_item
from onprem_label.workflow.settings import ProjectSettings
from onprem_label.workflow.shapes import ShapeError, validate_annotation
from onprem_label.workflow.taskrows import ANNOTATIONS, REVIEWS, TASKS as T, TaskRow

GOLD, CHECKS = GoldItem.__table__, GoldCheck.__table__
USES = ("hidden", "qualification", "both")
DRAW_POOL = 200  # candidates read per draw: enough variety, bounded cost
SYSTEM_RANDOM = random.SystemRandom()


def thresholds(settings: ProjectSettings) -> Thresholds:
    """The project's matching thresholds."""
    return Thresholds(iou=settings.iou_threshold, dice=settings.dice_threshold, point_distance=settings.point_distance)


def mark_gold(db: Session, project, item_id: Any, reference: Any, *, use: Any = "both", actor: User, now: datetime,
              context: AuditContext = CONSOLE) -> GoldItem:
    """A manager makes an item gold with its reference answer (or replaces the reference); audited.

    The item's own work task must not be under way: a new one is held back from the queue (the
    item is used as gold only), an accepted one stays real, exported work.
    """
    require_role(db, project.id, actor, "manager")
    if use not in USES:
        raise Invalid("Unknown gold use.", errors=[{"field": "use", "message": " or ".join(USES)}])
    conn = db.connection()
    item = taskrows.item_size(conn, item_id) if isinstance(item_id, int) else None
    # The item's work tasks, locked: a lease (SKIP LOCKED) passes them by, and a second mark of the
    # same item waits here rather than racing this one to the gold row.
    work = conn.execute(select(T.c.id, T.c.state, T.c.project_id, T.c.version).where(
        T.c.item_id == item_id, T.c.purpose.in_(("work", "held"))).with_for_update()).all() if item is not None else []
    if item is None or (work and work[0].project_id != project.id):
        raise NotFound("No such item in this project.")
    busy = [row for row in work if row.state not in ("new", "accepted")]
    if busy:
        raise Conflict("The item's task is being worked on; mark it gold when it is accepted or still new.",
                       state=busy[0].state, version=busy[0].version)
    try:
        answer = validate_annotation(reference, project.label_schema or {}, width=item.width, height=item.height,
                                     frames=item.frames, require_complete=True)
    except ShapeError as exc:
        raise Invalid("The reference answer is not valid.", errors=[
            {**e, "field": f"reference.{e.get('field', '')}".rstrip(".")} for e in exc.errors]) from None
    gold = db.get(GoldItem, item_id)
    if gold is None:
        gold = GoldItem(item_id=item_id, project_id=project.id, created_by=actor.id, created_at=now)
        db.add(gold)
    gold.reference, gold.use, gold.active, gold.updated_at = answer, use, True, now
    conn.execute(update(T).where(T.c.item_id == item_id, T.c.purpose == "work", T.c.state == "new")
                 .values(purpose="held", version=T.c.version + 1, updated_at=now))
    db.flush()
    record(db, AuditAction.GOLD_MARK, actor=actor, object_type="item", object_id=item_id,
           details={"project_id": project.id, "use": use, "shapes": len(answer["shapes"]),
                    "questions": len(answer["classifications"])}, context=context, now=now)
    return gold


def unmark_gold(db: Session, project, item_id: int, *, actor: User, now: datetime,
                context: AuditContext = CONSOLE) -> None:
    """The item stops being gold (its checks so far stay); a held work task returns to the queue; audited."""
    require_role(db, project.id, actor, "manager")
    gold = db.get(GoldItem, item_id)
    if gold is None or gold.project_id != project.id:
        raise NotFound("No such gold item in this project.")
    gold.active, gold.updated_at = False, now
    db.connection().execute(update(T).where(T.c.item_id == item_id, T.c.purpose == "held")
                            .values(purpose="work", version=T.c.version + 1, updated_at=now))
    record(db, AuditAction.GOLD_UNMARK, actor=actor, object_type="item", object_id=item_id,
           details={"project_id": project.id}, context=context, now=now)


def list_gold(db: Session, project_id: int) -> list[GoldItem]:
    """The project's gold items, active first, by item id."""
    return list(db.scalars(select(GoldItem).where(GoldItem.project_id == project_id)
                           .order_by(GoldItem.active.desc(), GoldItem.item_id)))


# Gold items this person has never touched: a labeler who labeled, reviewed or held an item (or met
# it in a test) would recognise it, and the check would no longer be hidden. The task's own columns
# are overwritten as work moves on, so the reviews and revisions they left are asked too.
_ON_ITEM = T.alias("on_item")
_TOUCHED = or_(
    exists().where(T.c.item_id == GOLD.c.item_id, or_(T.c.labeler_id == bindparam("user_id"),
                                                       T.c.reviewer_id == bindparam("user_id"),
                                                       T.c.lease_owner_id == bindparam("user_id"))),
    exists().where(_ON_ITEM.c.item_id == GOLD.c.item_id, REVIEWS.c.task_id == _ON_ITEM.c.id,
                   REVIEWS.c.reviewer_id == bindparam("user_id")),
    exists().where(_ON_ITEM.c.item_id == GOLD.c.item_id, ANNOTATIONS.c.task_id == _ON_ITEM.c.id,
                   ANNOTATIONS.c.author_id == bindparam("user_id")))
_UNTOUCHED_GOLD = (select(GOLD.c.item_id).where(GOLD.c.project_id == bindparam("project_id"), GOLD.c.active.is_(True),
                                                 GOLD.c.use.in_(("hidden", "both")), ~_TOUCHED)
                   .order_by(GOLD.c.item_id).limit(DRAW_POOL))


def draw_hidden_gold(conn, project_id: int, user_id: int, rate: float, rng: random.Random | None = None) -> int | None:
    """With probability `rate`, a gold item for this person's next task (None: real work as usual)."""
    rng = rng or SYSTEM_RANDOM
    if rate <= 0 or rng.random() >= rate:
        return None
    candidates = conn.execute(_UNTOUCHED_GOLD, {"project_id": project_id, "user_id": user_id}).scalars().all()
    return rng.choice(candidates) if candidates else None


def new_gold_task(conn, *, project_id: int, item_id: int, user_id: int, purpose: str, now: datetime) -> TaskRow:
    """A task on a gold item for one person (a hidden check or a test question), state new."""
    values = {"project_id": project_id, "item_id": item_id, "state": "new", "purpose": purpose, "slot": 0,
              "round": 0, "version": 1, "labeler_id": user_id, "active_seconds": 0, "lease_seconds": 0,
              "created_at": now, "updated_at": now}
    task_id = conn.execute(insert(T).values(values).returning(T.c.id)).scalar_one()
    task = TaskRow.of(conn.execute(select(T).where(T.c.id == task_id)).one())
    if purpose == "gold":
        # A hidden check must open as work on its item would: with the model's drafts, when the item
        # had them (the import leaves them on the held-back work task). The reference is never copied.
        draft = conn.execute(_HELD_DRAFT, {"item_id": item_id}).first()
        if draft is not None and draft.kind == "import":
            taskrows.add_annotation(conn, task=task, author_id=None, kind="import", source=draft.source,
                                    schema_version=draft.schema_version, now=now,
                                    annotation={"shapes": draft.shapes, "classifications": draft.classifications})
    return task


# The newest revision of an item's held-back work task, if it is a model's drafts.
_HELD_DRAFT = (select(ANNOTATIONS).join(T, T.c.id == ANNOTATIONS.c.task_id)
               .where(T.c.item_id == bindparam("item_id"), T.c.purpose == "held")
               .order_by(ANNOTATIONS.c.revision.desc()).limit(1))


_REFERENCE = select(GOLD.c.reference).where(GOLD.c.item_id == bindparam("item_id"))


def score_task(db: Session, task: TaskRow, annotation, *, stage: str, settings: ProjectSettings, now: datetime,
               actor: User | None = None, context: AuditContext = CONSOLE) -> ItemScore:
    """Score a gold or test task's revision against the reference, store the check and audit it."""
    conn = db.connection()
    reference = conn.execute(_REFERENCE, {"item_id": task.item_id}).scalar_one()
    answer = {"shapes": annotation.shapes, "classifications": annotation.classifications}
    result = score_item(answer, reference, thresholds(settings))
    conn.execute(insert(CHECKS).values(
        project_id=task.project_id, item_id=task.item_id, task_id=task.id, user_id=task.labeler_id,
        purpose="qualification" if task.purpose == "qualification" else "gold", stage=stage, round=task.round,
        revision=annotation.revision, score=result.score, correct=result.correct, detail=result.as_dict(),
        created_at=now))
    if task.purpose == "gold" and stage == "submitted" and task.round == 0:
        item = task.item or taskrows.item_size(conn, task.item_id)
        matching.bump(conn, task.labeler_id, matching.skills_of(item, reference), now=now, gold=1,
                      gold_correct=int(result.correct))
    record(db, AuditAction.GOLD_CHECK, actor=actor, object_type="task", object_id=task.id,
           details={"project_id": task.project_id, "item_id": task.item_id, "stage": stage, "round": task.round,
                    "labeler_id": task.labeler_id, "score": round(result.score, 4), "correct": result.correct},
           context=context, now=now)
    return result


def reference_of(db: Session, item_id: int) -> dict:
    """The reference answer of a gold item."""
    return db.connection().execute(_REFERENCE, {"item_id": item_id}).scalar_one()

