"""The full-inspection state machine: each step is one function that checks and audits itself.

    new --lease--> labeling --submit--> submitted --lease--> reviewing --accept/correct--> accepted
                      ^                                         |
                      +------ rework <------- reject(comment) --+  (after max_rounds: escalated,
                                                                    until a manager reassigns)

Every step checks the actor's project role, the task's state, the caller's lease and the version
the request was based on, and writes its audit event in the same transaction. Leasing and
releasing live in leases.py.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import User
from onprem_label.workflow import consensus, gold, ledger, matching, promotion, qualification, spotcheck, taskrows
from onprem_label.workflow.errors import Forbidden, IllegalTransition, Invalid, LeaseLost, NotFound, StaleVersion
from onprem_label.workflow.leases import end_lease, holds_lease
from onprem_label.workflow.members import project_roles, require_role
from onprem_label.workflow.settings import project_settings
from onprem_label.workflow.shapes import ShapeError, validate_annotation
from onprem_label.workflow.taskrows import TaskRow, write_task

MAX_COMMENT = 5000
DECISIONS = ("accept", "reject", "correct")


def get_task(db: Session, task_id: int, user: User, *, lock: bool = False, reading: bool = False) -> TaskRow:
    """A task the user may see (any project role); 404 for another project's task.

    `reading` (showing its labels): someone who is only a labeler in the project sees their own
    tasks, no one else's: another person's labels on a gold item would be its answer."""
    task = taskrows.load_task(db.connection(), task_id, lock=lock)
    roles = project_roles(db, task.project_id, user) if task is not None else set()
    if not roles or (reading and roles == {"labeler"} and user.id not in (task.labeler_id, task.lease_owner_id)):
        raise NotFound("No such task.")
    return task


def latest_annotation(db: Session, task_id: int):
    """The task's newest revision (a row with the annotations columns), or None."""
    return taskrows.latest_annotation(db.connection(), task_id)


def reviews_of(db: Session, task_id: int) -> list:
    """Every review decision on the task, oldest first (rows with the reviews columns)."""
    return taskrows.reviews_of(db.connection(), task_id)


def _check(task: TaskRow, user: User, state: str, version: Any, now: datetime) -> None:
    """The common guard: state, then lease, then version (in that order, for useful 409s)."""
    if task.state != state:
        raise IllegalTransition(f"The task is {task.state}, not {state}.", state=task.state, version=task.version)
    if not holds_lease(task, user, now):
        raise LeaseLost("You no longer hold this task; it may have expired or gone to someone else.",
                        state=task.state, version=task.version)
    if not isinstance(version, int) or isinstance(version, bool):
        raise Invalid("version is required.", errors=[{"field": "version", "message": "an integer"}])
    if version != task.version:
        raise StaleVersion(f"The task changed since version {version}; reload it.", state=task.state,
                           version=task.version)


def _validated(db: Session, task: TaskRow, body: Any, *, complete: bool) -> tuple[dict, Any]:
    """The annotation, checked against the project's schema and the item; and the project row."""
    conn = db.connection()
    project = task.project or taskrows.load_project(conn, task.project_id)
    item = task.item or taskrows.item_size(conn, task.item_id)
    try:
        return validate_annotation(body, project.label_schema or {}, width=item.width, height=item.height,
                                   frames=item.frames, require_complete=complete), project
    except ShapeError as exc:
        raise Invalid("The annotation is not valid.", errors=exc.errors) from None


def save_annotation(db: Session, task: TaskRow, user: User, body: Any, version: Any, *, now: datetime,
                    context: AuditContext = CONSOLE):
    """A new revision of the labels (draft: required answers may still be missing); the revision."""
    _check(task, user, "labeling", version, now)
    annotation, project = _validated(db, task, body, complete=False)
    conn = db.connection()
    row = taskrows.add_annotation(conn, task=task, author_id=user.id, kind="label",
                                  schema_version=project.schema_version, annotation=annotation, now=now)
    task.version, task.updated_at = task.version + 1, now
    write_task(conn, task, version)
    record(db, AuditAction.ANNOTATION_SAVE, actor=user, object_type="task", object_id=task.id,
           details={"project_id": task.project_id, "revision": row.revision, "shapes": len(row.shapes),
                    "version": task.version}, context=context, now=now)
    return row


