"""Master key file: create once with mode 0600, load with clear errors, derive purpose keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_BYTES = 32


class KeyFileError(Exception):
    """The master key file is missing, unreadable, of the wrong size or too open."""


def create_key_file(path: Path) -> bool:
    """Write 32 random bytes to `path` with mode 0600; False (and untouched) if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: never overwrite a key, the data it protects would be lost for good.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(MASTER_KEY_BYTES))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def load_key_file(path: Path) -> bytes:
    """Read and check the master key; raise KeyFileError with one clear sentence otherwise."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"master key file {path} not found (run 'onprem-label init', "
                           "or set key_file to where the key is kept)") from None
    except OSError as exc:
        raise KeyFileError(f"master key file {path} cannot be read: {exc.strerror}") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"master key file {path} is readable by others "
                           f"(mode {stat.S_IMODE(mode):o}); run 'chmod 600 {path}'")
    if len(data) != MASTER_KEY_BYTES:
        raise KeyFileError(f"master key file {path} holds {len(data)} bytes, expected "
                           f"{MASTER_KEY_BYTES}; it is not an onprem-label key")
    return data


def derive_key(master_key: bytes, purpose: str, length: int = 32) -> bytes:
    """A key for one purpose (sessions, audit, TOTP...), independent of every other purpose."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=b"onprem-label/" + purpose.encode()).derive(master_key)
