"""Helpers of audit_trail.py: a data directory with a chained sessionmaker, realistic events, a long chain."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import _common as c
import _workflow as w

PASSWORD = "a long audit trail bench passphrase 42"
BATCH = 10_000
USER_AGENT = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/156.0.0.0 Safari/537.36")
STUDY_UID = "2.25.31415926535897932384626433832795"  # 37 characters; 8 more digits per study below
# What a labeling site's trail is mostly made of: image reads, then saves, leases and submits.
ACTIONS = (("image:read", "item"),) * 6 + (("annotation:save", "task"),) * 2 + (
    ("task:lease", "task"), ("task:submit", "task"))


@dataclass
class Site:
    """A data directory made by `onprem-label init`, opened the way `serve` opens it."""

    data: Path
    settings: Any
    chain: Any  # audit.chain.AuditChain of the data directory (key, checkpoint file) via chain_for
    engine: Any
    maker: Any  # sessionmaker with the chain attached: record() + commit seals the event
    auditor: Any  # a User row with the auditor role
    token: str  # the auditor's API token
    project_id: int
    task_ids: list[int]

    @property
    def key(self) -> bytes:
        """The audit key."""
        return self.chain.key

    def close(self) -> None:
        """Dispose of the engine."""
        self.engine.dispose()


def prepare(base: Path, *, database_url: str = "", tasks: int = 1000) -> Site:
    """`onprem-label init` in base/data, then an auditor with a token and a project of `tasks` tasks."""
    from onprem_label.audit.chain import attach
    from onprem_label.audit.site import chain_for
    from onprem_label.auth import accounts, tokens
    from onprem_label.config import load_settings
    from onprem_label.db import make_engine, make_sessionmaker
    from onprem_label.storage import open_keyring
    from onprem_label.workflow.projects import create_project

    data = base / "data"
    if database_url:
        data.mkdir(mode=0o700)
        (data / "onprem-label.toml").write_text(f'database_url = "{database_url}"\n')
    c.run_cli(data, "init")
    settings = load_settings({"data_dir": str(data)}, env={})
    chain = chain_for(settings, open_keyring(settings))
    engine = make_engine(settings.effective_database_url)
    maker = make_sessionmaker(engine)
    attach(maker, chain)  # bench/_workflow.py's makers have no chain: their events would not be sealed
    now = datetime.now(timezone.utc)
    with maker() as db:
        # The CLI's `user create` makes a one-time password that must be changed before the API
        # accepts the user's token; the core function can skip that.
        auditor = accounts.create_user(db, "auditor01", PASSWORD, ["auditor"], must_change_password=False, now=now)
        project = create_project(db, "Audit bench", label_schema=w.SCHEMA, actor_name="bench", now=now)
        token = tokens.create_token(db, auditor, "bench", now=now)[0]
        db.commit()
    w.add_tasks(settings.effective_database_url, project.id, tasks)
    with engine.connect() as conn:
        task_ids = list(conn.exec_driver_sql(f"SELECT id FROM tasks WHERE project_id = {int(project.id)}").scalars())
    return Site(data, settings, chain, engine, maker, auditor, token, project.id, task_ids)


def event_rows(first: int, count: int, t0: datetime) -> Iterator[dict[str, Any]]:
    """`count` unsealed events numbered from `first`, 1 ms apart from t0, as `record` makes them."""
    for n in range(first, first + count):
        action, object_type = ACTIONS[n % len(ACTIONS)]
        details = {"project_id": 3, "frame": n % 30} if action == "image:read" else {"project_id": 3, "version": 1 + n % 5}
        ts = t0 + timedelta(milliseconds=n)
        yield {"ts": ts.replace(microsecond=ts.microsecond // 1000 * 1000), "actor_id": 2 + n % 40,
               "actor_name": f"labeler{n % 40:02d}", "actor_role": "labeler", "action": action,
               "object_type": object_type, "object_id": str(100_000 + n // 7),
               "study_uid": f"{STUDY_UID}.{n // 200:08d}", "outcome": "success" if n % 97 else "denied",
               "client_addr": f"10.0.{n % 4}.{20 + n % 37}", "user_agent": USER_AGENT,
               "request_id": f"{n:032x}", "details": details}


def event_count(site: Site) -> int:
    """The chain's head id (= its number of events: ids have no gaps and nothing is archived)."""
    from onprem_label.audit.chain import head

    with site.engine.connect() as conn:
        return head(conn)[0]


