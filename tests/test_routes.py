"""Every route against every role, CSRF on every state-changing route, security headers, errors."""

from __future__ import annotations

import io
import re
from urllib.parse import urlsplit

import pytest
from flask import url_for
from sqlalchemy import select, text

from conftest import PASSWORD, csrf_from
from imaging_helpers import make_dicom, new_project
from onprem_label.app import create_app
from onprem_label.audit import AuditAction
from onprem_label.auth import sessions as core_sessions
from onprem_label.auth import tokens
from onprem_label.config import load_settings
from onprem_label.db.models import AuditEvent, Task, User
from onprem_label.imaging.ingest import IngestTarget, ingest_stream
from onprem_label.web.sessions import AUTH_PREFIX

ANON = "anonymous"
WHO = (ANON, "admin", "manager", "labeler", "reviewer", "auditor")
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
AUTOMATIC = frozenset({"HEAD", "OPTIONS"})  # Flask answers these from the rule (HEAD: the GET view)
LOGIN = "/login"  # outcome: a redirect to the login page
TARGET = "/admin/users/<target>"


def row(*outcomes) -> dict:
    """One matrix row: outcomes in the order of WHO (status code, or the path redirected to)."""
    assert len(outcomes) == len(WHO)
    return dict(zip(WHO, outcomes))


def same_for_roles(anon, outcome) -> dict:
    """A row where every role gets the same outcome."""
    return row(anon, *[outcome] * (len(WHO) - 1))


LANDING = row(200, "/admin/users", "/projects", "/work", "/work", "/audit-log")

