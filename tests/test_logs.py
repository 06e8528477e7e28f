"""Application log: formats, rotation, redaction, request context and access lines, no PHI or secrets."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import pydicom
import pytest
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from conftest import csrf_from
from dicom_net_helpers import (CALLER, MARKERS as DICOM_MARKERS, Site, listener_process, make_site, send_study,
                               wait_for, write_study)
from imaging_helpers import PATIENT, PATIENT_ID, bearer_for, make_dicom, new_project
from onprem_label import logs
from onprem_label.config import load_settings
from onprem_label.imaging.isolation import WorkerPool

SECRET_PASSWORD = "Pw-Zebra-Quokka-4471"
WRONG_PASSWORD = "Wrong-Pw-Marmot-9183"
QUERY_SECRET = "QuerySecret-Narwhal-5530"
USERNAME = "dr.okonkwo-marker"
FILE_NAME = "Smithfield_Johanna_MRN-7741-0032.dcm"
KV_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|\S*)')


def _unescape(match: re.Match) -> str:
    code = match.group(1)
    if len(code) > 1:  # \xNN or \uNNNN
        return chr(int(code[1:], 16))
    return {"n": "\n", "r": "\r", "t": "\t"}.get(code, code)


def parse_kv(line: str) -> dict[str, str]:
    """One key=value line back into its fields (quoted values unescaped); the whole line must be pairs."""
    fields, position = {}, 0
    for match in KV_PAIR.finditer(line):
        assert line[position:match.start()].strip() == "", f"not key=value: {line!r}"
        raw = match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)", _unescape, raw[1:-1])
        fields[match.group(1)] = raw
        position = match.end()
    assert line[position:].strip() == "", f"not key=value: {line!r}"
    return fields


def read_records(path: Path, log_format: str = "json") -> list[dict]:
    """Every line of a log file as its fields; a line that does not parse fails the test."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) if log_format == "json" else parse_kv(line) for line in lines]


def log_settings(tmp_path: Path, **values):
    """Settings with only the log_* values given (no database is opened)."""
    return load_settings({"data_dir": str(tmp_path / "data"), **values}, env={})


@pytest.fixture
def configured():
    """configure_logging's handlers are removed again after the test."""
    yield logs.configure_logging
    logs.close_logging()


# --- formats ---------------------------------------------------------------------------------

def test_json_record_has_time_level_logger_message_and_context(tmp_path, configured):
    """A JSON line carries UTC time, level, logger, message, command, pid, context and extra fields."""
    path = tmp_path / "logs" / "{command}.log"
    configured(log_settings(tmp_path, log_file=str(path)), "serve")
    with logs.log_context(request_id="abc123"):
        logging.getLogger("onprem_label.test").warning("hello %s", "world", extra={"count": 3})
    logging.getLogger("onprem_label.test").info("outside")
    records = read_records(tmp_path / "logs" / "serve.log")
    first, second = records
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert (first["level"], first["logger"], first["message"]) == ("warning", "onprem_label.test", "hello world")
    assert (first["command"], first["request_id"], first["count"]) == ("serve", "abc123", 3)
    assert "request_id" not in second and second["level"] == "info"
    assert (tmp_path / "logs" / "serve.log").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("log_format", ["keyvalue", "json"])
def test_control_characters_never_split_a_record(tmp_path, configured, log_format):
    """A trailing newline, ESC, DEL, C1 controls, U+0085, U+2028 and U+2029 are escaped: one record
    per value, parsed back to the same text, and no raw control character in the file."""
    path = tmp_path / "app.log"
    configured(log_settings(tmp_path, log_file=str(path), log_format=log_format), "serve")
    values = ["abc\n", "abc\r", "a\x1b[31mred", "tab\there", "nul\x00del\x7f", "c1\x85\x9b",
              "ls\u2028ps\u2029end", "x\x0b\x0c"]
    log = logging.getLogger("onprem_label.test")
    for value in values:
        log.warning("value", extra={"detail": value})
    text = path.read_text(encoding="utf-8")
    records = read_records(path, log_format)
    assert [r["detail"] for r in records] == values
    assert text.count("\n") == len(values) and not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", text)


