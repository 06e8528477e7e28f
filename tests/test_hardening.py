"""Fixes from the security review: token lifetime, password-change guessing, odd input, re-login."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from conftest import PASSWORD, csrf_from, login
from onprem_label.auth import tokens
from onprem_label.db.models import ApiToken, LoginSession, User

ME = "/api/v1/me"
NEW_PASSWORD = "a brand new passphrase, long enough"


def bearer(token: str) -> dict:
    """Authorization header for a token."""
    return {"Authorization": f"Bearer {token}"}


def fresh(app, model, ident):
    """A row as the database has it now."""
    with app.extensions["onprem_label"].sessionmaker() as s:
        return s.get(model, ident)


def mint(db, user, clock) -> str:
    """A live API token for `user`."""
    secret, _ = tokens.create_token(db, user, "script", now=clock())
    db.commit()
    return secret


def test_password_change_revokes_api_tokens(app, client, db, make_user, clock):
    """Changing one's password also revokes one's API tokens (a stolen session cannot keep access)."""
    user = make_user("nina")
    secret = mint(db, user, clock)
    assert client.get(ME, headers=bearer(secret)).status_code == 200
    login(client, "nina")
    token = csrf_from(client, "/account/password")
    response = client.post("/account/password", data={
        "current_password": PASSWORD, "new_password": NEW_PASSWORD,
        "confirm_password": NEW_PASSWORD, "csrf_token": token})
    assert response.status_code == 302
    assert app.test_client().get(ME, headers=bearer(secret)).status_code == 401


@pytest.mark.parametrize("action", ["reset-password", "end-sessions"])
def test_admin_reset_and_end_sessions_revoke_tokens(app, client, db, make_user, clock, action):
    """An admin's password reset or "end all sessions" cuts off the user's API tokens too."""
    make_user("root", "admin")
    target = make_user("olga")
    secret = mint(db, target, clock)
    login(client, "root")
    token = csrf_from(client, f"/admin/users/{target.id}")
    assert client.post(f"/admin/users/{target.id}/{action}",
                       data={"csrf_token": token}).status_code in (200, 302)
    assert app.test_client().get(ME, headers=bearer(secret)).status_code == 401
    with app.extensions["onprem_label"].sessionmaker() as s:
        assert all(t.revoked_at is not None for t in s.scalars(select(ApiToken)))


def test_guessing_the_current_password_locks_and_ends_the_session(app, client, make_user):
    """Wrong current passwords on the change form count toward the lockout; at the limit the session ends."""
    user = make_user("pete")
    login(client, "pete")
    for attempt in range(5):
        token = csrf_from(client, "/account/password")
        response = client.post("/account/password", data={
            "current_password": f"guess number {attempt}", "new_password": NEW_PASSWORD,
            "confirm_password": NEW_PASSWORD, "csrf_token": token})
        assert response.status_code == 422
    assert fresh(app, User, user.id).locked_until is not None
    assert client.get(ME).status_code == 401
    with app.extensions["onprem_label"].sessionmaker() as s:
        assert s.scalars(select(LoginSession).where(LoginSession.user_id == user.id)).all() == []


def test_logging_in_again_ends_the_previous_session(app, client, make_user):
    """A second login in the same browser (even as someone else) ends the first session."""
    make_user("fay")
    make_user("gus")
    login(client, "fay")
    first = client.get_cookie("olsession").value
    token = csrf_from(client, "/account/password")  # /login itself redirects a logged-in user
    client.post("/login", data={"username": "gus", "password": PASSWORD, "csrf_token": token})
    assert client.get(ME).get_json()["username"] == "gus"
    stale = app.test_client()
    stale.set_cookie("olsession", first)
    assert stale.get(ME).status_code == 401


def test_planted_remember_cookie_does_not_log_anyone_out(client, make_user):
    """A remember_token cookie (which we never issue) is ignored: our sessions stay in charge."""
    make_user("hal")
    login(client, "hal")
    client.set_cookie("remember_token", "planted|value")
    assert client.get(ME).status_code == 200


@pytest.mark.parametrize("next_url", ["/%0d%0aSet-Cookie:x=1", "/%0aX", "/\\evil.example", "/%09x"])
def test_next_with_control_characters_is_dropped(client, make_user, next_url):
    """A `next` with CR/LF, tabs or backslashes is ignored, and login still works (no 500)."""
    make_user("ida")
    client.get(f"/login?next={next_url}")
    response = login(client, "ida")
    assert response.status_code == 302
    assert response.headers["Location"] in ("/work", "http://localhost/work")


@pytest.mark.parametrize("where", ["form", "header"])
def test_non_ascii_csrf_token_is_refused_not_crashed(client, make_user, where):
    """A CSRF token with non-ASCII characters is a 403, never a 500."""
    make_user("jon")
    login(client, "jon")
    if where == "form":
        response = client.post("/logout", data={"csrf_token": "\u00e9\u00e9\u00e9"})
    else:
        response = client.post("/api/v1/tokens", json={"name": "x"},
                               headers={"X-CSRF-Token": "\u00e9\u00e9\u00e9"})
    assert response.status_code == 403


def test_non_ascii_digits_as_totp_code_are_wrong_not_a_crash(app, client, make_user, db):
    """Arabic-Indic digits in a TOTP code are simply a wrong code (422), not a 500."""
    make_user("kim")
    login(client, "kim")
    token = csrf_from(client, "/account/totp")
    client.post("/account/totp", data={"action": "start", "csrf_token": token})
    response = client.post("/account/totp", data={"code": "\u0661\u0662\u0663\u0664\u0665\u0666",
                                                  "csrf_token": token})
    assert response.status_code == 422


def test_lone_surrogate_in_json_is_a_400(client, make_user, db, clock):
    """JSON carrying a lone surrogate (unstorable text) gets a 400 instead of a database error."""
    user = make_user("lee")
    secret = mint(db, user, clock)
    response = client.post("/api/v1/tokens", data='{"name": "\\ud800"}',
                           content_type="application/json", headers=bearer(secret))
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "bad_request"


def test_token_revoked_by_another_process_stops_within_the_cache_ttl(app, client, db, make_user,
                                                                    clock, monkeypatch):
    """A revocation this process did not make (another server) is seen once the short cache expires."""
    from sqlalchemy import update

    user = make_user("max")
    secret = mint(db, user, clock)
    assert client.get(ME, headers=bearer(secret)).status_code == 200
    db.execute(update(ApiToken).values(revoked_at=clock()))  # as another process would
    db.commit()
    assert client.get(ME, headers=bearer(secret)).status_code == 200  # still within the TTL
    later = tokens.time.monotonic() + tokens.CheckedTokens.TTL + 1
    monkeypatch.setattr(tokens.time, "monotonic", lambda: later)
    assert client.get(ME, headers=bearer(secret)).status_code == 401
