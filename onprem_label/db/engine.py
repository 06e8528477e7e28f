"""Engine and session factory: SQLite in WAL mode with immediate write locks, or PostgreSQL."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 15000
READ_ONLY_OPTION = "onprem_label_read_only"


def make_engine(url: str, **kwargs) -> Engine:
    """Create an engine for `url`, with SQLite tuned for many threads writing at once."""
    if url.startswith("postgresql:"):
        # psycopg 3 is the only PostgreSQL driver we ship with.
        url = "postgresql+psycopg:" + url[len("postgresql:"):]
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
        deferred = connection.get_execution_options().get(READ_ONLY_OPTION)
        connection.exec_driver_sql("BEGIN DEFERRED" if deferred else "BEGIN IMMEDIATE")


def read_only(session: Session) -> Session:
    """Start `session`'s next transaction as a read: on SQLite it takes no write lock.

    The transaction must not write (a deferred SQLite transaction cannot wait for the lock it
    would need): commit it, and do any write in a transaction of its own.
    """
    if not session.in_transaction():  # a transaction already open keeps the mode it began with
        session.connection(execution_options={READ_ONLY_OPTION: True})
    return session


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A pooled connection in a read-only transaction (no SQLite write lock), rolled back after."""
    with engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY_OPTION: True})
        with conn.begin() as transaction:
            yield conn
            transaction.rollback()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)
