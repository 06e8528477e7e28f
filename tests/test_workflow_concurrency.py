"""Many people at once against real `serve` processes: each task has one holder, every save is kept.

Sixteen labelers (each with an API token and a keep-alive connection) loop lease -> save ->
submit, while two reviewers accept or reject the tasks drawn for review at the same time, until
every task is accepted. The review rate is lowered to 10% to keep the run short; the labelers'
loop is the load. SQLite runs one server. PostgreSQL runs two servers on one database, with the clients
split between them. The tasks are bulk-inserted items without images; the workflow never reads
pixels. Each client writes down what it saw, and the database and the audit trail must agree with
that record, exactly.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select

from onprem_label.audit.verify import verify_chain
from onprem_label.db import make_engine, make_sessionmaker
from onprem_label.db.engine import read_connection
from onprem_label.db.models import Annotation, AuditEvent, Review, Task
from site_helpers import add_image_less_tasks, add_people, site_chain
from workflow_helpers import BOX, SCHEMA

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"
TASKS = 2000
LABELERS = 16
REVIEWERS = 2
REVIEW_RATE = 0.1  # the project's sampled review: ~200 reviews besides the 2,000 label loops
REJECT_EVERY = 3  # reviewed first-round tasks whose id is a multiple of this are rejected once
TWO_SAVES_EVERY = 4  # these tasks get two saves before submit (revision counts must match)
STALE_EVERY = 7  # on these tasks the labeler also sends one save based on an old version (must be 409)
START_TIMEOUT = 60
REQUEST_TIMEOUT = 60
WORKLOAD_TIMEOUT = 420  # an upper bound; a run takes about a minute on 2 cores
STOP_TIMEOUT = 20
IDLE_POLL = 0.5  # a client with no work waits this long before asking again


# --- servers -----------------------------------------------------------------------------------

def _command() -> list[str]:
    script = Path(sys.executable).parent / "onprem-label"
    return [str(script)] if script.exists() else [sys.executable, "-m", "onprem_label"]


def _env(database_url: str) -> dict[str, str]:
    """The environment of the commands: only the database URL set, faulthandler on for stack dumps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONPREM_LABEL_")}
    if database_url:
        env["ONPREM_LABEL_DATABASE_URL"] = database_url
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _status_of(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


@dataclass
class Server:
    """One `onprem-label serve` process with its log file."""

    port: int
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        """Everything the server wrote so far."""
        return self.log.read_text(errors="replace")

    def dump(self) -> str:
        """The log, after every thread's stack (SIGABRT + faulthandler) if it still runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        return self.log_text()[-20000:]

    def stop(self) -> None:
        """Ctrl+C (a clean waitress shutdown), then kill if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)


def _init(data: Path, database_url: str) -> None:
    result = subprocess.run([*_command(), "--data-dir", str(data), "init"], env=_env(database_url),
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"init failed:\n{result.stdout}\n{result.stderr}"


def _serve(data: Path, database_url: str, name: str) -> Server:
    port, log = _free_port(), data.parent / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*_command(), "--data-dir", str(data), "serve", "--host", LOOPBACK,
                                 "--port", str(port)], env=_env(database_url), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    server = Server(port, proc, log)
    deadline = time.monotonic() + START_TIMEOUT
    while _status_of(port, "/healthz") != 200:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{server.log_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"/healthz not 200 within {START_TIMEOUT} s:\n{server.dump()}")
        time.sleep(0.1)
    return server


# --- clients -----------------------------------------------------------------------------------

@dataclass
class Hold:
    """One lease as a client saw it: from the lease's answer to the request that ended it."""

    task_id: int
    who: str
    role: str
    start: float
    end: float