# (endpoint, method) -> who gets what. A new route fails test_every_route_is_classified until added.
MATRIX = {
    ("static", "GET"): same_for_roles(200, 200),
    ("health.healthz", "GET"): same_for_roles(200, 200),
    ("auth.login", "GET"): LANDING,
    ("auth.login", "POST"): same_for_roles(200, 200),  # wrong credentials: the form again
    ("auth.login_totp", "GET"): same_for_roles(LOGIN, LOGIN),  # no first step pending
    ("auth.login_totp", "POST"): same_for_roles(LOGIN, LOGIN),
    ("auth.break_glass_login", "GET"): same_for_roles(200, 200),
    ("auth.break_glass_login", "POST"): same_for_roles(200, 200),  # wrong code: the form again
    ("auth.logout", "POST"): same_for_roles(LOGIN, LOGIN),
    ("auth.change_password", "GET"): same_for_roles(LOGIN, 200),
    ("auth.change_password", "POST"): same_for_roles(LOGIN, 422),  # wrong current password
    ("auth.totp_enrol", "GET"): same_for_roles(LOGIN, 200),
    ("auth.totp_enrol", "POST"): same_for_roles(LOGIN, 422),  # wrong code
    ("home.index", "GET"): {**LANDING, ANON: LOGIN},
    ("home.work", "GET"): same_for_roles(LOGIN, 200),
    ("home.manager", "GET"): row(LOGIN, 200, 200, 403, 403, 403),
    ("audit.log", "GET"): row(LOGIN, 403, 403, 403, 403, 200),
    ("audit.verify", "GET"): row(LOGIN, 403, 403, 403, 403, 200),
    ("api.audit_search", "GET"): row(401, 403, 403, 403, 403, 200),
    ("api.audit_export", "GET"): row(401, 403, 403, 403, 403, 200),
    ("api.audit_verify", "GET"): row(401, 403, 403, 403, 403, 200),
    ("home.no_role", "GET"): same_for_roles(LOGIN, 200),
    ("admin.users", "GET"): row(LOGIN, 200, 403, 403, 403, 403),
    ("admin.create_user", "POST"): row(LOGIN, 200, 403, 403, 403, 403),
    ("admin.user_detail", "GET"): row(LOGIN, 200, 403, 403, 403, 403),
    ("admin.user_action", "POST"): row(LOGIN, TARGET, 403, 403, 403, 403),
    ("api.me", "GET"): same_for_roles(401, 200),
    ("api.list_tokens", "GET"): same_for_roles(401, 200),
    ("api.create_token", "POST"): same_for_roles(401, 201),
    ("api.revoke_token", "DELETE"): same_for_roles(401, 200),  # the caller's own token
    ("api.list_users", "GET"): row(401, 200, 403, 403, 403, 403),
    ("api.upload_items", "POST"): row(401, 400, 400, 403, 403, 403),  # not multipart: a 400
    # Labelers and reviewers who are not members of the project see nothing of it: 404.
    ("api.list_items", "GET"): row(401, 200, 200, 404, 404, 403),
    ("api.get_item", "GET"): row(401, 200, 200, 404, 404, 403),
    ("api.item_image", "GET"): row(401, 200, 200, 404, 404, 403),
    ("api.item_thumbnail", "GET"): row(401, 200, 200, 404, 404, 403),
    ("api.clear_pixel_check", "POST"): row(401, 200, 200, 403, 403, 403),
    ("items.item", "GET"): row(LOGIN, 200, 200, 404, 404, 403),
    ("api.list_projects", "GET"): same_for_roles(401, 200),
    ("api.create_project_api", "POST"): row(401, 201, 409, 403, 403, 403),  # manager: the name is taken
    ("api.get_project", "GET"): row(401, 200, 200, 404, 404, 404),
    ("api.update_project", "PATCH"): row(401, 200, 200, 404, 404, 404),
    ("api.list_members", "GET"): row(401, 200, 200, 404, 404, 404),
    ("api.add_member", "POST"): row(401, 201, 201, 404, 404, 404),
    ("api.project_dashboard", "GET"): row(401, 200, 200, 404, 404, 404),
    ("api.next_task", "POST"): row(401, 422, 422, 404, 404, 404),  # no label schema yet
    ("api.list_tasks", "GET"): row(401, 200, 200, 404, 404, 404),
    ("api.get_task", "GET"): row(401, 200, 200, 404, 404, 404),
    ("api.save_annotation", "PUT"): row(401, 409, 409, 404, 404, 404),  # the task is new, not leased
    ("api.heartbeat", "POST"): row(401, 409, 409, 404, 404, 404),
    ("api.submit", "POST"): row(401, 409, 409, 404, 404, 404),
    ("api.review", "POST"): row(401, 403, 403, 404, 404, 404),  # managers are not reviewers
    ("api.release", "POST"): row(401, 409, 409, 404, 404, 404),
    ("api.reassign", "POST"): row(401, 409, 409, 404, 404, 404),  # not escalated
    # Project admin pages: the form's name is taken (422); the page needs the project manager role.
    ("projects.create", "POST"): row(LOGIN, 422, 422, 403, 403, 403),
    ("projects.admin", "GET"): row(LOGIN, 200, 200, 404, 404, 404),
    ("api.task_revisions", "GET"): row(401, 200, 200, 404, 404, 404),
    # The workspaces need the project role: admins and managers are managers everywhere (403),
    # the matrix's other people are not members (404).
    ("work.label", "GET"): row(LOGIN, 403, 403, 404, 404, 404),
    ("work.review", "GET"): row(LOGIN, 403, 403, 404, 404, 404),
    # Quality and people: managers only, except the test (labelers) and one's own skills and pay.
    ("api.list_gold", "GET"): row(401, 200, 200, 404, 404, 404),
    ("api.mark_gold", "PUT"): row(401, 200, 200, 404, 404, 404),
    ("api.unmark_gold", "DELETE"): row(401, 404, 404, 404, 404, 404),  # the item is not gold
    ("api.qualification_status", "GET"): row(401, 403, 403, 404, 404, 404),  # managers are not labelers
    ("api.start_qualification", "POST"): row(401, 403, 403, 404, 404, 404),
    ("api.project_quality", "GET"): row(401, 200, 200, 404, 404, 404),
    ("api.list_proposals", "GET"): row(401, 200, 200, 404, 404, 404),
    ("api.evaluate_people", "POST"): row(401, 200, 200, 404, 404, 404),
    ("api.decide_proposal", "POST"): row(401, 404, 404, 404, 404, 404),  # no such proposal
    ("api.recommended_people", "GET"): row(401, 200, 200, 403, 403, 403),  # site managers (all projects' history)
    ("api.qualification_fresh_start", "POST"): row(401, 404, 404, 404, 404, 404),  # the target is no labeler here
    ("api.pay_statements", "GET"): row(401, 200, 200, 404, 404, 404),
    ("projects.quality", "GET"): row(LOGIN, 200, 200, 404, 404, 404),
    ("api.export_project", "GET"): row(401, 422, 422, 404, 404, 404),  # no format asked for
    ("api.import_predictions", "POST"): row(401, 422, 422, 404, 404, 404),  # no name given
    ("api.import_report", "GET"): row(401, 200, 200, 404, 404, 404),
}

