"""Helpers of label_loop.py: a project of N image-less tasks, labelers with tokens, the label loop client."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import _common as c

SCHEMA = {"classes": [{"name": "nodule", "color": "#e6194b", "hotkey": "1", "tools": ["bbox", "polygon"]}],
          "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"], "required": True}]}
BOX = {"type": "bbox", "label": "nodule", "frame": 0, "x": 2, "y": 3, "width": 10, "height": 8}
PASSWORD = "a long label loop passphrase 42"
INSERT_CHUNK = 50_000
KINDS = ("next", "save", "submit")


@dataclass
class Project:
    """A prepared data directory: its database URL, the project and one token per labeler."""

    data: Path
    url: str
    project_id: int
    tokens: list[str]
    seconds_to_fill: float


def prepare(base: Path, *, items: int, labelers: int, database_url: str = "") -> Project:
    """`onprem-label init` in base/data, then labelers, a project and `items` new tasks (bulk insert)."""
    data = base / "data"
    if database_url:
        data.mkdir(mode=0o700)
        (data / "onprem-label.toml").write_text(f'database_url = "{database_url}"\n')
    c.run_cli(data, "init")
    url = database_url or f"sqlite:///{data / 'onprem-label.db'}"
    project_id, tokens = _people_and_project(data, url, labelers)
    started = time.monotonic()
    add_tasks(url, project_id, items)
    return Project(data, url, project_id, tokens, time.monotonic() - started)


def _people_and_project(data: Path, url: str, labelers: int) -> tuple[int, list[str]]:
    from onprem_label.auth import accounts, tokens
    from onprem_label.db import make_engine
    from onprem_label.workflow.members import add_member
    from onprem_label.workflow.projects import create_project

    now = datetime.now(timezone.utc)
    engine = make_engine(url)
    secrets = []
    try:
        with c.site_sessionmaker(data, engine)() as db:
            # The CLI's `user create` makes a one-time password that must be changed in the browser
            # before the API accepts the user's token; the core function can skip that.
            users = [accounts.create_user(db, f"labeler{n:02d}", PASSWORD, ["labeler"],
                                          must_change_password=False, now=now) for n in range(labelers)]
            project = create_project(db, "Label loop", label_schema=SCHEMA, actor_name="bench", now=now)
            for user in users:
                add_member(db, project, user.username, "labeler", actor=None, now=now)
                secrets.append(tokens.create_token(db, user, "bench", now=now)[0])
            db.commit()
            return project.id, secrets
    finally:
        engine.dispose()


def add_tasks(url: str, project_id: int, count: int) -> None:
    """`count` items without images and their new tasks: Core executemany, then INSERT ... SELECT."""
    from sqlalchemy import insert, literal, select

    from onprem_label.db import make_engine
    from onprem_label.db.models import Item, Task

    now = datetime.now(timezone.utc)
    row = {"project_id": project_id, "kind": "raster", "width": 64, "height": 64, "frames": 1,
           "source": "cli", "created_at": now}
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for start in range(0, count, INSERT_CHUNK):
                conn.execute(insert(Item), [row] * min(INSERT_CHUNK, count - start))
            conn.execute(insert(Task).from_select(
                ["project_id", "item_id", "state", "round", "version", "active_seconds", "created_at",
                 "updated_at"],
                select(Item.project_id, Item.id, literal("new"), literal(0), literal(1), literal(0),
                       Item.created_at, Item.created_at).where(Item.project_id == project_id)))
        _analyze(engine)
    finally:
        engine.dispose()


def labeler_ids(url: str) -> list[int]:
    """The ids of the bench labelers, in order."""
    from sqlalchemy import select

    from onprem_label.db import make_engine
    from onprem_label.db.models import User

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(select(User.id).where(User.username.like("labeler%"))
                                     .order_by(User.username)))
    finally:
        engine.dispose()


def age_project(url: str, project_id: int, fraction: float) -> int:
    """Mark the first `fraction` of the tasks accepted, labeled in turn by the bench labelers.

    A project half-way through: the queues' indexes now hold many finished tasks in front of
    the new ones, and each labeler has a long history. Rows changed.
    """
    from sqlalchemy import func, select, update

    from onprem_label.db import make_engine
    from onprem_label.db.models import Task

    people = labeler_ids(url)
    assert people == list(range(people[0], people[0] + len(people))), people  # made in one go, in order
    now = datetime.now(timezone.utc)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            low, high = conn.execute(select(func.min(Task.id), func.max(Task.id))
                                     .where(Task.project_id == project_id)).one()
            cut = low + int((high - low + 1) * fraction)
            changed = conn.execute(update(Task).where(Task.project_id == project_id, Task.id < cut)
                                   .values(state="accepted", labeler_id=people[0] + Task.id % len(people),
                                           submitted_at=now, accepted_at=now, updated_at=now,
                                           version=Task.version + 2)).rowcount
        _analyze(engine)
        return changed
    finally:
        engine.dispose()


def _analyze(engine) -> None:
    # PostgreSQL's autovacuum would analyze after a change this large; do it now, so the plans are
    # the ones a running site gets. SQLite: production never runs ANALYZE, so neither do we.
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE tasks")


def refill_if_low(url: str, project_id: int, reserve: int) -> int:
    """When fewer than `reserve` tasks are new, put the ones the loop handed in back: rows reset.

    Only tasks the loop left (labeling, submitted) go back; an aged project's accepted tasks stay.
    Their annotations and audit events stay too, as they would in a project that keeps growing.
    """
    from sqlalchemy import func, select, update

    from onprem_label.db import make_engine
    from onprem_label.db.models import Task

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            left = conn.scalar(select(func.count()).where(Task.project_id == project_id, Task.state == "new"))
            if left >= reserve:
                return 0
            return conn.execute(update(Task).where(Task.project_id == project_id,
                                                   Task.state.in_(("labeling", "submitted")))
                                .values(state="new", round=0, labeler_id=None, lease_owner_id=None,
                                        lease_expires_at=None, last_heartbeat_at=None, submitted_at=None,
                                        review_sampled=None, version=Task.version + 1)).rowcount
    finally:
        engine.dispose()


def lease_queries(project_id: int, user_id: int) -> list[tuple[str, object]]:
    """The statements lease_next_task runs, by name: the held-lease check, then each queue."""
    from onprem_label.clock import utcnow
    from onprem_label.workflow import leases

    params = {"project_id": project_id, "user_id": user_id, "now": utcnow()}
    queries = [("held (a reload gets the same task)", leases.HELD["labeling"])]
    queries += [(f"label queue: {name}", q) for name, q in leases.LABEL_QUEUES.items()]
    queries += [(f"review queue: {name}", q) for name, q in leases.REVIEW_QUEUES.items()]
    return [(name, query.params(**params)) for name, query in queries]


def explain_lease_queries(url: str, project_id: int, repeats: int = 20) -> list[tuple[str, list[str], float]]:
    """Per lease query: its EXPLAIN QUERY PLAN (SQLite) / EXPLAIN (PostgreSQL) and its median ms alone.

    Asked as the first bench labeler (whose history an aged project holds). Each timed run is its own
    transaction, rolled back (PostgreSQL's row locks go with it).
    """
    from onprem_label.db import make_engine

    engine = make_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    out = []
    try:
        for name, query in lease_queries(project_id, labeler_ids(url)[0]):
            compiled = query.compile(engine)
            params = compiled.construct_params()
            # The values as the driver gets them (naive UTC times), through each type's bind processor.
            processors = compiled._bind_processors
            params = {k: processors[k](v) if k in processors else v for k, v in params.items()}
            with engine.connect() as conn:
                if sqlite:
                    rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled),
                                                tuple(params[k] for k in compiled.positiontup)).all()
                    plan = [str(r[-1]) for r in rows]
                else:
                    plan = [r[0] for r in conn.exec_driver_sql("EXPLAIN " + str(compiled), params).all()]
                conn.rollback()
                took = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    conn.execute(query).all()
                    took.append(time.perf_counter() - started)
                    conn.rollback()
            out.append((name, plan, sorted(took)[len(took) // 2] * 1000))
    finally:
        engine.dispose()
    return out


class LoopClient:
    """One labeler on one keep-alive connection: lease next -> save -> submit, each request timed."""

    def __init__(self, port: int, token: str, project_id: int):
        self.port, self.project_id = port, project_id
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection(c.LOOPBACK, port, timeout=30)

    def _call(self, method: str, path: str, body: dict) -> tuple[int, bytes, float]:
        sent = time.monotonic()
        try:
            self.conn.request(method, path, body=json.dumps(body).encode(), headers=self.headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            self.conn = http.client.HTTPConnection(c.LOOPBACK, self.port, timeout=30)
            return 0, repr(exc).encode(), time.monotonic() - sent
        return response.status, raw, time.monotonic() - sent

    def loop_once(self) -> tuple[str, dict[str, float], str]:
        """One loop: ("ok"|"empty"|"error", seconds per request kind, what went wrong)."""
        took: dict[str, float] = {}
        status, raw, took["next"] = self._call("POST", f"/api/v1/projects/{self.project_id}/tasks/next", {})
        if status == 204:
            return "empty", took, ""
        if status != 200:
            return "error", took, f"next {status} {raw[:300]!r}"
        task = json.loads(raw)["task"]
        body = {"shapes": [BOX], "classifications": {"quality": "good"}, "version": task["version"]}
        status, raw, took["save"] = self._call("PUT", f"/api/v1/tasks/{task['id']}/annotation", body)
        if status != 200:
            return "error", took, f"save {status} {raw[:300]!r}"
        version = json.loads(raw)["task"]["version"]
        status, raw, took["submit"] = self._call("POST", f"/api/v1/tasks/{task['id']}/submit",
                                                 {"version": version})
        if status != 200:
            return "error", took, f"submit {status} {raw[:300]!r}"
        return "ok", took, ""

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


class BareClient:
    """The reference: GET /api/v1/me of bench/_bare_server.py on one keep-alive connection."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection(c.LOOPBACK, port, timeout=30)

    def loop_once(self) -> tuple[str, dict[str, float], str]:
        """One GET, timed."""
        sent = time.monotonic()
        try:
            self.conn.request("GET", "/api/v1/me")
            response = self.conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            self.conn = http.client.HTTPConnection(c.LOOPBACK, self.port, timeout=30)
            return "error", {"bare": time.monotonic() - sent}, repr(exc)
        took = {"bare": time.monotonic() - sent}
        return ("ok", took, "") if response.status == 200 else ("error", took, f"bare {response.status}")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def percentile(sorted_values: list[float], share: float) -> float:
    """The value below which `share` of the sorted values lie (nearest rank); nan when empty."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * share))]


def profiled_serve(data: str, port: int, threads: int, out: str, clock: str = "wall") -> None:
    """`serve` in this process with every request under cProfile (one profiler per worker thread).

    The stats of all threads are merged into `out` when Ctrl+C stops the server. With the wall
    clock, time spent waiting (for the SQLite write lock, a row lock, a disk flush) shows where
    it happens; with clock="cpu" only the thread's own CPU time counts.
    """
    import cProfile
    import pstats
    import threading
    import time as time_module

    import waitress

    from onprem_label.app import create_app
    from onprem_label.config import load_settings
    from onprem_label.storage import open_keyring

    settings = load_settings({"data_dir": data})
    app = create_app(settings, keyring=open_keyring(settings))
    profilers, local, lock = [], threading.local(), threading.Lock()
    inner = app.wsgi_app

    def profiled(environ, start_response):
        profiler = getattr(local, "profiler", None)
        if profiler is None:
            profiler = local.profiler = (cProfile.Profile(time_module.thread_time) if clock == "cpu"
                                         else cProfile.Profile())
            with lock:
                profilers.append(profiler)
        profiler.enable()
        try:
            return list(inner(environ, start_response))
        finally:
            profiler.disable()

    app.wsgi_app = profiled
    server = waitress.create_server(app, host=c.LOOPBACK, port=port, threads=threads, ident="profiled")
    print(f"profiled onprem-label serving on http://{c.LOOPBACK}:{port}/", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        if profilers:
            stats = pstats.Stats(profilers[0])
            for profiler in profilers[1:]:
                stats.add(profiler)
            stats.dump_stats(out)


if __name__ == "__main__":
    # python bench/_workflow.py DATA_DIR PORT THREADS OUT.prof wall|cpu  (label_loop.py --profile starts this)
    import sys

    profiled_serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
