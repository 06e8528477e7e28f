"""Server-side login sessions: random ids, hashed at rest, idle and absolute timeouts."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from onprem_label.audit import AuditAction, AuditContext, record
from onprem_label.audit.record import CONSOLE
from onprem_label.db.models import LoginSession, User

# last_seen_at is written at most this often, so reads do not each cost a write.
TOUCH_INTERVAL = timedelta(seconds=30)


@dataclass(frozen=True)
class SessionPolicy:
    """Idle and absolute lifetimes of a login session."""

    idle: timedelta = timedelta(minutes=15)
    absolute: timedelta = timedelta(hours=12)

    @classmethod
    def from_settings(cls, settings) -> SessionPolicy:
        """Build from session_idle_minutes and session_absolute_hours."""
        return cls(timedelta(minutes=settings.session_idle_minutes),
                   timedelta(hours=settings.session_absolute_hours))


def hash_sid(sid: str) -> str:
    """SHA-256 of a session id: a database reader cannot replay what it sees."""
    return hashlib.sha256(sid.encode()).hexdigest()


def start_session(db: Session, user: User, *, policy: SessionPolicy, break_glass: bool = False,
                  data: dict | None = None, context: AuditContext = CONSOLE,
                  now: datetime) -> tuple[str, LoginSession]:
    """Open a new session (256-bit random id) for a user who just logged in; audit the login."""
    sid = secrets.token_urlsafe(32)
    row = LoginSession(sid_hash=hash_sid(sid), user_id=user.id, created_at=now, last_seen_at=now,
                       expires_at=now + policy.absolute, client_addr=context.client_addr[:64],
                       user_agent=context.user_agent[:300], break_glass=break_glass,
                       data=dict(data or {}))
    db.add(row)
    user.last_login_at = now
    db.flush()
    record(db, AuditAction.BREAK_GLASS_LOGIN if break_glass else AuditAction.LOGIN_OK,
           actor=user, object_type="session", object_id=row.id, context=context, now=now)
    return sid, row


def load_session(db: Session, sid: str, *, policy: SessionPolicy, context: AuditContext = CONSOLE,
                 now: datetime) -> LoginSession | None:
    """The live session for `sid`, touched; None (and the row ended) when it has timed out."""
    if not sid or len(sid) > 128:
        return None
    row = db.scalar(select(LoginSession).where(LoginSession.sid_hash == hash_sid(sid)))
    if row is None:
        return None
    user = row.user
    idle_expired = now - row.last_seen_at > policy.idle
    if idle_expired or now >= row.expires_at or not user.active:
        reason = "idle" if idle_expired else ("absolute" if now >= row.expires_at else "disabled")
        db.delete(row)
        record(db, AuditAction.SESSION_TIMEOUT, actor=user, object_type="session",
               object_id=row.id, details={"reason": reason}, context=context, now=now)
        return None
    if now - row.last_seen_at >= TOUCH_INTERVAL:
        row.last_seen_at = now
    return row


def end_session(db: Session, row: LoginSession, *, context: AuditContext = CONSOLE,
                now: datetime) -> None:
    """Logout: delete the row, so a copied cookie stops working at once."""
    record(db, AuditAction.LOGOUT, actor=row.user, object_type="session", object_id=row.id,
           context=context, now=now)
    db.delete(row)


def end_user_sessions(db: Session, user_id: int) -> int:
    """End every session of a user (disable, password change, admin action); returns how many."""
    result = db.execute(delete(LoginSession).where(LoginSession.user_id == user_id))
    return result.rowcount or 0


def purge_expired(db: Session, *, policy: SessionPolicy, now: datetime) -> int:
    """Delete rows past their idle or absolute limit (housekeeping; they are refused anyway)."""
    result = db.execute(delete(LoginSession).where(
        (LoginSession.expires_at <= now) | (LoginSession.last_seen_at < now - policy.idle)))
    return result.rowcount or 0


def list_user_sessions(db: Session, user_id: int) -> list[LoginSession]:
    """A user's live session rows, newest first."""
    return list(db.scalars(select(LoginSession).where(LoginSession.user_id == user_id)
                           .order_by(LoginSession.created_at.desc())))
