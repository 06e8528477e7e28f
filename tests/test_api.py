"""API tokens and the /api/v1 account endpoints: shown once, hashed at rest, bearer auth, revocation."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from conftest import csrf_from
from onprem_label.auth import accounts, tokens
from onprem_label.db.models import ApiToken, AuditEvent, User


@pytest.fixture
def alice(make_user) -> int:
    """A labeler; returns her id."""
    return make_user("alice", "labeler").id


@pytest.fixture
def token_for(db, clock):
    """Make a live token for a user id (arranged in the core); returns (secret, token id)."""

    def make(user_id: int, name: str = "script") -> tuple[str, int]:
        secret, row = tokens.create_token(db, db.get(User, user_id), name, now=clock())
        db.commit()
        return secret, row.id

    return make


def bearer(secret: str) -> dict:
    """The Authorization header for a token."""
    return {"Authorization": f"Bearer {secret}"}


def assert_api_error(response, status: int, code: str | None = None) -> None:
    """A JSON error body of the contract shape with the given status (and code)."""
    assert response.status_code == status
    body = response.get_json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"]
    if code is not None:
        assert body["error"]["code"] == code


def token_row(db, token_id: int) -> ApiToken:
    """The stored token row, read afresh (and the read ended)."""
    db.expire_all()
    row = db.get(ApiToken, token_id)
    db.commit()
    return row


def audit_actions(db) -> list[str]:
    """Every audit action so far, oldest first."""
    actions = list(db.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
    db.commit()
    return actions


# --- creating ------------------------------------------------------------------------------

def test_create_token_shows_the_secret_once(client, auth, alice, db):
    """POST /tokens answers the secret; the list and later answers never show it again."""
    auth.login("alice")
    csrf = csrf_from(client, "/welcome")
    response = client.post("/api/v1/tokens", json={"name": "nightly"}, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 201
    body = response.get_json()
    secret = body["token"]
    assert secret.startswith("olt_") and len(secret) >= 4 + 43  # 32 random bytes, base64url
    assert (body["name"], body["revoked"], body["last_used_at"]) == ("nightly", False, None)
    listed = client.get("/api/v1/tokens")
    assert [t["id"] for t in listed.get_json()["tokens"]] == [body["id"]]
    assert "token" not in listed.get_json()["tokens"][0]
    assert secret not in listed.get_data(as_text=True)
    assert secret not in client.get("/api/v1/me").get_data(as_text=True)
    assert audit_actions(db)[-1] == "token:create"


def test_only_the_sha256_of_a_token_is_stored(client, auth, alice, db):
    """The database holds the token's SHA-256, and the clear token appears in no table."""
    auth.login("alice")
    csrf = csrf_from(client, "/welcome")
    body = client.post("/api/v1/tokens", json={}, headers={"X-CSRF-Token": csrf}).get_json()
    secret = body["token"]
    assert token_row(db, body["id"]).token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert token_row(db, body["id"]).name == "token"  # an empty name gets a default
    for table in ("api_tokens", "audit_events", "login_sessions", "users"):
        dump = repr(db.execute(text(f"SELECT * FROM {table}")).all())
        assert secret not in dump and secret[4:] not in dump, table
    db.commit()


def test_each_token_is_different(alice, token_for):
    """Two tokens for the same user share nothing: each is fresh randomness."""
    (first, _), (second, _) = token_for(alice), token_for(alice)
    assert first != second and first[4:12] != second[4:12]


# --- using ------------------------------------------------------------------------------------

def test_bearer_token_authenticates_without_a_session(client, alice, token_for):
    """A bearer token is enough for /me, and the answer opens no browser session."""
    secret, _ = token_for(alice)
    response = client.get("/api/v1/me", headers=bearer(secret))
    assert response.status_code == 200
    assert response.get_json()["username"] == "alice"
    assert response.get_json()["roles"] == ["labeler"]
    assert "Set-Cookie" not in response.headers
    assert client.get("/api/v1/me").status_code == 401  # nothing was remembered


def test_last_used_time_is_recorded(client, alice, token_for, db, clock):
    """Use of a token records its time, at most once a minute (a busy script does not write often)."""
    secret, token_id = token_for(alice)
    assert token_row(db, token_id).last_used_at is None
    start = clock()
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 200
    assert token_row(db, token_id).last_used_at == start
    clock.advance(seconds=30)
    client.get("/api/v1/me", headers=bearer(secret))
    assert token_row(db, token_id).last_used_at == start
    clock.advance(minutes=2)
    client.get("/api/v1/me", headers=bearer(secret))
    assert token_row(db, token_id).last_used_at == start + timedelta(seconds=150)
    listed = client.get("/api/v1/tokens", headers=bearer(secret)).get_json()["tokens"]
    assert listed[0]["last_used_at"] == (start + timedelta(seconds=150)).isoformat()


@pytest.mark.parametrize("header", [
    "Bearer", "Bearer ", "Bearer garbage", "Bearer olt_" + "x" * 43, "Bearer olt_" + "x" * 300,
    "Basic YWxpY2U6cGFzc3dvcmQ=", "Token olt_abc",
])
def test_bad_credentials_get_401(client, alice, token_for, header):
    """A missing, malformed or unknown token gets a JSON 401."""
    token_for(alice)
    assert_api_error(client.get("/api/v1/me", headers={"Authorization": header}), 401, "unauthorized")


def test_user_who_must_change_password_cannot_use_the_api(client, make_user, token_for):
    """A token of an account with a pending one-time password is refused until it is changed."""
    secret, _ = token_for(make_user("fresh", "labeler", must_change=True).id)
    assert_api_error(client.get("/api/v1/me", headers=bearer(secret)), 403, "password_change_required")