def submit_task(db: Session, task: TaskRow, user: User, version: Any, *, now: datetime,
                context: AuditContext = CONSOLE) -> TaskRow:
    """The labeler hands in: the latest revision must be complete; then review, or a sampled skip."""
    _check(task, user, "labeling", version, now)
    latest = latest_annotation(db, task.id)
    if latest is None:
        raise Invalid("Save the labels before submitting.", errors=[{"field": "annotation", "message": "none saved"}])
    annotation, project = _validated(db, task, {"shapes": latest.shapes, "classifications": latest.classifications},
                                     complete=True)
    if latest.kind == "import":
        # Drafts handed in as they are become the labeler's own revision: what is reviewed, scored,
        # compared across consensus copies and exported is always someone's labels.
        latest = taskrows.add_annotation(db.connection(), task=task, author_id=user.id, kind="label",
                                         schema_version=project.schema_version, annotation=annotation, now=now)
        record(db, AuditAction.ANNOTATION_SAVE, actor=user, object_type="task", object_id=task.id,
               details={"project_id": task.project_id, "revision": latest.revision, "shapes": len(latest.shapes),
                        "version": task.version, "drafts_kept": True}, context=context, now=now)
    settings = project_settings(project)
    seconds = end_lease(db, task, user, "label", "submit", now)
    item = task.item or taskrows.item_size(db.connection(), task.item_id)
    matching.bump(db.connection(), user.id, matching.skills_of(item, None), now=now, label_seconds=seconds,
                  label_tasks=1)
    task.submitted_at, task.updated_at, task.version = now, now, task.version + 1
    details = {"project_id": task.project_id, "round": task.round, "revision": latest.revision}
    if task.purpose == "qualification":
        # A test question is scored at once and shown against the reference; no reviewer sees it.
        qualification.answer(db, task, user, latest, settings, now=now, context=context)
        write_task(db.connection(), task, version)
        _accepted(db, task, settings, latest, user, now, context)
        record(db, AuditAction.TASK_SUBMIT, actor=user, object_type="task", object_id=task.id,
               details={**details, "to": task.state}, context=context, now=now)
        return task
    if task.purpose == "gold":
        gold.score_task(db, task, latest, stage="submitted", settings=settings, now=now, actor=user,
                        context=context)
    rate = settings.review_rate
    task.review_sampled = rate >= 1.0 or secrets.randbelow(10**6) < rate * 10**6
    if task.review_sampled:
        task.state = "submitted"
    else:
        # Review rate below 100%: this one was not drawn for review, and the trail says so.
        task.state, task.accepted_at = "accepted", now
        taskrows.add_review(db.connection(), task_id=task.id, round=task.round, reviewer_id=None,
                            decision="auto_accept", comment=f"not sampled for review (review rate {rate:.0%})",
                            annotation_revision=latest.revision, created_at=now)
        details["auto_accepted"] = f"review rate {rate}"
    consensus.after_submit(db, task, project, settings)
    write_task(db.connection(), task, version)
    if task.state == "accepted":
        _accepted(db, task, settings, latest, user, now, context)
    record(db, AuditAction.TASK_SUBMIT, actor=user, object_type="task", object_id=task.id,
           details={**details, "to": task.state}, context=context, now=now)
    return task


