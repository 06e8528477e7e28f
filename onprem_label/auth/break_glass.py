"""Break-glass: a one-time emergency login for an admin, issued at the server console."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from onprem_label.audit import AuditAction, AuditContext, record
from onprem_label.audit.record import CONSOLE
from onprem_label.auth import passwords
from onprem_label.auth.errors import InvalidRole
from onprem_label.db.models import User

DEFAULT_TTL = timedelta(hours=1)


def issue_code(db: Session, user: User, *, ttl: timedelta = DEFAULT_TTL,
               context: AuditContext = CONSOLE, now: datetime) -> str:
    """Make a one-time code for `user` (an admin); only someone at the console can ask for one."""
    if "admin" not in user.role_set:
        raise InvalidRole("break-glass codes are only for admins")
    code = secrets.token_urlsafe(18)
    user.break_glass_hash = passwords.hash_password(code)
    user.break_glass_expires_at = now + ttl
    record(db, AuditAction.BREAK_GLASS_ISSUED, object_type="user", object_id=user.id,
           details={"username": user.username, "expires_at": user.break_glass_expires_at.isoformat()},
           context=context, now=now)
    return code


def redeem_code(db: Session, user: User | None, code: str, *, now: datetime) -> bool:
    """True (and the code used up) when `code` is the user's live break-glass code.

    It bypasses the lockout and the second factor, never the password: the caller checks that
    separately. Always costs one hash, whether or not the user has a code. The code is spent
    by a conditional UPDATE, so two requests racing with the same code cannot both win.
    """
    live = (user is not None and user.break_glass_hash is not None
            and user.break_glass_expires_at is not None and user.break_glass_expires_at > now
            and "admin" in user.role_set and user.active)
    stored = user.break_glass_hash if live else passwords.dummy_hash()
    if not (passwords.verify_password(code or "", stored) and live):
        return False
    spent = db.execute(update(User).where(User.id == user.id, User.break_glass_hash == stored)
                       .values(break_glass_hash=None, break_glass_expires_at=None)
                       .execution_options(synchronize_session=False))
    if spent.rowcount != 1:
        return False
    user.break_glass_hash, user.break_glass_expires_at = None, None
    return True
