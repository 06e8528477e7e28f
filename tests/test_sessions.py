"""Server-side sessions: logout, timeouts, id rotation, ending sessions, forced password change."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select, text

from conftest import PASSWORD, csrf_from, login
from onprem_label.audit import AuditAction
from onprem_label.auth import accounts, tokens
from onprem_label.config import ROLES
from onprem_label.db.models import AuditEvent, LoginSession, User

COOKIE = "olsession"
ME = "/api/v1/me"
NEW_PASSWORD = "a brand new passphrase, long enough"
# What a user with a pending password change may still reach (the change page and its exits).
GATE_EXEMPT = {"auth.change_password", "auth.logout", "auth.totp_enrol", "static",
               "health.healthz"}


def fetch(app, model, ident):
    """A fresh copy of one row, read in a short transaction of its own."""
    with app.extensions["onprem_label"].sessionmaker() as s:
        return s.get(model, ident)


def session_rows(app, user_id: int) -> list[LoginSession]:
    """The user's session rows as the database has them now."""
    with app.extensions["onprem_label"].sessionmaker() as s:
        return list(s.scalars(select(LoginSession).where(LoginSession.user_id == user_id)))


def cookie(client) -> str | None:
    """The client's session cookie value, or None."""
    found = client.get_cookie(COOKIE)
    return found.value if found else None


def with_cookie(app, value: str):
    """A new client (another machine) that only has a copied cookie value."""
    other = app.test_client()
    other.set_cookie(COOKIE, value)
    return other


def timeout_reasons(app) -> list[str]:
    """The reasons of every session-timeout audit event, in order."""
    with app.extensions["onprem_label"].sessionmaker() as s:
        events = s.scalars(select(AuditEvent).where(
            AuditEvent.action == AuditAction.SESSION_TIMEOUT.value).order_by(AuditEvent.id))
        return [e.details["reason"] for e in events]


def logout(client):
    """Press "Log out" (the CSRF token comes from a page every logged-in user may open)."""
    token = csrf_from(client, "/account/password")
    return client.post("/logout", data={"csrf_token": token})


def change_password(client, current: str, new: str, confirm: str | None = None):
    """Submit the change-password form."""
    token = csrf_from(client, "/account/password")
    return client.post("/account/password", data={
        "current_password": current, "new_password": new,
        "confirm_password": new if confirm is None else confirm, "csrf_token": token})


# --- logout and replay -------------------------------------------------------------------------

def test_cookie_replayed_after_logout_is_refused(app, client, auth, make_user):
    """A cookie copied before logout opens nothing afterwards: pages go to /login, the API 401."""
    make_user("alice")
    assert auth.login("alice").status_code == 302
    saved = cookie(client)
    assert saved.startswith("a.") and client.get(ME).status_code == 200

    assert logout(client).status_code == 302
    replay = with_cookie(app, saved)
    page = replay.get("/work")
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")
    assert replay.get(ME).status_code == 401
    assert client.get(ME).status_code == 401


# --- timeouts ---------------------------------------------------------------------------------------

def test_idle_session_is_refused_after_fifteen_minutes(app, client, auth, make_user, clock):
    """Requests keep a session alive; 15 minutes and a second without one end it."""
    make_user("alice")
    auth.login("alice")
    for _ in range(3):
        clock.advance(minutes=14, seconds=59)
        assert client.get(ME).status_code == 200
    clock.advance(minutes=15, seconds=1)
    assert client.get(ME).status_code == 401
    assert timeout_reasons(app) == ["idle"]


def test_session_ends_twelve_hours_after_login_even_when_active(app, client, auth, make_user,
                                                                clock):
    """A session used every 10 minutes still ends 12 hours after login."""
    alice = make_user("alice")
    auth.login("alice")
    for _ in range(12 * 6 - 1):
        clock.advance(minutes=10)
        assert client.get(ME).status_code == 200
    clock.advance(minutes=10)
    assert client.get(ME).status_code == 401
    assert timeout_reasons(app) == ["absolute"]
    assert session_rows(app, alice.id) == []


# --- the id ---------------------------------------------------------------------------------------

def test_session_id_is_new_at_every_login(app, client, auth, make_user):
    """Every login sets a new random session id in an HttpOnly, SameSite=Lax cookie."""
    make_user("alice")
    client.get("/login")
    anonymous = cookie(client)
    response = auth.login("alice")
    first = cookie(client)
    assert first != anonymous and first.startswith("a.") and len(first) >= 2 + 43
    set_cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie

    logout(client)
    auth.login("alice")
    second = cookie(client)
    assert second.startswith("a.") and second not in (first, anonymous)


def test_a_planted_session_id_cannot_be_fixated(app, make_user):
    """A session id chosen by an attacker before the victim logs in is never made valid."""
    make_user("alice")
    planted = "a.attacker-chosen-id-0123456789abcdefghijklmnop"
    victim = with_cookie(app, planted)
    assert login(victim, "alice").status_code == 302
    assert cookie(victim) != planted and victim.get(ME).status_code == 200

    assert with_cookie(app, planted).get(ME).status_code == 401
    with app.extensions["onprem_label"].sessionmaker() as s:
        hashes = list(s.scalars(select(LoginSession.sid_hash)))
    assert hashlib.sha256(planted[2:].encode()).hexdigest() not in hashes


