"""Backups of a site at work: a real `serve` with 16 labelers, 2 reviewers and uploads; and a killed backup.

The backup runs as its own `onprem-label backup` process while the clients keep labeling,
reviewing and uploading. Whatever a client saw accepted (or stored) before the backup started
must be in the restored copy; the restored audit chain verifies with the checkpoints written
during the run, every blob authenticates and every table has the manifest's count. A backup
killed with SIGKILL half-way is never reported complete.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text

from onprem_label.audit.site import chain_for
from onprem_label.audit.verify import verify_chain
from onprem_label.config import load_settings
from onprem_label.db import make_engine
from onprem_label.db.engine import read_connection
from onprem_label.db.models import Blob, Item, Task
from onprem_label.storage import open_keyring, open_store
from site_helpers import add_image_less_tasks, add_people
from workflow_helpers import BOX, SCHEMA

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("pg_client_programs")]

LOOPBACK = "127.0.0.1"
TASKS = 3000
LABELERS = 16
REVIEWERS = 2
WORK_BEFORE = 6.0  # seconds of work before the backup starts
WORK_AFTER = 2.0  # and after it has finished
TIMEOUT = 120


def _command() -> list[str]:
    script = Path(sys.executable).parent / "onprem-label"
    return [str(script)] if script.exists() else [sys.executable, "-m", "onprem_label"]


def _env(database_url: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONPREM_LABEL_")}
    if database_url:
        env["ONPREM_LABEL_DATABASE_URL"] = database_url
    return env


def _cli(data: Path, *args: str, database_url: str = "", timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*_command(), "--data-dir", str(data), *args], env=_env(database_url),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# --- the site ----------------------------------------------------------------------------------

def _settings(data: Path, url: str):
    return load_settings({"data_dir": str(data), "database_url": url}, env={})


@dataclass
class Ledger:
    """What the clients saw, with the monotonic time each answer arrived."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: dict[int, float] = field(default_factory=dict)
    uploaded: dict[int, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    requests: int = 0


class Client:
    """One person on one keep-alive connection."""

    def __init__(self, name: str, token: str, port: int, ledger: Ledger):
        self.name, self.port, self.ledger = name, port, ledger
        self.headers = {"Authorization": f"Bearer {token}"}
        self.conn = http.client.HTTPConnection(LOOPBACK, port, timeout=60)

    def call(self, method: str, path: str, body: dict | None = None, *, raw: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, dict | None]:
        """(status, JSON or None); a 5xx or a broken connection is a problem."""
        payload = raw if raw is not None else json.dumps(body or {}).encode()
        try:
            self.conn.request(method, path, body=payload, headers={**self.headers, "Content-Type": content_type})
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            self.conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=60)
            self.ledger.problems.append(f"{self.name}: {method} {path}: {exc!r}")
            return 0, None
        with self.ledger.lock:
            self.ledger.requests += 1
        if response.status >= 500:
            self.ledger.problems.append(f"{self.name}: {method} {path} -> {response.status} {data[:300]!r}")
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, None

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def _run(target, client: Client, project_id: int, stop: threading.Event) -> None:
    """A client's loop; a crash is a problem, and its connection is closed either way."""
    try:
        target(client, project_id, stop)
    except Exception as exc:
        client.ledger.problems.append(f"{client.name} crashed: {exc!r}")
    finally:
        client.close()


def _labeler(client: Client, project_id: int, stop: threading.Event) -> None:
    while not stop.is_set():
        status, got = client.call("POST", f"/api/v1/projects/{project_id}/tasks/next")
        if status != 200:
            time.sleep(0.2)
            continue
        task = got["task"]
        status, saved = client.call("PUT", f"/api/v1/tasks/{task['id']}/annotation",
                                    {"shapes": [BOX], "classifications": {"quality": "good"},
                                     "version": task["version"]})
        if status != 200:
            continue
        status, done = client.call("POST", f"/api/v1/tasks/{task['id']}/submit",
                                   {"version": saved["task"]["version"]})
        if status == 200 and done["task"]["state"] == "accepted":  # not drawn for review
            with client.ledger.lock:
                client.ledger.accepted[task["id"]] = time.monotonic()


def _reviewer(client: Client, project_id: int, stop: threading.Event) -> None:
    while not stop.is_set():
        status, got = client.call("POST", f"/api/v1/projects/{project_id}/tasks/next", {"kind": "review"})
        if status != 200:
            time.sleep(0.2)
            continue
        task = got["task"]
        status, done = client.call("POST", f"/api/v1/tasks/{task['id']}/review",
                                   {"decision": "accept", "version": task["version"]})
        if status == 200 and done["task"]["state"] == "accepted":
            with client.ledger.lock:
                client.ledger.accepted[task["id"]] = time.monotonic()


