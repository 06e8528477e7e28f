"""API tokens for scripts: 32 random bytes shown once; only the SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from onprem_label.audit import AuditAction, AuditContext, record
from onprem_label.audit.record import CONSOLE
from onprem_label.auth.errors import AuthError
from onprem_label.db.models import ApiToken, User

TOKEN_PREFIX = "olt_"
# last_used_at is written at most this often, so a busy script does not write on every call.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class UnknownToken(AuthError):
    """No live token with that id for that user."""

    code = "unknown_token"


def _hash(token: str) -> str:
    # A fast hash is right here: the token has 256 bits of entropy, nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: Session, user: User, name: str, *, actor: User | None = None,
                 context: AuditContext = CONSOLE, now: datetime) -> tuple[str, ApiToken]:
    """Make a token for `user`; returns the clear token (never stored) and its row."""
    name = (name or "").strip()[:100] or "token"
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name, token_hash=_hash(token), created_at=now)
    db.add(row)
    db.flush()
    record(db, AuditAction.TOKEN_CREATE, actor=actor or user, object_type="token", object_id=row.id,
           details={"for_user": user.username, "name": name}, context=context, now=now)
    return token, row


def authenticate_token(db: Session, token: str, *, now: datetime) -> User | None:
    """The active user owning a live token, or None; records last use."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 100:
        return None
    row = db.scalar(select(ApiToken).where(ApiToken.token_hash == _hash(token),
                                           ApiToken.revoked_at.is_(None)))
    if row is None or not row.user.active:
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
    return row.user


def revoke_token(db: Session, token_id: int, *, owner: User | None = None,
                 actor: User | None = None, context: AuditContext = CONSOLE,
                 now: datetime) -> ApiToken:
    """Revoke a token by id (optionally only if `owner` holds it)."""
    row = db.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None or (owner is not None and row.user_id != owner.id):
        raise UnknownToken(f"no live token with id {token_id}")
    row.revoked_at = now
    record(db, AuditAction.TOKEN_REVOKE, actor=actor or owner, object_type="token",
           object_id=row.id, details={"for_user": row.user.username, "name": row.name},
           context=context, now=now)
    return row


def revoke_user_tokens(db: Session, user_id: int, *, now: datetime) -> int:
    """Revoke every live token of a user (password change, reset, "end all sessions")."""
    result = db.execute(update(ApiToken).where(ApiToken.user_id == user_id,
                                               ApiToken.revoked_at.is_(None))
                        .values(revoked_at=now))
    return result.rowcount or 0


def list_tokens(db: Session, user: User | None = None) -> list[ApiToken]:
    """Tokens (all, or one user's), newest first."""
    query = select(ApiToken).order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    return list(db.scalars(query))
