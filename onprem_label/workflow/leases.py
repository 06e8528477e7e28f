"""Leases: handing out the next task to exactly one person, renewing and giving it back.

Exactly one holder per task under any concurrency: on PostgreSQL the candidate row is taken
with SELECT ... FOR UPDATE SKIP LOCKED (two serve processes skip each other's rows); on SQLite
every write transaction is BEGIN IMMEDIATE (db/engine.py), so the select-then-update below runs
alone. An expired lease counts as none: the task is back in its queue, and the old holder's
late save or submit finds no lease (409).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, case, exists, func, insert, or_, select, text
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import User
from onprem_label.db.quality import WorkLog
from onprem_label.workflow import gold, matching, qualification, taskrows
from onprem_label.workflow.errors import IllegalTransition, LeaseLost
from onprem_label.workflow.members import require_role
from onprem_label.workflow.settings import project_settings
from onprem_label.workflow.taskrows import TASKS as T, TaskRow, first_of, queue_query, write_task

HEARTBEAT_CAP = timedelta(minutes=2)  # longer gaps are idle time, not work
_LOG_WORK = insert(WorkLog.__table__)


@dataclass(frozen=True)
class Lease:
    """A task handed out: what kind of work it is for the caller."""

    task: TaskRow
    kind: str  # "label" | "rework" | "review"


def holds_lease(task: TaskRow, user: User, now: datetime) -> bool:
    """True while `user` holds a live lease on `task`."""
    return task.lease_owner_id == user.id and task.lease_expires_at is not None and task.lease_expires_at > now


_P, _U, _NOW = bindparam("project_id"), bindparam("user_id"), bindparam("now")
# A key of our own in the database-wide advisory-lock space (another application's two-int keys
# cannot collide with it except by a hash accident, which costs a short wait and nothing else).
_ONE_ASKER = text("SELECT pg_advisory_xact_lock(hashtextextended("
                  "'onprem-label lease ' || :project_id || ' ' || :user_id, 0))")
# The task the caller holds: locked and waited for, never skipped (SKIP LOCKED would pass over it
# while one of the caller's own saves holds its row, and hand them a second task).
HELD = {state: select(T).where(T.c.project_id == _P, T.c.lease_owner_id == _U, T.c.state == state,
                               T.c.lease_expires_at > _NOW).order_by(T.c.id).limit(1).with_for_update()
        for state in ("labeling", "reviewing")}
# One condition per query (no OR on the labeler's side): each is answered from an index, so the
# cost does not grow with the project (an OR made SQLite scan the project's tasks and sort them).
_MINE = (T.c.project_id == _P, T.c.labeler_id == _U)
_WORK = T.c.purpose == "work"
_NOT_WORK = T.c.purpose != "work"
MY_QUEUES = {
    "rework": queue_query(*_MINE, T.c.state == "rework", order_by=[T.c.updated_at, T.c.id]),
    # my own rework (or gold check, or test question) whose lease lapsed while I held it
    "lapsed mine": queue_query(*_MINE, T.c.state == "labeling", or_(T.c.round > 0, _NOT_WORK),
                               T.c.lease_expires_at <= _NOW, order_by=[T.c.updated_at, T.c.id]),
    # my gold checks and test questions not begun, or given back
    "mine new": queue_query(*_MINE, T.c.state == "new", _NOT_WORK, order_by=[T.c.id]),
}
_OTHER = taskrows.OTHER_TASK


def _shared(*extra) -> dict:
    # the first lap of the queue: new tasks by id, then first-round tasks whose holder vanished
    return {"new": queue_query(T.c.project_id == _P, T.c.state == "new", _WORK, *extra, order_by=[T.c.id]),
            "lapsed new": queue_query(T.c.project_id == _P, T.c.state == "labeling", T.c.round == 0, _WORK,
                                      T.c.lease_expires_at <= _NOW, *extra,
                                      order_by=[T.c.lease_expires_at, T.c.id])}


# Consensus: nobody labels two copies of one item.
SHARED_QUEUES, CONSENSUS_QUEUES = _shared(), _shared(taskrows.NOT_MY_ITEM)
LABEL_QUEUES = {**MY_QUEUES, **SHARED_QUEUES}
OWN_WORK = {name: MY_QUEUES[name] for name in ("rework", "lapsed mine")}
TEST_QUEUES = {name: queue_query(*_MINE, T.c.state == state, T.c.purpose == "qualification", *extra, order_by=[T.c.id])
               for name, state, extra in (("test", "new", ()), ("lapsed test", "labeling", (T.c.lease_expires_at <= _NOW,)))}
# A spot check goes to a second reviewer: never to the one who accepted the task it checks.
_NOT_MY_ACCEPTANCE = or_(T.c.origin_task_id.is_(None),
                         ~exists().where(_OTHER.c.id == T.c.origin_task_id, _OTHER.c.reviewer_id == _U))
_NOT_MINE = and_(or_(T.c.labeler_id.is_(None), T.c.labeler_id != _U), _NOT_MY_ACCEPTANCE)


def _review(first: list) -> dict:
    return {"submitted": queue_query(T.c.project_id == _P, T.c.state == "submitted", _NOT_MINE,
                                     order_by=[*first, T.c.submitted_at, T.c.id]),
            "lapsed review": queue_query(T.c.project_id == _P, T.c.state == "reviewing",
                                         T.c.lease_expires_at <= _NOW, _NOT_MINE,
                                         order_by=[T.c.lease_expires_at, T.c.id])}


REVIEW_QUEUES = _review([])
# Consensus: the items whose copies agree least are reviewed first (copies not all in yet, last);
# gold and spot checks, which have no agreement, take the middle (0.5) rather than waiting for ever.
_WAITING_FOR_COPIES = and_(T.c.purpose == "work", T.c.agreement.is_(None))
CONSENSUS_REVIEW_QUEUES = _review([case((_WAITING_FOR_COPIES, 1), else_=0),
                                   func.coalesce(T.c.agreement, 0.5)])


def lease_next_task(db: Session, project, user: User, *, review: bool, now: datetime,
                    context: AuditContext = CONSOLE, rng: random.Random | None = None) -> Lease | None:
    """The caller's next task, leased to them; None when there is no work.

    Labelers get their own rework first (oldest first), then new work; reviewers ask for review
    work separately and never get a task they labeled. A caller who already holds a live lease
    of that kind in the project gets the same task again (a reload must not grab a second one).
    A project with a qualification test hands a labeler who has not passed it their test questions
    only (403 without a test under way); a share of new work (hidden_gold_rate) is a hidden gold
    check, handed out by the same path and shown the same way. `project` is a row or object with
    id and settings; `rng` is for simulations (the system's randomness otherwise).
    """
    require_role(db, project.id, user, "reviewer" if review else "labeler")
    conn, params = db.connection(), {"project_id": project.id, "user_id": user.id, "now": now}
    if conn.dialect.name == "postgresql":
        # One caller asking twice at once (two tabs, a double click) must not get two tasks: their
        # requests queue here until the first has committed its lease (SQLite writers queue anyway).
        conn.execute(_ONE_ASKER, {"project_id": project.id, "user_id": user.id})
    held = first_of(conn, HELD["reviewing" if review else "labeling"], **params)
    if held is not None:
        record(db, AuditAction.TASK_VIEW, actor=user, object_type="task", object_id=held.id,
               details={"project_id": held.project_id, "item_id": held.item_id, "held": True},
               context=context, now=now)
        return Lease(held, _kind(held, review))
    settings = project_settings(project)
    consensus = settings.consensus_k > 1
    if review:
        return _first_granted(db, conn, CONSENSUS_REVIEW_QUEUES if consensus else REVIEW_QUEUES, params, user, True,
                              settings, now, context)
    if not qualification.may_work(db, project.id, user.id, settings):
        # Work already theirs (rework from before the test was asked for) goes on; new work waits.
        return _first_granted(db, conn, OWN_WORK, params, user, False, settings, now, context) or \
            _first_granted(db, conn, TEST_QUEUES, params, user, False, settings, now, context) or \
            qualification.refuse(db, project.id, user.id, settings, now)
    lease = _first_granted(db, conn, MY_QUEUES, params, user, False, settings, now, context)
    if lease is None and (item_id := gold.draw_hidden_gold(conn, project.id, user.id, settings.hidden_gold_rate, rng)):
        task = gold.new_gold_task(conn, project_id=project.id, item_id=item_id, user_id=user.id, purpose="gold", now=now)
        lease = _grant(db, task, user, False, settings.lease_minutes, now, context)
    if lease is None and (task := matching.preferred_new_task(conn, project.id, user.id, settings.match_window,
                                                              consensus=consensus)):
        lease = _grant(db, task, user, False, settings.lease_minutes, now, context)
    return lease or _first_granted(db, conn, CONSENSUS_QUEUES if consensus else SHARED_QUEUES, params, user, False,
                                   settings, now, context)


def _first_granted(db: Session, conn, queues: dict, params: dict, user: User, review: bool, settings, now: datetime,
                   context: AuditContext) -> Lease | None:
    """The first task any of the queues finds, leased to the caller."""
    for query in queues.values():
        task = first_of(conn, query, **params)
        if task is not None:
            return _grant(db, task, user, review, settings.lease_minutes, now, context)
    return None


def _grant(db: Session, task: TaskRow, user: User, review: bool, minutes: int, now: datetime,
           context: AuditContext) -> Lease:
    if task.lease_owner_id is not None and task.lease_owner_id != user.id:
        record(db, AuditAction.TASK_LEASE_EXPIRED, object_type="task", object_id=task.id,
               details={"previous_holder": task.lease_owner_id, "expired_at": str(task.lease_expires_at)},
               context=context, now=now)
    if task.lease_owner_id is not None and task.lease_seconds:
        # The lapsed lease's heartbeats were work too: its holder's line of the work log.
        db.connection().execute(_LOG_WORK, {
            "project_id": task.project_id, "task_id": task.id, "user_id": task.lease_owner_id,
            "kind": "review" if task.state == "reviewing" else "label", "outcome": "expired",
            "seconds": task.lease_seconds, "ended_at": now})
    before, version = task.state, task.version
    task.state = "reviewing" if review else "labeling"
    if review:
        task.reviewer_id = user.id
    elif task.round == 0:
        task.labeler_id = user.id  # the first lap: whoever labels it owns its rework later
    task.lease_owner_id, task.lease_expires_at = user.id, now + timedelta(minutes=minutes)
    task.last_heartbeat_at, task.updated_at, task.version, task.lease_seconds = now, now, version + 1, 0
    write_task(db.connection(), task, version)
    lease = Lease(task, _kind(task, review))
    record(db, AuditAction.TASK_LEASE, actor=user, object_type="task", object_id=task.id,
           details={"project_id": task.project_id, "item_id": task.item_id, "kind": lease.kind, "from": before,
                    "round": task.round,
                    "expires_at": task.lease_expires_at.isoformat()}, context=context, now=now)
    return lease


def _kind(task: TaskRow, review: bool) -> str:
    # A hidden gold check is "label" or "rework" like any other task; only a test says what it is.
    if task.purpose == "qualification":
        return "qualification"
    return "review" if review else ("rework" if task.round > 0 else "label")


def renew_lease(db: Session, task: TaskRow, user: User, *, now: datetime,
                context: AuditContext = CONSOLE) -> TaskRow:
    """Heartbeat: extend the caller's live lease and count the time since the last beat as work (audited)."""
    if not holds_lease(task, user, now):
        raise LeaseLost("You no longer hold this task.", state=task.state, version=task.version)
    project = task.project or taskrows.load_project(db.connection(), task.project_id)
    count_active_time(task, now)
    task.lease_expires_at = now + timedelta(minutes=project_settings(project).lease_minutes)
    write_task(db.connection(), task, task.version)  # the version stays: a heartbeat changes no work
    record(db, AuditAction.TASK_HEARTBEAT, actor=user, object_type="task", object_id=task.id,
           details={"project_id": task.project_id, "expires_at": task.lease_expires_at.isoformat(),
                    "active_seconds": task.active_seconds}, context=context, now=now)
    return task


def count_active_time(task: TaskRow, now: datetime) -> None:
    """Add the time since the last heartbeat (capped: a longer gap is idle) to the task and its lease."""
    if task.last_heartbeat_at is not None:
        seconds = int(min(max(now - task.last_heartbeat_at, timedelta(0)), HEARTBEAT_CAP).total_seconds())
        task.active_seconds += seconds
        task.lease_seconds += seconds
    task.last_heartbeat_at = now


def end_lease(db: Session, task: TaskRow, user: User, kind: str, outcome: str, now: datetime) -> int:
    """Close the caller's lease: its active time becomes one line of the work log; those seconds."""
    count_active_time(task, now)
    db.connection().execute(_LOG_WORK, {"project_id": task.project_id, "task_id": task.id, "user_id": user.id,
                                        "kind": kind, "outcome": outcome, "seconds": task.lease_seconds,
                                        "ended_at": now})
    task.lease_owner_id = task.lease_expires_at = None
    seconds, task.lease_seconds = task.lease_seconds, 0
    return seconds


def release_lease(db: Session, task: TaskRow, user: User, *, now: datetime,
                  context: AuditContext = CONSOLE) -> TaskRow:
    """Give the task back: a first-round task returns to the queue, rework stays the labeler's."""
    if not holds_lease(task, user, now):
        raise LeaseLost("You no longer hold this task.", state=task.state, version=task.version)
    before, version = task.state, task.version
    if task.state == "labeling":
        end_lease(db, task, user, "label", "release", now)
        task.state = "new" if task.round == 0 else "rework"
        if task.round == 0 and task.purpose == "work":
            task.labeler_id = None  # gold checks and test questions stay their person's
    elif task.state == "reviewing":
        end_lease(db, task, user, "review", "release", now)
        task.state, task.reviewer_id = "submitted", None
    else:
        raise IllegalTransition(f"A {task.state} task cannot be released.", state=task.state, version=task.version)
    task.updated_at, task.version = now, version + 1
    write_task(db.connection(), task, version)
    record(db, AuditAction.TASK_RELEASE, actor=user, object_type="task", object_id=task.id,
           details={"project_id": task.project_id, "from": before, "to": task.state}, context=context, now=now)
    return task
