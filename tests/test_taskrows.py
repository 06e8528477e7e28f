"""The label loop's prebuilt statements: a lost update is refused, and a locked task locks nothing else."""

from __future__ import annotations

import pytest
from sqlalchemy import text, update
from sqlalchemy.exc import OperationalError

from imaging_helpers import new_project
from onprem_label.db.models import Project, Task
from onprem_label.workflow import taskrows
from onprem_label.workflow.errors import StaleVersion
from workflow_helpers import SCHEMA, ingest_items


@pytest.fixture
def task_id(app, db, clock) -> int:
    """One new task in a project with a schema."""
    project_id = new_project(db)
    db.execute(update(taskrows.PROJECTS).where(taskrows.PROJECTS.c.id == project_id).values(label_schema=SCHEMA))
    db.commit()
    [item_id] = ingest_items(app, db, project_id, 1, clock)
    return db.scalar(Task.__table__.select().with_only_columns(Task.id).where(Task.item_id == item_id))


def test_load_task_reads_the_project_and_item_with_the_task(app, db, task_id):
    """One statement brings the task, its project's schema and settings, and its item's size."""
    task = taskrows.load_task(db.connection(), task_id)
    assert task.state == "new" and task.version == 1
    assert task.project.label_schema == SCHEMA and task.project.id == task.project_id
    assert (task.item.width, task.item.height, task.item.frames) == (16, 16, 1)  # workflow_helpers' items
    db.rollback()


def test_write_task_refuses_a_row_that_moved_on(app, db, task_id, clock):
    """A write based on an older version changes nothing and raises StaleVersion."""
    task = taskrows.load_task(db.connection(), task_id)
    db.rollback()
    db.execute(update(Task).where(Task.id == task_id).values(version=Task.version + 1))  # someone else
    db.commit()
    task.state, task.version = "labeling", 2
    with pytest.raises(StaleVersion):
        taskrows.write_task(db.connection(), task, 1)
    db.rollback()
    assert taskrows.load_task(db.connection(), task_id).state == "new"
    db.rollback()


@pytest.mark.postgres_only
@pytest.mark.parametrize("backend", ["postgresql"])  # row locks are PostgreSQL's; SQLite has one writer
def test_a_locked_task_does_not_lock_its_project(app, db, task_id, backend):
    """FOR UPDATE OF tasks: other requests can still lock the project and item rows, not the task."""
    engine = app.extensions["onprem_label"].engine
    task = taskrows.load_task(db.connection(), task_id, lock=True)
    try:
        with engine.connect() as other:
            other.execute(text("SET lock_timeout = '300ms'"))
            other.execute(text("SELECT id FROM projects WHERE id = :p FOR UPDATE"), {"p": task.project_id})
            other.execute(text("SELECT id FROM items WHERE id = :i FOR UPDATE"), {"i": task.item_id})
            with pytest.raises(OperationalError):
                other.execute(text("SELECT id FROM tasks WHERE id = :t FOR UPDATE"), {"t": task_id})
            other.rollback()
    finally:
        db.rollback()


@pytest.mark.postgres_only
@pytest.mark.parametrize("backend", ["postgresql"])  # SQLite serialises every writer already
def test_one_caller_asking_twice_at_once_gets_one_task(app, db, task_id, backend, clock):
    """Two lease requests of one labeler at the same moment: the second waits and gets the same task."""
    import threading

    from onprem_label.auth import accounts
    from onprem_label.workflow.leases import lease_next_task
    from onprem_label.workflow.members import add_member

    svc = app.extensions["onprem_label"]
    project_id = taskrows.load_task(db.connection(), task_id).project_id
    db.rollback()
    ingest_items(app, db, project_id, 1, clock)  # a second task the second request could take
    labeler = accounts.create_user(db, "twice", "a passphrase long enough", ["labeler"],
                                   must_change_password=False, now=clock())
    project = taskrows.load_project(db.connection(), project_id)
    add_member(db, db.get(Project, project_id), "twice", "labeler", actor=None, now=clock())
    db.commit()
    first_db, second_db = svc.sessionmaker(), svc.sessionmaker()
    first = lease_next_task(first_db, project, labeler, review=False, now=clock())  # not committed yet
    got = {}

    def second_request():
        got["lease"] = lease_next_task(second_db, project, labeler, review=False, now=clock())
        got["at_commit_of_first"] = committed.is_set()
        second_db.commit()

    committed = threading.Event()
    thread = threading.Thread(target=second_request)
    thread.start()
    thread.join(timeout=1.0)
    assert thread.is_alive()  # waiting for the first request's lease to be committed
    committed.set()
    first_db.commit()
    thread.join(timeout=10)
    assert got["at_commit_of_first"] and got["lease"].task.id == first.task.id
    first_db.close()
    second_db.close()


@pytest.mark.postgres_only
@pytest.mark.parametrize("backend", ["postgresql"])  # row locks are PostgreSQL's
def test_a_held_task_whose_row_is_busy_is_waited_for_not_skipped(app, db, task_id, backend, clock):
    """While the holder's own save holds the row, asking for work again returns that task, not a second."""
    import threading

    from sqlalchemy import text as sql

    from onprem_label.auth import accounts
    from onprem_label.workflow.leases import lease_next_task
    from onprem_label.workflow.members import add_member

    svc = app.extensions["onprem_label"]
    project_id = taskrows.load_task(db.connection(), task_id).project_id
    db.rollback()
    ingest_items(app, db, project_id, 1, clock)
    labeler = accounts.create_user(db, "holder", "a passphrase long enough", ["labeler"],
                                   must_change_password=False, now=clock())
    add_member(db, db.get(Project, project_id), "holder", "labeler", actor=None, now=clock())
    db.commit()
    project = taskrows.load_project(db.connection(), project_id)
    first = lease_next_task(db, project, labeler, review=False, now=clock())
    db.commit()
    saving = svc.engine.connect()  # a save of that task, in flight: it holds the row
    saving.execute(sql("SELECT id FROM tasks WHERE id = :t FOR UPDATE"), {"t": first.task.id})
    got = {}

    def ask_again():
        with svc.sessionmaker() as other:
            got["lease"] = lease_next_task(other, project, labeler, review=False, now=clock())
            other.commit()

    thread = threading.Thread(target=ask_again)
    thread.start()
    thread.join(timeout=1.0)
    assert thread.is_alive()  # it waits for the save instead of passing over the task
    saving.rollback()
    saving.close()
    thread.join(timeout=10)
    assert got["lease"].task.id == first.task.id


def test_a_stale_write_reports_the_rows_real_state_and_version(app, db, task_id):
    """The 409 of a lost race names what the row holds now, so a client can rebase on it."""
    task = taskrows.load_task(db.connection(), task_id)
    db.rollback()
    db.execute(update(Task).where(Task.id == task_id).values(version=7, state="labeling"))
    db.commit()
    task.state, task.version = "submitted", 2
    with pytest.raises(StaleVersion) as caught:
        taskrows.write_task(db.connection(), task, 1)
    db.rollback()
    assert caught.value.extra == {"state": "labeling", "version": 7}
