"""The audit hash chain: sealing at commit, append-only triggers, tampering caught, concurrency, archive."""

from __future__ import annotations

import os
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from onprem_label.audit import AuditAction, record
from onprem_label.audit.archive import ArchiveError, archive_before, guard_lifted, read_archive, verify_archive
from onprem_label.audit.chain import (GENESIS_HASH, AuditChain, AuditKeyMissing, append, attach, event_hash,
                                      legacy_sealer)
from onprem_label.audit.checkpoints import CheckpointLog
from onprem_label.audit.verify import verify_chain
from onprem_label.db import make_engine, make_sessionmaker, migrate
from onprem_label.db.engine import read_connection
from onprem_label.db.models import AuditAnchor, AuditEvent

KEY = b"a" * 32
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def site(settings, tmp_path):
    """(engine, sessionmaker with a chain, chain) on a fresh database; checkpoints in tmp_path."""
    engine = make_engine(settings.effective_database_url)
    chain = AuditChain(key=KEY, checkpoints=CheckpointLog(tmp_path / "checkpoints.log", KEY), checkpoint_every=10,
                       checkpoint_seconds=0)  # by count only, so the tests know where they are
    maker = make_sessionmaker(engine)
    attach(maker, chain)
    yield engine, maker, chain
    engine.dispose()


def add_events(maker, count: int, *, start: datetime = T0, per_commit: int = 1) -> None:
    """`count` events, `per_commit` per transaction, one second apart."""
    n = 0
    while n < count:
        with maker() as db:
            for _ in range(min(per_commit, count - n)):
                record(db, AuditAction.IMAGE_READ, actor_name=f"user{n % 7}", object_type="item", object_id=n,
                       details={"n": n, "frame": 0}, now=start + timedelta(seconds=n), study_uid="2.25.1")
                n += 1
            db.commit()


def verify(engine, chain):
    """verify_chain in a read transaction."""
    with read_connection(engine) as conn:
        return verify_chain(conn, chain)


def tamper(engine, *statements: str, params: dict | None = None) -> None:
    """What someone with database access could do: lift the guard, change rows, put it back."""
    with engine.begin() as conn:
        with guard_lifted(conn):
            for statement in statements:
                conn.execute(text(statement), params or {})


def test_events_are_sealed_in_order_with_gapless_ids(site):
    """Each commit appends its events after the head: ids 1..n, each linked to the one before."""
    engine, maker, chain = site
    add_events(maker, 12, per_commit=5)
    with maker() as db:
        rows = list(db.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    assert [r.id for r in rows] == list(range(1, 13))
    assert rows[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(rows, rows[1:]))
    assert rows[3].study_uid == "2.25.1" and rows[3].ts.microsecond % 1000 == 0
    result = verify(engine, chain)
    assert result.ok and result.events == 12 and result.last_id == 12 and result.checkpoints == 1


def test_rollback_drops_queued_events_and_a_savepoint_rollback_keeps_the_outer_ones(site):
    """Events go with their transaction: a rollback drops them, a rolled-back savepoint does not."""
    engine, maker, chain = site
    with maker() as db:
        record(db, AuditAction.IMAGE_READ, actor_name="gone")
        db.rollback()
        record(db, AuditAction.IMAGE_READ, actor_name="kept")
        with db.begin_nested() as nested:
            db.execute(select(1))
            nested.rollback()
        db.commit()
    with maker() as db:
        assert list(db.scalars(select(AuditEvent.actor_name))) == ["kept"]
    assert verify(engine, chain).ok


def test_a_session_without_a_key_cannot_record_events(settings):
    """An event that cannot be sealed is refused when recorded, never written as an unchained row."""
    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine)() as db:
            with pytest.raises(AuditKeyMissing):
                record(db, AuditAction.IMAGE_READ, actor_name="x")
    finally:
        engine.dispose()