def test_keyvalue_lines_parse_back_to_their_values(tmp_path, configured):
    """key=value lines quote and escape spaces, quotes, '=' and newlines; a trace stays on one line."""
    path = tmp_path / "app.log"
    configured(log_settings(tmp_path, log_file=str(path), log_format="keyvalue"), "serve")
    tricky = 'a "quoted" word, x=1 and\na second line \\ end'
    log = logging.getLogger("onprem_label.test")
    log.warning(tricky, extra={"empty": "", "none": None})
    try:
        raise ValueError("broken")
    except ValueError:
        log.exception("failed")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first, second = map(parse_kv, lines)
    assert first["message"] == tricky and first["level"] == "warning" and first["logger"] == "onprem_label.test"
    assert first["empty"] == "" and first["none"] == "-" and first["time"].endswith("Z")
    assert second["message"] == "failed" and "ValueError (message not logged)" in second["exception"]
    assert "broken" not in lines[1]


def test_records_go_to_standard_error_without_a_log_file(tmp_path, configured, capsys):
    """An empty log_file writes JSON lines to standard error (journald's), nothing to standard output."""
    configured(log_settings(tmp_path), "dicom-listen")
    logging.getLogger("onprem_label.test").error("to the journal")
    out, err = capsys.readouterr()
    assert out == ""
    assert json.loads(err.strip())["message"] == "to the journal"


# --- rotation and files ----------------------------------------------------------------------

def test_small_max_size_rotates_and_keeps_the_configured_backups(tmp_path, configured):
    """With log_max_mb=1 and log_backups=2, 3.5 MiB of records leave app.log, .1 and .2, each <= 1 MiB."""
    path = tmp_path / "app.log"
    configured(log_settings(tmp_path, log_file=str(path), log_max_mb=1, log_backups=2), "serve")
    log = logging.getLogger("onprem_label.test")
    for n in range(3500):
        log.info("record %d %s", n, "x" * 900)
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("app.log") and not p.name.endswith(".lock"))
    assert files == ["app.log", "app.log.1", "app.log.2"]
    numbers = []
    for name in files:
        assert (tmp_path / name).stat().st_size <= 1 << 20
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640
        numbers += [int(r["message"].split()[1]) for r in read_records(tmp_path / name)]
    assert max(numbers) == 3499  # the newest records are kept, whole lines each


def test_a_log_file_has_one_writer(tmp_path, configured):
    """A second handler on a file another holds is refused, naming {command} as the fix."""
    path = tmp_path / "shared.log"
    settings = log_settings(tmp_path, log_file=str(path))
    configured(settings, "serve")
    with pytest.raises(logs.LogFileInUse, match=r"\{command\}"):
        logs.make_handler(settings, "dicom-listen")
    other = log_settings(tmp_path, log_file=str(tmp_path / "{command}.log"))
    logs.make_handler(other, "dicom-listen").close()  # its own file: fine


def test_a_worker_process_logs_into_the_parents_file(tmp_path, configured):
    """A decode worker (spawned) writes its records to the parent's file, in the parent's format."""
    path = tmp_path / "app.log"
    configured(log_settings(tmp_path, log_file=str(path), log_format="keyvalue"), "serve")
    pool = WorkerPool(1)
    try:
        pool.run(logging.warning, "from the worker")
    finally:
        pool.close()
    records = read_records(path, "keyvalue")
    assert [r["message"] for r in records] == ["from the worker"]
    assert records[0]["worker"] == "true" and records[0]["command"] == "serve"


# --- redaction and quiet libraries -----------------------------------------------------------

@pytest.mark.parametrize("text, secret", [
    ("token olt_AbCdEfGhIjKlMnOpQrStUv0123456789 used", "olt_AbCdEfGhIjKlMnOpQrStUv0123456789"),
    ("Authorization: Bearer abc.DEF-123_x", "abc.DEF-123_x"),
    ("Cookie: olsession=s3ss10nvalue; other=1", "s3ss10nvalue"),
    ("__Host-olsession=s3ss10nvalue", "s3ss10nvalue"),
    ("form password=hunter2&user=x", "hunter2"),
    ('{"password": "hunter 2", "new_password": "x2"}', "hunter 2"),
    ("csrf_token=Zq9_abc", "Zq9_abc"),
    ("postgresql+psycopg://labeler:S3cr3t-pw@db/onprem", "S3cr3t-pw"),
])
def test_formatter_masks_what_looks_like_a_secret(tmp_path, configured, text, secret):
    """The safety net: tokens, bearer values, session cookies, passwords and URL passwords are masked."""
    path = tmp_path / "app.log"
    configured(log_settings(tmp_path, log_file=str(path)), "serve")
    logging.getLogger("onprem_label.test").warning("seen: %s", text, extra={"detail": text})
    written = path.read_text(encoding="utf-8")
    assert secret not in written
    assert "[redacted]" in json.loads(written)["message"]