def _png(seed: int) -> bytes:
    from PIL import Image

    image = Image.frombytes("L", (48, 48), bytes((seed * 7 + i * 13) % 256 for i in range(48 * 48)))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _uploader(client: Client, project_id: int, stop: threading.Event) -> None:
    """The manager uploads a new picture now and then: blobs are written while the backup runs."""
    seed = 0
    while not stop.is_set():
        seed += 1
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"p{seed}.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + _png(seed) + f"\r\n--{boundary}--\r\n".encode()
        status, got = client.call("POST", f"/api/v1/projects/{project_id}/items", raw=body,
                                  content_type=f"multipart/form-data; boundary={boundary}")
        if status == 200 and got["results"][0]["status"] == "imported":
            with client.ledger.lock:
                client.ledger.uploaded[got["results"][0]["item_id"]] = time.monotonic()
        time.sleep(0.1)


def _serve(data: Path, url: str) -> tuple[subprocess.Popen, int, Path]:
    port, log = _free_port(), data.parent / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*_command(), "--data-dir", str(data), "serve", "--port", str(port)],
                                env=_env(url), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while True:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc, port, log
        except OSError:
            pass
        finally:
            conn.close()
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve did not start: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def test_backup_while_sixteen_clients_work_restores_everything_accepted_before_it(
        tmp_path, empty_database_url, restore_url):
    """Backup under a 16-labeler loop: the restore holds every task accepted before the backup began."""
    data, url = tmp_path / "data", empty_database_url
    assert _cli(data, "init", database_url=url).returncode == 0
    db_url = url or f"sqlite:///{data / 'onprem-label.db'}"
    # Checkpoints every 50 events, so the checkpoint file grows during the backup too.
    (data / "onprem-label.toml").write_text("audit_checkpoint_every = 50\n")
    people = {name: token for name, (_, token) in add_people(
        data, db_url, labelers=LABELERS, reviewers=REVIEWERS, token_name="backup").items()}
    proc, port, log = _serve(data, url)
    ledger, stop, threads = Ledger(), threading.Event(), []
    try:
        manager = Client("manager", people["manager"], port, ledger)
        status, project = manager.call("POST", "/api/v1/projects", {
            "name": "Backup under load", "label_schema": SCHEMA,
            "settings": {"review_rate": 0.3, "spot_check_rate": 0.0}})
        assert status == 201, project
        for name in people:
            if name != "manager":
                role = "labeler" if name.startswith("labeler") else "reviewer"
                assert manager.call("POST", f"/api/v1/projects/{project['id']}/members",
                                    {"username": name, "role": role})[0] == 201
        add_image_less_tasks(db_url, project["id"], TASKS)
        for name, token in people.items():
            target = _uploader if name == "manager" else _labeler if name.startswith("labeler") else _reviewer
            threads.append(threading.Thread(target=_run, args=(target, Client(name, token, port, ledger),
                                                               project["id"], stop), name=name))
        for thread in threads:
            thread.start()
        time.sleep(WORK_BEFORE)
        with ledger.lock:
            started = time.monotonic()
            accepted_before, uploaded_before = set(ledger.accepted), set(ledger.uploaded)
        backup = _cli(data, "backup", str(tmp_path / "backup"), database_url=url)
        finished = time.monotonic()
        time.sleep(WORK_AFTER)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=70)
        manager.close()
        _stop(proc)
    assert backup.returncode == 0, backup.stderr
    assert not ledger.problems, ledger.problems[:10]
    assert "Traceback" not in log.read_text(errors="replace")
    accepted_during = {t for t, at in ledger.accepted.items() if started <= at <= finished}
    assert len(accepted_before) > 50 and uploaded_before, (len(accepted_before), len(uploaded_before))
    assert len(ledger.accepted) > len(accepted_before)  # the work went on during and after the backup
    print(f"\n{'PostgreSQL' if url else 'SQLite'}: backup took {finished - started:.1f} s under load; "
          f"{len(accepted_before)} tasks accepted before it, {len(accepted_during)} during, "
          f"{len(ledger.accepted)} in all; {len(ledger.uploaded)} uploads; {ledger.requests} requests")

    verified = _cli(data, "backup", "verify", str(tmp_path / "backup"), database_url=url)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    restored = tmp_path / "restored"
    (tmp_path / "restored.key").write_bytes((tmp_path / "data.key").read_bytes())
    (tmp_path / "restored.key").chmod(0o600)
    args = ["--database-url", restore_url] if restore_url else []
    result = _cli(restored, "restore", str(tmp_path / "backup"), *args)
    assert result.returncode == 0, result.stdout + result.stderr

    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    settings = load_settings({"data_dir": str(restored)}, env={})
    keyring = open_keyring(settings)
    engine = make_engine(settings.effective_database_url)
    try:
        with read_connection(engine, snapshot=True) as conn:
            accepted = set(conn.scalars(select(Task.id).where(Task.state == "accepted")))
            assert accepted_before <= accepted, sorted(accepted_before - accepted)[:20]
            items = set(conn.scalars(select(Item.id)))
            assert uploaded_before <= items, sorted(uploaded_before - items)
            for table, rows in manifest["database"]["rows"].items():
                expected = rows + (table == "audit_events")  # + the backup:restore event
                assert conn.scalar(text(f'SELECT count(*) FROM "{table}"')) == expected, table
            result = verify_chain(conn, chain_for(settings, keyring))
            assert result.ok and result.checkpoints >= 1, result.as_dict()
            blob_ids = list(conn.scalars(select(Blob.id)))
    finally:
        engine.dispose()
    store = open_store(settings, keyring)
    assert len(blob_ids) == manifest["blobs"]["count"] >= len(uploaded_before)
    for blob_id in blob_ids:
        store.verify(blob_id)


