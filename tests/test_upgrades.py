"""Upgrades: a data directory made at each older migration head keeps every row through `db upgrade`;
a database newer than the code stops `serve`, `db upgrade` and `doctor` without a change."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from onprem_label.audit.chain import append, audit_key
from onprem_label.cli import cli
from onprem_label.config import ENV_PREFIX, load_settings
from onprem_label.db import make_engine, migrate
from onprem_label.db.engine import read_connection
from onprem_label.storage import init_keyring, open_store

T = "2026-11-30 10:00:00.000000"
T2 = "2026-11-30 22:00:00.000000"
OLDER_HEADS = ("0001", "0002", "0003", "0004", "0005", "0006")


@pytest.fixture(autouse=True)
def no_machine_env(monkeypatch):
    """The machine's own ONPREM_LABEL_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def rows_of(revision: str, blob_id: str) -> dict[str, list[dict]]:
    """Representative rows for every table that exists at `revision`, in the columns it had then."""
    rows = {
        "users": [dict(id=1, username="alice", display_name="Alice A", password_hash="scrypt$n=17$x", roles="admin",
                       active=True, must_change_password=False, failed_logins=2, last_failed_at=T, locked_until=None,
                       totp_secret_sealed="sealed-totp", totp_enabled=True, totp_last_step=1234,
                       recovery_codes='["h1", "h2"]', break_glass_hash=None, break_glass_expires_at=None,
                       created_at=T, password_changed_at=T, last_login_at=T2),
                  dict(id=2, username="bob", display_name="Bob", password_hash="scrypt$n=17$y", roles="labeler",
                       active=True, must_change_password=True, failed_logins=0, last_failed_at=None,
                       locked_until=T2, totp_secret_sealed=None, totp_enabled=False, totp_last_step=None,
                       recovery_codes="[]", break_glass_hash="bg", break_glass_expires_at=T2, created_at=T,
                       password_changed_at=None, last_login_at=None)],
        "api_tokens": [dict(id=1, user_id=1, name="ci", token_hash="a" * 64, created_at=T, last_used_at=T2,
                            revoked_at=None)],
        "login_sessions": [dict(id=1, sid_hash="b" * 64, user_id=2, created_at=T, last_seen_at=T2, expires_at=T2,
                                client_addr="10.0.0.5", user_agent="Firefox/128", break_glass=False,
                                data='{"csrf": "tok"}')],
        "projects": [dict(id=1, name="chest CT", description="nodules", created_by=1, created_at=T,
                          label_schema='{"classes": [{"name": "nodule", "color": "#ff0000"}]}',
                          settings='{"lease_minutes": 20}')],
        "project_members": [dict(project_id=1, user_id=2, role="labeler", added_at=T),
                            dict(project_id=1, user_id=1, role="manager", added_at=T)],
    }
    if revision < "0005":  # before the chain: plain rows, sealed by the upgrade
        rows["audit_events"] = [
            dict(id=n, ts=T, actor_id=1, actor_name="alice", actor_role="admin", action="user:create",
                 object_type="user", object_id=str(n), outcome="success", client_addr="console", user_agent="",
                 request_id=f"r{n}", details=f'{{"n": {n}}}') for n in (1, 2, 3)]
    if revision >= "0002":
        rows["blobs"] = [dict(id=blob_id, size=4000, created_at=T)]
    if revision >= "0003":
        rows["items"] = [dict(id=1, project_id=1, kind="raster", width=64, height=48, frames=1, modality="US",
                              study_uid="2.25.7", series_uid="2.25.8", is_stack=False, needs_pixel_check=True,
                              pixel_check_reasons='["ultrasound"]', pixel_check_cleared_by=None,
                              pixel_check_cleared_at=None, source="cli", created_by=1, created_at=T)]
        rows["item_images"] = [dict(id=1, item_id=1, project_id=1, position=0, blob_id=blob_id,
                                    source_digest="c" * 64, source_page=0, instance_uid="2.25.9", sort_key=1.5,
                                    frames=1, width=64, height=48, meta='{"photometric": "RGB"}',
                                    deid_report='{"removed": 3}', created_at=T)]
        rows["renditions"] = [dict(source_blob_id=blob_id, frame=0, spec="thumb-256", blob_id=blob_id, created_at=T)]
        rows["deid_links"] = [dict(image_id=1, sealed=b"\x00\x01sealed", created_at=T)]
    if revision >= "0004":
        rows["schema_versions"] = [dict(project_id=1, version=1, created_by=1, created_at=T,
                                        label_schema='{"classes": [{"name": "nodule", "color": "#ff0000"}]}')]
        rows["tasks"] = [dict(id=1, project_id=1, item_id=1, state="submitted", round=1, version=4, labeler_id=2,
                              reviewer_id=None, lease_owner_id=None, lease_expires_at=None, review_sampled=True,
                              active_seconds=95, last_heartbeat_at=T, created_at=T, updated_at=T2,
                              submitted_at=T2, accepted_at=None)]
        rows["annotations"] = [dict(id=1, task_id=1, revision=1, round=0, kind="label", author_id=2, schema_version=1,
                                    shapes='[{"type": "bbox", "label": "nodule", "frame": 0, "x": 1, "y": 2, '
                                           '"width": 3, "height": 4}]',
                                    classifications='{"quality": "good"}', created_at=T)]
        rows["reviews"] = [dict(id=1, task_id=1, round=0, reviewer_id=1, decision="reject", comment="box too loose",
                                shape_id="s1", annotation_revision=1, created_at=T)]
    if revision >= "0006":
        rows["pay_entries"] = [dict(id=1, project_id=1, user_id=2, task_id=1, kind="label", amount="1.50",
                                    currency="EUR", rate="1.50", created_at=T)]
        rows["qualification_attempts"] = [dict(id=1, project_id=1, user_id=2, item_ids="[1]", pass_mark=0.8,
                                               answered=1, correct=1, score=1.0, passed=True, counted=True,
                                               started_at=T, finished_at=T2)]
        rows["role_proposals"] = [dict(id=1, project_id=1, user_id=2, kind="promote", status="open",
                                       figures='{"accuracy": 0.99}', reason="99% on gold", created_at=T,
                                       decided_by=None, decided_at=None)]
        rows["gold_items"] = [dict(item_id=1, project_id=1, use="hidden", reference='{"shapes": []}', active=True,
                                   created_by=1, created_at=T, updated_at=T)]
        rows["gold_checks"] = [dict(id=1, project_id=1, item_id=1, task_id=1, user_id=2, purpose="gold",
                                    stage="submitted", round=0, revision=1, score=0.9, correct=True, detail="{}",
                                    created_at=T)]
        rows["work_log"] = [dict(id=1, project_id=1, task_id=1, user_id=2, kind="label", outcome="submitted",
                                 seconds=95, ended_at=T2)]
        rows["skill_profiles"] = [dict(user_id=2, kind="modality", skill="US", reviewed=3, passed=2, gold=1,
                                       gold_correct=1, label_seconds=300, label_tasks=3, updated_at=T)]
    return rows


