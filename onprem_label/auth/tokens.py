"""API tokens for scripts: 32 random bytes shown once; only the SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.orm import Session, make_transient_to_detached

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


# Built once: this runs on every API call, and composing the statement costs more than the query.
_LIVE_TOKEN = (select(User.__table__, ApiToken.id.label("token_id"),
                      ApiToken.last_used_at.label("token_last_used_at"))
               .join(ApiToken, ApiToken.user_id == User.id)
               .where(ApiToken.token_hash == bindparam("token_hash"),
                      ApiToken.revoked_at.is_(None), User.active.is_(True)))
_USER_COLUMNS = tuple(column.key for column in User.__table__.columns)


@dataclass(frozen=True)
class TokenUse:
    """A checked token: its owner (a detached User) and what touch_token needs."""

    user: User
    token_id: int
    last_used_at: datetime | None


class CheckedTokens:
    """Tokens checked in the last few seconds, so a busy script is not one query per call.

    A revocation, a disabled account or a password change made through this package in this
    process forgets the entry at once (see forget_user); another process on the same database
    sees it within TTL seconds. A token is never cached as valid for longer than that.
    """

    TTL = 5.0
    MAX_ENTRIES = 10_000

    def __init__(self):
        self._entries: dict[str, tuple[float, TokenUse]] = {}
        self._lock = threading.Lock()

    def get(self, token_hash: str) -> TokenUse | None:
        """A still-fresh check of this token, or None."""
        entry = self._entries.get(token_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, token_hash: str, use: TokenUse) -> None:
        """Remember a successful check for TTL seconds."""
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[token_hash] = (time.monotonic() + self.TTL, use)

    def forget_user(self, user_id: int) -> None:
        """Drop every cached check of one user's tokens."""
        with self._lock:
            for key in [k for k, (_, use) in self._entries.items() if use.user.id == user_id]:
                del self._entries[key]


CHECKED = CheckedTokens()


def recently_checked(token: str) -> TokenUse | None:
    """A check of this token made in the last few seconds (see CheckedTokens), or None."""
    return CHECKED.get(_hash(token)) if token.startswith(TOKEN_PREFIX) else None


def authenticate_token(conn: Connection, token: str) -> TokenUse | None:
    """The active owner of a live token, or None: one read on a plain connection, no ORM
    session (this is on every scripted API call). Callers try recently_checked first."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 100:
        return None
    token_hash = _hash(token)
    row = conn.execute(_LIVE_TOKEN, {"token_hash": token_hash}).mappings().first()
    if row is None:
        return None
    user = User(**{key: row[key] for key in _USER_COLUMNS})
    make_transient_to_detached(user)  # it is the stored row: merge() into a session works
    use = TokenUse(user, row["token_id"], row["token_last_used_at"])
    CHECKED.put(token_hash, use)
    return use


def needs_touch(use: TokenUse, *, now: datetime) -> bool:
    """True when the token's last use is older than LAST_USED_RESOLUTION (or never recorded)."""
    return use.last_used_at is None or now - use.last_used_at >= LAST_USED_RESOLUTION


def touch_token(db: Session, use: TokenUse, *, now: datetime) -> bool:
    """Record the token's use, at most once per LAST_USED_RESOLUTION; True if it wrote."""
    if not needs_touch(use, now=now):
        return False
    db.execute(update(ApiToken).where(ApiToken.id == use.token_id).values(last_used_at=now)
               .execution_options(synchronize_session=False))
    object.__setattr__(use, "last_used_at", now)  # the cached check must not write again
    return True


def revoke_token(db: Session, token_id: int, *, owner: User | None = None,
                 actor: User | None = None, context: AuditContext = CONSOLE,
                 now: datetime) -> ApiToken:
    """Revoke a token by id (optionally only if `owner` holds it)."""
    row = db.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None or (owner is not None and row.user_id != owner.id):
        raise UnknownToken(f"no live token with id {token_id}")
    row.revoked_at = now
    CHECKED.forget_user(row.user_id)
    record(db, AuditAction.TOKEN_REVOKE, actor=actor or owner, object_type="token",
           object_id=row.id, details={"for_user": row.user.username, "name": row.name},
           context=context, now=now)
    return row


def revoke_user_tokens(db: Session, user_id: int, *, now: datetime) -> int:
    """Revoke every live token of a user (password change, reset, "end all sessions")."""
    CHECKED.forget_user(user_id)
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