@dataclass
class Ledger:
    """What the clients did and saw, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    saves: dict[int, list[tuple[str, int, list]]] = field(default_factory=lambda: defaultdict(list))
    labeled_by: dict[int, str] = field(default_factory=dict)
    rejected: set[int] = field(default_factory=set)
    stale_refused: int = 0

    def problem(self, text: str) -> None:
        """Note something no correct server does; the test fails on any."""
        with self.lock:
            self.problems.append(text)


class Person:
    """One user on one keep-alive connection to one server; every answer is checked as it comes."""

    def __init__(self, name: str, token: str, port: int, ledger: Ledger):
        self.name, self.port, self.ledger = name, port, ledger
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection(LOOPBACK, port, timeout=REQUEST_TIMEOUT)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None]:
        """(status, JSON body or None); a 5xx, a non-JSON error or a broken connection is a problem."""
        try:
            self.conn.request(method, path, body=json.dumps(body or {}).encode(), headers=self.headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            self.conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=REQUEST_TIMEOUT)
            raise Stop(f"{self.name}: {method} {path} -> {exc!r}") from None
        status, ctype = response.status, response.getheader("Content-Type", "")
        with self.ledger.lock:
            self.ledger.statuses[status] += 1
        parsed = None
        if raw and ctype.startswith("application/json"):
            try:
                parsed = json.loads(raw)
            except ValueError:
                pass
        where = f"{self.name} on :{self.port}: {method} {path} {body} -> {status} {raw[:500]!r}"
        if status >= 500:
            self.ledger.problem(f"5xx: {where}")
        elif status >= 300 and not (isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)
                                    and {"code", "message"} <= parsed["error"].keys()):
            self.ledger.problem(f"non-JSON error: {where} (Content-Type {ctype!r})")
        return status, parsed

    def expect(self, wanted: int, method: str, path: str, body: dict | None = None) -> dict | None:
        """The JSON answer of a call that must answer `wanted`; Stop otherwise."""
        status, parsed = self.call(method, path, body)
        if status != wanted:
            raise Stop(f"{self.name}: {method} {path} {body} -> {status} {parsed}, expected {wanted}")
        return parsed

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


class Stop(Exception):
    """A client cannot go on; the message says what it saw."""


def _labeler(person: Person, index: int, project_id: int, done: threading.Event) -> None:
    """Lease -> save (once or twice) -> submit until everything is accepted; rework comes back here."""
    ledger = person.ledger
    while not done.is_set():
        status, got = person.call("POST", f"/api/v1/projects/{project_id}/tasks/next")
        if status == 204:
            time.sleep(IDLE_POLL)
            continue
        if status != 200:
            raise Stop(f"{person.name}: tasks/next -> {status} {got}")
        task, start = got["task"], time.monotonic()
        tid, version = task["id"], task["version"]
        if got["kind"] == "rework":
            last = got["reviews"][-1] if got["reviews"] else {}
            if last.get("comment") != f"redo {tid}":
                ledger.problem(f"{person.name}: rework of {tid} without its comment: {got['reviews']}")
        for n in range(1 + (tid % TWO_SAVES_EVERY == 0)):
            shapes = [{**BOX, "x": index, "y": n + 3 * task["round"]}]  # names its author and save
            body = {"shapes": shapes, "classifications": {"quality": "good"}, "version": version}
            saved = person.expect(200, "PUT", f"/api/v1/tasks/{tid}/annotation", body)
            with ledger.lock:
                ledger.saves[tid].append((person.name, saved["annotation"]["revision"], shapes))
            stale, version = version, saved["task"]["version"]
        if tid % STALE_EVERY == 0:
            refused = person.expect(409, "PUT", f"/api/v1/tasks/{tid}/annotation",
                                    {"shapes": [], "classifications": {}, "version": stale})
            if refused["error"]["code"] != "stale_version" or refused["error"].get("version") != version:
                ledger.problem(f"{person.name}: stale save on {tid} answered {refused}")
            with ledger.lock:
                ledger.stale_refused += 1
        end = time.monotonic()
        submitted = person.expect(200, "POST", f"/api/v1/tasks/{tid}/submit", {"version": version})
        if submitted["task"]["state"] not in ("submitted", "accepted"):  # accepted: not drawn for review
            ledger.problem(f"{person.name}: submit of {tid} gave {submitted['task']}")
        with ledger.lock:
            ledger.holds.append(Hold(tid, person.name, "labeler", start, end))
            ledger.labeled_by.setdefault(tid, person.name)


def _reviewer(person: Person, project_id: int, done: threading.Event) -> None:
    """Lease review work and decide: reject a few first-round tasks with a comment, accept the rest."""
    ledger = person.ledger
    while not done.is_set():
        status, got = person.call("POST", f"/api/v1/projects/{project_id}/tasks/next", {"kind": "review"})
        if status == 204:
            time.sleep(IDLE_POLL)
            continue
        if status != 200:
            raise Stop(f"{person.name}: review tasks/next -> {status} {got}")
        task, start = got["task"], time.monotonic()
        tid = task["id"]
        reject = task["round"] == 0 and tid % REJECT_EVERY == 0
        end = time.monotonic()
        decided = person.expect(200, "POST", f"/api/v1/tasks/{tid}/review",
                                {"decision": "reject" if reject else "accept", "version": task["version"],
                                 "comment": f"redo {tid}" if reject else ""})
        if decided["task"]["state"] != ("rework" if reject else "accepted"):
            ledger.problem(f"{person.name}: review of {tid} gave {decided['task']}")
        with ledger.lock:
            ledger.holds.append(Hold(tid, person.name, "reviewer", start, end))
            if reject:
                ledger.rejected.add(tid)


def _run_client(target, person: Person, *args) -> None:
    try:
        target(person, *args)
    except Stop as exc:
        person.ledger.problem(str(exc))
    except Exception as exc:  # a bug in the client itself: report it, never die silently
        person.ledger.problem(f"{person.name}: client crashed: {exc!r}")
    finally:
        person.close()


# --- arranging ---------------------------------------------------------------------------------

def _workload(tmp_path: Path, database_url: str, server_count: int) -> None:
    """Init, start the servers, arrange, let everyone work until all is accepted, then check it all."""
    data = tmp_path / "data"
    t0 = time.monotonic()
    _init(data, database_url)
    url = database_url or f"sqlite:///{data / 'onprem-label.db'}"
    servers, ledger = [], Ledger()
    try:
        for n in range(server_count):
            servers.append(_serve(data, database_url, f"serve{n}"))
        people = add_people(data, url, labelers=LABELERS, reviewers=REVIEWERS, token_name="concurrency")
        manager = Person("manager", people["manager"][1], servers[0].port, ledger)
        project_id = _project_with_team(manager, people)
        add_image_less_tasks(url, project_id, TASKS)
        t_ready = time.monotonic()
        counts = _work(servers, people, project_id, manager, ledger)
        t_done = time.monotonic()
        assert not ledger.problems, (f"{len(ledger.problems)} problems, first ones:\n"
                                     + "\n".join(ledger.problems[:20]))
        assert counts.get("accepted") == TASKS, f"not finished within {WORKLOAD_TIMEOUT} s: {counts}"
    finally:
        for server in servers:
            server.stop()
    _check_against_database(url, ledger, {name: uid for name, (uid, _) in people.items()})
    # Every server appended to one chain, under 16 clients: it is linear and verifies.
    engine = make_engine(url)
    try:
        with read_connection(engine, snapshot=True) as conn:
            result = verify_chain(conn, site_chain(data, database_url))
        assert result.ok and result.events > TASKS * 3, result.as_dict()
    finally:
        engine.dispose()
    for server in servers:
        log = server.log_text()
        assert "Traceback" not in log and "unhandled error" not in log, log[-20000:]
    requests = sum(ledger.statuses.values())
    print(f"\n{server_count} server(s) on {'PostgreSQL' if database_url else 'SQLite'}: {TASKS} tasks, "
          f"{LABELERS} labelers + {REVIEWERS} reviewers, {requests} requests in {t_done - t_ready:.1f} s "
          f"({requests / (t_done - t_ready):.0f} req/s); setup {t_ready - t0:.1f} s; statuses "
          f"{dict(sorted(ledger.statuses.items()))}; rejected {len(ledger.rejected)}; "
          f"stale saves refused {ledger.stale_refused}")


def _project_with_team(manager: Person, people: dict) -> int:
    """The project (sampled review) and its members, made through the API; its id."""
    created = manager.expect(201, "POST", "/api/v1/projects", {"name": "Concurrency", "label_schema": SCHEMA,
                                                               "settings": {"review_rate": REVIEW_RATE,
                                                                                "spot_check_rate": 0.0}})
    for name in people:
        if name != "manager":
            role = "labeler" if name.startswith("labeler") else "reviewer"
            manager.expect(201, "POST", f"/api/v1/projects/{created['id']}/members",
                           {"username": name, "role": role})
    return created["id"]


def _work(servers: list[Server], people: dict, project_id: int, manager: Person, ledger: Ledger) -> dict:
    """Every labeler and reviewer on a thread of their own (split over the servers) until all is
    accepted, a client gives up or time runs out; the project's last counts."""
    done, threads = threading.Event(), []
    for n, name in enumerate(p for p in people if p != "manager"):
        person = Person(name, people[name][1], servers[n % len(servers)].port, ledger)
        args = (_labeler, person, n, project_id, done) if name.startswith("labeler") else \
            (_reviewer, person, project_id, done)
        threads.append(threading.Thread(target=_run_client, args=args, name=name))
    for thread in threads:
        thread.start()
    deadline, counts = time.monotonic() + WORKLOAD_TIMEOUT, {}
    try:
        while time.monotonic() < deadline and not ledger.problems:
            counts = manager.expect(200, "GET", f"/api/v1/projects/{project_id}")["counts"]
            if counts.get("accepted") == TASKS:
                break
            time.sleep(0.5)
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT + 5)
        manager.close()
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"clients still running: {hung}\n" + "\n".join(s.dump() for s in servers)
    return counts


