"""Auditor API and pages: search, export (CSV/JSON Lines, signed, injection-safe), verify; and the CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from conftest import login
from onprem_label.audit import AuditAction
from onprem_label.audit.archive import guard_lifted
from onprem_label.audit.export import public_key_hex, read_export, signing_key, unneutralise, verify_export
from onprem_label.audit.chain import audit_key
from onprem_label.cli import cli
from onprem_label.db.models import AuditEvent

FORMULA = "=cmd|' /C calc'!A0"
CRLF = "x\r\nFAKE,1,2"


@pytest.fixture
def auditor(app, client, make_user):
    """A logged-in auditor (browser session)."""
    make_user("audrey", "auditor")
    login(client, "audrey")
    return client


def failed_logins(app, *names: str) -> None:
    """Failed logins under hostile user names: their events carry the names as typed."""
    other = app.test_client()
    for name in names:
        login(other, name, "wrong password")


def actions(db) -> list[str]:
    """Every event's action, oldest first."""
    db.expire_all()
    return list(db.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))


def test_search_filters_pages_and_records_itself(app, auditor, db):
    """Filters narrow the events, `next.before` pages back, and each search is an audit:search event."""
    failed_logins(app, *[f"guess{n}" for n in range(7)])
    first = auditor.get("/api/v1/audit?action=auth:login_failed&limit=3").get_json()
    assert [e["actor_name"] for e in first["events"]] == ["guess6", "guess5", "guess4"]
    assert {"prev_hash", "hash", "study_uid", "request_id"} <= set(first["events"][0])
    second = auditor.get(f"/api/v1/audit?action=auth:login_failed&limit=3&before={first['next']['before']}").get_json()
    assert [e["actor_name"] for e in second["events"]] == ["guess3", "guess2", "guess1"]
    prefix = auditor.get("/api/v1/audit?action=auth:&outcome=failure&actor=GUESS0").get_json()
    assert [e["actor_name"] for e in prefix["events"]] == ["guess0"]
    assert actions(db).count(AuditAction.AUDIT_SEARCH.value) == 3


@pytest.mark.parametrize("query, field", [("since=yesterday", "since"), ("outcome=maybe", "outcome"),
                                          ("action=not-an-action", "action"), ("limit=0", "limit"),
                                          ("limit=100000", "limit"), ("before=-3", "before"),
                                          ("since=2026-02-01&until=2026-01-01", "until"),
                                          ("actor=" + "x" * 65, "actor"), ("limit=%C2%B2", "limit"),
                                          ("since=9999-12-31T23:59:59-01:00", "since")])
def test_a_malformed_filter_is_a_422_naming_the_field(auditor, query, field):
    """Bad search input gets a JSON 422 that names the parameter, never a 500."""
    response = auditor.get(f"/api/v1/audit?{query}")
    assert response.status_code == 422
    assert response.get_json()["error"]["errors"][0]["field"] == field
    if field not in ("limit", "before"):  # paging is the search's; an export is the whole filtered set
        assert auditor.get(f"/api/v1/audit/export?{query}").status_code == 422
    bad_format = auditor.get("/api/v1/audit/export?format=xlsx")
    assert bad_format.status_code == 422 and bad_format.get_json()["error"]["errors"][0]["field"] == "format"
    page = auditor.get(f"/audit-log?{query}")
    assert page.status_code == 422 and f'data-field="{field}"'.encode() in page.data


def test_csv_export_reads_back_unchanged_and_neutralises_formulas(app, auditor):
    """The CSV holds every field; a formula name starts with an apostrophe; CR/LF never makes a row."""
    failed_logins(app, FORMULA, CRLF, "-2+3", "@SUM(A1)", "'quoted")
    response = auditor.get("/api/v1/audit/export?format=csv&action=auth:login_failed")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True), newline="")))
    header, events, end = rows[0], rows[1:-1], rows[-1]
    assert end[0] == "#end" and len(events) == 5 == int(response.headers["X-Audit-Events"])
    names = [row[header.index("actor_name")] for row in events]
    assert names == ["'" + FORMULA, CRLF, "'-2+3", "'@SUM(A1)", "''quoted"]
    assert [unneutralise(n) for n in names] == [FORMULA, CRLF, "-2+3", "@SUM(A1)", "'quoted"]
    api = auditor.get("/api/v1/audit?action=auth:login_failed&limit=10").get_json()["events"][::-1]
    parsed = [dict(zip(header, (unneutralise(c) for c in row))) for row in events]
    for mine, theirs in zip(parsed, api):
        assert mine["hash"] == theirs["hash"] and mine["ts"] == theirs["ts"]
        assert json.loads(mine["details"]) == theirs["details"] and mine["user_agent"] == theirs["user_agent"]


