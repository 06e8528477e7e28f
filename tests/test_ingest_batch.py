"""Storing many files in one transaction: order, duplicates inside a batch, fallbacks, stacks, store-behind."""

from __future__ import annotations

import io
import os

import pytest
from sqlalchemy import event, func, select

from imaging_helpers import make_dicom, new_project
from onprem_label.db.models import Annotation, AuditEvent, Blob, Item, ItemImage, Task
from onprem_label.imaging import ingest
from onprem_label.imaging.batch import StoreBehind, prepare_source, run_batch
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.ingest import IngestTarget, KnownFile, store_batch
from onprem_label.imaging.prepare import prepare_or_reject
from onprem_label.imaging.sources import Source
from test_isolation import OPTIONS

SERIES = "1.2.826.0.1.3680043.8.498.77.1"


def prepared(app, data: bytes):
    """A file prepared in this process with the app's options."""
    return prepare_or_reject(io.BytesIO(data), app.extensions["onprem_label"].ingest_options)


def store(app, db, project_id: int, files, clock):
    """store_batch of (name, outcome) pairs into the project as the console."""
    svc = app.extensions["onprem_label"]
    return store_batch(db, svc.store, IngestTarget(project_id, "cli", actor_name="test"), files, now=clock())


def count(db, model, **where) -> int:
    """Rows of `model` matching the keyword filters."""
    query = select(func.count()).select_from(model)
    for name, value in where.items():
        query = query.where(getattr(model, name) == value)
    return db.scalar(query)


def test_a_mixed_batch_is_one_transaction_with_results_in_order(app, db, clock):
    """Rejected, new, repeated bytes, a repeated instance and a known file: right result each, one commit."""
    project_id = new_project(db)
    first, second = make_dicom(seed=1), make_dicom(seed=2)
    uid = "1.2.826.0.1.3680043.8.498.99.5"
    same_uid_a, same_uid_b = make_dicom(seed=3, instance=uid), make_dicom(seed=4, instance=uid)
    [before] = store(app, db, project_id, [("before.dcm", prepared(app, first))], clock)
    engine = app.extensions["onprem_label"].engine
    commits = []

    def counted(conn):
        commits.append(1)

    event.listen(engine, "commit", counted)
    try:
        results = store(app, db, project_id, [
            ("bad.dcm", Rejected("corrupt", "not a readable DICOM file")),
            ("new.dcm", prepared(app, second)),
            ("again.dcm", prepared(app, first)),          # bytes stored by an earlier batch
            ("new-again.dcm", prepared(app, second)),     # bytes stored earlier in this batch
            ("uid-a.dcm", prepared(app, same_uid_a)),
            ("uid-b.dcm", prepared(app, same_uid_b)),     # same instance, other bytes
            ("known.dcm", KnownFile("0" * 64, before.item_id)),
        ], clock)
    finally:
        event.remove(engine, "commit", counted)
    assert len(commits) == 1
    assert [(r.name, r.status) for r in results] == [
        ("bad.dcm", "rejected"), ("new.dcm", "imported"), ("again.dcm", "duplicate"),
        ("new-again.dcm", "duplicate"), ("uid-a.dcm", "imported"), ("uid-b.dcm", "duplicate"),
        ("known.dcm", "duplicate")]
    assert results[2].item_id == before.item_id and results[6].item_id == before.item_id
    assert results[3].item_id == results[1].item_id and results[5].item_id == results[4].item_id
    assert count(db, Item, project_id=project_id) == 3 == count(db, Task, project_id=project_id)
    actions = db.execute(select(AuditEvent.action, AuditEvent.object_id).where(AuditEvent.action.like("item:%"))
                         .order_by(AuditEvent.id)).all()
    assert [a for a, _ in actions[1:]] == ["item:reject", "item:ingest", "item:duplicate", "item:duplicate",
                                           "item:ingest", "item:duplicate", "item:duplicate"]
    assert actions[3][1] == str(before.item_id) and actions[4][1] == str(results[1].item_id)


def test_a_file_stored_meanwhile_by_another_writer_falls_back_to_one_by_one(app, db, clock, monkeypatch):
    """A unique index firing (the pre-check missed a row) rolls the batch back; each file is stored alone."""
    project_id = new_project(db)
    already = make_dicom(seed=10)
    [first] = store(app, db, project_id, [("first.dcm", prepared(app, already))], clock)
    real_known = ingest._known
    calls = []

    def blind_once(*args):
        calls.append(1)
        return {} if len(calls) <= 2 else real_known(*args)  # the batch's two look-ups see nothing

    monkeypatch.setattr(ingest, "_known", blind_once)
    results = store(app, db, project_id, [("fresh.dcm", prepared(app, make_dicom(seed=11))),
                                          ("raced.dcm", prepared(app, already))], clock)
    assert [(r.name, r.status) for r in results] == [("fresh.dcm", "imported"), ("raced.dcm", "duplicate")]
    assert results[1].item_id == first.item_id
    assert count(db, Item, project_id=project_id) == 2 == count(db, ItemImage, project_id=project_id)
    assert count(db, Blob) == 2


