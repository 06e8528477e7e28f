"""Password hashing (scrypt parameters, verification, no truncation, re-hash) and the policy."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest

from onprem_label.auth import accounts, passwords
from onprem_label.auth.errors import PasswordPolicyError

PASSWORD = "a long enough passphrase"


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _hash_with(password: str, log_n: int, r: int, p: int, scheme: str = "scrypt") -> str:
    """A hash in the stored format, made with chosen (e.g. weaker) parameters."""
    salt = os.urandom(16)
    n = 1 << log_n
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                            maxmem=256 * r * n + (1 << 20), dklen=32)
    return f"{scheme}${log_n}${r}${p}${_b64(salt)}${_b64(digest)}"


@pytest.fixture(scope="module")
def stored() -> str:
    """One full-cost hash of PASSWORD, shared by the tests that only read it."""
    return passwords.hash_password(PASSWORD)


# --- hashing ---------------------------------------------------------------------------------

def test_stored_hash_carries_owasp_scrypt_parameters(stored):
    """The stored hash names scrypt with N >= 2^17, r=8, p=1, a 16-byte salt and a 32-byte digest."""
    scheme, log_n, r, p, salt, digest = stored.split("$")
    assert scheme == "scrypt"
    assert 1 << int(log_n) >= 1 << 17
    assert (int(r), int(p)) == (8, 1)
    assert len(_unb64(salt)) >= 16 and len(_unb64(digest)) == 32


def test_stored_parameters_are_the_ones_used(stored):
    """Recomputing scrypt with the parameters written in the hash gives the stored digest."""
    _, log_n, r, p, salt, digest = stored.split("$")
    n = 1 << int(log_n)
    again = hashlib.scrypt(PASSWORD.encode(), salt=_unb64(salt), n=n, r=int(r), p=int(p),
                           maxmem=256 * int(r) * n + (1 << 20), dklen=32)
    assert again == _unb64(digest)


def test_same_password_hashes_differently(stored):
    """Each hash has its own random salt, so equal passwords do not give equal hashes."""
    assert passwords.hash_password(PASSWORD) != stored


def test_verify_accepts_right_and_refuses_wrong(stored):
    """The right password verifies; a wrong one, or one differing only in case, does not."""
    assert passwords.verify_password(PASSWORD, stored)
    assert not passwords.verify_password(PASSWORD + "!", stored)
    assert not passwords.verify_password(PASSWORD.upper(), stored)


def test_no_truncation_in_a_long_password():
    """A 200-character password differing from the stored one only at character 150 fails."""
    long_password = "".join(chr(ord("a") + i % 26) for i in range(200))
    encoded = passwords.hash_password(long_password)
    other = long_password[:149] + "#" + long_password[150:]
    assert len(other) == 200 and other != long_password
    assert passwords.verify_password(long_password, encoded)
    assert not passwords.verify_password(other, encoded)


def test_no_truncation_past_the_length_limit():
    """A password longer than the limit never verifies, even if it starts with the stored one."""
    longest = "x" * (passwords.MAX_LENGTH - 1) + "y"
    encoded = passwords.hash_password(longest)
    assert passwords.verify_password(longest, encoded)
    assert not passwords.verify_password(longest + "z", encoded)


@pytest.mark.parametrize("encoded", [
    "", "scrypt", "scrypt$17$8$1$salt", "bcrypt$17$8$1$c2FsdA$ZGlnZXN0", "scrypt$x$8$1$c2FsdA$ZGln",
    "scrypt$17$8$1$!!!$???",
])
def test_malformed_hash_verifies_nothing(encoded):
    """A broken or foreign stored hash makes verification fail, never raise."""
    assert passwords.verify_password(PASSWORD, encoded) is False


# --- re-hashing ------------------------------------------------------------------------------

def test_current_hash_needs_no_rehash(stored):
    """A hash made with today's parameters is left alone."""
    assert not passwords.needs_rehash(stored)


@pytest.mark.parametrize("log_n, r, p, scheme", [
    (14, 8, 1, "scrypt"), (16, 8, 1, "scrypt"), (17, 4, 1, "scrypt"), (17, 8, 1, "oldscheme")])
def test_weaker_hash_needs_rehash(log_n, r, p, scheme):
    """A hash with a smaller N, another r, or another scheme is flagged for re-hashing."""
    assert passwords.needs_rehash(_hash_with(PASSWORD, log_n, r, p, scheme))


def test_weaker_hash_still_verifies():
    """A hash with older, weaker parameters still verifies, so the next login can upgrade it."""
    assert passwords.verify_password(PASSWORD, _hash_with(PASSWORD, 14, 8, 1))
    assert not passwords.verify_password("not the password", _hash_with(PASSWORD, 14, 8, 1))


def test_login_upgrades_a_weak_hash(db, make_user, clock):
    """A successful login replaces a weak stored hash with one at today's parameters."""
    user = make_user("weakhash")
    user.password_hash = _hash_with(PASSWORD, 14, 8, 1)
    db.commit()
    ok = accounts.authenticate(db, "weakhash", PASSWORD, policy=accounts.LockoutPolicy(), now=clock())
    db.commit()
    assert ok is not None
    db.refresh(user)
    assert not passwords.needs_rehash(user.password_hash)
    assert passwords.verify_password(PASSWORD, user.password_hash)


# --- policy ----------------------------------------------------------------------------------

def test_common_password_list_is_shipped_and_large():
    """The package ships at least the top 10,000 common passwords."""
    common = passwords.common_passwords()
    assert len(common) >= 10_000
    assert {"password", "123456", "qwerty"} <= common


@pytest.mark.parametrize("password", [
    "x" * 12,
    "twelve chars",
    "no composition rules at all",
    "ÄÖÜ ünïcødé pässwörd",
])
def test_policy_accepts(password):
    """12 to at least 128 characters, with no composition rules, is enough."""
    passwords.check_password_policy(password, "alice")


def test_policy_accepts_128_characters():
    """A 128-character password is allowed (the maximum is at least 128)."""
    assert passwords.MAX_LENGTH >= 128
    passwords.check_password_policy("k9" * 64, "alice")


@pytest.mark.parametrize("password, username, rule", [
    ("", "alice", "at least 12"),
    ("elevenchars", "alice", "at least 12"),
    ("password1234", "alice", "common"),
    ("Password1234", "alice", "common"),
    ("password123456", "alice", "common"),
    ("123456123456", "alice", "common"),
    ("alice-is-my-name", "alice", "username"),
    ("my name is ALICE ok", "alice", "username"),
    ("y" * (passwords.MAX_LENGTH + 1), "alice", "at most"),
])
def test_policy_rejects(password, username, rule):
    """Too short, common (any case), containing the username, or absurdly long is refused with the rule."""
    if rule == "common":
        assert password.lower() in passwords.common_passwords()
    with pytest.raises(PasswordPolicyError, match=rule):
        passwords.check_password_policy(password, username)
