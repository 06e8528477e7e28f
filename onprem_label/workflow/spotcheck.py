"""Spot checks: a share of accepted tasks reviewed again, blind, by a second reviewer, to measure the first.

The second reviewer gets an ordinary review task (purpose spot_check) holding the accepted labels as a
labeler's revision and no review history, so they cannot tell it from first-round work. Their decision
ends it (no rework: the task it checks stays accepted); accepting agrees with the first reviewer,
rejecting or correcting disagrees and is recorded for the manager (the audit trail names both tasks).
"""

from __future__ import annotations

import random
from datetime import datetime

from sqlalchemy import case, func, insert, select
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import ProjectMember, User
from onprem_label.workflow import gold
from onprem_label.workflow.settings import ProjectSettings
from onprem_label.workflow.taskrows import ANNOTATIONS, REVIEWS as R, TASKS as T, TaskRow


def maybe_spot_check(db: Session, task: TaskRow, annotation, settings: ProjectSettings, *, reviewer: User,
                     now: datetime, context: AuditContext = CONSOLE, rng: random.Random | None = None) -> int | None:
    """Draw a just-accepted work task for a second review (spot_check_rate); the spot check's task id or None."""
    rng = rng or gold.SYSTEM_RANDOM
    if task.purpose != "work" or settings.spot_check_rate <= 0 or rng.random() >= settings.spot_check_rate:
        return None
    others = db.scalar(select(func.count()).select_from(ProjectMember).join(User, User.id == ProjectMember.user_id)
                       .where(ProjectMember.project_id == task.project_id, ProjectMember.role == "reviewer",
                              User.active.is_(True), User.id.not_in([reviewer.id, task.labeler_id or 0])))
    if not others or annotation is None:
        return None  # nobody else could take it: it would wait for ever
    conn = db.connection()
    # It must look like a task handed in for its first review: the original's version, time and hand-in
    # moment, its labels as the labeler's revision under the same number (a correction by the first
    # reviewer must not show), and no review history.
    check_id = conn.execute(insert(T).values(
        project_id=task.project_id, item_id=task.item_id, state="submitted", purpose="spot_check", slot=0, round=0,
        version=max(1, task.version - 2), labeler_id=task.labeler_id, origin_task_id=task.id,
        active_seconds=task.active_seconds, lease_seconds=0, created_at=task.created_at, updated_at=now,
        submitted_at=task.submitted_at or now, review_sampled=True).returning(T.c.id)).scalar_one()
    conn.execute(insert(ANNOTATIONS).values(task_id=check_id, revision=annotation.revision, round=0, kind="label",
                                            author_id=task.labeler_id, schema_version=annotation.schema_version,
                                            shapes=annotation.shapes, classifications=annotation.classifications,
                                            created_at=task.submitted_at or now))
    record(db, AuditAction.TASK_SPOT_CHECK, actor=reviewer, object_type="task", object_id=check_id,
           details={"project_id": task.project_id, "checks_task": task.id, "first_reviewer": reviewer.id},
           context=context, now=now)
    return check_id


def second_review_agreement(db: Session, project_id: int) -> dict[int, tuple[int, int]]:
    """Per first reviewer: (their acceptances spot-checked so far, those the second reviewer accepted too)."""
    origin = T.alias("origin")
    agreed = case((R.c.decision == "accept", 1), else_=0)
    rows = db.execute(select(origin.c.reviewer_id, func.count(), func.sum(agreed))
                      .select_from(T).join(origin, origin.c.id == T.c.origin_task_id)
                      .join(R, R.c.task_id == T.c.id)
                      .where(T.c.project_id == project_id, T.c.purpose == "spot_check", R.c.reviewer_id.is_not(None))
                      .group_by(origin.c.reviewer_id)).all()
    return {uid: (int(n), int(ok or 0)) for uid, n, ok in rows if uid is not None}