def test_savepoints_keep_exactly_the_events_of_the_work_that_stays(site):
    """A failed flush in a savepoint keeps earlier events; a rolled-back savepoint drops its own, even
    ones from a savepoint released inside it; nothing is sealed before the outermost COMMIT."""
    engine, maker, chain = site
    forwarded = []
    chain.after_commit.append(forwarded.extend)
    try:
        with maker() as db:
            record(db, AuditAction.IMAGE_READ, actor_name="before")
            with pytest.raises(IntegrityError), db.begin_nested():
                db.add(AuditAnchor(id=1, archived_at=T0, first_id=1, last_id=1, last_hash="0" * 64, file_name="x",
                                   file_sha256="0" * 64, mac="0" * 64))
                db.add(AuditAnchor(id=1, archived_at=T0, first_id=2, last_id=2, last_hash="0" * 64, file_name="y",
                                   file_sha256="0" * 64, mac="0" * 64))
                db.flush()
            outer = db.begin_nested()
            inner = db.begin_nested()
            record(db, AuditAction.IMAGE_READ, actor_name="undone")
            inner.commit()  # released, but inside `outer`
            outer.rollback()
            record(db, AuditAction.IMAGE_READ, actor_name="after")
            db.commit()
    finally:
        chain.after_commit.remove(forwarded.extend)
    with maker() as db:
        assert list(db.scalars(select(AuditEvent.actor_name).order_by(AuditEvent.id))) == ["before", "after"]
    assert [e["actor_name"] for e in forwarded] == ["before", "after"] and verify(engine, chain).ok


def test_a_failed_checkpoint_write_does_not_fail_the_commit(site, tmp_path):
    """The events are committed before the checkpoint is written: its failure is logged, not raised."""
    engine, maker, chain = site
    chain.checkpoints.path = tmp_path / "not-a-dir"
    chain.checkpoints.path.write_text("")
    chain.checkpoints.path = chain.checkpoints.path / "checkpoints.log"  # its parent is a file
    add_events(maker, 12)
    with maker() as db:
        assert db.scalar(select(func.count()).select_from(AuditEvent)) == 12


def test_a_checkpoint_is_also_written_after_a_quiet_while(settings, tmp_path):
    """With few events, a checkpoint still follows the first commit and then every checkpoint_seconds."""
    engine = make_engine(settings.effective_database_url)
    chain = AuditChain(key=KEY, checkpoints=CheckpointLog(tmp_path / "c.log", KEY), checkpoint_every=1000,
                       checkpoint_seconds=3600)
    maker = make_sessionmaker(engine)
    attach(maker, chain)
    try:
        add_events(maker, 3)
        assert [c.count for c in chain.checkpoints.read()[0]] == [1]
        chain.checkpoints.last_written -= 3601
        add_events(maker, 1)
        assert [c.count for c in chain.checkpoints.read()[0]] == [1, 4]
    finally:
        engine.dispose()


def test_details_read_back_exactly_as_hashed(site):
    """Floats, non-string keys and NUL in details are made stable before hashing (JSONB rewrites them)."""
    engine, maker, chain = site
    with maker() as db:
        record(db, AuditAction.IMAGE_READ, actor_name="x",
               details={"big": 1e16, "neg": -0.0, 2: "two", 10: "ten", "nul": "a\x00b", "nested": [{"f": 0.1}]})
        db.commit()
    with maker() as db:
        details = db.scalar(select(AuditEvent.details))
    assert details == {"big": "1e+16", "neg": "-0.0", "2": "two", "10": "ten", "nul": "a\ufffdb",
                       "nested": [{"f": "0.1"}]}
    assert verify(engine, chain).ok


@pytest.mark.parametrize("column, value", [("hash", "é" * 64), ("prev_hash", "zz"), ("hash", "A" * 64)])
def test_a_malformed_hash_field_is_named_not_a_crash(site, column, value):
    """Non-hex or non-ASCII hash fields are reported as an edited event, never an exception."""
    engine, maker, chain = site
    add_events(maker, 4)
    tamper(engine, f"UPDATE audit_events SET {column} = :v WHERE id = 3", params={"v": value})
    result = verify(engine, chain)
    assert (result.problem.kind, result.problem.event_id) == ("edited", 3)


GUARDED = {
    "update": "UPDATE audit_events SET actor_name = 'mallory' WHERE id = 2",
    "delete": "DELETE FROM audit_events WHERE id = 2",
    # SQLite's TRUNCATE is a DELETE without WHERE; PostgreSQL's TRUNCATE fires no row trigger.
    "truncate": {"sqlite": "DELETE FROM audit_events", "postgresql": "TRUNCATE audit_events"},
    "anchor update": "UPDATE audit_anchors SET last_id = 1",
    "anchor delete": "DELETE FROM audit_anchors",
}