def test_exception_text_can_be_kept_out(tmp_path, configured):
    """extra=HIDE_EXCEPTION_TEXT logs the exception's type and frames, never its message."""
    path = tmp_path / "app.log"
    configured(log_settings(tmp_path, log_file=str(path)), "serve")
    try:
        raise ValueError(f"bad value {PATIENT}")
    except ValueError:
        logging.getLogger("onprem_label.imaging").exception("unexpected", extra=logs.HIDE_EXCEPTION_TEXT)
    record = json.loads(path.read_text(encoding="utf-8"))
    assert "ValueError (message not logged)" in record["exception"] and "test_logs.py" in record["exception"]
    assert PATIENT not in path.read_text(encoding="utf-8")


MARKER = "Marker-Okapi-6620"


def test_exception_text_is_hidden_by_default(tmp_path, configured):
    """Without any extra, a trace shows types and frames (file, line, function), for its cause too,
    never a message or a source line; SHOW_EXCEPTION_TEXT opts in to the full text."""
    path = tmp_path / "app.log"
    configured(log_settings(tmp_path, log_file=str(path)), "serve")
    log = logging.getLogger("onprem_label.test")

    def failing():
        try:
            raise KeyError(f"cause {MARKER}")
        except KeyError as exc:
            raise ValueError(f"bad value {MARKER}") from exc

    for call in (lambda: log.exception("plain"), lambda: log.warning("retry", exc_info=True)):
        try:
            failing()
        except ValueError:
            call()
    try:
        raise ValueError("known safe text")
    except ValueError:
        log.error("opted in", exc_info=True, extra=logs.SHOW_EXCEPTION_TEXT)
    text = path.read_text(encoding="utf-8")
    plain, retry, shown = read_records(path)
    assert MARKER not in text
    for record in (plain, retry):
        trace = record["exception"]
        assert "raise " not in trace  # no source line either
        assert "ValueError (message not logged)" in trace and "KeyError (message not logged)" in trace
        assert "direct cause" in trace and re.search(r'test_logs\.py", line \d+, in failing', trace)
    assert "ValueError: known safe text" in shown["exception"] and "show_exception_text" not in shown


def test_pil_stays_at_warning_under_debug(tmp_path, configured):
    """log_level=debug: Pillow's TIFF tag values (its DEBUG lines) stay out, here and in a decode worker."""
    from PIL import Image, TiffImagePlugin

    path = tmp_path / "app.log"
    configured(log_settings(tmp_path, log_file=str(path), log_level="debug"), "serve")
    tiff = io.BytesIO()
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[270] = f"description {MARKER}"  # ImageDescription, which TiffImagePlugin logs at DEBUG
    Image.new("L", (4, 4)).save(tiff, format="TIFF", tiffinfo=info)
    tiff.seek(0)
    with Image.open(tiff) as image:
        image.load()
    pool = WorkerPool(1)
    try:
        pool.run(logging.getLogger("PIL.TiffImagePlugin").debug, f"worker {MARKER}")
        pool.run(logging.debug, "ours from the worker")
    finally:
        pool.close()
    logging.getLogger("onprem_label.imaging").debug("ours")
    assert MARKER not in path.read_text(encoding="utf-8")
    assert [r["message"] for r in read_records(path)] == ["ours from the worker", "ours"]


def test_log_files_are_0640_under_umask_077(tmp_path, configured):
    """systemd's UMask=0077 would make new files 0600: the first file and each rotated one are 0640."""
    path = tmp_path / "app.log"
    old = os.umask(0o077)
    try:
        configured(log_settings(tmp_path, log_file=str(path), log_max_mb=1, log_backups=1), "serve")
        log = logging.getLogger("onprem_label.test")
        for n in range(1500):
            log.info("record %d %s", n, "x" * 900)
    finally:
        os.umask(old)
    assert (tmp_path / "app.log.1").exists()
    assert [oct(p.stat().st_mode & 0o777) for p in (path, tmp_path / "app.log.1")] == ["0o640", "0o640"]


