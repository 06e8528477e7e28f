"""Admin user management pages: create, disable, enable, unlock, reset, roles, sessions, TOTP."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from conftest import PASSWORD, csrf_from, login
from onprem_label.auth import tokens
from onprem_label.db.models import AuditEvent, LoginSession, User

SECRET_RE = re.compile(r'<code class="secret">([^<]+)</code>')
USER_ACTIONS = ("disable", "enable", "unlock", "reset-password", "roles", "end-sessions",
                "reset-totp")


@pytest.fixture
def admin(make_user, auth):
    """The admin 'root', logged in on the test client; returns its id."""
    user = make_user("root", "admin")
    assert urlsplit(auth.login("root").headers["Location"]).path == "/admin/users"
    return user.id


@pytest.fixture
def target(make_user) -> int:
    """An ordinary account the admin acts on; returns its id."""
    return make_user("carol", "labeler").id


def act(client, user_id: int, action: str, **form):
    """POST one admin action for a user, with the page's CSRF token."""
    token = csrf_from(client, f"/admin/users/{user_id}")
    return client.post(f"/admin/users/{user_id}/{action}", data=dict(form, csrf_token=token))


def fresh(db, user_id: int) -> User:
    """The user as stored now (the read is ended, so SQLite's write lock is free again)."""
    db.expire_all()
    user = db.get(User, user_id)
    db.commit()
    return user


def audit(db, action: str) -> list[AuditEvent]:
    """Audit rows of one action, oldest first."""
    rows = list(db.scalars(select(AuditEvent).where(AuditEvent.action == action)
                           .order_by(AuditEvent.id)))
    db.commit()
    return rows


def live_sessions(db, user_id: int) -> int:
    """How many login sessions the user has."""
    count = len(list(db.scalars(select(LoginSession).where(LoginSession.user_id == user_id))))
    db.commit()
    return count


def signed_in_client(app, username: str, password: str = PASSWORD):
    """A second browser, logged in as `username` through the form."""
    client = app.test_client()
    response = login(client, username, password)
    assert response.status_code == 302 and urlsplit(response.headers["Location"]).path != "/login"
    return client


def can_work(client) -> bool:
    """True when the client's session still reaches a page behind login."""
    return client.get("/welcome").status_code == 200


# --- create ---------------------------------------------------------------------------------

def test_create_user_shows_a_one_time_password_once_that_must_be_changed(app, client, admin, db):
    """A created user gets a one-time password shown once; signing in with it forces a change."""
    token = csrf_from(client, "/admin/users")
    response = client.post("/admin/users", data={"username": "Newbie", "display_name": "New Bie",
                                                 "roles": ["labeler", "reviewer"],
                                                 "csrf_token": token})
    assert response.status_code == 200
    password = SECRET_RE.search(response.get_data(as_text=True)).group(1)
    user = db.scalar(select(User).where(User.username == "newbie"))
    db.commit()
    assert (user.roles, user.display_name, user.must_change_password) == (
        "labeler reviewer", "New Bie", True)
    assert password not in user.password_hash
    [event] = audit(db, "user:create")
    assert (event.actor_id, event.object_id, event.outcome) == (admin, str(user.id), "success")
    for page in (f"/admin/users/{user.id}", "/admin/users"):
        assert password not in client.get(page).get_data(as_text=True)
    newbie = signed_in_client(app, "newbie", password)
    assert urlsplit(newbie.get("/work").headers["Location"]).path == "/account/password"


@pytest.mark.parametrize("form,message", [
    ({"username": "carol", "roles": "labeler"}, "already exists"),
    ({"username": "dave", "roles": "superuser"}, "unknown role"),
    ({"username": "bad name!", "roles": "labeler"}, "username must be"),
    ({"username": "", "roles": "labeler"}, "username must be"),
])
def test_create_user_with_bad_input_shows_the_reason_and_creates_nobody(client, admin, target, db,
                                                                        form, message):
    """A taken name, an unknown role or a bad username: 422 with the reason, nothing created."""
    count = len(list(db.scalars(select(User))))
    db.commit()
    response = client.post("/admin/users", data=dict(form, csrf_token=csrf_from(client, "/admin/users")))
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)
    assert len(list(db.scalars(select(User)))) == count
    db.commit()
    assert audit(db, "user:create") == []