def fill(site: Site, total: int) -> tuple[int, float]:
    """Append realistic events with `append` in transactions of BATCH until the chain holds `total`."""
    from onprem_label.audit.chain import append

    have = event_count(site)
    t0 = datetime.now(timezone.utc) - timedelta(milliseconds=total)
    started = time.monotonic()
    for first in range(have, total, BATCH):
        with site.engine.begin() as conn:
            append(conn, site.key, event_rows(first, min(BATCH, total - first), t0))
    seconds = time.monotonic() - started
    if site.engine.dialect.name == "sqlite":
        # Outside the engine: its "begin" hook would wrap the PRAGMA in BEGIN IMMEDIATE.
        raw = sqlite3.connect(site.data / "onprem-label.db", isolation_level=None)
        try:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()
    else:
        with site.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE audit_events")  # what autovacuum would do after this
    return max(0, total - have), seconds


def database_settings(site: Site) -> str:
    """One line: the database, its version and its durability settings (fsync at each COMMIT?)."""
    with site.engine.connect() as conn:
        if site.engine.dialect.name == "sqlite":
            version = conn.exec_driver_sql("SELECT sqlite_version()").scalar()
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
            return (f"SQLite {version}, journal_mode={mode}, synchronous={names.get(sync, sync)} "
                    f"(every COMMIT fsyncs the WAL)")
        version = conn.exec_driver_sql("SHOW server_version").scalar()
        sync = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
        fsync = conn.exec_driver_sql("SHOW fsync").scalar()
        return f"PostgreSQL {version} on 127.0.0.1, synchronous_commit={sync}, fsync={fsync}"


def head_plan(site: Site) -> list[str]:
    """The plan of the head lookup `seal_pending` runs (the production statement, compiled)."""
    from onprem_label.audit import chain

    sql = str(chain._HEAD.compile(dialect=site.engine.dialect, compile_kwargs={"literal_binds": True}))
    prefix = "EXPLAIN QUERY PLAN " if site.engine.dialect.name == "sqlite" else "EXPLAIN "
    with site.engine.connect() as conn:
        rows = conn.exec_driver_sql(prefix + sql).all()
    return [" ".join(str(v) for v in row) for row in rows]


def database_bytes(site: Site) -> int:
    """Bytes the database takes (SQLite file + WAL; PostgreSQL database size)."""
    if site.engine.dialect.name == "sqlite":
        path = site.data / "onprem-label.db"
        return sum(p.stat().st_size for p in (path, Path(str(path) + "-wal")) if p.exists())
    with site.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()


def trailer_of(path: Path) -> dict:
    """The signed trailer at the end of an export file (jsonl or csv)."""
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - 8192))
        last = fh.read().decode().rstrip("\r\n").rsplit("\n", 1)[-1]
    return trailer_of_line(last)


def trailer_of_line(last: str) -> dict:
    """The trailer from the last line of an export."""
    if last.startswith('{"end"'):
        return json.loads(last)["end"]
    return json.loads(next(csv.reader(io.StringIO(last)))[1])


def proc_kib(pid: int, field: str) -> int | None:
    """A `VmXXX:` figure of /proc/<pid>/status in KiB, None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_meminfo_kib(field: str) -> int:
    """A figure of /proc/meminfo in KiB (MemAvailable, MemTotal)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/meminfo")


def reset_peak(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux >= 4.0; our own child); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True
