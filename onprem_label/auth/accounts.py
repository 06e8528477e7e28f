"""Local accounts: create, authenticate with lockout, change or reset passwords, disable, roles."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from onprem_label.audit import AuditAction, AuditContext, record
from onprem_label.audit.record import CONSOLE
from onprem_label.auth import passwords, sessions, tokens
from onprem_label.auth.errors import (InvalidRole, InvalidUsername, PasswordPolicyError,
                                      UnknownUser, UserExists, WrongPassword)
from onprem_label.config import ROLES
from onprem_label.db.models import User

USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class LockoutPolicy:
    """How many failures in which window lock an account, and for how long."""

    threshold: int = 5
    window: timedelta = timedelta(minutes=15)
    duration: timedelta = timedelta(minutes=15)

    @classmethod
    def from_settings(cls, settings) -> LockoutPolicy:
        """Build from the lockout_* settings."""
        return cls(settings.lockout_threshold, timedelta(minutes=settings.lockout_window_minutes),
                   timedelta(minutes=settings.lockout_minutes))


def normalise_username(username: str) -> str:
    """Lowercase and check a username; raise InvalidUsername."""
    name = (username or "").strip().lower()
    if not USERNAME_RE.match(name):
        raise InvalidUsername("username must be 1-64 characters: letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return name


def parse_roles(roles) -> str:
    """Validate a role list (or space/comma separated string) into the stored form."""
    items = roles.replace(",", " ").split() if isinstance(roles, str) else list(roles)
    bad = [r for r in items if r not in ROLES]
    if bad:
        raise InvalidRole(f"unknown role '{bad[0]}'; roles are: {', '.join(ROLES)}")
    return " ".join(sorted(set(items)))


def get_user(db: Session, username: str) -> User | None:
    """The user with this username (any case), or None."""
    return db.scalar(select(User).where(User.username == (username or "").strip().lower()))


def require_user(db: Session, username: str) -> User:
    """The user with this username, or UnknownUser."""
    user = get_user(db, username)
    if user is None:
        raise UnknownUser(f"no user named '{username}'")
    return user


def generate_password() -> str:
    """A random one-time password (~120 bits) that passes the policy."""
    return secrets.token_urlsafe(15)


def create_user(db: Session, username: str, password: str, roles, *, actor: User | None = None,
                display_name: str = "", must_change_password: bool = True,
                context: AuditContext = CONSOLE, now: datetime) -> User:
    """Create an account; by default its password must be changed at first login."""
    name = normalise_username(username)
    role_text = parse_roles(roles)
    passwords.check_password_policy(password, name)
    # Hash before the first query: on SQLite that query takes the write lock for the transaction.
    password_hash = passwords.hash_password(password)
    if get_user(db, name) is not None:
        raise UserExists(f"user '{name}' already exists")
    user = User(username=name, display_name=display_name or name,
                password_hash=password_hash, roles=role_text, active=True,
                must_change_password=must_change_password, failed_logins=0, created_at=now,
                password_changed_at=now, recovery_codes=[], totp_enabled=False)
    db.add(user)
    db.flush()
    record(db, AuditAction.USER_CREATE, actor=actor, object_type="user", object_id=user.id,
           details={"username": name, "roles": role_text}, context=context, now=now)
    return user


def authenticate(db: Session, username: str, password: str, *, policy: LockoutPolicy,
                 context: AuditContext = CONSOLE, now: datetime) -> User | None:
    """Check a username and password; the user on success, None on any failure.

    Every failure looks the same to the caller (unknown user, wrong password, locked, disabled)
    and costs one scrypt verification, so neither answer nor timing tells which it was. The
    transaction is ended before hashing so a slow hash never holds SQLite's write lock; the
    caller commits the audit rows and counters this adds.
    """
    user = get_user(db, username)
    db.commit()
    ok = passwords.verify_password(password, user.password_hash if user else passwords.dummy_hash())
    if user is None:
        record(db, AuditAction.LOGIN_FAILED, actor_name=(username or "")[:64], object_type="user",
               outcome="failure", details={"reason": "unknown_user"}, context=context, now=now)
        return None
    db.refresh(user, with_for_update=True)
    if user.locked_until is not None and user.locked_until > now:
        record(db, AuditAction.LOGIN_LOCKED, actor=user, object_type="user", object_id=user.id,
               outcome="denied", details={"reason": "account_locked",
                                          "locked_until": user.locked_until.isoformat()},
               context=context, now=now)
        return None
    if not ok:
        register_failure(db, user, "wrong_password", policy=policy, context=context, now=now)
        return None
    if not user.active:
        record(db, AuditAction.LOGIN_FAILED, actor=user, object_type="user", object_id=user.id,
               outcome="denied", details={"reason": "account_disabled"}, context=context, now=now)
        return None
    if not user.totp_enabled:
        # With a second factor, failures are forgiven only once it passes too (clear_failures):
        # else re-entering the password between code guesses would dodge the lockout.
        clear_failures(user)
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = passwords.hash_password(password)
    return user


def clear_failures(user: User) -> None:
    """Forget counted failures after a complete login (password and, if enrolled, second factor)."""
    user.failed_logins, user.last_failed_at, user.locked_until = 0, None, None


def register_failure(db: Session, user: User, reason: str, *, policy: LockoutPolicy,
                     context: AuditContext, now: datetime) -> None:
    """Count one failed factor; lock the account when the policy's threshold is reached."""
    if user.last_failed_at is None or now - user.last_failed_at > policy.window:
        user.failed_logins = 0
    user.failed_logins += 1
    user.last_failed_at = now
    record(db, AuditAction.LOGIN_FAILED, actor=user, object_type="user", object_id=user.id,
           outcome="failure", details={"reason": reason, "failures": user.failed_logins},
           context=context, now=now)
    if user.failed_logins >= policy.threshold:
        user.locked_until = now + policy.duration
        user.failed_logins = 0
        record(db, AuditAction.LOGIN_LOCKED, actor=user, object_type="user", object_id=user.id,
               outcome="denied", details={"reason": "too_many_failures",
                                          "locked_until": user.locked_until.isoformat()},
               context=context, now=now)