# --- each action is audited ------------------------------------------------------------------

@pytest.mark.parametrize("action,event", [
    ("disable", "user:disable"), ("enable", "user:enable"), ("unlock", "user:unlock"),
    ("reset-password", "user:password_reset"), ("roles", "user:roles"),
    ("end-sessions", "user:sessions_end"), ("reset-totp", "user:totp_disable"),
])
def test_every_admin_action_writes_its_audit_event(client, admin, target, db, action, event):
    """Each admin action records its own event naming the admin and the account."""
    response = act(client, target, action, roles=["reviewer"])
    assert response.status_code in (200, 302)
    [row] = audit(db, event)
    assert (row.actor_id, row.object_type, row.object_id, row.outcome) == (
        admin, "user", str(target), "success")


def test_the_action_list_matches_the_page(client, admin, target):
    """Every action the user page offers is one this test file covers (and no other is offered)."""
    page = client.get(f"/admin/users/{target}").get_data(as_text=True)
    offered = set(re.findall(rf'action="/admin/users/{target}/([a-z-]+)"', page))
    assert offered | {"enable"} == set(USER_ACTIONS)


# --- behaviour of each action ---------------------------------------------------------------

def test_disable_ends_sessions_and_refuses_login(app, client, admin, target, db):
    """Disabling an account ends its live sessions at once and its password no longer works."""
    carol = signed_in_client(app, "carol")
    assert can_work(carol)
    assert urlsplit(act(client, target, "disable").headers["Location"]).path == f"/admin/users/{target}"
    assert fresh(db, target).active is False
    assert live_sessions(db, target) == 0
    assert urlsplit(carol.get("/welcome").headers["Location"]).path == "/login"
    assert login(app.test_client(), "carol").status_code == 200  # the form again, with an error


def test_enable_lets_a_disabled_user_back_in(app, client, admin, make_user, db):
    """Enabling a disabled account makes its password work again."""
    dave = make_user("dave", "labeler", active=False)
    assert login(app.test_client(), "dave").status_code == 200
    act(client, dave.id, "enable")
    assert fresh(db, dave.id).active is True
    assert can_work(signed_in_client(app, "dave"))


def test_unlock_lifts_a_lockout(app, client, admin, target, db, clock):
    """Unlocking clears the lock and the failure count, so the right password works again."""
    user = fresh(db, target)
    user.locked_until, user.failed_logins = clock() + timedelta(minutes=10), 3
    db.commit()
    assert login(app.test_client(), "carol").status_code == 200  # locked: refused
    act(client, target, "unlock")
    user = fresh(db, target)
    assert (user.locked_until, user.failed_logins) == (None, 0)
    assert can_work(signed_in_client(app, "carol"))


def test_reset_password_shows_a_new_one_time_password_and_ends_sessions(app, client, admin, target,
                                                                       db):
    """A reset shows a new one-time password once, retires the old one and ends live sessions."""
    carol = signed_in_client(app, "carol")
    response = act(client, target, "reset-password")
    assert response.status_code == 200
    password = SECRET_RE.search(response.get_data(as_text=True)).group(1)
    assert fresh(db, target).must_change_password is True
    assert not can_work(carol)
    assert login(app.test_client(), "carol").status_code == 200  # old password refused
    again = signed_in_client(app, "carol", password)
    assert urlsplit(again.get("/welcome").headers["Location"]).path == "/account/password"
    assert password not in client.get(f"/admin/users/{target}").get_data(as_text=True)