def review_task(db: Session, task: TaskRow, user: User, decision: Any, version: Any, *, comment: Any = "",
                shape_id: Any = None, body: Any = None, now: datetime, context: AuditContext = CONSOLE,
                rng=None) -> TaskRow:
    """Accept, reject (comment required; back to the labeler) or correct-and-accept.

    A spot check (a second, blind review of accepted work) ends with any decision: the task it checks
    stays accepted. An acceptance may draw the task for a spot check (`rng` for simulations)."""
    _check(task, user, "reviewing", version, now)
    if task.labeler_id == user.id:
        raise Forbidden("Nobody reviews their own labels.")
    if decision not in DECISIONS:
        raise Invalid("Unknown decision.", errors=[{"field": "decision", "message": " or ".join(DECISIONS)}])
    comment = _comment(comment, required=decision == "reject")
    if shape_id is not None and (not isinstance(shape_id, str) or len(shape_id) > 64):
        raise Invalid("shape_id is a shape's id.", errors=[{"field": "shape_id", "message": "a string of <= 64"}])
    latest = latest_annotation(db, task.id)
    revision = latest.revision if latest else None
    project = None
    if decision == "correct":
        corrected, project = _validated(db, task, body, complete=True)
        revision = taskrows.add_annotation(db.connection(), task=task, author_id=user.id, kind="correction",
                                           schema_version=project.schema_version, annotation=corrected,
                                           now=now).revision
    seen = matching.classes_in(latest.shapes if latest else [])
    taskrows.add_review(db.connection(), task_id=task.id, round=task.round, reviewer_id=user.id, decision=decision,
                        comment=comment, shape_id=shape_id, annotation_revision=revision, classes=seen,
                        created_at=now)
    before_round = task.round
    settings = project_settings(project or task.project or taskrows.load_project(db.connection(), task.project_id))
    end_lease(db, task, user, "review", decision, now)
    if task.round == 0 and task.purpose in ("work", "gold") and latest is not None:
        # The labeler's history: a first-round verdict in the item's modality and each class they drew.
        item = task.item or taskrows.item_size(db.connection(), task.item_id)
        matching.bump(db.connection(), task.labeler_id, matching.skills_of(item, {"shapes": latest.shapes}), now=now,
                      reviewed=1, passed=int(decision == "accept"))
    if decision == "reject" and task.purpose != "spot_check":
        task.round += 1
        task.state = "escalated" if task.round >= settings.max_rounds else "rework"
    else:
        task.state, task.accepted_at = "accepted", now
    task.updated_at, task.version = now, task.version + 1
    write_task(db.connection(), task, version)
    if task.state == "accepted":
        final = latest_annotation(db, task.id)
        _accepted(db, task, settings, final, user, now, context)
        spotcheck.maybe_spot_check(db, task, final, settings, reviewer=user, now=now, context=context, rng=rng)
    record(db, AuditAction.TASK_REVIEW, actor=user, object_type="task", object_id=task.id,
           details={"project_id": task.project_id, "decision": decision, "round": before_round, "to": task.state,
                    "labeler_id": task.labeler_id, "revision": revision, "pinned": shape_id is not None},
           context=context, now=now)
    return task


def _accepted(db: Session, task: TaskRow, settings, annotation, user: User, now: datetime,
              context: AuditContext) -> None:
    """What acceptance sets off: the accepted labels of a gold check scored (the accuracy of accepted
    work is estimated from these), and the pay ledger's entries."""
    if task.purpose == "gold":
        gold.score_task(db, task, annotation, stage="accepted", settings=settings, now=now, actor=user,
                        context=context)
    ledger.pay_for_acceptance(db, task, settings, now=now, actor=user, context=context)
    if task.purpose == "work":
        project = task.project or taskrows.load_project(db.connection(), task.project_id)
        promotion.after_acceptance(db, project, task.labeler_id, now=now, actor=user, context=context)


def _comment(comment: Any, *, required: bool) -> str:
    if comment is None:
        comment = ""
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise Invalid("comment is text.", errors=[{"field": "comment", "message": f"up to {MAX_COMMENT} characters"}])
    if required and not comment.strip():
        raise Invalid("A rejection needs a comment for the labeler.",
                      errors=[{"field": "comment", "message": "required when rejecting"}])
    return comment.strip()


def reassign_task(db: Session, task: TaskRow, manager: User, labeler: User, version: Any, *, now: datetime,
                  context: AuditContext = CONSOLE) -> TaskRow:
    """A manager sends an escalated task back to rework by a labeler of their choice."""
    require_role(db, task.project_id, manager, "manager")
    if task.state != "escalated":
        raise IllegalTransition(f"Only escalated tasks are reassigned; this one is {task.state}.",
                                state=task.state, version=task.version)
    if version != task.version:
        raise StaleVersion("The task changed; reload it.", state=task.state, version=task.version)
    if "labeler" not in project_roles(db, task.project_id, labeler):
        raise Invalid("The new labeler must be a labeler of this project.",
                      errors=[{"field": "labeler", "message": "not a labeler here"}])
    before = task.labeler_id
    task.state, task.labeler_id = "rework", labeler.id
    task.updated_at, task.version = now, task.version + 1
    write_task(db.connection(), task, version)
    record(db, AuditAction.TASK_REASSIGN, actor=manager, object_type="task", object_id=task.id,
           details={"project_id": task.project_id, "from_labeler": before, "to_labeler": labeler.id},
           context=context, now=now)
    return task