def test_a_stack_is_not_joined_once_its_labeling_began(app, db, clock):
    """A new slice never renumbers frames under saved shapes: it starts a new stack, and says so."""
    project_id = new_project(db, stack_series=True)
    slice_ = lambda n: prepared(app, make_dicom(series=SERIES, z=float(n), number=n, seed=20 + n))  # noqa: E731
    [one] = store(app, db, project_id, [("s1.dcm", slice_(1))], clock)
    [two] = store(app, db, project_id, [("s2.dcm", slice_(2))], clock)
    assert two.item_id == one.item_id and two.frames == 2
    task = db.scalar(select(Task).where(Task.item_id == one.item_id))
    db.add(Annotation(task_id=task.id, revision=1, round=0, kind="label", author_id=None, schema_version=1,
                      shapes=[], classifications={}, created_at=clock()))
    db.commit()  # a labeler saved once and let go: the task is new again, but no longer untouched
    [three] = store(app, db, project_id, [("s3.dcm", slice_(3))], clock)
    [four] = store(app, db, project_id, [("s4.dcm", slice_(4))], clock)
    assert three.item_id != one.item_id and "already being labeled" in three.reason
    assert four.item_id == three.item_id and four.reason is None
    assert db.get(Item, one.item_id).frames == 2 and db.get(Item, three.item_id).frames == 2


def test_known_files_are_never_decoded(tmp_path):
    """run_batch's `known` answers for a file before any worker sees it (a decoder-killing file here)."""
    good, killer = tmp_path / "good.dcm", tmp_path / "killer.dcm"
    good.write_bytes(make_dicom(seed=30))
    killer.write_bytes(b"KILL" + make_dicom(seed=31))
    outcomes = []
    run_batch([Source(str(good), str(good)), Source(str(killer), str(killer))], OPTIONS, 1,
              lambda source, outcome: outcomes.append(outcome), prepare=prepare_or_die,
              known=lambda source: KnownFile("f" * 64, 7) if source.path == str(killer) else None)
    assert outcomes[1] == KnownFile("f" * 64, 7)
    assert outcomes[0].kind == "dicom"


def prepare_or_die(source: Source, options):
    """prepare_source, except that a file starting with KILL ends the worker process."""
    with open(source.path, "rb") as fh:
        if fh.read(4) == b"KILL":
            os._exit(134)
    return prepare_source(source, options)


def test_store_behind_hands_over_groups_in_order_and_bounded():
    """Groups of at most max_files, in order, everything stored by close()."""
    groups = []
    storer = StoreBehind(groups.append, max_files=3, max_seconds=60)
    for n in range(8):
        storer(Source(str(n), str(n)), Rejected("corrupt", str(n)))
    storer.close()
    assert [len(g) for g in groups] == [3, 3, 2]
    assert [source.name for g in groups for source, _ in g] == [str(n) for n in range(8)]


def test_store_behind_passes_the_storers_error_to_the_caller():
    """A failing store (database down, say) stops the run at the next result or at close()."""
    def broken(group):
        raise RuntimeError("database is gone")

    storer = StoreBehind(broken, max_files=1, max_seconds=60)
    with pytest.raises(RuntimeError, match="database is gone"):
        for n in range(50):
            storer(Source(str(n), str(n)), Rejected("corrupt", "x"))
        storer.close()
    storer.abort()


def test_abort_drops_the_groups_still_waiting():
    """After abort() only the group already being stored finishes; the one queued behind it is dropped."""
    import threading

    started, release, stored = threading.Event(), threading.Event(), []

    def slow(group):
        started.set()
        release.wait(10)
        stored.append(group)

    storer = StoreBehind(slow, max_files=1, max_seconds=60)
    storer(Source("a", "a"), Rejected("corrupt", "a"))  # being stored
    started.wait(10)
    storer(Source("b", "b"), Rejected("corrupt", "b"))  # queued
    threading.Timer(0.2, release.set).start()
    storer.abort()
    assert [[s.name for s, _ in g] for g in stored] == [["a"]]


def test_a_failure_while_storing_one_by_one_keeps_the_results_before_it(app, db, clock, monkeypatch):
    """BatchInterrupted carries the results of the files committed before the unexpected error."""
    project_id = new_project(db)
    files = [(f"{n}.dcm", prepared(app, make_dicom(seed=40 + n))) for n in range(3)]
    real_known, real_store = ingest._known, ingest._store_all
    calls = []

    def blind(*args):
        return {} if len(calls) == 0 else real_known(*args)

    def flaky(db_, store_, target_, files_, now_, put_):
        calls.append(len(files_))
        if len(calls) == 1:  # the batch: make the unique index fire
            raise ingest.IntegrityError("insert", {}, Exception("unique"))
        if len(calls) == 3:  # the second file alone: something unexpected
            raise RuntimeError("disk full")
        return real_store(db_, store_, target_, files_, now_, put_)

    monkeypatch.setattr(ingest, "_known", blind)
    monkeypatch.setattr(ingest, "_store_all", flaky)
    with pytest.raises(ingest.BatchInterrupted) as caught:
        store(app, db, project_id, files, clock)
    assert [(r.name, r.status) for r in caught.value.results] == [("0.dcm", "imported")]
    assert isinstance(caught.value.__cause__, RuntimeError)