# What each state-changing request sends (besides a valid CSRF token).
BODY = {
    ("auth.login", "POST"): {"data": {"username": "nobody", "password": "not the password"}},
    ("auth.login_totp", "POST"): {"data": {"code": "123456"}},
    ("auth.break_glass_login", "POST"): {"data": {"username": "admin", "password": PASSWORD,
                                                  "code": "wrong-code"}},
    ("auth.change_password", "POST"): {"data": {"current_password": "not the password",
                                                "new_password": "a brand new passphrase",
                                                "confirm_password": "a brand new passphrase"}},
    ("auth.totp_enrol", "POST"): {"data": {"code": "000000"}},
    ("admin.create_user", "POST"): {"data": {"username": "newcomer", "roles": "labeler"}},
    ("api.create_token", "POST"): {"json": {"name": "matrix"}},
    ("api.create_project_api", "POST"): {"json": {"name": "matrix"}},
    ("api.update_project", "PATCH"): {"json": {"description": "matrix"}},
    ("api.add_member", "POST"): {"json": {"username": "target", "role": "labeler"}},
    ("api.next_task", "POST"): {"json": {}},
    ("api.save_annotation", "PUT"): {"json": {"shapes": [], "version": 1}},
    ("api.heartbeat", "POST"): {"json": {}},
    ("api.submit", "POST"): {"json": {"version": 1}},
    ("api.review", "POST"): {"json": {"decision": "accept", "version": 1}},
    ("api.release", "POST"): {"json": {}},
    ("api.reassign", "POST"): {"json": {"username": "target", "version": 1}},
    ("projects.create", "POST"): {"data": {"name": "Chest CT"}},  # the matrix project's own name
    ("api.mark_gold", "PUT"): {"json": {"reference": {"shapes": [], "classifications": {}}}},
    ("api.start_qualification", "POST"): {"json": {}},
    ("api.evaluate_people", "POST"): {"json": {}},
    ("api.decide_proposal", "POST"): {"json": {"confirm": True}},
    ("api.qualification_fresh_start", "POST"): {"json": {}},
}

GET_ROUTES = sorted(key for key in MATRIX if key[1] == "GET")
CHANGING_ROUTES = sorted(key for key in MATRIX if key[1] in STATE_CHANGING)


# --- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def people(app, make_user, db, clock) -> dict:
    """A user per role plus a target account, each with one API token; returns their ids."""
    ids = {}
    for name in WHO[1:] + ("target",):
        user = make_user(name, "labeler" if name == "target" else name)
        _, token = tokens.create_token(db, user, "script", now=clock())
        ids[name], ids[f"{name}_token"] = user.id, token.id
    db.commit()
    ids[f"{ANON}_token"] = ids["target_token"]
    ids["project"], ids["item"] = _project_with_item(app, db, clock)
    ids["task"] = db.scalar(select(Task.id).where(Task.item_id == ids["item"]))
    db.commit()
    return ids