@pytest.mark.parametrize("what", GUARDED)
def test_triggers_refuse_update_delete_and_truncate(site, backend, what):
    """The table is append-only in the database itself, for any client."""
    engine, maker, chain = site
    add_events(maker, 3)
    with engine.begin() as conn:
        conn.execute(AuditAnchor.__table__.insert(), {"archived_at": T0, "first_id": 1, "last_id": 0, "last_hash": "0" * 64,
                                                      "file_name": "x", "file_sha256": "0" * 64, "mac": "0" * 64})
    statement = GUARDED[what] if isinstance(GUARDED[what], str) else GUARDED[what][backend]
    with pytest.raises(DBAPIError, match="append-only"):
        with engine.begin() as conn:
            conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_events")).scalar() == 3


def _forge(engine, row_id: int, key: bytes) -> None:
    """Insert an event after the head, its hash made with `key`."""
    with engine.connect() as conn:
        last = conn.execute(text("SELECT hash FROM audit_events WHERE id = :i"), {"i": row_id - 1}).scalar()
    row = {"id": row_id, "ts": T0, "actor_id": None, "actor_name": "mallory", "actor_role": "admin",
           "action": "user:roles", "object_type": "user", "object_id": "1", "study_uid": "", "outcome": "success",
           "client_addr": "10.0.0.9", "user_agent": "", "request_id": "", "details": {}}
    with engine.begin() as conn:
        conn.execute(AuditEvent.__table__.insert(), {**row, "prev_hash": last, "hash": event_hash(key, row, last)})


def _swap(engine, a: int, b: int) -> None:
    tamper(engine, f"UPDATE audit_events SET id = -1 WHERE id = {a}", f"UPDATE audit_events SET id = {a} WHERE id = {b}",
           f"UPDATE audit_events SET id = {b} WHERE id = -1")


def _rebuild(engine, key: bytes) -> None:
    """Recompute every hash with `key`, as someone without the audit key would have to."""
    with engine.begin() as conn:
        with guard_lifted(conn):
            rows = [dict(r._mapping) for r in conn.execute(AuditEvent.__table__.select().order_by(AuditEvent.id))]
            prev = GENESIS_HASH
            for row in rows:
                digest = event_hash(key, row, prev)
                conn.execute(text("UPDATE audit_events SET prev_hash = :p, hash = :h WHERE id = :i"),
                             {"p": prev, "h": digest, "i": row["id"]})
                prev = digest


TAMPERING = {
    "edit a field": (lambda e: tamper(e, "UPDATE audit_events SET actor_name = 'someone' WHERE id = 17"),
                     "edited", 17),
    "edit the details": (lambda e: tamper(e, "UPDATE audit_events SET outcome = 'denied' WHERE id = 5"), "edited", 5),
    "delete a row": (lambda e: tamper(e, "DELETE FROM audit_events WHERE id = 20"), "missing", 20),
    "delete a range": (lambda e: tamper(e, "DELETE FROM audit_events WHERE id BETWEEN 8 AND 11"), "missing", 8),
    "insert a forged row": (lambda e: _forge(e, 26, os.urandom(32)), "edited", 26),
    "swap two rows": (lambda e: _swap(e, 12, 13), "edited", 12),
    # Checkpoints were written at events 12 and 21; cutting after 15 leaves a chain shorter than 21.
    "truncate the tail after a checkpoint": (lambda e: tamper(e, "DELETE FROM audit_events WHERE id > 15"),
                                             "truncated", 16),
    "rebuild the chain with a wrong key": (lambda e: _rebuild(e, os.urandom(32)), "edited", 1),
}


@pytest.mark.parametrize("how", TAMPERING)
def test_tampering_names_the_first_bad_event(site, how):
    """Each kind of tampering is caught, and verify names the first event it touched."""
    engine, maker, chain = site
    add_events(maker, 25, per_commit=3)  # checkpoints at 10 and 20 (every=10, written at crossings)
    assert verify(engine, chain).ok
    act, kind, first_bad = TAMPERING[how]
    act(engine)
    result = verify(engine, chain)
    assert not result.ok
    assert (result.problem.kind, result.problem.event_id) == (kind, first_bad), result.problem


