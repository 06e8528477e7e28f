"""API: the caller's identity, their API tokens, and the user list for admins."""

from __future__ import annotations

from flask import jsonify, request
from flask_login import current_user

from onprem_label.auth import accounts, tokens
from onprem_label.auth.roles import Permission
from onprem_label.web.api import bp
from onprem_label.web.context import audit_context, db, now
from onprem_label.web.errors import error_response
from onprem_label.web.login import require


def _user_json(user) -> dict:
    return {"id": user.id, "username": user.username, "display_name": user.display_name,
            "roles": sorted(user.role_set), "active": user.active,
            "totp_enabled": user.totp_enabled,
            "locked_until": user.locked_until.isoformat() if user.locked_until else None}


def _token_json(row) -> dict:
    return {"id": row.id, "name": row.name, "created_at": row.created_at.isoformat(),
            "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
            "revoked": row.revoked_at is not None}


@bp.get("/me")
@require()
def me():
    """Who the caller is."""
    return jsonify(_user_json(current_user))


@bp.get("/tokens")
@require()
def list_tokens():
    """The caller's API tokens (never the secrets)."""
    user = db().merge(current_user._get_current_object())
    return jsonify({"tokens": [_token_json(t) for t in tokens.list_tokens(db(), user)]})


@bp.post("/tokens")
@require()
def create_token():
    """Make a token for the caller; the secret is in this answer and nowhere else."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("name", ""), str):
        return error_response(422, "invalid_body", "Send a JSON object like {\"name\": \"...\"}.")
    dbs = db()
    user = dbs.merge(current_user._get_current_object())
    secret, row = tokens.create_token(dbs, user, body.get("name", ""), context=audit_context(),
                                      now=now())
    dbs.commit()
    return jsonify({"token": secret, **_token_json(row)}), 201


@bp.delete("/tokens/<id:token_id>")
@require()
def revoke_token(token_id: int):
    """Revoke one of the caller's tokens."""
    dbs = db()
    user = dbs.merge(current_user._get_current_object())
    row = tokens.revoke_token(dbs, token_id, owner=user, context=audit_context(), now=now())
    dbs.commit()
    return jsonify(_token_json(row))


@bp.get("/users")
@require(Permission.MANAGE_USERS)
def list_users():
    """Every account (admins only)."""
    return jsonify({"users": [_user_json(u) for u in accounts.list_users(db())]})