CHAINED_EVENTS = [{"ts": datetime(2026, 11, 30, 10, n, tzinfo=timezone.utc), "actor_id": 1, "actor_name": "alice",
                   "actor_role": "admin", "action": "project:create", "object_type": "project", "object_id": "1",
                   "study_uid": "", "outcome": "success", "client_addr": "console", "user_agent": "",
                   "request_id": f"c{n}", "details": {"n": n}} for n in range(3)]


def read_back(conn, columns: dict[str, list[str]]) -> dict[str, list]:
    """Those columns of those tables, every row as the database returns it, in a stable order."""
    out = {}
    for table, names in columns.items():
        listed = ", ".join(f'"{c}"' for c in names)
        out[table] = sorted((tuple(r) for r in conn.execute(text(f'SELECT {listed} FROM "{table}"'))), key=repr)
    return out


def cli_env(database_url: str) -> dict[str, str]:
    """The environment of an operator's shell: this Python's, no ONPREM_LABEL_* but the database URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    if database_url:
        env[f"{ENV_PREFIX}DATABASE_URL"] = database_url
    return env


def operator(data: Path, database_url: str, *args: str) -> subprocess.CompletedProcess:
    """`onprem-label --data-dir DATA ARGS...` as a separate process, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "onprem_label", "--data-dir", str(data), *args],
                          env=cli_env(database_url), capture_output=True, text=True, timeout=120)