def test_exports_are_signed_events_that_verify_offline(app, auditor, db, tmp_path):
    """Both formats verify with the install's public key and the audit key; an edit or a cut is caught."""
    failed_logins(app, "someone")
    svc = app.extensions["onprem_label"]
    public = public_key_hex(signing_key(svc.keyring))
    for fmt in ("jsonl", "csv"):
        body = auditor.get(f"/api/v1/audit/export?format={fmt}").data
        path = tmp_path / f"export.{fmt}"
        path.write_bytes(body)
        result = verify_export(path, public_key=public, audit_key=audit_key(svc.keyring))
        assert result.ok and result.events == sum(1 for _ in read_export(path).events()) > 0, result.problem
        path.write_bytes(body.replace(b"someone", b"Someone"))
        assert verify_export(path, public_key=public).problem.kind == "edited"
        path.write_bytes(body[: body.rfind(b"\n", 0, len(body) - 1) + 1])  # the trailer cut off
        assert verify_export(path, public_key=public).problem.kind == "truncated"
    # The metadata is signed too: dropping a filter from the trailer cannot pass a partial export off
    # as the whole chain.
    partial = auditor.get("/api/v1/audit/export?format=csv&action=auth:login_failed").get_data(as_text=True)
    path = tmp_path / "partial.csv"
    forged = partial.replace('""filters"": {""action"": ""auth:login_failed""}', '""filters"": {}')
    assert forged != partial
    path.write_text(forged, newline="")
    assert verify_export(path, public_key=public).problem.kind == "edited"
    # Each export was recorded (with its count) before its first byte was sent.
    exports = db.scalars(select(AuditEvent).where(AuditEvent.action == "audit:export")).all()
    assert len(exports) == 3 and all(e.details["events"] > 0 for e in exports)


def test_verify_api_and_page_name_the_first_bad_event(app, auditor, db):
    """GET /api/v1/audit/verify and the page say intact, then name the event someone edited."""
    failed_logins(app, "a", "b", "c")
    assert auditor.get("/api/v1/audit/verify").get_json()["ok"] is True
    assert b'data-ok="true"' in auditor.get("/audit-log/verify").data
    engine = app.extensions["onprem_label"].engine
    with engine.begin() as conn, guard_lifted(conn):
        conn.execute(text("UPDATE audit_events SET actor_name = 'nobody' WHERE id = 2"))
    body = auditor.get("/api/v1/audit/verify").get_json()
    assert body["ok"] is False and body["problem"]["event_id"] == 2 and body["problem"]["kind"] == "edited"
    page = auditor.get("/audit-log/verify").data
    assert b'data-ok="false"' in page and b'data-event-id="2"' in page
    assert db.scalars(select(AuditEvent.outcome).where(AuditEvent.action == "audit:verify")).all()[-1] == "failure"


def test_another_projects_item_is_a_404_that_is_audited(app, client, make_user, db):
    """Guessing the id of an item in a project one is not part of leaves auth:access_denied."""
    from imaging_helpers import make_dicom, new_project
    from onprem_label.imaging.ingest import IngestTarget, ingest_stream

    svc = app.extensions["onprem_label"]
    project = new_project(db)
    result = ingest_stream(db, svc.store, IngestTarget(project, "test", actor_name="test"), svc.ingest_options,
                           io.BytesIO(make_dicom()), "a.dcm", now=datetime_now())
    db.commit()
    make_user("lena", "labeler")
    login(client, "lena")
    for path in (f"/api/v1/items/{result.item_id}", f"/api/v1/items/{result.item_id}/image", f"/items/{result.item_id}"):
        assert client.get(path).status_code == 404
    denied = db.scalars(select(AuditEvent).where(AuditEvent.action == "auth:access_denied")).all()
    assert [e.details["reason"] for e in denied] == ["not_found_or_not_a_member"] * 3
    assert {e.actor_name for e in denied} == {"lena"}