# What the cheap walk (since the newest checkpoint, at 21) catches of TAMPERING, and where; None: left to a full walk.
SINCE_CHECKPOINT = {"edit a field": None, "edit the details": None, "delete a row": None, "delete a range": None,
                    "insert a forged row": ("edited", 26), "swap two rows": ("edited", 12),
                    "truncate the tail after a checkpoint": ("truncated", 16),
                    "rebuild the chain with a wrong key": ("edited", 12)}


@pytest.mark.parametrize("how", TAMPERING)
def test_walk_since_the_newest_checkpoint(site, how):
    """since_checkpoint walks the events after the newest checkpoint and checks the events checkpoints name."""
    engine, maker, chain = site
    add_events(maker, 25, per_commit=3)
    with read_connection(engine) as conn:
        clean = verify_chain(conn, chain, since_checkpoint=True)
    assert clean.ok and (clean.first_id, clean.last_id, clean.events, clean.checkpoints) == (22, 25, 4, 2)
    TAMPERING[how][0](engine)
    with read_connection(engine) as conn:
        result = verify_chain(conn, chain, since_checkpoint=True)
    expected = SINCE_CHECKPOINT[how]
    if expected is None:
        assert result.ok and not verify(engine, chain).ok  # the full walk still catches it
    else:
        assert (result.problem.kind, result.problem.event_id) == expected, result.problem


def test_walk_since_the_newest_checkpoint_misses_no_event_a_checkpoint_names(site):
    """An event that an older checkpoint names, deleted: the cheap walk names it missing."""
    engine, maker, chain = site
    add_events(maker, 25, per_commit=3)  # checkpoints at 12 and 21
    tamper(engine, "DELETE FROM audit_events WHERE id = 12")
    with read_connection(engine) as conn:
        result = verify_chain(conn, chain, since_checkpoint=True)
    assert (result.problem.kind, result.problem.event_id) == ("missing", 12)


def test_walk_since_a_checkpoint_at_the_head(site):
    """A checkpoint at the last event: nothing to walk, the head is the checkpoint's, and it is checked."""
    engine, maker, chain = site
    add_events(maker, 20)  # a checkpoint at 20, the last event
    with read_connection(engine) as conn:
        result = verify_chain(conn, chain, since_checkpoint=True)
        full = verify_chain(conn, chain)
    assert result.ok and result.events == 0 and (result.last_id, result.head) == (full.last_id, full.head)


def test_moving_an_event_away_is_caught_where_it_left(site):
    """An event moved to another id leaves a hole that verify names."""
    engine, maker, chain = site
    add_events(maker, 6)
    tamper(engine, "UPDATE audit_events SET id = 100 WHERE id = 3")
    result = verify(engine, chain)
    assert (result.problem.kind, result.problem.event_id) == ("missing", 3)


def test_a_forged_checkpoint_line_is_reported(site):
    """A checkpoint not written with the audit key makes verify fail (and say why)."""
    engine, maker, chain = site
    add_events(maker, 3)
    with open(chain.checkpoints.path, "a") as f:
        f.write('{"count":999,"head":"00","at":"2026-01-01T00:00:00.000Z","mac":"00"}\n')
    result = verify(engine, chain)
    assert not result.ok and result.problem.kind == "checkpoint"
    assert any("does not match its HMAC" in w for w in result.warnings)


def test_a_chain_of_100000_events_verifies(site):
    """An untouched chain of 100,000 events verifies from end to end."""
    engine, maker, chain = site
    rows = [{"ts": T0 + timedelta(milliseconds=n), "actor_id": n % 50, "actor_name": f"u{n % 50}", "actor_role": "labeler",
             "action": "image:read", "object_type": "item", "object_id": str(n), "study_uid": "2.25.9",
             "outcome": "success", "client_addr": "127.0.0.1", "user_agent": "pytest", "request_id": f"{n:032x}",
             "details": {"frame": n % 30}} for n in range(100_000)]
    for start in range(0, len(rows), 10_000):
        with engine.begin() as conn:
            append(conn, KEY, rows[start:start + 10_000])
    result = verify(engine, chain)
    assert result.ok, result.problem
    assert result.events == 100_000 and result.last_id == 100_000