def change_password(db: Session, user: User, current: str, new: str, *, policy: LockoutPolicy,
                    context: AuditContext = CONSOLE, now: datetime) -> None:
    """Change one's own password: the current one is required; every session of the user ends.

    A wrong current password counts toward the lockout like a failed login, and reaching the
    lockout ends the user's sessions: someone guessing from a stolen session is cut off.
    """
    if not passwords.verify_password(current, user.password_hash):
        record(db, AuditAction.USER_PASSWORD_CHANGE, actor=user, object_type="user",
               object_id=user.id, outcome="failure", details={"reason": "wrong_current_password"},
               context=context, now=now)
        register_failure(db, user, "wrong_current_password", policy=policy, context=context, now=now)
        if user.locked_until is not None and user.locked_until > now:
            sessions.end_user_sessions(db, user.id)
        raise WrongPassword("the current password is wrong")
    passwords.check_password_policy(new, user.username)
    if passwords.verify_password(new, user.password_hash):
        raise PasswordPolicyError("the new password must differ from the current one")
    revoked = _set_password(db, user, new, must_change=False, now=now)
    record(db, AuditAction.USER_PASSWORD_CHANGE, actor=user, object_type="user", object_id=user.id,
           details={"tokens_revoked": revoked}, context=context, now=now)


def reset_password(db: Session, user: User, new: str | None = None, *, actor: User | None = None,
                   context: AuditContext = CONSOLE, now: datetime) -> str:
    """Admin reset: set a (generated) one-time password the user must change; returns it."""
    new = new or generate_password()
    passwords.check_password_policy(new, user.username)
    revoked = _set_password(db, user, new, must_change=True, now=now)
    user.locked_until, user.failed_logins = None, 0
    record(db, AuditAction.USER_PASSWORD_RESET, actor=actor, object_type="user", object_id=user.id,
           details={"username": user.username, "tokens_revoked": revoked}, context=context, now=now)
    return new


def _set_password(db: Session, user: User, new: str, *, must_change: bool, now: datetime) -> int:
    """Store a new password; end the user's sessions and revoke their API tokens (returns how many)."""
    user.password_hash = passwords.hash_password(new)
    user.must_change_password = must_change
    user.password_changed_at = now
    sessions.end_user_sessions(db, user.id)
    return tokens.revoke_user_tokens(db, user.id, now=now)


def set_active(db: Session, user: User, active: bool, *, actor: User | None = None,
               context: AuditContext = CONSOLE, now: datetime) -> None:
    """Disable (ending every session and token use) or re-enable an account."""
    if not active and user.active and "admin" in user.role_set and count_admins(db) <= 1:
        raise InvalidRole("cannot disable the last active admin")
    user.active = active
    if not active:
        sessions.end_user_sessions(db, user.id)
        tokens.CHECKED.forget_user(user.id)
    record(db, AuditAction.USER_ENABLE if active else AuditAction.USER_DISABLE, actor=actor,
           object_type="user", object_id=user.id, details={"username": user.username},
           context=context, now=now)


def end_everywhere(db: Session, user: User, *, actor: User | None = None,
                   context: AuditContext = CONSOLE, now: datetime) -> tuple[int, int]:
    """Log a user out everywhere: end every session and revoke every API token."""
    ended = sessions.end_user_sessions(db, user.id)
    revoked = tokens.revoke_user_tokens(db, user.id, now=now)
    record(db, AuditAction.USER_SESSIONS_END, actor=actor, object_type="user", object_id=user.id,
           details={"username": user.username, "sessions": ended, "tokens_revoked": revoked},
           context=context, now=now)
    return ended, revoked


def unlock(db: Session, user: User, *, actor: User | None = None,
           context: AuditContext = CONSOLE, now: datetime) -> None:
    """Lift a lockout and clear the failure count."""
    user.locked_until, user.failed_logins, user.last_failed_at = None, 0, None
    record(db, AuditAction.USER_UNLOCK, actor=actor, object_type="user", object_id=user.id,
           details={"username": user.username}, context=context, now=now)


def set_roles(db: Session, user: User, roles, *, actor: User | None = None,
              context: AuditContext = CONSOLE, now: datetime) -> None:
    """Replace a user's roles; refuses to remove the last active admin."""
    new = parse_roles(roles)
    if "admin" in user.role_set and "admin" not in new.split() and count_admins(db) <= 1:
        raise InvalidRole("cannot remove the admin role from the last active admin")
    old, user.roles = user.roles, new
    tokens.CHECKED.forget_user(user.id)
    record(db, AuditAction.USER_ROLES, actor=actor, object_type="user", object_id=user.id,
           details={"username": user.username, "before": old, "after": new},
           context=context, now=now)


def count_admins(db: Session) -> int:
    """Number of active users holding the admin role."""
    # Locked rows: two admins disabling each other at once must not leave none (PostgreSQL).
    users = db.scalars(select(User).where(User.active.is_(True), User.roles.contains("admin"))
                       .with_for_update())
    return sum(1 for u in users if "admin" in u.role_set)


def count_users(db: Session) -> int:
    """Number of accounts."""
    return db.scalar(select(func.count(User.id))) or 0


def list_users(db: Session) -> list[User]:
    """Every account, by username."""
    return list(db.scalars(select(User).order_by(User.username)))