def test_pynetdicom_and_pydicom_stay_at_warning_under_debug(tmp_path, configured):
    """log_level=debug opens our loggers, never pynetdicom's or pydicom's (they print UIDs and values)."""
    path = tmp_path / "app.log"
    configured(log_settings(tmp_path, log_file=str(path), log_level="debug"), "dicom-listen")
    logging.getLogger("pynetdicom.dsutils").debug("SOP Instance UID 1.2.3.4.5")
    logging.getLogger("pydicom").info(PATIENT)
    logging.getLogger("onprem_label.dicomnet").debug("ours")
    assert [r["message"] for r in read_records(path)] == ["ours"]


def test_warnings_become_records(tmp_path, configured):
    """A library's warning (when not an error) is a JSON record too, not a raw stderr line."""
    path = tmp_path / "app.log"
    configured(log_settings(tmp_path, log_file=str(path)), "serve")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    (record,) = read_records(path)
    assert record["logger"] == "py.warnings" and "deprecated thing" in record["message"]


# --- the web app, through a test client ------------------------------------------------------

@pytest.fixture
def overrides(tmp_path) -> dict:
    """The app logs JSON lines to its own file."""
    return {"log_file": str(tmp_path / "logs" / "{command}.log")}


@pytest.fixture
def app_log(settings, tmp_path):
    """configure_logging as serve does it; yields the log file's path."""
    logs.configure_logging(settings, "serve")
    yield tmp_path / "logs" / "serve.log"
    logs.close_logging()


def _upload(client, project_id: int, headers: dict):
    boundary, body = encode_multipart({"files": [FileStorage(io.BytesIO(make_dicom()), FILE_NAME)]})
    return client.post(f"/api/v1/projects/{project_id}/items", data=body, headers=headers,
                       content_type=f"multipart/form-data; boundary={boundary}")


def test_request_log_has_ids_and_access_lines_and_no_secrets(app, client, db, make_user, clock, app_log,
                                                             monkeypatch):
    """Login (wrong and right password), token API calls, a DICOM upload, a query secret, a 404 and a
    500: every line is JSON, each response's X-Request-Id has one access line with method, route,
    status and duration, and no password, token, cookie, patient string, file name or query secret is
    anywhere in the log."""
    user = make_user(USERNAME, "manager", password=SECRET_PASSWORD)
    headers = bearer_for(db, user, clock)
    token = headers["Authorization"].split()[1]
    project_id = new_project(db)
    db.close()
    responses = []

    def track(response):
        responses.append(response)
        return response

    csrf = csrf_from(client, "/login")
    track(client.post("/login", data={"username": USERNAME, "password": WRONG_PASSWORD, "csrf_token": csrf}))
    track(client.post("/login", data={"username": USERNAME, "password": SECRET_PASSWORD, "csrf_token": csrf}))
    cookie = client.get_cookie("olsession")
    assert cookie is not None and responses[-1].status_code == 302
    track(client.get(f"/api/v1/projects?secret={QUERY_SECRET}&password={SECRET_PASSWORD}"))
    uploaded = track(_upload(client, project_id, headers))
    assert uploaded.status_code == 200 and uploaded.get_json()["results"][0]["status"] == "imported"
    track(client.get("/api/v1/projects", headers=headers))
    track(client.get(f"/api/v1/no-such-thing?token={QUERY_SECRET}", headers=headers))

    def broken(_project):
        raise RuntimeError(f"boom while serving password={SECRET_PASSWORD} {token}")

    monkeypatch.setattr("onprem_label.web.api.workflow.project_json", broken)
    failed = track(client.get("/api/v1/projects", headers=headers))
    assert failed.status_code == 500

    text = app_log.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    access = {r["request_id"]: r for r in records if r["logger"] == "onprem_label.access"}
    for response in responses:
        line = access[response.headers["X-Request-Id"]]
        assert line["status"] == response.status_code and line["method"] in ("GET", "POST")
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert "?" not in (line["route"] or "") and "time" in line and line["command"] == "serve"
    assert [access[r.headers["X-Request-Id"]]["route"] for r in responses] == [
        "/login", "/login", "/api/v1/projects", "/api/v1/projects/<id:project_id>/items", "/api/v1/projects",
        None, "/api/v1/projects"]
    assert access[responses[1].headers["X-Request-Id"]]["user_id"] == user.id  # the login that worked
    assert access[responses[0].headers["X-Request-Id"]]["user_id"] is None
    assert access[uploaded.headers["X-Request-Id"]]["auth"] == "token"
    error = next(r for r in records if r["logger"] == "onprem_label.web" and r["level"] == "error")
    assert error["request_id"] == failed.headers["X-Request-Id"] and error["user_id"] == user.id
    assert "RuntimeError" in error["exception"] and error["route"] == "/api/v1/projects"
    forbidden = [SECRET_PASSWORD, WRONG_PASSWORD, token, token[4:], cookie.value, csrf, PATIENT,
                 PATIENT.split("^")[0], PATIENT_ID, FILE_NAME, "Smithfield", QUERY_SECRET, USERNAME]
    assert [s for s in forbidden if s in text] == []