def test_eight_threads_appending_make_one_linear_chain(site):
    """8 threads x 1,000 appends, each its own transaction: one gapless chain that verifies."""
    engine, maker, chain = site
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(1000):
                with maker() as db:
                    record(db, AuditAction.TASK_HEARTBEAT, actor_name=f"t{n}", object_id=i, details={"t": n})
                    db.commit()
        except BaseException as exc:  # asserted in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    with maker() as db:
        assert db.scalar(select(func.count()).select_from(AuditEvent)) == 8000
        assert db.scalar(select(func.max(AuditEvent.id))) == 8000
    result = verify(engine, chain)
    assert result.ok and result.events == 8000, result.problem


def test_migration_seals_events_written_before_the_chain(settings, backend):
    """Upgrading a database with old events chains them (renumbered without gaps); without the key it refuses."""
    engine = make_engine(settings.effective_database_url)
    try:
        migrate.downgrade(engine, "0004")
        with engine.begin() as conn:
            for n in (1, 2, 5):  # a gap, as a rolled-back sequence value leaves on PostgreSQL
                conn.execute(text("INSERT INTO audit_events (id, ts, actor_name, actor_role, action, object_type, "
                                  "object_id, outcome, client_addr, user_agent, request_id, details) VALUES "
                                  "(:id, :ts, 'old', '', 'auth:login', '', '', 'success', '', '', '', '{}')"),
                             {"id": n, "ts": datetime(2025, 5, 1, 12, 0, n)})
        with pytest.raises(RuntimeError, match="onprem-label db upgrade"):
            migrate.upgrade(engine)
        migrate.upgrade(engine, audit_seal=legacy_sealer(KEY))
        chain = AuditChain(key=KEY)
        assert verify(engine, chain).ok and verify(engine, chain).last_id == 3
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("DELETE FROM audit_events"))
    finally:
        engine.dispose()


def test_archive_moves_old_events_into_a_sealed_file_that_still_verifies(site, tmp_path):
    """archive --before: old events leave the table for an encrypted file; chain, file and checkpoints verify."""
    engine, maker, chain = site
    add_events(maker, 30, per_commit=4)
    with maker() as db:
        report = archive_before(db, T0 + timedelta(seconds=12), tmp_path / "archive", now=T0 + timedelta(days=1))
    assert (report.first_id, report.last_id, report.count) == (1, 12, 12)
    assert b"user" not in report.path.read_bytes()  # encrypted
    with maker() as db:
        assert db.scalar(select(func.min(AuditEvent.id))) == 13
        assert db.scalar(select(func.max(AuditEvent.action))) == "image:read"
        assert db.scalar(select(AuditAnchor.last_id)) == 12
    result = verify(engine, chain)
    assert result.ok, result.problem
    assert result.last_id == 31  # the archive is an event itself
    archived = verify_archive(report.path, KEY)
    assert archived.ok and archived.last_id == 12
    assert [e["id"] for e in read_archive(report.path, KEY)] == list(range(1, 13))
    # A second archive goes on from the first one's anchor.
    with maker() as db:
        second = archive_before(db, T0 + timedelta(seconds=20), tmp_path / "archive", now=T0 + timedelta(days=2))
    assert (second.first_id, second.last_id) == (13, 20)
    assert verify_archive(second.path, KEY, start_id=13, start_prev=archived.head).ok
    full = verify(engine, chain)
    assert full.ok
    # The cheap walk (doctor's) starts after the anchor or the newest checkpoint, whichever is later.
    with read_connection(engine) as conn:
        cheap = verify_chain(conn, chain, since_checkpoint=True)
    assert cheap.ok and (cheap.last_id, cheap.head) == (full.last_id, full.head), cheap.problem


def test_an_altered_or_cut_archive_file_fails(site, tmp_path):
    """Flipping a byte or cutting the file makes the archive fail to verify; nothing archived twice."""
    engine, maker, chain = site
    add_events(maker, 10)
    with maker() as db:
        report = archive_before(db, T0 + timedelta(seconds=5), tmp_path / "archive", now=T0 + timedelta(days=1))
    data = report.path.read_bytes()
    report.path.write_bytes(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    assert not verify_archive(report.path, KEY).ok
    report.path.write_bytes(data[:-10])
    assert not verify_archive(report.path, KEY).ok
    report.path.write_bytes(data)
    assert not verify_archive(report.path, os.urandom(32)).ok
    with maker() as db, pytest.raises(ArchiveError, match="no events before"):
        archive_before(db, T0 + timedelta(seconds=3), tmp_path / "archive", now=T0 + timedelta(days=1))
