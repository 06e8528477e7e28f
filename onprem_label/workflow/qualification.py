"""Qualification tests: N gold items a labeler answers, with feedback, before the project gives them live work."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import User
from onprem_label.db.quality import GoldCheck, GoldItem, QualificationAttempt
from onprem_label.workflow import gold
from onprem_label.workflow.errors import Conflict, QualificationRequired
from onprem_label.workflow.members import require_role
from onprem_label.workflow.settings import ProjectSettings, project_settings
from onprem_label.workflow.taskrows import TaskRow

ATTEMPTS = QualificationAttempt.__table__
_PASSED = (select(ATTEMPTS.c.id).where(ATTEMPTS.c.project_id == bindparam("project_id"),
                                       ATTEMPTS.c.user_id == bindparam("user_id"), ATTEMPTS.c.passed.is_(True))
           .limit(1))


def may_work(db: Session, project_id: int, user_id: int, settings: ProjectSettings) -> bool:
    """True when the project has no test, or the person has passed it."""
    if settings.qualification_items == 0:
        return True
    return db.connection().execute(_PASSED, {"project_id": project_id, "user_id": user_id}).first() is not None


def _attempts(db: Session, project_id: int, user_id: int) -> list[QualificationAttempt]:
    return list(db.scalars(select(QualificationAttempt).where(QualificationAttempt.project_id == project_id,
                                                              QualificationAttempt.user_id == user_id)
                           .order_by(QualificationAttempt.id)))


def status(db: Session, project_id: int, user_id: int, settings: ProjectSettings, now: datetime) -> dict:
    """Where the person stands: required, passed, the test under way, retakes left and when the next may start."""
    attempts = _attempts(db, project_id, user_id)
    finished = [a for a in attempts if a.passed is not None and a.counted]
    open_ = next((a for a in attempts if a.passed is None), None)
    retakes_left = max(0, settings.qualification_retakes + 1 - len(finished))
    next_at = None
    if finished and not finished[-1].passed:
        next_at = finished[-1].finished_at + timedelta(hours=settings.qualification_cooldown_hours)
    return {"required": settings.qualification_items > 0, "items": settings.qualification_items,
            "pass_mark": settings.qualification_pass, "passed": any(a.passed for a in attempts),
            "attempts": [_attempt_json(a) for a in attempts],
            "under_way": _attempt_json(open_) if open_ else None,
            "attempts_left": retakes_left,
            "next_attempt_at": next_at.isoformat() if next_at and next_at > now else None}


def _attempt_json(a: QualificationAttempt) -> dict:
    return {"id": a.id, "questions": len(a.item_ids), "answered": a.answered, "correct": a.correct, "score": a.score,
            "passed": a.passed, "pass_mark": a.pass_mark, "started_at": a.started_at.isoformat(),
            "finished_at": a.finished_at.isoformat() if a.finished_at else None}


def refuse(db: Session, project_id: int, user_id: int, settings: ProjectSettings, now: datetime):
    """Raise the 403 that says why the person cannot have live work yet and what to do."""
    state = status(db, project_id, user_id, settings, now)
    if state["under_way"]:
        reason = "Finish your qualification test first."  # all its questions are answered or leased
    elif not state["attempts"]:
        reason = "This project asks for a qualification test before live work; start it first."
    elif state["attempts_left"] == 0:
        reason = "You did not pass the qualification test and have no retakes left; ask a manager."
    elif state["next_attempt_at"]:
        reason = f"You did not pass the qualification test; you may retake it from {state['next_attempt_at']}."
    else:
        reason = "You did not pass the qualification test; you may retake it now."
    raise QualificationRequired(reason, qualification=state)


def start_test(db: Session, project, user: User, *, now: datetime, context: AuditContext = CONSOLE,
               rng: random.Random | None = None) -> QualificationAttempt:
    """Begin a test of N gold items (items not met in earlier tests first); the one under way if any; audited."""
    require_role(db, project.id, user, "labeler")
    settings = project_settings(project)
    state = status(db, project.id, user.id, settings, now)
    if not state["required"]:
        raise Conflict("This project has no qualification test.", state="not_required")
    if state["under_way"]:
        return db.get(QualificationAttempt, state["under_way"]["id"])
    if state["passed"]:
        raise Conflict("You have passed this project's test already.", state="passed")
    if state["attempts_left"] == 0 or state["next_attempt_at"]:
        refuse(db, project.id, user.id, settings, now)
    pool = list(db.scalars(select(GoldItem.item_id).where(GoldItem.project_id == project.id, GoldItem.active.is_(True),
                                                          GoldItem.use.in_(("qualification", "both")))
                           .order_by(GoldItem.item_id)))
    if len(pool) < settings.qualification_items:
        raise Conflict(f"The test needs {settings.qualification_items} gold items for tests; the project has "
                       f"{len(pool)}. Ask a manager.", state="not_ready")
    seen = {i for a in _attempts(db, project.id, user.id) for i in a.item_ids}
    rng = rng or gold.SYSTEM_RANDOM
    fresh, old = [i for i in pool if i not in seen], [i for i in pool if i in seen]
    rng.shuffle(fresh)
    rng.shuffle(old)
    chosen = (fresh + old)[:settings.qualification_items]
    attempt = QualificationAttempt(project_id=project.id, user_id=user.id, item_ids=chosen,
                                   pass_mark=settings.qualification_pass, answered=0, correct=0, started_at=now)
    try:
        with db.begin_nested():  # a second request at the same moment: the index keeps one test
            db.add(attempt)
    except IntegrityError:
        return db.scalar(select(QualificationAttempt).where(
            QualificationAttempt.project_id == project.id, QualificationAttempt.user_id == user.id,
            QualificationAttempt.passed.is_(None)))
    conn = db.connection()
    for item_id in chosen:
        gold.new_gold_task(conn, project_id=project.id, item_id=item_id, user_id=user.id, purpose="qualification",
                           now=now)
    record(db, AuditAction.QUALIFICATION_START, actor=user, object_type="project", object_id=project.id,
           details={"attempt_id": attempt.id, "items": chosen, "pass_mark": attempt.pass_mark}, context=context, now=now)
    return attempt


def answer(db: Session, task: TaskRow, user: User, annotation, settings: ProjectSettings, *, now: datetime,
           context: AuditContext = CONSOLE) -> None:
    """Score one test question (the task is then done: tests are not reviewed); finish the test on the last."""
    result = gold.score_task(db, task, annotation, stage="submitted", settings=settings, now=now, actor=user,
                             context=context)
    task.state, task.accepted_at, task.review_sampled = "accepted", now, False
    attempt = db.scalar(select(QualificationAttempt).where(QualificationAttempt.project_id == task.project_id,
                                                           QualificationAttempt.user_id == user.id,
                                                           QualificationAttempt.passed.is_(None))
                        .order_by(QualificationAttempt.id).limit(1))
    if attempt is None or task.item_id not in attempt.item_ids:
        return  # a question of a test ended by other means; scored, counts nowhere
    attempt.answered += 1
    attempt.correct += int(result.correct)
    if attempt.answered >= len(attempt.item_ids):
        attempt.score = attempt.correct / len(attempt.item_ids)
        attempt.passed, attempt.finished_at = attempt.score >= attempt.pass_mark, now
        record(db, AuditAction.QUALIFICATION_FINISH, actor=user, object_type="project", object_id=task.project_id,
               details={"attempt_id": attempt.id, "score": round(attempt.score, 4), "passed": attempt.passed,
                        "correct": attempt.correct, "questions": len(attempt.item_ids)}, context=context, now=now)
    db.flush()


def grant_fresh_start(db: Session, project, manager: User, person: User, *, now: datetime,
                      context: AuditContext = CONSOLE) -> dict:
    """A manager lets someone who used up their retakes start again: failed attempts stop counting
    (they stay on record); audited. The person's new standing."""
    require_role(db, project.id, manager, "manager")
    settings = project_settings(project)
    if not settings.qualification_items:
        raise Conflict("This project has no qualification test.", state="not_required")
    cleared = 0
    for attempt in _attempts(db, project.id, person.id):
        if attempt.passed is False and attempt.counted:
            attempt.counted, cleared = False, cleared + 1
    db.flush()
    record(db, AuditAction.QUALIFICATION_FRESH_START, actor=manager, object_type="user", object_id=person.id,
           details={"project_id": project.id, "attempts_cleared": cleared}, context=context, now=now)
    return status(db, project.id, person.id, settings, now)


def feedback(db: Session, task: TaskRow) -> dict:
    """What a test question teaches: the person's answer scored against the reference, shown side by side."""
    check = db.scalar(select(GoldCheck).where(GoldCheck.task_id == task.id).order_by(GoldCheck.id.desc()).limit(1))
    attempt = db.scalar(select(QualificationAttempt).where(QualificationAttempt.project_id == task.project_id,
                                                           QualificationAttempt.user_id == task.labeler_id)
                        .order_by(QualificationAttempt.id.desc()).limit(1))
    return {"score": check.score, "correct": check.correct, "detail": check.detail,
            "reference": gold.reference_of(db, task.item_id), "attempt": _attempt_json(attempt) if attempt else None}