def _project_with_item(app, db, clock) -> tuple[int, int]:
    """A project holding one ingested DICOM item (through the core, as the CLI would)."""
    svc = app.extensions["onprem_label"]
    project = new_project(db)
    result = ingest_stream(db, svc.store, IngestTarget(project, "cli", actor_name="test"), svc.ingest_options,
                           io.BytesIO(make_dicom()), "ct.dcm", now=clock())
    assert result.status == "imported", result
    return project, result.item_id


def url(app, endpoint: str, ids: dict, who: str = "admin") -> str:
    """The URL of `endpoint` with its variables filled from real rows."""
    args = {"static": {"filename": "style.css"},
            "admin.user_detail": {"user_id": ids["target"]},
            "admin.user_action": {"user_id": ids["target"], "action": "unlock"},
            "api.revoke_token": {"token_id": ids[f"{who}_token"]},
            "api.upload_items": {"project_id": ids["project"]},
            "api.list_items": {"project_id": ids["project"]},
            "api.get_item": {"item_id": ids["item"]},
            "api.item_image": {"item_id": ids["item"]},
            "api.item_thumbnail": {"item_id": ids["item"]},
            "api.clear_pixel_check": {"item_id": ids["item"]},
            "items.item": {"item_id": ids["item"]},
            **{name: {"project_id": ids["project"]} for name in (
                "api.get_project", "api.update_project", "api.list_members", "api.add_member",
                "api.project_dashboard", "api.next_task", "api.list_tasks", "work.label", "work.review",
                "projects.admin", "api.list_gold", "api.qualification_status", "api.start_qualification",
                "api.project_quality", "api.list_proposals", "api.evaluate_people", "api.recommended_people",
                "api.pay_statements", "projects.quality", "api.export_project", "api.import_predictions",
                "api.import_report")},
            **{name: {"project_id": ids["project"], "item_id": ids["item"]} for name in (
                "api.mark_gold", "api.unmark_gold")},
            "api.decide_proposal": {"project_id": ids["project"], "proposal_id": 1},
            "api.qualification_fresh_start": {"project_id": ids["project"], "user_id": 1},
            **{name: {"task_id": ids["task"]} for name in (
                "api.get_task", "api.save_annotation", "api.heartbeat", "api.submit", "api.review",
                "api.release", "api.reassign", "api.task_revisions")}}.get(endpoint, {})
    with app.test_request_context():
        return url_for(endpoint, **args)


def signed_in(app, user_id: int):
    """A client holding a fresh login session for `user_id` (the password step is tested elsewhere)."""
    client = app.test_client()
    svc = app.extensions["onprem_label"]
    with svc.sessionmaker() as dbs:
        sid, _ = core_sessions.start_session(dbs, dbs.get(User, user_id),
                                             policy=svc.session_policy, now=svc.clock())
        dbs.commit()
    client.set_cookie(app.config["SESSION_COOKIE_NAME"], AUTH_PREFIX + sid)
    return client


def caller(app, who: str, ids: dict):
    """(client, csrf token) for a role, or for an anonymous visitor."""
    client = app.test_client() if who == ANON else signed_in(app, ids[who])
    return client, csrf_from(client, "/login" if who == ANON else "/account/password")


def send(client, method: str, path: str, key, csrf: str | None):
    """Send the matrix request for `key`, with `csrf` as form field and header (None: no token)."""
    body = BODY.get(key, {})
    headers = {"X-CSRF-Token": csrf} if csrf else {}
    if method not in STATE_CHANGING:
        return client.open(path, method=method)
    if "json" in body:
        return client.open(path, method=method, json=body["json"], headers=headers)
    data = dict(body.get("data", {}), **({"csrf_token": csrf} if csrf else {}))
    return client.open(path, method=method, data=data, headers=headers)


