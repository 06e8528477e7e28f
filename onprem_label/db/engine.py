"""Engine and session factory: SQLite in WAL mode with immediate write locks, or PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 15000
READ_ONLY_OPTION = "onprem_label_read_only"

_writer_locks: dict[str, threading.Lock] = {}
_writer_locks_guard = threading.Lock()


def _writer_lock(database: str) -> threading.Lock:
    """One lock per SQLite file in this process, shared by every engine opened on it."""
    if database in ("", ":memory:"):
        return threading.Lock()  # a memory database is private to its connection
    with _writer_locks_guard:
        return _writer_locks.setdefault(os.path.realpath(database), threading.Lock())


class WriterLockedConnection(sqlite3.Connection):
    """A sqlite3 connection whose write transactions queue on a lock in this process.

    SQLite lets one writer in at a time. Threads that find the database locked otherwise poll
    (sleeping 1, 2, 5, ... up to 100 ms between tries), so under load some requests wait far
    longer than the work ahead of them; a lock wakes the next writer the moment the last one
    commits. Other processes (a CLI ingest beside the server) still meet SQLite's own lock and
    busy timeout. `writer_lock` is set on the subclass made for each engine.
    """

    writer_lock: threading.Lock
    holds_writer_lock = False

    def acquire_writer(self) -> None:
        """Wait for this process's other writers (as long as SQLite's busy timeout would)."""
        if not self.holds_writer_lock:
            if not self.writer_lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000):
                raise sqlite3.OperationalError("database is locked (by another thread of this process)")
            self.holds_writer_lock = True

    def release_writer(self) -> None:
        """Let the next writer in (after COMMIT or ROLLBACK)."""
        if self.holds_writer_lock:
            self.holds_writer_lock = False
            self.writer_lock.release()

    def commit(self) -> None:
        super().commit()
        self.release_writer()  # not when COMMIT failed: the transaction is still open until rollback

    def __del__(self) -> None:
        # A connection dropped without close() (its pool collected) must not keep the lock.
        self.release_writer()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.release_writer()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.release_writer()


def make_engine(url: str, **kwargs) -> Engine:
    """Create an engine for `url`, with SQLite tuned for many threads writing at once."""
    if url.startswith("postgresql:"):
        # psycopg 3 is the only PostgreSQL driver we ship with.
        url = "postgresql+psycopg:" + url[len("postgresql:"):]
    if url.startswith("sqlite"):
        database = make_url(url).database or ""
        factory = type("WriterLocked", (WriterLockedConnection,), {"writer_lock": _writer_lock(database)})
        kwargs["connect_args"] = {**kwargs.get("connect_args", {}), "factory": factory}
    # An error's text (in a log, or a trace) would otherwise quote its statement's parameters:
    # usernames, label texts, hashes. The statement itself is enough to find the fault. (The driver's
    # own text is not covered: PostgreSQL's DETAIL line quotes the row, `Key (username)=(jdoe) already
    # exists`; the log's formatter shows an exception's type, frames, SQLSTATE and constraint only.)
    kwargs.setdefault("hide_parameters", True)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    """WAL, foreign keys, a busy timeout, and BEGIN IMMEDIATE for every transaction.

    A deferred transaction that reads and then writes cannot wait for the write lock (SQLite
    answers "database is locked" at once to avoid deadlock); taking the lock at BEGIN lets the
    busy timeout queue writers instead. Transactions here are short, so readers pay little.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Hand transaction control to SQLAlchemy's "begin" event below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        # Read-only transactions (see read_only) need no lock: WAL readers run side by side.
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN DEFERRED")
            return
        raw = connection.connection.dbapi_connection
        raw.acquire_writer()
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            raw.release_writer()
            raise


def read_only(session: Session) -> Session:
    """Start `session`'s next transaction as a read: on SQLite it takes no write lock.

    The transaction must not write (a deferred SQLite transaction cannot wait for the lock it
    would need): commit it, and do any write in a transaction of its own.
    """
    if not session.in_transaction():  # a transaction already open keeps the mode it began with
        session.connection(execution_options={READ_ONLY_OPTION: True})
    return session


@contextmanager
def read_connection(engine: Engine, *, snapshot: bool = False) -> Iterator[Connection]:
    """A pooled connection in a read-only transaction (no SQLite write lock), rolled back after.

    `snapshot`: every statement sees the same moment (PostgreSQL REPEATABLE READ; a SQLite read
    transaction in WAL mode always does), for reads that must agree with each other.
    """
    with engine.connect() as conn:
        options = {READ_ONLY_OPTION: True}
        if snapshot and engine.dialect.name == "postgresql":
            options["isolation_level"] = "REPEATABLE READ"
        conn = conn.execution_options(**options)
        with conn.begin() as transaction:
            yield conn
            transaction.rollback()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def sqlite_file(database_url: str) -> Path | None:
    """The database file a SQLite URL names (resolved), or None for another database or a memory one."""
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or not url.database or url.database == ":memory:":
        return None
    return Path(url.database).resolve()
