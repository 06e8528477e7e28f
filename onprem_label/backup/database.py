"""The database part of a backup: a consistent snapshot (SQLite backup API, pg_dump), and its restore."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sqlalchemy import Connection, create_engine, inspect, make_url, text
from sqlalchemy.pool import NullPool

from onprem_label.audit.chain import head
from onprem_label.backup.errors import BackupError
from onprem_label.db import make_engine

SQLITE_FILE = "onprem-label.db"
PG_DUMP_FILE = "database.pgdump"
PG_DUMP = "/usr/bin/pg_dump"
PG_RESTORE = "/usr/bin/pg_restore"
SQLITE_BUSY_MS = 15000


class DatabaseBackupError(BackupError):
    """The database could not be snapshotted or restored (one line naming why)."""


@dataclass
class SnapshotFacts:
    """What one consistent view of the database holds: the manifest's counts and what to copy."""

    schema_revision: str | None
    rows: dict[str, int]
    blobs: list[tuple[str, int]]
    audit_last_id: int
    audit_head: str
    archive_files: list[str] = field(default_factory=list)


def read_facts(conn: Connection) -> SnapshotFacts:
    """Counts, blob ids, audit head and archive files, all read in `conn`'s one transaction."""
    tables = sorted(inspect(conn).get_table_names())
    rows = {name: int(conn.execute(text(f'SELECT count(*) FROM "{name}"')).scalar()) for name in tables}
    revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar() \
        if "alembic_version" in tables else None
    blobs = [(r[0], int(r[1])) for r in conn.execute(text("SELECT id, size FROM blobs ORDER BY id"))] \
        if "blobs" in tables else []
    last_id, last_hash = head(conn) if "audit_events" in tables else (0, "0" * 64)
    archives = [r[0] for r in conn.execute(text("SELECT file_name FROM audit_anchors ORDER BY last_id"))] \
        if "audit_anchors" in tables else []
    return SnapshotFacts(revision, rows, blobs, last_id, last_hash, archives)


@contextmanager
def sqlite_file_connection(path: Path) -> Iterator[Connection]:
    """A read-only connection on a SQLite file that nothing else writes (a backup's snapshot)."""
    uri = f"file:{Path(path).resolve()}?mode=ro&immutable=1"
    engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def snapshot_sqlite(live: Path, target: Path) -> SnapshotFacts:
    """Copy the live database (WAL mode, the server may be writing) into `target` with the backup API.

    One step (pages=-1): the whole copy runs inside one read transaction, so it is one moment of
    the database however busy the writers are; an incremental backup would start over after
    every write by another connection and might never finish under load. The copy is then
    switched to rollback-journal mode, so it is one self-contained file.
    """
    source = sqlite3.connect(live, timeout=SQLITE_BUSY_MS / 1000)  # reads only
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
    except sqlite3.Error as exc:
        raise DatabaseBackupError(f"SQLite snapshot of {live} failed: {exc}") from None
    finally:
        source.close()
    os.chmod(target, 0o600)
    with sqlite_file_connection(target) as conn:
        return read_facts(conn)


# --- PostgreSQL ----------------------------------------------------------------------------------

def pg_program(path: str) -> str:
    """The absolute path of pg_dump/pg_restore, or a clear error naming the Debian package."""
    found = path if os.path.exists(path) else shutil.which(os.path.basename(path))
    if not found:
        raise DatabaseBackupError(f"{os.path.basename(path)} not found: install the PostgreSQL client "
                                  "programs (Debian: apt install postgresql-client)")
    return found


def libpq_target(url: str) -> tuple[str, dict[str, str]]:
    """(libpq connection string without the password, environment with PGPASSWORD) for a URL.

    The password goes through the environment, never the command line other users can read in ps.
    """
    parsed = make_url(url)
    parts = {"host": parsed.host, "port": parsed.port, "user": parsed.username, "dbname": parsed.database}
    parts.update({k: v for k, v in parsed.query.items() if isinstance(v, str)})
    conninfo = " ".join(f"{k}='{_quote(str(v))}'" for k, v in parts.items() if v not in (None, ""))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    return conninfo, env


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _run(argv: list[str], env: dict[str, str], what: str) -> None:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()] or ["(no message)"]
        raise DatabaseBackupError(f"{what} failed: {lines[0]}")


def snapshot_postgresql(url: str, target: Path) -> SnapshotFacts:
    """pg_dump (custom format) of the database in a snapshot this process exported and read its facts in.

    The counts and blob ids of the manifest come from the very snapshot pg_dump writes out.
    """
    program = pg_program(PG_DUMP)
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                snapshot = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar()
                facts = read_facts(conn)
                conninfo, env = libpq_target(url)
                _run([program, "--format=custom", f"--snapshot={snapshot}", f"--file={target}",
                      f"--dbname={conninfo}"], env, "pg_dump")
    finally:
        engine.dispose()
    os.chmod(target, 0o600)
    return facts


_USER_OBJECTS = ("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND n.nspname NOT IN "
                 "('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
                 "AND n.nspname NOT LIKE 'pg_temp%'")
_FUNCTIONS = ("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
              "WHERE n.nspname = current_schema()")


def postgresql_state(url: str) -> tuple[list[str], set[str]]:
    """(relations in the database, functions in its schema): a restore needs no relations at all."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            relations = [r[0] for r in conn.execute(text(_USER_OBJECTS))]
            functions = {r[0] for r in conn.execute(text(_FUNCTIONS))}
            conn.rollback()
            return relations, functions
    finally:
        engine.dispose()


def restore_postgresql(url: str, dump: Path) -> None:
    """pg_restore the dump into the (empty) database in one transaction: all of it or nothing."""
    program = pg_program(PG_RESTORE)
    conninfo, env = libpq_target(url)
    _run([program, "--single-transaction", "--exit-on-error", "--no-owner", "--no-privileges",
          f"--dbname={conninfo}", str(dump)], env, "pg_restore")


def undo_postgresql(url: str, functions_before: set[str]) -> None:
    """Drop what a restore put into a database that held no relations before (a later check failed)."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            tables = [r[0] for r in conn.exec_driver_sql(
                "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables "
                "WHERE schemaname = current_schema()")]
            if tables:
                conn.exec_driver_sql(f"DROP TABLE {', '.join(tables)} CASCADE")
            for sequence in conn.exec_driver_sql(
                    "SELECT quote_ident(sequence_schema) || '.' || quote_ident(sequence_name) "
                    "FROM information_schema.sequences WHERE sequence_schema = current_schema()").all():
                conn.exec_driver_sql(f"DROP SEQUENCE IF EXISTS {sequence[0]} CASCADE")
            for function in {r[0] for r in conn.execute(text(_FUNCTIONS))} - functions_before:
                conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {function} CASCADE")
    finally:
        engine.dispose()