def _site_with_blobs(data: Path, url: str, count: int) -> list:
    """An initialised site with `count` blobs of 1 MiB (and their rows): a copy that takes a while."""
    assert _cli(data, "init", database_url=url).returncode == 0
    settings = _settings(data, url)
    store = open_store(settings, open_keyring(settings))
    now = datetime.now(timezone.utc)
    refs = [store.put(io.BytesIO(os.urandom(1 << 20))) for _ in range(count)]
    engine = make_engine(settings.effective_database_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(Blob), [{"id": r.blob_id, "size": r.size, "created_at": now} for r in refs])
    finally:
        engine.dispose()
    return refs


def _kill_when_blobs_copied(args: list[str], url: str, folder: Path, enough: int) -> None:
    """Run an onprem-label command and SIGKILL it once `enough` entries exist under folder/blobs."""
    proc = subprocess.Popen([*_command(), *args], env=_env(url),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while sum(1 for _ in (folder / "blobs").rglob("*")) < enough if folder.exists() else True:
            assert proc.poll() is None, "the command finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    assert proc.returncode == -signal.SIGKILL


def test_a_backup_killed_half_way_is_never_reported_complete(tmp_path, empty_database_url):
    """SIGKILL during the blob copy: `backup verify` says incomplete (exit 1), `restore` refuses it."""
    data, url = tmp_path / "data", empty_database_url
    refs = _site_with_blobs(data, url, 400)
    dest = tmp_path / "backup"
    _kill_when_blobs_copied(["--data-dir", str(data), "backup", str(dest)], url, dest, 40)
    assert not (dest / "manifest.json").exists()
    copied = [p for p in (dest / "blobs").rglob("*") if p.is_file()]
    assert 0 < len(copied) < len(refs)
    verified = _cli(data, "backup", "verify", str(dest), database_url=url)
    assert verified.returncode == 1
    assert "incomplete backup" in verified.stderr and "OK" not in verified.stdout
    (tmp_path / "restored.key").write_bytes((tmp_path / "data.key").read_bytes())
    (tmp_path / "restored.key").chmod(0o600)
    restored = _cli(tmp_path / "restored", "restore", str(dest))
    assert restored.returncode == 1 and "incomplete backup" in restored.stderr
    assert not (tmp_path / "restored").exists()


def test_a_restore_killed_half_way_leaves_a_directory_nothing_starts_on(tmp_path, empty_database_url, restore_url):
    """SIGKILL during a restore's blob copy: serve and every other command refuse the half-made directory,
    doctor reports it (exit 2), and a new restore after removing it succeeds."""
    data, url = tmp_path / "data", empty_database_url
    _site_with_blobs(data, url, 400)
    dest = tmp_path / "backup"
    assert _cli(data, "backup", str(dest), database_url=url).returncode == 0
    target = tmp_path / "restored"
    (tmp_path / "restored.key").write_bytes((tmp_path / "data.key").read_bytes())
    (tmp_path / "restored.key").chmod(0o600)
    args = ["--data-dir", str(target), "restore", str(dest)] + (["--database-url", restore_url] if restore_url else [])
    _kill_when_blobs_copied(args, "", target, 40)
    assert (target / "RESTORE-UNFINISHED").exists()
    served = _cli(target, "serve", "--port", str(_free_port()))
    assert served.returncode == 1 and "did not finish" in served.stderr, served.stderr
    assert _cli(target, "user", "list").returncode == 1
    doctor = _cli(target, "doctor")
    assert doctor.returncode == 2 and "did not finish" in doctor.stdout, doctor.stdout