def outcome(response):
    """A status code, or the path a redirect points to."""
    if response.status_code in (301, 302, 303, 307, 308):
        return urlsplit(response.headers["Location"]).path
    return response.status_code


def audit_actions(db, **where) -> list[str]:
    """Audit actions recorded so far (optionally filtered by column), ending the read."""
    query = select(AuditEvent.action).order_by(AuditEvent.id)
    for column, value in where.items():
        query = query.where(getattr(AuditEvent, column) == value)
    actions = list(db.scalars(query))
    db.commit()  # on SQLite an open read transaction would hold the write lock
    return actions


def snapshot(db) -> dict:
    """Every row of every table except the audit trail, to prove a request changed nothing."""
    tables = ("users", "api_tokens", "login_sessions", "projects", "project_members")
    state = {t: sorted(map(repr, db.execute(text(f"SELECT * FROM {t}")).all())) for t in tables}
    db.commit()
    return state


# --- role x route matrix -----------------------------------------------------------------------

def test_every_route_is_classified(app):
    """Every rule and method of the url_map is in the matrix, and the matrix names no stale route."""
    routes = {(rule.endpoint, method) for rule in app.url_map.iter_rules()
              for method in rule.methods - AUTOMATIC}
    assert sorted(routes - MATRIX.keys()) == [], "classify these routes in MATRIX"
    assert sorted(MATRIX.keys() - routes) == [], "these MATRIX rows match no route"


@pytest.mark.parametrize("key,method", [
    pytest.param(key, m, id=f"{key[0]}-{m}") for key in sorted(MATRIX)
    for m in (key[1], "HEAD") if m != "HEAD" or key[1] == "GET"])
def test_role_route_matrix(app, people, db, key, method):
    """Each role and anonymous get exactly the matrix outcome; HEAD answers as GET does."""
    endpoint = key[0]
    actual = {}
    for who in WHO:
        client, csrf = caller(app, who, people)
        response = send(client, method, url(app, endpoint, people, who), key, csrf)
        actual[who] = outcome(response)
        if actual[who] == 403:
            assert AuditAction.ACCESS_DENIED in audit_actions(db, actor_id=people[who]), who
        if actual[who] == 401 and method != "HEAD":
            assert response.get_json()["error"]["code"] == "unauthorized"
        if method == "HEAD":
            assert response.get_data() == b""
        response.close()
    expected = {who: (v.replace("<target>", str(people["target"])) if isinstance(v, str) else v)
                for who, v in MATRIX[key].items()}
    assert actual == expected


def test_options_is_answered_without_running_a_view(app, client, db):
    """OPTIONS on any rule lists the allowed methods, needs no login, and changes nothing."""
    before = snapshot(db)
    fill = {"filename": "style.css", "action": "unlock"}
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: fill.get(m.group(1), "1"), rule.rule)
        response = client.options(path)
        assert response.status_code == 200, path
        assert rule.methods <= set(response.headers["Allow"].split(", ")), path
        response.close()
    assert snapshot(db) == before


def test_head_never_runs_a_form_handler(app, people, db):
    """HEAD skips CSRF like GET, so it must never reach a POST branch: no login, no password change."""
    client, _ = caller(app, "labeler", people)
    before, audit_before = snapshot(db), audit_actions(db)
    new = "a fresh long passphrase"
    client.head("/account/password",
                data={"current_password": PASSWORD, "new_password": new, "confirm_password": new})
    app.test_client().head("/login", data={"username": "labeler", "password": PASSWORD})
    assert snapshot(db) == before
    assert audit_actions(db) == audit_before


