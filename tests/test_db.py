"""Database engine: SQLite tuning, concurrent writers, UTC round trips, on both backends."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest
from sqlalchemy import func, select, text

from onprem_label.audit import AuditAction, record
from onprem_label.audit.chain import AuditChain, attach
from onprem_label.db import make_engine, make_sessionmaker
from onprem_label.db.models import AuditEvent, User


def test_sqlite_connection_pragmas(tmp_path):
    """SQLite runs in WAL mode with foreign keys on and a busy timeout."""
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5000
    finally:
        engine.dispose()


@pytest.mark.parametrize("end", ["commit", "rollback", "close", "error"])
def test_sqlite_write_transactions_queue_on_one_lock_per_file(tmp_path, end):
    """Every engine on one SQLite file shares the writer lock; commit, rollback, close and errors free it."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    first, second = make_engine(url), make_engine(url)
    try:
        with first.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE t (v INTEGER)")
            conn.commit()
        conn = first.connect()
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")  # a write transaction: holds the lock
        raw = conn.connection.dbapi_connection
        assert raw.holds_writer_lock and raw.writer_lock.locked()
        assert second.connect().connection.dbapi_connection.writer_lock is raw.writer_lock
        if end == "error":
            with pytest.raises(Exception):
                conn.exec_driver_sql("INSERT INTO missing VALUES (1)")
            conn.rollback()
        else:
            getattr(conn, end)()
        assert not raw.writer_lock.locked()
        with second.begin() as other:  # the next writer gets in at once
            other.exec_driver_sql("INSERT INTO t VALUES (2)")
        if end != "close":
            conn.close()
    finally:
        first.dispose()
        second.dispose()


def test_foreign_keys_enforced(db, backend):
    """A row pointing at a missing user is refused on both backends."""
    from sqlalchemy.exc import IntegrityError

    from onprem_label.db.models import ApiToken

    db.add(ApiToken(user_id=9999, name="x", token_hash="0" * 64,
                    created_at=datetime.now(timezone.utc)))
    with pytest.raises(IntegrityError):
        db.commit()
    db.rollback()


def test_concurrent_read_then_write_transactions(settings, backend):
    """Eight threads doing read-modify-write transactions at once never see 'database is locked'."""
    engine = make_engine(settings.effective_database_url, pool_size=8, max_overflow=0)
    make_session = make_sessionmaker(engine)
    attach(make_session, AuditChain(key=b"k" * 32))
    with make_session() as s:
        s.add(User(username="counter", display_name="", password_hash="x", roles="",
                   active=True, must_change_password=False, failed_logins=0,
                   created_at=datetime.now(timezone.utc), recovery_codes=[], totp_enabled=False))
        s.commit()
    errors: list[BaseException] = []
    rounds, threads = 25, 8

    def worker(n: int) -> None:
        try:
            for i in range(rounds):
                with make_session() as s:
                    # Read first, then write: the pattern that deadlocks deferred SQLite transactions.
                    user = s.scalar(select(User).where(User.username == "counter")
                                    .with_for_update())
                    user.failed_logins += 1
                    record(s, AuditAction.USER_UNLOCK, actor_name="counter", details={"n": n, "i": i})
                    s.commit()
        except BaseException as exc:  # collected and asserted in the main thread
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    try:
        assert not errors, errors[:3]
        with make_session() as s:
            # No lost update: every increment of the counter survived.
            assert s.scalar(select(User.failed_logins).where(User.username == "counter")) == rounds * threads
            assert s.scalar(select(func.count(AuditEvent.id))) == rounds * threads
    finally:
        engine.dispose()


def test_utc_datetimes_round_trip(db, make_user, backend):
    """Aware UTC times come back aware and equal; naive times are refused."""
    user = make_user("timekeeper")
    moment = datetime(2026, 3, 29, 1, 30, 15, 123000, tzinfo=timezone.utc)
    user.last_login_at = moment
    db.commit()
    db.expire_all()
    again = db.get(User, user.id)
    assert again.last_login_at == moment and again.last_login_at.tzinfo is not None
    again.last_login_at = datetime(2026, 1, 1)
    with pytest.raises(Exception):
        db.commit()
    db.rollback()