def test_streamed_response_logs_its_line_when_the_body_is_done(app, client, db, make_user, clock, app_log):
    """An export streams after the handler returns: its access line comes at the end, marked streamed."""
    headers = bearer_for(db, make_user(USERNAME, "manager"), clock)
    project_id = new_project(db)
    db.close()
    response = client.get(f"/api/v1/projects/{project_id}/export?format=jsonl", headers=headers)
    request_id = response.headers["X-Request-Id"]
    assert response.is_streamed
    lines = lambda: [r for r in read_records(app_log) if r.get("request_id") == request_id]  # noqa: E731
    response.get_data()
    response.close()
    (line,) = lines()
    assert line["status"] == 200 and line["streamed"] is True and line["route"].endswith("/export")


def test_unhandled_error_logs_its_type_and_request_id_not_its_text(app, client, db, make_user, clock, app_log,
                                                                     monkeypatch):
    """A 500: the error record has the request id and the exception's type, never its message."""
    headers = bearer_for(db, make_user(USERNAME, "manager"), clock)
    new_project(db)
    db.close()

    def broken(_project):
        raise RuntimeError(f"boom for {MARKER}")

    monkeypatch.setattr("onprem_label.web.api.workflow.project_json", broken)
    failed = client.get("/api/v1/projects", headers=headers)
    assert failed.status_code == 500
    records = read_records(app_log)
    (error,) = [r for r in records if r["logger"] == "onprem_label.web" and r["level"] == "error"]
    assert error["request_id"] == failed.headers["X-Request-Id"] in error["message"]
    assert "RuntimeError (message not logged)" in error["exception"] and "in broken" in error["exception"]
    assert MARKER not in app_log.read_text(encoding="utf-8")


def test_a_database_errors_driver_text_stays_out(app, db, make_user, app_log, backend):
    """A unique violation on a username (PostgreSQL's DETAIL quotes it) logs the type, SQLSTATE and
    constraint, never the value."""
    from sqlalchemy.exc import IntegrityError

    make_user(MARKER)
    with pytest.raises(IntegrityError) as caught:
        make_user(MARKER)
    db.rollback()
    try:
        raise caught.value
    except IntegrityError:
        logging.getLogger("onprem_label.web").exception("could not store")
    (record,) = [r for r in read_records(app_log) if r["message"] == "could not store"]
    assert "sqlalchemy.exc.IntegrityError (message not logged" in record["exception"]
    if backend == "postgresql":
        assert MARKER in str(caught.value)  # what the log would have said
        assert "sqlstate 23505" in record["exception"] and "constraint " in record["exception"]
    assert MARKER not in app_log.read_text(encoding="utf-8")


def test_an_error_in_a_streamed_body_logs_neither_its_text_nor_the_path(app, db, make_user, clock, app_log,
                                                                        monkeypatch):
    """Under waitress, an export whose body fails after its first chunk: the app's record has the
    request id and the exception's type, waitress's the type; neither its message nor the path."""
    import threading

    import waitress

    headers = bearer_for(db, make_user(USERNAME, "manager"), clock)
    project_id = new_project(db)
    db.close()

    def chunks(*_args, **_kwargs):
        yield b"first chunk\n"
        raise RuntimeError(f"export broke on {MARKER}")

    monkeypatch.setattr("onprem_label.exchange.export.chunks", chunks)
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=1)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    path = f"/api/v1/projects/{project_id}/export?format=jsonl"
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=60)
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        request_id = response.headers["X-Request-Id"]
        with pytest.raises(http.client.IncompleteRead):
            response.read()
        conn.close()
        assert wait_for(lambda: any(r["logger"] == "waitress" for r in read_records(app_log)))
    finally:
        server.close()
        thread.join(10)
    text = app_log.read_text(encoding="utf-8")
    (record,) = [r for r in read_records(app_log) if r["logger"] == "waitress"]
    assert record["message"] == "Exception while serving a request (path not logged)"
    assert "RuntimeError (message not logged)" in record["exception"]
    (ours,) = [r for r in read_records(app_log) if r["logger"] == "onprem_label.web"]
    assert ours["request_id"] == request_id and ours["route"].endswith("/export") and ours["level"] == "error"
    assert "RuntimeError (message not logged)" in ours["exception"] and "in chunks" in ours["exception"]
    assert MARKER not in text and path.split("?")[0] not in text


