"""Task, annotation and review rows read and written with prebuilt statements: the label loop's hot path.

Every request of the label loop (lease, save, submit, review) goes through here. The
statements are built once, with bound parameters, so a request pays for executing a handful of
SQL statements and not for building and caching them again (SQLAlchemy's ORM and fresh Core
statements cost several times more than the SQL itself; bench/RESULTS.md, issue 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, and_, bindparam, exists, func, insert, select, update

from onprem_label.db.models import Annotation, Item, ItemImage, Project, ProjectMember, Review, Task, User
from onprem_label.workflow.errors import StaleVersion

TASKS, ANNOTATIONS, REVIEWS = Task.__table__, Annotation.__table__, Review.__table__
ITEMS, IMAGES, PROJECTS, MEMBERS = Item.__table__, ItemImage.__table__, Project.__table__, ProjectMember.__table__
USERS = User.__table__


@dataclass
class TaskRow:
    """A task as read from its row; the state machine changes it, write_task stores the change."""

    id: int
    project_id: int
    item_id: int
    state: str
    round: int
    version: int
    labeler_id: int | None
    reviewer_id: int | None
    lease_owner_id: int | None
    lease_expires_at: datetime | None
    review_sampled: bool | None
    active_seconds: int
    last_heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None
    accepted_at: datetime | None
    purpose: str
    slot: int
    agreement: float | None
    lease_seconds: int
    origin_task_id: int | None
    # Read along with the task by load_task (not columns of its row): the project's schema and
    # settings, and the item's size, which every step of the loop checks against.
    project: Any = field(default=None, compare=False, repr=False)
    item: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, row) -> TaskRow:
        """From a result row of TASKS."""
        return cls(*(row._mapping[name] for name in _FIELDS))


_FIELDS = [f.name for f in fields(TaskRow) if f.name not in ("project", "item")]
# What a transition may change; written all at once by one prebuilt UPDATE.
_MUTABLE = [name for name in _FIELDS
            if name not in ("id", "project_id", "item_id", "created_at", "purpose", "slot", "origin_task_id")]

_PROJECT_COLUMNS = (PROJECTS.c.label_schema, PROJECTS.c.schema_version, PROJECTS.c.settings)
_ITEM_COLUMNS = (ITEMS.c.width, ITEMS.c.height, ITEMS.c.frames, ITEMS.c.modality, ITEMS.c.kind)
# One statement for the task, its project's schema and settings and its item's size. FOR UPDATE
# OF tasks: only the task row is locked (PostgreSQL), never the project every request reads.
_TASK_BY_ID = (select(TASKS, *_PROJECT_COLUMNS, *_ITEM_COLUMNS)
               .join(PROJECTS, PROJECTS.c.id == TASKS.c.project_id).join(ITEMS, ITEMS.c.id == TASKS.c.item_id)
               .where(TASKS.c.id == bindparam("task_id")))
_TASK_BY_ID_LOCKED = _TASK_BY_ID.with_for_update(of=TASKS)
_STATE_BY_ID = select(TASKS.c.state, TASKS.c.version).where(TASKS.c.id == bindparam("task_id"))
_WRITE_TASK = (update(TASKS).where(TASKS.c.id == bindparam("task_id"), TASKS.c.version == bindparam("expected"))
               .values({name: bindparam(f"new_{name}") for name in _MUTABLE}))


def load_task(conn: Connection, task_id: int, *, lock: bool = False) -> TaskRow | None:
    """The task, row-locked for the transaction when `lock` (PostgreSQL; SQLite writers are serial)."""
    row = conn.execute(_TASK_BY_ID_LOCKED if lock else _TASK_BY_ID, {"task_id": task_id}).first()
    if row is None:
        return None
    task, values = TaskRow.of(row), row._mapping
    task.project = SimpleNamespace(id=task.project_id, **{c.name: values[c] for c in _PROJECT_COLUMNS})
    task.item = SimpleNamespace(id=task.item_id, **{c.name: values[c] for c in _ITEM_COLUMNS})
    return task


def write_task(conn: Connection, task: TaskRow, expected_version: int) -> None:
    """Store the task's fields if its row is still at `expected_version`, else StaleVersion.

    Callers hold the row (FOR UPDATE on PostgreSQL; SQLite has one writer at a time), so the
    version check never fires in normal work: it is the last guard against a lost update.
    """
    params = {f"new_{name}": getattr(task, name) for name in _MUTABLE}
    result = conn.execute(_WRITE_TASK, {"task_id": task.id, "expected": expected_version, **params})
    if result.rowcount != 1:
        now_state, now_version = conn.execute(_STATE_BY_ID, {"task_id": task.id}).one()
        raise StaleVersion("The task changed meanwhile; reload it.", state=now_state, version=now_version)


OTHER_TASK = TASKS.alias("other")
# Consensus: no task on an item the caller already has a copy of (`user_id` bound by the caller).
NOT_MY_ITEM = ~exists().where(OTHER_TASK.c.item_id == TASKS.c.item_id, OTHER_TASK.c.labeler_id == bindparam("user_id"))


def queue_query(*conditions, order_by) -> Any:
    """A prebuilt 'first task of this queue' query (FOR UPDATE SKIP LOCKED on PostgreSQL)."""
    return select(TASKS).where(*conditions).order_by(*order_by).limit(1).with_for_update(skip_locked=True)


def first_of(conn: Connection, query, **params) -> TaskRow | None:
    """The first task a queue query finds."""
    row = conn.execute(query, params).first()
    return TaskRow.of(row) if row is not None else None


# --- projects, members, items ---------------------------------------------------------------------

_PROJECT = select(PROJECTS.c.id, PROJECTS.c.label_schema, PROJECTS.c.schema_version, PROJECTS.c.settings) \
    .where(PROJECTS.c.id == bindparam("project_id"))
_ROLES = select(MEMBERS.c.role).where(MEMBERS.c.project_id == bindparam("project_id"),
                                      MEMBERS.c.user_id == bindparam("user_id"))
_PROJECT_AND_ROLES = (select(PROJECTS.c.id, *_PROJECT_COLUMNS, MEMBERS.c.role)
                      .outerjoin(MEMBERS, and_(MEMBERS.c.project_id == PROJECTS.c.id,
                                               MEMBERS.c.user_id == bindparam("user_id")))
                      .where(PROJECTS.c.id == bindparam("project_id")))
_ITEM = select(ITEMS).where(ITEMS.c.id == bindparam("item_id"))
_ITEM_SIZE = select(*_ITEM_COLUMNS).where(ITEMS.c.id == bindparam("item_id"))
_IMAGES = select(IMAGES).where(IMAGES.c.item_id == bindparam("item_id")).order_by(IMAGES.c.position)


def load_project(conn: Connection, project_id: int):
    """The project's id, label_schema, schema_version and settings (a row), or None."""
    return conn.execute(_PROJECT, {"project_id": project_id}).first()