def test_session_table_holds_only_the_sha256_of_the_id(app, client, auth, make_user):
    """No column of the sessions table holds the cookie's id; the row is found by its SHA-256."""
    make_user("alice")
    auth.login("alice")
    sid = cookie(client)[2:]
    with app.extensions["onprem_label"].sessionmaker() as s:
        raw_rows = s.execute(text("SELECT * FROM login_sessions")).all()
        hashes = list(s.scalars(select(LoginSession.sid_hash)))
    assert len(raw_rows) == 1
    assert not any(sid in str(value) for value in raw_rows[0])
    assert hashes == [hashlib.sha256(sid.encode()).hexdigest()]


# --- ending a user's sessions -------------------------------------------------------------------

@pytest.mark.parametrize("how", ["admin page", "core"])
def test_disabling_a_user_ends_their_live_sessions(app, client, db, auth, make_user, clock, how):
    """Once a user is disabled, their already open session gets 401."""
    alice = make_user("alice")
    auth.login("alice")
    assert client.get(ME).status_code == 200

    if how == "core":
        accounts.set_active(db, alice, False, now=clock())
        db.commit()
    else:
        make_user("root", "admin")
        admin = app.test_client()
        login(admin, "root")
        response = admin.post(f"/admin/users/{alice.id}/disable",
                              data={"csrf_token": csrf_from(admin, "/admin/users")})
        assert response.status_code == 302
    assert fetch(app, User, alice.id).active is False
    assert session_rows(app, alice.id) == []
    assert client.get(ME).status_code == 401


def test_password_change_ends_the_users_other_sessions(app, client, auth, make_user):
    """A password change kills the user's other sessions and old cookie; this browser gets a new one."""
    alice = make_user("alice")
    laptop = app.test_client()
    login(laptop, "alice")
    auth.login("alice")
    before = cookie(client)

    response = change_password(client, PASSWORD, NEW_PASSWORD)
    assert response.status_code == 302
    assert laptop.get(ME).status_code == 401
    assert with_cookie(app, before).get(ME).status_code == 401
    assert cookie(client) != before and client.get(ME).status_code == 200
    assert len(session_rows(app, alice.id)) == 1


# --- forced password change ---------------------------------------------------------------------

def _urls(app, user_id: int):
    """(method, url, endpoint) for every route of the app, with arguments filled in."""
    values = {"user_id": user_id, "action": "unlock", "token_id": 1, "filename": "style.css",
              "project_id": 1, "item_id": 1, "task_id": 1, "proposal_id": 1}
    adapter = app.url_map.bind("localhost")
    for rule in app.url_map.iter_rules():
        url = adapter.build(rule.endpoint, {a: values[a] for a in rule.arguments})
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, url, rule.endpoint


def test_pending_password_change_blocks_every_page_and_api_call(app, client, auth, make_user,
                                                                clock):
    """A pending password change sends every page to /account/password and every API call to a 403."""
    alice = make_user("alice", ROLES, must_change=True)
    response = auth.login("alice")
    assert response.status_code == 302
    assert client.get(response.headers["Location"]).headers["Location"] == "/account/password"
    token = auth.csrf("/account/password")
    checked = 0
    for method, url, endpoint in _urls(app, alice.id):
        if endpoint in GATE_EXEMPT:
            continue
        answer = client.open(url, method=method, headers={"X-CSRF-Token": token})
        if url.startswith("/api/"):
            assert answer.status_code == 403, url
            assert answer.get_json()["error"]["code"] == "password_change_required", url
        else:
            assert answer.status_code == 302, url
            assert answer.headers["Location"] == "/account/password", url
        checked += 1
    assert checked >= 15

    with app.extensions["onprem_label"].sessionmaker() as s:
        secret, _ = tokens.create_token(s, s.get(User, alice.id), "script", now=clock())
        s.commit()
    api = app.test_client().get(ME, headers={"Authorization": f"Bearer {secret}"})
    assert api.status_code == 403
    assert api.get_json()["error"]["code"] == "password_change_required"
    assert fetch(app, User, alice.id).must_change_password is True


def test_changing_the_one_time_password_lifts_the_gate(app, client, auth, make_user):
    """The right current password and a good new one end the forced change; work can start."""
    alice = make_user("alice", must_change=True)
    auth.login("alice")
    response = change_password(client, PASSWORD, NEW_PASSWORD)
    assert response.status_code == 302 and response.headers["Location"] == "/work"
    assert client.get("/work").status_code == 200
    assert client.get(ME).status_code == 200
    assert fetch(app, User, alice.id).must_change_password is False

    logout(client)
    assert auth.login("alice", NEW_PASSWORD).status_code == 302


@pytest.mark.parametrize("current, new, confirm, message", [
    ("wrong current password", NEW_PASSWORD, None, "current password is wrong"),
    (PASSWORD, "short pw 1", None, "at least 12 characters"),
    (PASSWORD, "PeanutButter", None, "common passwords"),
    (PASSWORD, "hello I am Alice from radiology", None, "must not contain the username"),
    (PASSWORD, NEW_PASSWORD, NEW_PASSWORD + "x", "differ"),
], ids=["wrong-current", "too-short", "common", "contains-username", "mismatch"])
def test_refused_password_change_shows_why_and_changes_nothing(app, client, auth, make_user,
                                                               current, new, confirm, message):
    """A wrong current password or a policy breach gets 422 with the reason, and nothing changes."""
    alice = make_user("alice", must_change=True)
    auth.login("alice")
    before = fetch(app, User, alice.id).password_hash

    response = change_password(client, current, new, confirm)
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)
    after = fetch(app, User, alice.id)
    assert after.password_hash == before and after.must_change_password is True
    assert client.get(ME).get_json()["error"]["code"] == "password_change_required"