def test_key_value_format_through_the_app(app, client, settings, tmp_path):
    """With log_format=keyvalue the access line parses and carries its request id; the context ends with it."""
    kv = load_settings({**settings.as_dict(), "log_format": "keyvalue"}, env={})
    logs.configure_logging(kv, "serve")
    try:
        response = client.get("/healthz?secret=" + QUERY_SECRET)
    finally:
        logs.close_logging()
    records = read_records(tmp_path / "logs" / "serve.log", "keyvalue")
    (line,) = [r for r in records if r["logger"] == "onprem_label.access"]
    assert line["request_id"] == response.headers["X-Request-Id"] and line["route"] == "/healthz"
    assert line["status"] == str(response.status_code) and float(line["duration_ms"]) >= 0
    assert QUERY_SECRET not in (tmp_path / "logs" / "serve.log").read_text()
    assert logs.current_context() == {}  # the thread's next request starts without this one's fields


# --- a real `onprem-label serve` -------------------------------------------------------------

def _cli(data: Path, env: dict, *args: str) -> str:
    result = subprocess.run([str(Path(sys.executable).with_name("onprem-label")), "--data-dir", str(data), *args],
                            env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


class Browser:
    """A tiny HTTP client over http.client that keeps the session cookie, as a browser does."""

    def __init__(self, port: int):
        self.port, self.cookies = port, {}

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(response, body bytes); Set-Cookie values are kept for the next request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        return response, data


def _wait_healthy(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            response, _ = Browser(port).request("GET", "/healthz")
            if response.status == 200:
                return
        except OSError:
            pass
        assert proc.poll() is None, f"serve exited with {proc.returncode}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "serve not healthy within 120 s"
        time.sleep(0.2)


def test_real_serve_writes_parseable_lines_without_secrets(tmp_path, database_url):
    """`onprem-label serve` with log_file: login (wrong, right), token API calls, a DICOM upload, a query
    secret and a 404 leave JSON lines whose request ids match X-Request-Id, with access fields, and no
    password, token, cookie, patient string, file name or query secret; stderr and stdout stay clean."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONPREM_LABEL_")}
    env.update(ONPREM_LABEL_LOG_FILE=str(tmp_path / "logs" / "{command}.log"), ONPREM_LABEL_THREADS="2")
    if database_url:
        env["ONPREM_LABEL_DATABASE_URL"] = database_url
    _cli(data, env, "init")
    _cli(data, env, "user", "create", USERNAME, "--role", "manager", "--password", SECRET_PASSWORD,
         "--no-must-change")
    token = _cli(data, env, "token", "create", USERNAME).strip().splitlines()[-1]
    project_id = int(re.search(r"created project (\d+)", _cli(data, env, "project", "create", "Chest CT")).group(1))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("onprem-label")), "--data-dir", str(data), "serve",
                             "--port", str(port)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        _wait_healthy(port, proc)
        browser, bearer = Browser(port), {"Authorization": f"Bearer {token}"}

        def call(method, path, body=None, headers=None):
            response, payload = browser.request(method, path, body, headers)
            seen.append((response.headers["X-Request-Id"], response.status, method))
            return response, payload

        _, page = call("GET", "/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.decode()).group(1)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        for password in (WRONG_PASSWORD, SECRET_PASSWORD):
            call("POST", "/login", urlencode({"username": USERNAME, "password": password,
                                              "csrf_token": csrf}).encode(), form)
        assert seen[-1][1] == 302
        cookie = browser.cookies["olsession"]
        call("GET", f"/api/v1/projects?secret={QUERY_SECRET}")
        boundary, body = encode_multipart({"files": [FileStorage(io.BytesIO(make_dicom()), FILE_NAME)]})
        response, payload = call("POST", f"/api/v1/projects/{project_id}/items", body,
                                 {**bearer, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert response.status == 200 and json.loads(payload)["results"][0]["status"] == "imported"
        call("GET", f"/api/v1/items/999999?access_token={QUERY_SECRET}", headers=bearer)
        assert seen[-1][1] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err == "" and "serving on" in out and "{" not in out  # every record went to the file
    path = tmp_path / "logs" / "serve.log"
    text = path.read_text(encoding="utf-8")
    records = read_records(path)
    access = {r["request_id"]: r for r in records if r["logger"] == "onprem_label.access"}
    for request_id, status, method in seen:
        line = access[request_id]
        assert (line["status"], line["method"], line["command"]) == (status, method, "serve")
        assert isinstance(line["duration_ms"], float) and "route" in line and "?" not in (line["route"] or "")
    assert all(r["time"].endswith("Z") and r["level"] and r["logger"] and "message" in r for r in records)
    assert f"serving on 127.0.0.1:{port}" in records[0]["message"] and records[-1]["message"] == "stopped"
    forbidden = [SECRET_PASSWORD, WRONG_PASSWORD, token, cookie, csrf, PATIENT, PATIENT.split("^")[0], PATIENT_ID,
                 FILE_NAME, "Smithfield", QUERY_SECRET, USERNAME]
    assert [s for s in forbidden if s in text] == []


# --- a real `onprem-label dicom-listen` ------------------------------------------------------

@dataclass
class LoggingSite(Site):
    """A receiver site whose CLI runs get the log settings of the test too."""

    log_env: dict = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The site's environment plus ONPREM_LABEL_LOG_*."""
        return {**super().env, **self.log_env}


@pytest.mark.dcmtk
def test_dicom_listen_records_carry_the_association_and_no_identifiers(tmp_path, database_url):
    """dicom-listen at log_level=debug: JSON lines in its own file, each association's records share one
    id, and no patient string or original UID (pynetdicom's DEBUG output) reaches the log."""
    base = make_site(tmp_path, database_url)
    site = LoggingSite(base.data, base.database_url, log_env={
        "ONPREM_LABEL_LOG_FILE": str(tmp_path / "logs" / "{command}.log"), "ONPREM_LABEL_LOG_LEVEL": "debug"})
    site.project("Chest CT", [{"ae_title": CALLER, "address": "127.0.0.1"}])
    study = write_study(tmp_path / "study")
    uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in [*study["folder"].iterdir(), study["rle"]]]
    with listener_process(site) as (port, process):
        for sent in send_study(port, study):
            assert sent.returncode == 0, sent.stdout + sent.stderr
        assert wait_for(lambda: len(site.events("dicom:association_end")) == study["associations"])
        # The association's thread logs its end just after committing the audit event.
        path = tmp_path / "logs" / "dicom-listen.log"
        assert wait_for(lambda: path.read_text(encoding="utf-8").count(" ended: ") == study["associations"])
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and err == "", err
    records = read_records(path)
    assert {r["command"] for r in records} == {"dicom-listen"}
    ours = [r for r in records if r["logger"] == "onprem_label.dicomnet" and "association" in r]
    accepted = {r["association"] for r in ours if "accepted" in r["message"]}
    ended = {r["association"] for r in ours if "ended" in r["message"]}
    assert len(accepted) == study["associations"] and accepted == ended
    assert not any(r["logger"].startswith("pynetdicom") and r["level"] in ("debug", "info") for r in records)
    text = path.read_text(encoding="utf-8")
    assert CALLER in text  # the caller is named, the patient never
    assert [m for m in [*DICOM_MARKERS, *uids] if m in text] == []


def test_database_errors_do_not_quote_their_parameters(tmp_path):
    """A failed statement's error text (what a trace in the log shows) names the SQL, not its values."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from onprem_label.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with engine.connect() as conn:
            conn.execute(text("CREATE TABLE t (name TEXT UNIQUE)"))
            conn.execute(text("INSERT INTO t VALUES (:name)"), {"name": PATIENT})
            with pytest.raises(SQLAlchemyError) as caught:
                conn.execute(text("INSERT INTO t VALUES (:name)"), {"name": PATIENT})
    finally:
        engine.dispose()
    assert "INSERT INTO t" in str(caught.value) and PATIENT not in str(caught.value)