def project_and_roles(conn: Connection, project_id: int, user_id: int):
    """(the project row or None, the roles the user was given in it) in one statement."""
    rows = conn.execute(_PROJECT_AND_ROLES, {"project_id": project_id, "user_id": user_id}).all()
    if not rows:
        return None, set()
    return rows[0], {row.role for row in rows if row.role is not None}


def member_roles(conn: Connection, project_id: int, user_id: int) -> set[str]:
    """The roles the user was given in the project (global roles not included)."""
    return set(conn.execute(_ROLES, {"project_id": project_id, "user_id": user_id}).scalars())


def item_size(conn: Connection, item_id: int):
    """The item's width, height, frames, modality and kind (a row)."""
    return conn.execute(_ITEM_SIZE, {"item_id": item_id}).first()


def load_item(conn: Connection, item_id: int):
    """(item row, its image rows in position order)."""
    item = conn.execute(_ITEM, {"item_id": item_id}).first()
    return item, conn.execute(_IMAGES, {"item_id": item_id}).all()


# --- annotations and reviews -------------------------------------------------------------------------

_LATEST = select(ANNOTATIONS).where(ANNOTATIONS.c.task_id == bindparam("task_id")) \
    .order_by(ANNOTATIONS.c.revision.desc()).limit(1)
_MAX_REVISION = select(func.max(ANNOTATIONS.c.revision)).where(ANNOTATIONS.c.task_id == bindparam("task_id"))
_REVIEWS = (select(REVIEWS, func.coalesce(func.nullif(USERS.c.display_name, ""), USERS.c.username).label("reviewer_name"))
            .outerjoin(USERS, USERS.c.id == REVIEWS.c.reviewer_id)
            .where(REVIEWS.c.task_id == bindparam("task_id")).order_by(REVIEWS.c.id))
_REVISIONS = (select(ANNOTATIONS).where(ANNOTATIONS.c.task_id == bindparam("task_id"))
              .order_by(ANNOTATIONS.c.revision.desc()).limit(bindparam("limit")))
_REVISION = select(ANNOTATIONS).where(ANNOTATIONS.c.task_id == bindparam("task_id"),
                                      ANNOTATIONS.c.revision == bindparam("revision"))
_ADD_ANNOTATION = insert(ANNOTATIONS)
_ADD_REVIEW = insert(REVIEWS)


def latest_annotation(conn: Connection, task_id: int):
    """The task's newest revision (a row), or None."""
    return conn.execute(_LATEST, {"task_id": task_id}).first()


def reviews_of(conn: Connection, task_id: int) -> list:
    """Every review decision on the task, oldest first (rows, with the reviewer's name)."""
    return conn.execute(_REVIEWS, {"task_id": task_id}).all()


def revisions_of(conn: Connection, task_id: int, *, limit: int, revision: int | None = None) -> list:
    """The task's revisions, newest first (at most `limit`), or just revision `revision`."""
    if revision is not None:
        return conn.execute(_REVISION, {"task_id": task_id, "revision": revision}).all()
    return conn.execute(_REVISIONS, {"task_id": task_id, "limit": limit}).all()


def add_annotation(conn: Connection, *, task: TaskRow, author_id: int | None, kind: str, schema_version: int,
                   annotation: dict, now: datetime, source: str | None = None) -> SimpleNamespace:
    """A new revision (the next number) of the task's labels; the row's values as attributes."""
    revision = (conn.execute(_MAX_REVISION, {"task_id": task.id}).scalar() or 0) + 1
    values = {"task_id": task.id, "revision": revision, "round": task.round, "kind": kind, "author_id": author_id,
              "source": source, "schema_version": schema_version, "shapes": annotation.get("shapes", []),
              "classifications": annotation.get("classifications", {}), "created_at": now}
    conn.execute(_ADD_ANNOTATION, values)
    return SimpleNamespace(**values)


def add_review(conn: Connection, **values) -> None:
    """A review decision (task_id, round, reviewer_id, decision, comment, shape_id, annotation_revision,
    created_at)."""
    conn.execute(_ADD_REVIEW, {"shape_id": None, "classes": None, **values})
