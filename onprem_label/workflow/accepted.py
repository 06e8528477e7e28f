"""The accepted work of a project: what every export reads (hidden gold checks and test questions never appear)."""

from __future__ import annotations

from typing import Iterator

from sqlalchemy import Connection, bindparam, func, select

from onprem_label.workflow.taskrows import ANNOTATIONS as A, TASKS as T

_LAST = (select(A.c.task_id, func.max(A.c.revision).label("revision")).group_by(A.c.task_id).subquery())
_ACCEPTED = (select(T.c.id, T.c.item_id, T.c.slot, T.c.labeler_id, T.c.accepted_at, A.c.revision, A.c.shapes,
                    A.c.classifications, A.c.schema_version)
             .join(_LAST, _LAST.c.task_id == T.c.id)
             .join(A, (A.c.task_id == T.c.id) & (A.c.revision == _LAST.c.revision))
             .where(T.c.project_id == bindparam("project_id"), T.c.state == "accepted", T.c.purpose == "work",
                    T.c.id > bindparam("after"))
             .order_by(T.c.id).limit(bindparam("limit")))


def accepted_work(conn: Connection, project_id: int, *, page: int = 1000) -> Iterator:
    """Every accepted work task with its final labels (rows: id, item_id, slot, labeler_id, accepted_at,
    revision, shapes, classifications, schema_version), by task id, read a page at a time."""
    after = 0
    while True:
        rows = conn.execute(_ACCEPTED, {"project_id": project_id, "after": after, "limit": page}).all()
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1].id
