"""Login: lockout and its end, identical failure answers, per-address rate limit, break-glass."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from conftest import CSRF_RE, PASSWORD, csrf_from, login
from onprem_label.audit import AuditAction
from onprem_label.audit.record import CONSOLE
from onprem_label.auth import accounts, break_glass, passwords
from onprem_label.auth.errors import InvalidRole
from onprem_label.db.models import AuditEvent, LoginSession, User

WRONG = "certainly not the password"
ME = "/api/v1/me"


def fetch(app, model, ident):
    """A fresh copy of one row, read in a short transaction of its own."""
    with app.extensions["onprem_label"].sessionmaker() as s:
        return s.get(model, ident)


def actions_of(app, response) -> list[str]:
    """The audit actions written by the request that produced `response`, in order."""
    rid = response.headers["X-Request-Id"]
    with app.extensions["onprem_label"].sessionmaker() as s:
        return list(s.scalars(select(AuditEvent.action).where(AuditEvent.request_id == rid)
                              .order_by(AuditEvent.id)))


def is_logged_in(client) -> bool:
    """True when the client's cookie opens a live session."""
    return client.get(ME).status_code == 200


def lock_in_core(app, db, user, clock) -> None:
    """Lock `user` through the core's failure counter (no password hashing, so it is quick)."""
    policy = app.extensions["onprem_label"].lockout
    for _ in range(policy.threshold):
        accounts.register_failure(db, user, "wrong_password", policy=policy,
                                  context=CONSOLE, now=clock())
    db.commit()
    assert user.locked_until == clock() + policy.duration


# --- lockout -----------------------------------------------------------------------------------

def test_five_wrong_passwords_lock_the_account_and_audit_every_attempt(app, client, make_user,
                                                                      clock):
    """5 wrong passwords lock the account, then the right one is refused; every attempt is audited."""
    alice = make_user("alice")
    for attempt in range(1, 6):
        response = login(client, "alice", WRONG)
        assert response.status_code == 200 and "Sign-in failed" in response.get_data(as_text=True)
        expected = [AuditAction.LOGIN_FAILED]
        if attempt == 5:
            expected.append(AuditAction.LOGIN_LOCKED)
        assert actions_of(app, response) == expected
        locked_until = fetch(app, User, alice.id).locked_until
        assert (locked_until is not None) == (attempt == 5)
    assert locked_until == clock() + timedelta(minutes=15)

    response = login(client, "alice", PASSWORD)
    assert "Sign-in failed" in response.get_data(as_text=True)
    assert actions_of(app, response) == [AuditAction.LOGIN_LOCKED]
    assert not is_logged_in(client)


@pytest.mark.parametrize("how", ["admin page", "core"])
def test_unlock_lets_the_right_password_in_again(app, client, db, make_user, clock, how):
    """A locked account refuses the right password until an admin unlocks it."""
    alice = make_user("alice")
    lock_in_core(app, db, alice, clock)
    login(client, "alice", PASSWORD)
    assert not is_logged_in(client)

    if how == "core":
        accounts.unlock(db, alice, now=clock())
        db.commit()
    else:
        make_user("root", "admin")
        admin = app.test_client()
        login(admin, "root")
        response = admin.post(f"/admin/users/{alice.id}/unlock",
                              data={"csrf_token": csrf_from(admin, "/admin/users")})
        assert response.status_code == 302
        assert actions_of(app, response) == [AuditAction.USER_UNLOCK]
    assert fetch(app, User, alice.id).locked_until is None

    response = login(client, "alice", PASSWORD)
    assert response.status_code == 302
    assert is_logged_in(client)


def test_lockout_expires_after_fifteen_minutes(app, client, db, make_user, clock):
    """The right password is refused during the lockout and accepted once it has expired."""
    alice = make_user("alice")
    lock_in_core(app, db, alice, clock)
    clock.advance(minutes=14, seconds=59)
    login(client, "alice", PASSWORD)
    assert not is_logged_in(client)

    clock.advance(seconds=2)
    assert login(client, "alice", PASSWORD).status_code == 302
    assert is_logged_in(client)


def test_failures_spread_beyond_the_window_do_not_lock(app, client, db, make_user, clock):
    """Failures older than the 15-minute window are forgotten, so they never add up to a lock."""
    alice = make_user("alice")
    policy = app.extensions["onprem_label"].lockout
    for _ in range(policy.threshold - 1):
        accounts.register_failure(db, alice, "wrong_password", policy=policy,
                                  context=CONSOLE, now=clock())
    db.commit()
    clock.advance(minutes=16)
    login(client, "alice", WRONG)
    row = fetch(app, User, alice.id)
    assert row.locked_until is None and row.failed_logins == 1


# --- failures look alike -------------------------------------------------------------------------

def _comparable(response, username: str) -> tuple:
    """Status, headers and body with the per-request parts (CSRF token, echo, id) blanked."""
    body = CSRF_RE.sub('name="csrf_token" value=""', response.get_data(as_text=True))
    body = body.replace(f'value="{username}"', 'value=""')
    headers = sorted((k, v) for k, v in response.headers.items() if k != "X-Request-Id")
    return response.status_code, headers, body.encode()


