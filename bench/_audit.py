"""Helpers of audit_trail.py: a data directory with a chained sessionmaker, realistic events, a long chain,
processes watched for their peak RSS, the export downloaded, the profile."""

from __future__ import annotations

import cProfile
import csv
import hmac
import http.client
import io
import json
import os
import pstats
import resource
import sqlite3
import threading
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
        details = ({"project_id": 3, "frame": n % 30} if action == "image:read"
                   else {"project_id": 3, "version": 1 + n % 5})
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


def fsync_ms(directory: Path, count: int = 200) -> float:
    """Median ms of one 4 KiB append + fsync to a file in `directory` (what a COMMIT's WAL sync costs here)."""
    path = directory / "fsync-probe"
    took = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            took.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return sorted(took)[len(took) // 2] * 1000


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


def run_watched(argv: list[str], log: Path, timeout: float, watch=None) -> tuple[float, resource.struct_rusage]:
    """Run a command (output to `log`), calling `watch(pid)` every 10 ms: (wall s, its wait4 rusage).

    wait4 gives the peak RSS (ru_maxrss) of that one child, however briefly it was reached.
    """
    t0 = time.perf_counter()
    proc = c.start_process(argv, log)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if watch is not None:
            watch(proc.pid)
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{' '.join(argv[2:5])} did not finish in {timeout:.0f} s")
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:])} failed ({proc.returncode}): {c.log_tail(proc, 5)}")
    return time.perf_counter() - t0, usage


def http_export(port: int, pid: int, token: str, fmt: str, *, zero: bool = False) -> dict:
    """One client downloads the export; the server's RSS before, its peak during (VmHWM, sampled)."""
    rss0 = proc_kib(pid, "VmRSS")
    reset = reset_peak(pid)
    sampled, stop = [rss0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            value = proc_kib(pid, "VmRSS")
            if value:
                sampled.append(value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    conn = http.client.HTTPConnection(c.LOOPBACK, port, timeout=300)
    query = f"format={fmt}" + ("&since=2999-01-01" if zero else "")
    total, tail = 0, b""
    t0 = time.perf_counter()
    try:
        conn.request("GET", f"/api/v1/audit/export?{query}", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"export answered {response.status}: {response.read()[:500]!r}")
        while block := response.read(1 << 20):
            total += len(block)
            tail = (tail + block)[-8192:]
    finally:
        wall = time.perf_counter() - t0
        conn.close()
        stop.set()
        sampler.join(timeout=5)
    hwm = proc_kib(pid, "VmHWM") if reset else None
    trailer = trailer_of_line(tail.decode().rstrip("\r\n").rsplit("\n", 1)[-1])
    peak = max(hwm or 0, max(sampled))
    return {"rss0_kib": rss0, "peak_kib": peak, "hwm_reset": reset, "wall_s": wall, "bytes": total,
            "count": trailer["count"]}


def profile(site: Site, verify_in_process) -> None:
    """The steps of verify timed apart, then cProfile of verify and of the export stream (to /dev/null)."""
    from onprem_label.audit.export import signing_key, stream_export
    from onprem_label.audit.search import AuditFilter, stream
    from onprem_label.db.engine import read_connection
    from onprem_label.storage import open_keyring

    key = signing_key(open_keyring(site.settings))
    up_to = event_count(site)

    def export(fmt: str) -> None:
        with read_connection(site.engine) as conn, open(os.devnull, "wb") as sink:
            for piece in stream_export(stream(conn, AuditFilter(), up_to=up_to), fmt, key, {}):
                sink.write(piece)

    verify_parts(site)
    for name, work in (("verify_chain", lambda: verify_in_process(site)), ("export jsonl", lambda: export("jsonl")),
                       ("export csv", lambda: export("csv"))):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(work)
        print(f"--- profile of {name}: {time.perf_counter() - t0:.1f} s under cProfile; top by own time ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def verify_parts(site: Site) -> None:
    """The steps of verify's walk, each summed over every row in one pass; the raw DB-API fetch."""
    from onprem_label.audit import chain, verify
    from onprem_label.db.engine import read_connection

    sums = dict.fromkeys(("format_ts", "canonical", "hmac", "compare"), 0.0)
    clock = time.perf_counter
    t0 = clock()
    with read_connection(site.engine) as conn:
        result = conn.exec_driver_sql(verify._RAW_ROWS, execution_options={"stream_results": True,
                                                                           "yield_per": 10_000})
        rows = 0
        for m in verify._raw_events(result):
            t1 = clock()
            m["ts"]  # noqa: B018 - already spelled by _raw_events (format_ts is inside the fetch now)
            t2 = clock()
            body = chain.canonical(m) + b"\n" + m["prev_hash"].encode("ascii")
            t3 = clock()
            digest = hmac.digest(site.key, body, "sha256").hex()
            t4 = clock()
            hmac.compare_digest(digest, m["hash"])
            t5 = clock()
            sums["format_ts"] += t2 - t1
            sums["canonical"] += t3 - t2
            sums["hmac"] += t4 - t3
            sums["compare"] += t5 - t4
            rows += 1
        result.close()
    total = clock() - t0
    with read_connection(site.engine) as conn:
        sql = verify._RAW_ROWS
        dbapi = conn.connection.dbapi_connection
        cursor = dbapi.cursor(name="bench_parts") if site.engine.dialect.name == "postgresql" else dbapi.cursor()
        t0 = clock()
        cursor.execute(sql)
        while cursor.fetchmany(10_000):
            pass
        raw = clock() - t0
        cursor.close()
    print(f"verify parts over {rows:,} rows (one pass, each step timed alone): SQLAlchemy fetch + rest "
          f"{total - sum(sums.values()):.2f} s; canonical() {sums['canonical']:.2f} s (of which format_ts "
          f"{sums['format_ts']:.2f} s, timed apart); HMAC + hex {sums['hmac']:.2f} s; compare_digest "
          f"{sums['compare']:.2f} s; total {total:.2f} s | the same SELECT through the bare DB-API cursor (tuples, "
          f"no type processing): {raw:.2f} s")