def _check_against_database(url: str, ledger: Ledger, user_ids: dict[str, int]) -> None:
    """The database and the audit trail say exactly what the clients saw, task by task."""
    names = {uid: name for name, uid in user_ids.items()}
    holds = defaultdict(list)
    for hold in ledger.holds:
        holds[hold.task_id].append(hold)
    # Nobody held a task while someone else did: each lease began after the previous one ended.
    overlaps = [(tid, a, b) for tid, hs in holds.items() for a, b in zip(sorted(hs, key=lambda h: h.start),
                                                                        sorted(hs, key=lambda h: h.start)[1:])
                if b.start <= a.end]
    assert not overlaps, f"{len(overlaps)} tasks held by two at once, e.g. {overlaps[:5]}"
    assert len(holds) == TASKS and ledger.rejected, "no task was rejected: the rework path went untested"
    for tid, hs in holds.items():
        labelers = [h.who for h in hs if h.role == "labeler"]
        assert labelers == [ledger.labeled_by[tid]] * (1 + (tid in ledger.rejected)), \
            f"task {tid}: labeled by {labelers}; rework must come back to its labeler, once"

    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as db:
            tasks = {t.id: (t.state, t.labeler_id) for t in db.scalars(select(Task))}
            leases = defaultdict(list)
            for object_id, actor in db.execute(select(AuditEvent.object_id, AuditEvent.actor_name)
                                               .where(AuditEvent.action == "task:lease")
                                               .order_by(AuditEvent.id)):
                leases[int(object_id)].append(actor)
            submits = db.scalar(select(func.count()).where(AuditEvent.action == "task:submit"))
            revisions = defaultdict(list)
            for row in db.scalars(select(Annotation).order_by(Annotation.task_id, Annotation.revision)):
                revisions[row.task_id].append((names[row.author_id], row.revision, row.shapes))
            reviews = defaultdict(list)
            for task_id, decision, reviewer_id in db.execute(select(Review.task_id, Review.decision,
                                                                    Review.reviewer_id).order_by(Review.id)):
                reviews[task_id].append((decision, names.get(reviewer_id)))
            self_reviews = db.scalar(select(func.count()).select_from(Review)
                                     .join(Task, Task.id == Review.task_id)
                                     .where(Review.reviewer_id == Task.labeler_id))
            db.rollback()
    finally:
        engine.dispose()

    assert len(tasks) == TASKS and all(state == "accepted" for state, _ in tasks.values())
    assert submits == TASKS + len(ledger.rejected)
    decisions = Counter(d for rs in reviews.values() for d, _ in rs)
    assert decisions["reject"] == len(ledger.rejected)
    assert decisions["accept"] + decisions["auto_accept"] == TASKS
    assert decisions["accept"] and decisions["auto_accept"] and self_reviews == 0, decisions
    for tid, (_, labeler_id) in tasks.items():
        seen = [h.who for h in sorted(holds[tid], key=lambda h: h.start)]
        assert leases[tid] == seen, f"task {tid}: audit says leased by {leases[tid]}, clients saw {seen}"
        assert names[labeler_id] == ledger.labeled_by[tid]
        reviewed_by = [h.who for h in sorted(holds[tid], key=lambda h: h.start) if h.role == "reviewer"]
        assert [who for d, who in reviews[tid] if d != "auto_accept"] == reviewed_by, \
            f"task {tid}: reviews {reviews[tid]}, clients saw {reviewed_by}"
        saves, rows = ledger.saves[tid], revisions[tid]
        assert [r[1] for r in rows] == list(range(1, len(saves) + 1)), f"task {tid}: {len(rows)} revisions"
        assert rows == saves, f"task {tid}: saved {saves}, stored {rows}"


def test_sixteen_labelers_and_two_reviewers_on_one_sqlite_server(tmp_path):
    """SQLite, one server: 2,000 tasks each leased to one labeler at a time, every save and decision kept."""
    _workload(tmp_path, "", server_count=1)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_sixteen_labelers_and_two_reviewers_on_two_postgresql_servers(tmp_path, empty_database_url):
    """PostgreSQL, two servers on one database: no task handed out twice, every save and decision kept."""
    _workload(tmp_path, empty_database_url, server_count=2)
