"""TOTP second factor: enrolment, login with a code, replay, recovery codes, lockout, required roles."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
from sqlalchemy import select

from conftest import csrf_from, login
from onprem_label.audit import AuditAction
from onprem_label.auth import totp
from onprem_label.db.models import AuditEvent, User

ME = "/api/v1/me"
RECOVERY_RE = re.compile(r"<code>([a-z2-7]{4}(?:-[a-z2-7]{4}){3})</code>")


@pytest.fixture
def key(app) -> bytes:
    """The app's key for sealing TOTP secrets."""
    return app.extensions["onprem_label"].totp_key


def fetch(app, ident) -> User:
    """A fresh copy of a user, read in a short transaction of its own."""
    with app.extensions["onprem_label"].sessionmaker() as s:
        return s.get(User, ident)


def enrol(db, user, key, clock) -> list[str]:
    """Turn TOTP on for `user` through the core; returns the recovery codes.

    The clock then moves to the next time step, so the code used here is not a replay later.
    """
    totp.begin_enrolment(db, user, key, now=clock())
    codes = totp.confirm_enrolment(db, user, key, totp.current_code(user, key, clock()),
                                   now=clock())
    db.commit()
    clock.advance(seconds=totp.TIME_STEP)
    return codes


def send_code(client, code: str):
    """Submit the second-factor form."""
    token = csrf_from(client, "/login/totp")
    return client.post("/login/totp", data={"code": code, "csrf_token": token})


def logout(client):
    """Press "Log out"."""
    token = csrf_from(client, "/account/password")
    return client.post("/logout", data={"csrf_token": token})


# --- enrolment -------------------------------------------------------------------------------------

def test_enrolment_shows_a_secret_and_a_right_code_turns_it_on(app, client, make_user, clock,
                                                               key):
    """Enrolment shows a secret; only a right code turns TOTP on and shows 10 recovery codes, kept hashed."""
    alice = make_user("alice")
    login(client, "alice")
    token = csrf_from(client, "/account/totp")
    assert fetch(app, alice.id).totp_secret_sealed is None  # opening the page changed nothing
    page = client.post("/account/totp", data={"action": "start", "csrf_token": token})
    page = page.get_data(as_text=True)
    secret = re.search(r'<code class="secret">([A-Z2-7]{32})</code>', page).group(1)
    assert f"secret={secret}" in page  # the otpauth:// address carries the same secret
    wrong = client.post("/account/totp", data={"code": "000000", "csrf_token": token})
    assert wrong.status_code == 422 and fetch(app, alice.id).totp_enabled is False

    code = totp.current_code(fetch(app, alice.id), key, clock())
    right = client.post("/account/totp", data={"code": code, "csrf_token": token})
    assert right.status_code == 200
    shown = RECOVERY_RE.findall(right.get_data(as_text=True))
    stored = fetch(app, alice.id)
    assert stored.totp_enabled is True and len(shown) == 10
    assert sorted(stored.recovery_codes) == sorted(hashlib.sha256(c.encode()).hexdigest()
                                                   for c in shown)
    assert secret not in str(stored.totp_secret_sealed)


# --- login with the second factor -----------------------------------------------------------------

def test_login_needs_the_code_and_a_used_code_is_refused(app, client, db, make_user, clock, key):
    """After the password no session exists until the code; the same code cannot be used twice."""
    alice = make_user("alice")
    enrol(db, alice, key, clock)
    response = login(client, "alice")
    assert response.headers["Location"] == "/login/totp"
    assert client.get(ME).status_code == 401

    code = totp.current_code(alice, key, clock())
    assert send_code(client, code).status_code == 302
    assert client.get(ME).status_code == 200

    logout(client)
    login(client, "alice")
    replay = send_code(client, code)
    assert "not right, or already used" in replay.get_data(as_text=True)
    assert client.get(ME).status_code == 401

    clock.advance(seconds=totp.TIME_STEP)
    assert send_code(client, totp.current_code(alice, key, clock())).status_code == 302
    assert client.get(ME).status_code == 200