# --- CSRF ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", ["missing", "wrong"])
@pytest.mark.parametrize("key", [pytest.param(k, id=f"{k[0]}-{k[1]}") for k in CHANGING_ROUTES])
def test_state_change_without_the_csrf_token_is_refused(app, people, db, key, token):
    """No or a wrong CSRF token: 403, nothing changed (e.g. no user created), one audit row."""
    client, _ = caller(app, "admin", people)
    before, audit_before = snapshot(db), audit_actions(db)
    response = send(client, key[1], url(app, key[0], people), key,
                    None if token == "missing" else "x" * 43)
    assert response.status_code == 403
    assert snapshot(db) == before
    assert audit_actions(db)[len(audit_before):] == ["auth:csrf_rejected"]


def test_anonymous_login_post_without_token_is_refused(client, db, make_user):
    """A login form posted from another site (no token) is refused before the password is checked."""
    make_user("alice", "labeler")
    response = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 403
    assert audit_actions(db) == ["auth:csrf_rejected"]


def test_bearer_request_needs_no_csrf_token(client, make_user, db, clock):
    """A script with a bearer token can POST without any CSRF token (no cookie authority)."""
    user = make_user("script", "labeler")
    secret, _ = tokens.create_token(db, user, "ci", now=clock())
    db.commit()
    response = client.post("/api/v1/tokens", json={"name": "second"},
                           headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 201


def test_cookie_session_api_call_needs_the_csrf_header(app, people):
    """A browser-session API call is refused without X-CSRF-Token and accepted with it."""
    client, csrf = caller(app, "labeler", people)
    assert client.post("/api/v1/tokens", json={"name": "a"}).status_code == 403
    assert client.post("/api/v1/tokens", json={"name": "a"},
                       headers={"X-CSRF-Token": "x" * 43}).status_code == 403
    assert client.post("/api/v1/tokens", json={"name": "a"},
                       headers={"X-CSRF-Token": csrf}).status_code == 201


# --- headers ---------------------------------------------------------------------------------

CSP_PARTS = ("default-src 'self'", "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'")
EXTRA_PAGES = [("404", "GET", "/no/such/page"), ("405", "GET", "/logout"),
               ("api-404", "GET", "/api/v1/nope"), ("api-405", "PATCH", "/api/v1/me")]


def header_cases():
    """Every GET route plus error answers."""
    cases = [(endpoint, "GET", endpoint) for endpoint, _ in GET_ROUTES] + EXTRA_PAGES
    return [pytest.param(*case, id=case[0]) for case in cases]


@pytest.mark.parametrize("label,method,target", header_cases())
def test_security_headers_on_every_answer(app, people, label, method, target):
    """CSP, nosniff, no-referrer on every answer; no-store unless static; no HSTS without https."""
    for who in ("admin", ANON):
        client, csrf = caller(app, who, people)
        path = target if target.startswith("/") else url(app, target, people, who)
        response = client.open(path, method=method, headers={"X-CSRF-Token": csrf})
        response.close()
        if label.endswith("405"):
            assert response.status_code == 405
        headers = response.headers
        for part in CSP_PARTS:
            assert part in headers["Content-Security-Policy"], who
        assert headers["X-Content-Type-Options"] == "nosniff", who
        assert headers["Referrer-Policy"] == "no-referrer", who
        if label != "static":
            assert "no-store" in headers["Cache-Control"], who
        assert "Strict-Transport-Security" not in headers, who


def test_plain_http_cookie_flags(client, auth, make_user):
    """Over plain HTTP both cookies (before and after login) are HttpOnly, SameSite=Lax, not Secure."""
    make_user("alice", "labeler")
    for response in (client.get("/login"), auth.login("alice")):
        cookie = response.headers["Set-Cookie"]
        assert cookie.startswith("olsession=")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie


@pytest.fixture
def https_app(settings, clock, keyring):
    """The app configured as served through a TLS proxy."""
    values = dict(settings.as_dict(), https=True, trusted_proxy="127.0.0.1")
    application = create_app(load_settings(values, env={}), clock=clock, keyring=keyring)
    yield application
    application.extensions["onprem_label"].engine.dispose()


def test_https_sends_hsts_and_secure_host_cookies(https_app, make_user):
    """With https, HSTS is on every answer and cookies are Secure, __Host- prefixed, no Domain."""
    make_user("alice", "labeler")
    client = https_app.test_client()
    page = client.get("/login", base_url="https://localhost")
    token = csrf_from(client, "/login")
    login = client.post("/login", base_url="https://localhost",
                        data={"username": "alice", "password": PASSWORD, "csrf_token": token})
    assert urlsplit(login.headers["Location"]).path == "/work"
    for response in (page, login, client.get("/nowhere", base_url="https://localhost")):
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    for cookie in (page.headers["Set-Cookie"], login.headers["Set-Cookie"]):
        assert cookie.startswith("__Host-olsession=")
        for flag in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
            assert flag in cookie
        assert "Domain=" not in cookie


# --- error pages and malformed input --------------------------------------------------------

def assert_no_trace(response):
    """No stack trace or source path in the body."""
    body = response.get_data(as_text=True)
    assert "Traceback" not in body and 'File "' not in body and ".py" not in body


PAGE_ERRORS = [  # who, method, path, form (None: no body), status
    (ANON, "GET", "/no/such/page", None, 404),
    ("labeler", "GET", "/admin/users", None, 403),
    ("admin", "GET", "/logout", None, 405),
    ("admin", "GET", "/admin/users/abc", None, 404),
    ("admin", "GET", "/admin/users/0", None, 404),
    ("admin", "GET", "/admin/users/99999999999999999999", None, 404),
    ("admin", "POST", "/admin/users/99999999999999999999/unlock", {}, 404),
    ("admin", "POST", "/admin/users/<target>/explode", {}, 404),
    ("admin", "POST", "/admin/users", {"username": "x" * (2 << 20)}, 413),
    ("admin", "POST", "/admin/users", {"username": "y" * 500_000, "roles": "labeler"}, 422),
    ("admin", "POST", "/admin/users", {"username": "bob", "display_name": "a\x00b"}, 400),
    ("admin", "POST", "/admin/users/%00/unlock", {}, 400),
    (ANON, "POST", "/login", {"username": "bob\x00", "password": "whatever it is"}, 400),
    (ANON, "POST", "/login/break-glass", {"username": "\x00", "code": "x"}, 400),
]


@pytest.mark.parametrize("who,method,path,form,status", PAGE_ERRORS)
def test_page_errors_are_html_without_trace(app, people, db, who, method, path, form, status):
    """Pages answer errors and malformed input with an HTML error page, never a 500 or a trace."""
    client, csrf = caller(app, who, people)
    before = snapshot(db)
    path = path.replace("<target>", str(people["target"]))
    data = None if form is None else dict(form, csrf_token=csrf)
    response = client.open(path, method=method, data=data)
    assert response.status_code == status
    assert response.mimetype == "text/html"
    assert_no_trace(response)
    if status != 422:
        assert f"Error {status}" in response.get_data(as_text=True)
    assert snapshot(db) == before


def test_nul_in_user_agent_is_dropped_not_crashed(app, people, db):
    """A User-Agent with a NUL byte (unstorable on PostgreSQL) is audited without it, not a 500."""
    client, csrf = caller(app, ANON, people)
    response = client.post("/login", headers={"User-Agent": "evil\x00agent"},
                           data={"username": "nobody", "password": "x", "csrf_token": csrf})
    assert response.status_code == 200
    agents = list(db.scalars(select(AuditEvent.user_agent)
                             .where(AuditEvent.action == "auth:login_failed")))
    db.commit()
    assert agents == ["evilagent"]


def test_server_error_shows_request_id_but_no_trace(app):
    """An unexpected exception gives a plain 500 page naming the request id, never the trace."""
    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail in /srv/app.py")

    response = app.test_client().get("/boom")
    assert response.status_code == 500
    body = response.get_data(as_text=True)
    assert "secret detail" not in body and "RuntimeError" not in body
    assert response.headers["X-Request-Id"] in body
