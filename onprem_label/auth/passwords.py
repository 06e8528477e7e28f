"""Password hashing (scrypt, N=2^17 r=8 p=1) and the password policy."""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import hmac
import os
import threading
from importlib.resources import files

from onprem_label.auth.errors import PasswordPolicyError

# OWASP's scrypt minimum is N=2^17, r=8, p=1 (128 MiB per hash). Stored with each hash, so
# raising it later re-hashes users at their next login (see needs_rehash).
SCRYPT_LOG_N = 17
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_LENGTH = 12
MAX_LENGTH = 1024  # far above the 128 asked for; bounded so a request cannot ask for a huge hash


# Each hash holds 128 MiB for ~0.5 s: at most this many at once, so a burst of logins can
# neither exhaust memory nor tie up every server thread (the others queue here briefly).
_HASH_SLOTS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    with _HASH_SLOTS:
        return _scrypt_unbounded(password, salt, n, r, p)


def _scrypt_unbounded(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * r * n + (1 << 20), dklen=HASH_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """Hash in the self-describing form 'scrypt$ln$r$p$salt$hash'."""
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_LOG_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """True when `password` matches `encoded`; constant-time comparison, False on malformed hashes."""
    if len(password) > MAX_LENGTH:
        return False  # no stored password is longer; comparing a cut-down copy would truncate
    try:
        scheme, log_n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = _scrypt(password, _unb64(salt), int(log_n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def needs_rehash(encoded: str) -> bool:
    """True when `encoded` was made with weaker parameters than today's."""
    parts = encoded.split("$")
    return len(parts) != 6 or parts[:4] != ["scrypt", str(SCRYPT_LOG_N), str(SCRYPT_R), str(SCRYPT_P)]


@functools.cache
def dummy_hash() -> str:
    """A hash to verify against when the user does not exist, so both paths cost the same."""
    return hash_password(os.urandom(16).hex())


@functools.cache
def common_passwords() -> frozenset[str]:
    """The shipped list of ~20,000 common passwords (lowercased), from Django's validator."""
    data = files("onprem_label.auth").joinpath("data/common-passwords.txt.gz").read_bytes()
    return frozenset(gzip.decompress(data).decode().split())


def check_password_policy(password: str, username: str = "") -> None:
    """Raise PasswordPolicyError naming the rule the password breaks (NIST 800-63B style)."""
    if len(password) < MIN_LENGTH:
        raise PasswordPolicyError(f"password must have at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise PasswordPolicyError(f"password must have at most {MAX_LENGTH} characters")
    if password.strip().lower() in common_passwords():
        raise PasswordPolicyError("password is on the list of common passwords")
    if username and username.lower() in password.lower():
        raise PasswordPolicyError("password must not contain the username")