def test_a_recovery_code_works_once(app, client, db, make_user, clock, key):
    """A recovery code stands in for the TOTP code once, and is then used up."""
    alice = make_user("alice")
    codes = enrol(db, alice, key, clock)
    login(client, "alice")
    assert send_code(client, codes[3].upper()).status_code == 302
    assert client.get(ME).status_code == 200
    assert len(fetch(app, alice.id).recovery_codes) == 9

    logout(client)
    login(client, "alice")
    assert "already used" in send_code(client, codes[3]).get_data(as_text=True)
    assert client.get(ME).status_code == 401


def test_wrong_codes_lock_the_account(app, client, db, make_user, clock, key):
    """Five wrong codes lock the account, so even the right password and code are then refused."""
    alice = make_user("alice")
    enrol(db, alice, key, clock)
    login(client, "alice")
    for _ in range(5):
        send_code(client, "123456")
    assert fetch(app, alice.id).locked_until == clock() + timedelta(minutes=15)

    response = login(client, "alice")
    assert response.status_code == 200 and "Sign-in failed" in response.get_data(as_text=True)
    clock.advance(seconds=totp.TIME_STEP)
    # The second step left open before the lock is refused too, even with the right code.
    answer = send_code(client, totp.current_code(alice, key, clock()))
    assert "Sign-in failed" in answer.get_data(as_text=True)
    assert client.get(ME).status_code == 401


def test_reentering_the_password_does_not_reset_the_code_failures(app, client, db, make_user,
                                                                  clock, key):
    """Wrong codes add up across password logins, so re-entering the password cannot dodge the lockout."""
    alice = make_user("alice")
    enrol(db, alice, key, clock)
    for guesses in (3, 2):
        login(client, "alice")
        for _ in range(guesses):
            send_code(client, "123456")
    assert fetch(app, alice.id).locked_until is not None


def test_a_good_second_factor_clears_the_failure_count(app, client, db, make_user, clock, key):
    """A full login (password and code) forgets earlier failures."""
    alice = make_user("alice")
    enrol(db, alice, key, clock)
    login(client, "alice")
    send_code(client, "123456")
    assert fetch(app, alice.id).failed_logins == 1
    send_code(client, totp.current_code(alice, key, clock()))
    assert fetch(app, alice.id).failed_logins == 0


# --- required by role -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{"require_totp_roles": ["admin"]}])
def test_required_role_must_enrol_before_anything_else(app, client, make_user, clock, key):
    """A role listed in require_totp_roles must enrol before any page or API call works."""
    root = make_user("root", "admin")
    response = login(client, "root")
    assert client.get(response.headers["Location"]).headers["Location"] == "/account/totp"
    for path in ("/", "/admin/users", f"/admin/users/{root.id}", "/projects", "/welcome"):
        answer = client.get(path)
        assert (answer.status_code, answer.headers.get("Location")) == (302, "/account/totp"), path
    for path in (ME, "/api/v1/users", "/api/v1/tokens"):
        answer = client.get(path)
        assert answer.status_code == 403 and answer.get_json()["error"]["code"] == "totp_required"

    token = csrf_from(client, "/account/totp")
    client.post("/account/totp", data={"action": "start", "csrf_token": token})
    code = totp.current_code(fetch(app, root.id), key, clock())
    assert client.post("/account/totp", data={"code": code, "csrf_token": token}).status_code == 200
    assert client.get("/admin/users").status_code == 200
    assert client.get(ME).status_code == 200


@pytest.mark.parametrize("overrides", [{"require_totp_roles": ["admin"]}])
def test_roles_not_listed_need_no_enrolment(app, client, make_user):
    """A labeler works without TOTP when only admins are required to enrol."""
    make_user("alice")
    login(client, "alice")
    assert client.get("/work").status_code == 200
    assert client.get(ME).status_code == 200


def test_failed_code_is_audited(app, client, db, make_user, clock, key):
    """A wrong code writes a failed-login audit event naming the second factor."""
    alice = make_user("alice")
    enrol(db, alice, key, clock)
    login(client, "alice")
    rid = send_code(client, "123456").headers["X-Request-Id"]
    with app.extensions["onprem_label"].sessionmaker() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.request_id == rid)))
    assert [(e.action, e.details["reason"]) for e in events] == [
        (AuditAction.LOGIN_FAILED.value, "wrong_totp")]