# --- revoking -------------------------------------------------------------------------------

def test_revoked_token_is_refused(client, alice, token_for, db):
    """DELETE /tokens/<id> revokes; the token then gets 401 on reads and writes alike."""
    secret, token_id = token_for(alice)
    response = client.delete(f"/api/v1/tokens/{token_id}", headers=bearer(secret))
    assert response.status_code == 200 and response.get_json()["revoked"] is True
    assert token_row(db, token_id).revoked_at is not None
    assert audit_actions(db)[-1] == "token:revoke"
    assert_api_error(client.get("/api/v1/me", headers=bearer(secret)), 401, "unauthorized")
    assert_api_error(client.post("/api/v1/tokens", json={"name": "again"}, headers=bearer(secret)),
                     401, "unauthorized")
    assert_api_error(client.delete(f"/api/v1/tokens/{token_id}", headers=bearer(secret)), 401)


def test_revoking_twice_is_404(client, alice, token_for):
    """A token already revoked cannot be revoked again (a live one of the caller is needed)."""
    secret, _ = token_for(alice)
    _, other_id = token_for(alice, "other")
    assert client.delete(f"/api/v1/tokens/{other_id}", headers=bearer(secret)).status_code == 200
    assert_api_error(client.delete(f"/api/v1/tokens/{other_id}", headers=bearer(secret)), 404,
                     "unknown_token")


def test_another_users_token_id_is_404(client, alice, make_user, token_for, db):
    """A user cannot revoke, or learn about, someone else's token: 404, and it stays live."""
    mine, _ = token_for(alice)
    theirs, their_id = token_for(make_user("bob", "labeler").id)
    assert_api_error(client.delete(f"/api/v1/tokens/{their_id}", headers=bearer(mine)), 404,
                     "unknown_token")
    assert token_row(db, their_id).revoked_at is None
    assert client.get("/api/v1/me", headers=bearer(theirs)).status_code == 200
    listed = client.get("/api/v1/tokens", headers=bearer(mine)).get_json()["tokens"]
    assert their_id not in [t["id"] for t in listed]


def test_disabled_users_token_is_refused(client, alice, token_for, db, clock):
    """Disabling an account stops its tokens at once, without revoking them one by one."""
    secret, _ = token_for(alice)
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 200
    accounts.set_active(db, db.get(User, alice), False, now=clock())
    db.commit()
    assert_api_error(client.get("/api/v1/me", headers=bearer(secret)), 401, "unauthorized")


# --- the user list --------------------------------------------------------------------------

def test_user_list_is_for_admins_only(client, make_user, token_for, db):
    """GET /users lists accounts for an admin token; any other role gets 403, which is audited."""
    admin_secret, _ = token_for(make_user("root", "admin").id)
    labeler_secret, _ = token_for(make_user("lab", "labeler").id)
    users = client.get("/api/v1/users", headers=bearer(admin_secret)).get_json()["users"]
    assert sorted(u["username"] for u in users) == ["lab", "root"]
    assert all("password_hash" not in u and "totp_secret_sealed" not in u for u in users)
    assert_api_error(client.get("/api/v1/users", headers=bearer(labeler_secret)), 403)
    assert audit_actions(db)[-1] == "auth:access_denied"


# --- errors -----------------------------------------------------------------------------------

ERRORS = [  # who (None: no credentials), method, path, request kwargs, status
    (None, "GET", "/api/v1/me", {}, 401),
    ("labeler", "GET", "/api/v1/users", {}, 403),
    ("admin", "GET", "/api/v1/nope", {}, 404),
    ("admin", "DELETE", "/api/v1/tokens/999999", {}, 404),
    ("admin", "DELETE", "/api/v1/tokens/99999999999999999999", {}, 404),
    ("admin", "DELETE", "/api/v1/tokens/abc", {}, 404),
    ("admin", "PUT", "/api/v1/me", {}, 405),
    ("admin", "POST", "/api/v1/tokens", {"data": "{not json", "content_type": "application/json"}, 422),
    ("admin", "POST", "/api/v1/tokens", {"data": "name=x", "content_type": "text/plain"}, 422),
    ("admin", "POST", "/api/v1/tokens", {"json": ["a", "list"]}, 422),
    ("admin", "POST", "/api/v1/tokens", {"json": {"name": 5}}, 422),
    ("admin", "POST", "/api/v1/tokens", {"json": {"name": "x" * (2 << 20)}}, 413),
    ("admin", "POST", "/api/v1/tokens", {"json": {"name": "a\x00b"}}, 400),
    ("admin", "POST", "/api/v1/tokens", {"data": "[" * 100_000, "content_type": "application/json"}, 422),
    ("admin", "POST", "/api/v1/tokens", {"data": "[" * 900 + "]" * 900,
                                         "content_type": "application/json"}, 422),
]


@pytest.mark.parametrize("who,method,path,kwargs,status", ERRORS)
def test_api_errors_are_json_without_trace(client, make_user, token_for, db, who, method, path,
                                           kwargs, status):
    """Errors and malformed input get {"error": {"code", "message"}}, a fitting status, no trace."""
    headers = bearer(token_for(make_user(who, who).id)[0]) if who else {}
    tokens_before = len(list(db.scalars(select(ApiToken))))
    db.commit()
    response = client.open(path, method=method, headers=headers, **kwargs)
    assert_api_error(response, status)
    assert all(isinstance(v, str) and v for v in response.get_json()["error"].values())
    body = response.get_data(as_text=True)
    assert "Traceback" not in body and ".py" not in body
    if status == 405:
        assert "GET" in response.headers["Allow"]
    assert len(list(db.scalars(select(ApiToken)))) == tokens_before
    db.commit()