def test_every_kind_of_login_failure_gets_the_same_answer(app, client, db, make_user, clock):
    """Unknown user, wrong password, disabled or locked account: byte-identical answers."""
    make_user("alice")
    make_user("dolly", active=False)
    lock_in_core(app, db, make_user("lenny"), clock)

    # Names of one length, so even Content-Length cannot differ by the echoed name.
    unknown = _comparable(login(client, "ghost", PASSWORD), "ghost")
    for username, password in [("alice", WRONG), ("dolly", PASSWORD), ("lenny", PASSWORD)]:
        other = app.test_client()  # a fresh visitor: its own CSRF token, no shared state
        assert _comparable(login(other, username, password), username) == unknown, username
        assert not is_logged_in(other)
    assert unknown[0] == 200


def test_unknown_user_costs_the_same_password_hash_as_a_wrong_password(client, make_user,
                                                                        monkeypatch):
    """Unknown and known usernames each cost exactly one full scrypt verification."""
    make_user("alice")
    costs: list[str] = []
    real = passwords.verify_password

    def counting(password, encoded):
        costs.append(encoded.split("$")[1])  # the scrypt cost parameter used
        return real(password, encoded)

    monkeypatch.setattr(passwords, "verify_password", counting)
    login(client, "nobody", WRONG)
    unknown, costs[:] = list(costs), []
    login(client, "alice", WRONG)
    assert unknown == costs == [str(passwords.SCRYPT_LOG_N)]


# --- per-address rate limit ------------------------------------------------------------------------

def test_default_address_rate_limit_is_30_per_15_minutes(app):
    """Without configuration an address gets 30 login attempts per 15 minutes."""
    limiter = app.extensions["onprem_label"].rate_limiter
    assert (limiter.limit, limiter.window) == (30, timedelta(minutes=15))


@pytest.mark.parametrize("overrides", [{"address_rate_limit": 3}])
def test_address_over_its_rate_gets_429_with_retry_after(app, client, make_user, clock):
    """Over the address limit even a right login gets an audited 429 + Retry-After, until the window ends."""
    make_user("alice")
    for _ in range(3):
        assert login(client, "nobody", WRONG).status_code == 200
    clock.advance(minutes=1)
    response = login(client, "alice", PASSWORD)
    assert response.status_code == 429
    assert 0 < int(response.headers["Retry-After"]) <= 14 * 60 + 1
    assert actions_of(app, response) == [AuditAction.LOGIN_RATE_LIMITED]
    assert not is_logged_in(client)

    elsewhere = app.test_client()
    elsewhere.environ_base["REMOTE_ADDR"] = "10.0.0.2"
    assert login(elsewhere, "alice", PASSWORD).status_code == 302

    clock.advance(minutes=15)
    assert login(client, "alice", PASSWORD).status_code == 302
    assert is_logged_in(client)


# --- break-glass -------------------------------------------------------------------------------------

def break_glass_post(client, username: str, password: str, code: str):
    """Submit the break-glass form."""
    token = csrf_from(client, "/login/break-glass")
    return client.post("/login/break-glass", data={"username": username, "password": password,
                                                   "code": code, "csrf_token": token})


def test_break_glass_logs_a_locked_admin_in_once(app, client, db, make_user, clock):
    """A console-issued code plus the password logs a locked admin in once, as its own audit event."""
    root = make_user("root", "admin")
    lock_in_core(app, db, root, clock)
    code = break_glass.issue_code(db, root, now=clock())
    db.commit()

    response = break_glass_post(client, "root", PASSWORD, code)
    assert response.status_code == 302
    assert actions_of(app, response) == [AuditAction.BREAK_GLASS_LOGIN]
    assert client.get(ME).get_json()["username"] == "root"
    with app.extensions["onprem_label"].sessionmaker() as s:
        assert [r.break_glass for r in s.scalars(select(LoginSession))] == [True]
    assert fetch(app, User, root.id).break_glass_hash is None

    token = csrf_from(client, "/admin/users")
    client.post("/logout", data={"csrf_token": token})
    again = app.test_client()
    response = break_glass_post(again, "root", PASSWORD, code)
    assert "Sign-in failed" in response.get_data(as_text=True)
    assert not is_logged_in(again)


def test_break_glass_with_a_wrong_password_fails_and_keeps_the_code(app, client, db, make_user,
                                                                    clock):
    """The right code with a wrong password is refused and leaves the code unused."""
    root = make_user("root", "admin")
    code = break_glass.issue_code(db, root, now=clock())
    db.commit()

    response = break_glass_post(client, "root", WRONG, code)
    assert "Sign-in failed" in response.get_data(as_text=True)
    assert actions_of(app, response) == [AuditAction.LOGIN_FAILED]
    assert not is_logged_in(client)
    assert fetch(app, User, root.id).break_glass_hash is not None

    assert break_glass_post(client, "root", PASSWORD, code).status_code == 302
    assert is_logged_in(client)


def test_break_glass_codes_are_for_admins_only(db, make_user, clock):
    """A break-glass code cannot be issued to a non-admin."""
    with pytest.raises(InvalidRole):
        break_glass.issue_code(db, make_user("alice"), now=clock())