def datetime_now():
    """Now, in UTC."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def test_the_log_page_escapes_control_characters(app, auditor):
    """A user name with CR/LF shows as one escaped line on the page, never as markup or a new row."""
    failed_logins(app, CRLF, "<script>alert(1)</script>")
    page = auditor.get("/audit-log?action=auth:login_failed").get_data(as_text=True)
    assert "x\\r\\nFAKE" in page and "x\r\nFAKE" not in page
    assert "&lt;script&gt;" in page and "<script>alert" not in page
    found = auditor.get("/api/v1/audit", query_string={"actor": CRLF}).get_json()["events"]
    assert [e["actor_name"] for e in found] == [CRLF]  # searchable as typed, case aside


def run(data: Path, *args: str, env: dict | None = None):
    """`onprem-label --data-dir DATA ARGS...` in-process."""
    return CliRunner().invoke(cli, ["--data-dir", str(data), *args], env=env or {})


@pytest.fixture
def data_dir(tmp_path, empty_database_url) -> tuple[Path, dict]:
    """An initialised data directory (init writes the first events) and its environment."""
    env = {"ONPREM_LABEL_DATABASE_URL": empty_database_url} if empty_database_url else {}
    data = tmp_path / "data"
    result = run(data, "init", env=env)
    assert result.exit_code == 0, result.output
    return data, env


def test_cli_verify_export_archive_and_checkpoint(data_dir, tmp_path):
    """The console commands: verify, checkpoint, export + verify-export (with and without keys), archive."""
    data, env = data_dir
    ok = run(data, "audit", "verify", env=env)
    assert ok.exit_code == 0 and "OK" in ok.output, ok.output
    checkpoint = json.loads(run(data, "audit", "checkpoint", env=env).output.strip().splitlines()[-1])
    assert set(checkpoint) == {"count", "head", "at", "mac"}
    out = tmp_path / "trail.jsonl"
    assert run(data, "audit", "export", "--out", str(out), env=env).exit_code == 0
    assert run(data, "audit", "verify-export", str(out), env=env).exit_code == 0
    public = run(data, "audit", "export-key", env=env).output.strip()
    offline = run(data, "audit", "verify-export", str(out), "--no-key", "--public-key", public, env=env)
    assert offline.exit_code == 0, offline.output
    wrong = run(data, "audit", "verify-export", str(out), "--no-key", "--public-key", "00" * 32, env=env)
    assert wrong.exit_code == 1 and "signature" in wrong.output
    unchecked = run(data, "audit", "verify-export", str(out), "--no-key", env=env)
    assert unchecked.exit_code == 1 and "--public-key" in unchecked.output
    archived = run(data, "audit", "archive", "--before", "2999-01-01", env=env)
    assert archived.exit_code == 0 and "archived events 1.." in archived.output, archived.output
    after = run(data, "audit", "verify", "--json", env=env)
    assert after.exit_code == 0 and json.loads(after.output.splitlines()[0])["ok"] is True
    again = run(data, "audit", "archive", "--before", "2000-01-01", env=env)
    assert again.exit_code == 1 and again.output.startswith("error: no events before")
    for archive in (data / "audit" / "archive").iterdir():
        archive.rename(archive.with_suffix(".moved"))
    lost = run(data, "audit", "verify", env=env)
    assert lost.exit_code == 1 and "FAILED at event 1: missing" in lost.output, lost.output


def test_cli_verify_fails_with_the_event_after_tampering(data_dir):
    """audit verify exits 1 and names the first bad event; a bad --before is one clear line."""
    data, env = data_dir
    from onprem_label.config import load_settings
    from onprem_label.db import make_engine

    settings = load_settings({"data_dir": str(data)}, env=env)
    engine = make_engine(settings.effective_database_url)
    try:
        with engine.begin() as conn, guard_lifted(conn):
            conn.execute(text("DELETE FROM audit_events WHERE id = 1"))
    finally:
        engine.dispose()
    result = run(data, "audit", "verify", env=env)
    assert result.exit_code == 1 and "FAILED at event 1: missing" in result.output
    bad = run(data, "audit", "archive", "--before", "last tuesday", env=env)
    assert bad.exit_code == 1 and bad.output.startswith("error: 'before' must be an ISO 8601")


def test_dicom_audit_message_export(app, auditor):
    """format=dicom streams one PS3.15 A.5 AuditMessage per event, in one well-formed document."""
    import xml.etree.ElementTree as ET

    failed_logins(app, "someone")
    response = auditor.get("/api/v1/audit/export?format=dicom&action=auth:login_failed")
    assert response.status_code == 200 and response.mimetype == "application/xml"
    root = ET.fromstring(response.data)
    messages = root.findall("AuditMessage")
    assert len(messages) == int(response.headers["X-Audit-Events"]) == 1
    event_id = messages[0].find("EventIdentification/EventID")
    assert event_id.get("csd-code") == "110114" and event_id.get("codeSystemName") == "DCM"


def test_syslog_forwarding_sends_each_committed_event(settings, keyring, clock):
    """With audit_syslog_host set, each committed event goes to the LAN collector as RFC 5424."""
    from test_audit_syslog import Collector

    from onprem_label.app import create_app
    from onprem_label.config import load_settings

    collector, app = Collector(), None
    try:
        forwarding = load_settings({"data_dir": settings.data_dir, "database_url": settings.database_url,
                                    "audit_syslog_host": "127.0.0.1", "audit_syslog_port": collector.port}, env={})
        app = create_app(forwarding, clock=clock, keyring=keyring)
        login(app.test_client(), "nobody-" + "x" * 3, "wrong password")
        message = collector.get()
        assert b" auth:login_failed " in message and b"nobody-xxx" in message
        assert message.startswith(b"<83>1 ")  # authpriv (10) * 8 + err (3): a failure
    finally:
        if app is not None:
            svc = app.extensions["onprem_label"]
            svc.sessionmaker.kw["info"]["onprem_label.audit_chain"].forwarder.close(timeout=2)
            svc.engine.dispose()
        collector.stop()