def make_old_site(data: Path, database_url: str, revision: str):
    """A data directory (key, keyring, one stored blob), its database at `revision` and filled.

    Returns (settings, the planted columns of each table, those columns read back).
    """
    settings = load_settings({"data_dir": str(data), "database_url": database_url}, env={})
    keyring, _notes = init_keyring(settings)
    store = open_store(settings, keyring)
    store.root.mkdir(mode=0o700, exist_ok=True)
    # (Before revision 0002 there was no blobs table: a blob then would be an orphan.)
    blob_id = store.put(io.BytesIO(os.urandom(4000))).blob_id if revision >= "0002" else ""
    rows = rows_of(revision, blob_id)
    engine = make_engine(settings.effective_database_url)
    try:
        migrate.upgrade(engine, revision)
        with engine.begin() as conn:
            for table, planted in rows.items():
                columns = list(planted[0])
                conn.execute(text(f'INSERT INTO "{table}" ({", ".join(columns)}) '
                                  f'VALUES ({", ".join(":" + c for c in columns)})'), planted)
            if revision >= "0005":
                append(conn, audit_key(keyring), [dict(e) for e in CHAINED_EVENTS])
        columns = {table: list(planted[0]) for table, planted in rows.items()}
        with read_connection(engine) as conn:
            before = read_back(conn, columns)
    finally:
        engine.dispose()
    if settings.is_sqlite:
        (data / "onprem-label.db").chmod(0o600)  # as init makes it
    return settings, columns, before


@pytest.mark.parametrize("revision", OLDER_HEADS)
def test_db_upgrade_from_an_older_head_keeps_every_row(tmp_path, empty_database_url, revision):
    """A data directory at an older head: `db upgrade` reaches head, every planted row keeps its values, doctor is clean."""
    data = tmp_path / "data"
    settings, columns, before = make_old_site(data, empty_database_url, revision)
    refused = operator(data, empty_database_url, "serve")
    assert refused.returncode == 1 and "run 'onprem-label db upgrade'" in refused.stderr, refused.stderr

    result = operator(data, empty_database_url, "db", "upgrade")
    head = migrate.head_revision(make_engine("sqlite://"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"database upgraded from {revision} to {head}"

    engine = make_engine(settings.effective_database_url)
    try:
        assert migrate.current_revision(engine) == head
        with read_connection(engine) as conn:
            assert read_back(conn, columns) == before
            events = conn.execute(text("SELECT count(*) FROM audit_events")).scalar()
    finally:
        engine.dispose()
    assert events == 3
    assert all(before[t] for t in before)  # every planted table held its rows before, too

    # The upgraded site works: the accounts list reads the old rows, doctor finds nothing wrong.
    users = operator(data, empty_database_url, "user", "list")
    assert users.returncode == 0 and "alice" in users.stdout and "bob" in users.stdout, users.stderr
    doctor = CliRunner().invoke(cli, ["--data-dir", str(data), "doctor", "--json", "--audit-full"],
                                env=cli_env(empty_database_url))
    report = json.loads(doctor.stdout)
    # The upgrade seals (or finds) the events, but writes no checkpoint: the one warning expected.
    assert [(f["check"], f["severity"]) for f in report["findings"] if f["severity"] != "ok"] == \
        [("audit", "warning")], report
    assert "no checkpoints were found" in [f for f in report["findings"] if f["check"] == "audit"][0]["detail"]


def test_a_database_newer_than_the_code_stops_serve_upgrade_and_doctor(tmp_path, database_url):
    """A revision the code does not know: serve and db upgrade refuse in one line (exit 1), doctor reports it; no change."""
    data = tmp_path / "data"
    init = CliRunner().invoke(cli, ["--data-dir", str(data), "init"], env=cli_env(database_url))
    assert init.exit_code == 0, init.output
    settings = load_settings({"data_dir": str(data), "database_url": database_url}, env={})
    engine = make_engine(settings.effective_database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))

    def dump():
        with read_connection(engine) as conn:
            tables = [r[0] for r in conn.execute(text(
                "SELECT name FROM sqlite_master WHERE type = 'table'" if engine.dialect.name == "sqlite" else
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))]
            return {t: sorted(map(repr, conn.execute(text(f'SELECT * FROM "{t}"')))) for t in sorted(tables)}

    try:
        before = dump()
        head = migrate.head_revision(engine)
        message = (f"error: database is at revision ffff9999, newer than this version of onprem-label knows "
                   f"(head {head}); upgrade the software")
        for args in (("serve",), ("db", "upgrade")):
            result = operator(data, database_url, *args)
            assert result.returncode == 1, (args, result.stdout, result.stderr)
            assert result.stderr.strip().splitlines() == [message], result.stderr
        doctor = CliRunner().invoke(cli, ["--data-dir", str(data), "doctor"], env=cli_env(database_url))
        assert doctor.exit_code == 2
        assert f"problem  database     {message[len('error: '):]}" in doctor.stdout.splitlines()
        assert dump() == before
    finally:
        engine.dispose()