def test_set_roles_replaces_the_roles(client, admin, target, db):
    """Saving roles replaces the set, and the audit row keeps before and after."""
    act(client, target, "roles", roles=["manager", "auditor"])
    assert fresh(db, target).roles == "auditor manager"
    [row] = audit(db, "user:roles")
    assert (row.details["before"], row.details["after"]) == ("labeler", "auditor manager")


@pytest.mark.parametrize("action,form", [("roles", {"roles": ["labeler"]}), ("roles", {}),
                                         ("disable", {})])
def test_the_last_admin_cannot_be_removed(client, admin, db, action, form):
    """Taking admin from (or disabling) the last active admin is refused with a message."""
    response = act(client, admin, action, **form)
    assert urlsplit(response.headers["Location"]).path == f"/admin/users/{admin}"
    assert "last active admin" in client.get(f"/admin/users/{admin}").get_data(as_text=True)
    user = fresh(db, admin)
    assert (user.roles, user.active) == ("admin", True)
    assert audit(db, "user:roles") == [] and audit(db, "user:disable") == []


def test_admin_role_can_move_when_another_admin_exists(client, admin, make_user, db):
    """With a second admin, the first may drop the role: the rule is about the last one only."""
    make_user("second", "admin")
    act(client, admin, "roles", roles=["manager"])
    assert fresh(db, admin).roles == "manager"


def test_end_sessions_ends_every_session_of_the_user(app, client, admin, target, db):
    """Ending sessions logs the user out in every browser; the audit row counts them."""
    browsers = [signed_in_client(app, "carol"), signed_in_client(app, "carol")]
    assert live_sessions(db, target) == 2
    act(client, target, "end-sessions")
    assert [can_work(b) for b in browsers] == [False, False]
    [row] = audit(db, "user:sessions_end")
    assert row.details == {"sessions": 2, "tokens_revoked": 0, "username": "carol"}
    assert fresh(db, target).active is True  # the account itself is untouched


def test_reset_totp_removes_the_second_factor(client, admin, target, db):
    """Resetting two-factor removes the secret and the recovery codes (e.g. a lost phone)."""
    user = fresh(db, target)
    user.totp_enabled, user.totp_secret_sealed, user.recovery_codes = True, "sealed", ["h1", "h2"]
    db.commit()
    act(client, target, "reset-totp")
    user = fresh(db, target)
    assert (user.totp_enabled, user.totp_secret_sealed, user.recovery_codes) == (False, None, [])


@pytest.mark.parametrize("path", ["/admin/users/{target}/promote", "/admin/users/999999/unlock",
                                  "/admin/users/999999/disable"])
def test_unknown_action_or_user_is_404_and_changes_nothing(client, admin, target, db, path):
    """An action or account that does not exist is a 404 with no audit row."""
    before = len(audit(db, "user:unlock")) + len(audit(db, "user:disable"))
    response = client.post(path.format(target=target),
                           data={"csrf_token": csrf_from(client, "/admin/users")})
    assert response.status_code == 404
    assert len(audit(db, "user:unlock")) + len(audit(db, "user:disable")) == before
    assert fresh(db, target).active is True


def test_admin_actions_are_not_reachable_by_get(client, admin, target, db):
    """No state change on GET: an action URL answers 405 to GET and the user stays active."""
    assert client.get(f"/admin/users/{target}/disable").status_code == 405
    assert fresh(db, target).active is True


def test_user_page_lists_live_sessions_and_tokens(app, client, admin, target, db, clock):
    """The user page shows the account's live sessions and tokens, never a token secret."""
    signed_in_client(app, "carol")
    secret, _ = tokens.create_token(db, fresh(db, target), "nightly-export", now=clock())
    db.commit()
    page = client.get(f"/admin/users/{target}").get_data(as_text=True)
    assert "nightly-export" in page and secret not in page
    assert "127.0.0.1" in page  # the live session's address
