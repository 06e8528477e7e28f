"""TOTP second factor (RFC 6238, offline), sealed secrets, replay protection, recovery codes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from datetime import datetime

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP
from sqlalchemy.orm import Session

from onprem_label.audit import AuditAction, AuditContext, record
from onprem_label.audit.record import CONSOLE
from onprem_label.auth.errors import InvalidTotp
from onprem_label.db.models import User

TIME_STEP = 30
DIGITS = 6
RECOVERY_CODES = 10
ISSUER = "onprem-label"


def _seal(key: bytes, secret: bytes, user_id: int) -> str:
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, secret, f"totp:{user_id}".encode())
    return base64.b64encode(nonce + sealed).decode()


def _unseal(key: bytes, sealed: str, user_id: int) -> bytes:
    raw = base64.b64decode(sealed)
    return AESGCM(key).decrypt(raw[:12], raw[12:], f"totp:{user_id}".encode())


def _totp(secret: bytes) -> TOTP:
    return TOTP(secret, DIGITS, SHA1(), TIME_STEP, enforce_key_length=False)


def begin_enrolment(db: Session, user: User, key: bytes, *, context: AuditContext = CONSOLE,
                    now: datetime) -> tuple[str, str]:
    """Give `user` a new, not yet active secret (audited); returns (base32 secret, otpauth URI)."""
    secret = os.urandom(20)
    user.totp_secret_sealed = _seal(key, secret, user.id)
    user.totp_enabled = False
    record(db, AuditAction.USER_TOTP_START, actor=user, object_type="user", object_id=user.id,
           context=context, now=now)
    uri = _totp(secret).get_provisioning_uri(user.username, ISSUER)
    return base64.b32encode(secret).decode(), uri


def confirm_enrolment(db: Session, user: User, key: bytes, code: str, *,
                      context: AuditContext = CONSOLE, now: datetime) -> list[str]:
    """Activate the pending secret once the user proves their app shows the right code.

    Returns the recovery codes, shown once; only their hashes are kept.
    """
    if user.totp_secret_sealed is None or not _verify_code(user, key, code, now):
        raise InvalidTotp("the code does not match; check the device clock and try again")
    user.totp_enabled = True
    codes = [_new_recovery_code() for _ in range(RECOVERY_CODES)]
    user.recovery_codes = [_hash_code(c) for c in codes]
    record(db, AuditAction.USER_TOTP_ENABLE, actor=user, object_type="user", object_id=user.id,
           context=context, now=now)
    return codes


def disable(db: Session, user: User, *, actor: User | None = None,
            context: AuditContext = CONSOLE, now: datetime) -> None:
    """Remove the second factor (admin action, e.g. a lost phone)."""
    user.totp_enabled, user.totp_secret_sealed, user.recovery_codes = False, None, []
    user.totp_last_step = None
    record(db, AuditAction.USER_TOTP_DISABLE, actor=actor, object_type="user", object_id=user.id,
           details={"username": user.username}, context=context, now=now)


def verify(user: User, key: bytes, code: str, *, now: datetime) -> bool:
    """True for a fresh TOTP code or an unused recovery code (which is then used up)."""
    code = (code or "").strip().replace(" ", "")
    if not user.totp_enabled:
        return False
    if "-" in code:
        if not code.isascii():
            return False
        digest = _hash_code(code.lower())
        for stored in user.recovery_codes:
            if hmac.compare_digest(stored, digest):
                user.recovery_codes = [c for c in user.recovery_codes if c != stored]
                return True
        return False
    return _verify_code(user, key, code, now)


def _verify_code(user: User, key: bytes, code: str, now: datetime) -> bool:
    if not (code.isascii() and code.isdigit() and len(code) == DIGITS):
        return False
    totp = _totp(_unseal(key, user.totp_secret_sealed, user.id))
    step_now = int(now.timestamp()) // TIME_STEP
    # One step either side for clock drift; a step already used is refused (no replay).
    for step in (step_now - 1, step_now, step_now + 1):
        if user.totp_last_step is not None and step <= user.totp_last_step:
            continue
        if hmac.compare_digest(totp.generate(step * TIME_STEP).decode(), code):
            user.totp_last_step = step
            return True
    return False


def current_code(user: User, key: bytes, now: datetime) -> str:
    """The code an authenticator shows at `now` (for tests and the enrolment page check)."""
    return _totp(_unseal(key, user.totp_secret_sealed, user.id)).generate(now.timestamp()).decode()


def _new_recovery_code() -> str:
    raw = base64.b32encode(secrets.token_bytes(10)).decode().lower()
    return "-".join(raw[i:i + 4] for i in range(0, 16, 4))


def _hash_code(code: str) -> str:
    # 80 random bits per code: a plain hash cannot be brute-forced.
    return hashlib.sha256(code.encode()).hexdigest()
