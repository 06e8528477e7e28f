"""Keyring: which master keys open this data directory, and the purpose keys derived from its root key.

`<data_dir>/keyring.json` records the id of the master key in use, a random root key wrapped by
that master key (every purpose key — blob names, TOTP secrets, session signing, audit — derives
from the root key, so rotating the master key changes none of them), how a passphrase is turned
into the master key (if one is used), and an unfinished rotation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from onprem_label.storage import format as fmt
from onprem_label.storage.durable import write_atomically
from onprem_label.storage.format import IntegrityError
from onprem_label.storage.keys import KeyFileError, derive_key, load_key_file

KEYRING_FILE = "keyring.json"
KEYRING_FORMAT = 1
# scrypt for passphrases: 2^17 x 8 x 1 is OWASP's minimum; recorded so it can be raised later.
PASSPHRASE_LOG_N, PASSPHRASE_R, PASSPHRASE_P = 17, 8, 1


@dataclass
class Keyring:
    """Master keys by id, the one new blobs are sealed with, and the root key."""

    masters: dict[bytes, bytes]
    current_id: bytes
    root_key: bytes = field(repr=False)

    def current(self) -> tuple[bytes, bytes]:
        """(key id, key) that new blobs are wrapped with."""
        return self.current_id, self.masters[self.current_id]

    def key_for(self, key_id: bytes) -> bytes:
        """The master key with this id; IntegrityError when this keyring does not hold it."""
        try:
            return self.masters[key_id]
        except KeyError:
            raise IntegrityError(f"blob is wrapped with master key {key_id.hex()}, "
                                 "which this keyring does not hold") from None

    def purpose_key(self, purpose: str) -> bytes:
        """A key for one purpose, stable across master key rotations."""
        return derive_key(self.root_key, purpose)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def keyring_path(data_dir: Path) -> Path:
    """Where the keyring file of a data directory is."""
    return Path(data_dir) / KEYRING_FILE


def read_state(data_dir: Path) -> dict:
    """The keyring file's contents; KeyFileError when missing or unreadable."""
    path = keyring_path(data_dir)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyFileError(f"no keyring in {data_dir}; run 'onprem-label init'") from None
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"keyring {path} cannot be read: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != KEYRING_FORMAT:
        raise KeyFileError(f"keyring {path} has an unknown format")
    return state


def write_state(data_dir: Path, state: dict) -> None:
    """Replace the keyring file atomically (temp file, fsync, rename, fsync directory)."""
    write_atomically(keyring_path(data_dir), json.dumps(state, indent=2, sort_keys=True).encode())


def passphrase_key(passphrase: str, params: dict) -> bytes:
    """Derive a master key from a passphrase with the recorded scrypt salt and parameters."""
    n = 1 << int(params["log_n"])
    r, p = int(params["r"]), int(params["p"])
    return hashlib.scrypt(passphrase.encode(), salt=_unb64(params["salt"]), n=n, r=r, p=p,
                          maxmem=256 * r * n + (1 << 20), dklen=32)


def new_passphrase_params() -> dict:
    """Fresh scrypt parameters (with a random salt) for a passphrase-derived master key."""
    return {"salt": _b64(os.urandom(16)), "log_n": PASSPHRASE_LOG_N, "r": PASSPHRASE_R,
            "p": PASSPHRASE_P}


def create_keyring(data_dir: Path, master_key: bytes, *, passphrase_params: dict | None = None) -> bool:
    """Write a new keyring (random root key) for `master_key`; False if one exists already."""
    if keyring_path(data_dir).exists():
        return False
    write_state(data_dir, {
        "format": KEYRING_FORMAT,
        "master_key_id": fmt.key_id_of(master_key).hex(),
        "root_key": _b64(fmt.wrap_key(master_key, os.urandom(32))),
        "passphrase": passphrase_params,
        "rotation": None,
    })
    return True


def next_key_path(key_path: Path) -> Path:
    """Where the new master key waits while a rotation is under way."""
    return key_path.with_name(key_path.name + ".next")


def load_keyring(data_dir: Path, key_path: Path, *, passphrase: str | None = None,
                 next_passphrase: str | None = None) -> Keyring:
    """Open the data directory's keyring with the master key (file, or passphrase if recorded).

    Raises KeyFileError, with one sentence naming the problem, for a missing or wrong key or a
    damaged keyring file.
    """
    try:
        return _load_keyring(data_dir, key_path, passphrase=passphrase,
                             next_passphrase=next_passphrase)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # A field missing or malformed in keyring.json: one clear line, not a traceback.
        raise KeyFileError(f"keyring {keyring_path(data_dir)} is damaged "
                           f"({exc.__class__.__name__}: {exc}); nothing was changed") from None


def _load_keyring(data_dir: Path, key_path: Path, *, passphrase: str | None,
                  next_passphrase: str | None) -> Keyring:
    state = read_state(data_dir)
    expected = bytes.fromhex(state["master_key_id"])
    rotation = state.get("rotation") or None
    masters: dict[bytes, bytes] = {}
    if state.get("passphrase"):
        if passphrase is None:
            raise KeyFileError("this data directory's master key comes from a passphrase; set "
                               "ONPREM_LABEL_KEY_PASSPHRASE or enter it when asked")
        key = passphrase_key(passphrase, state["passphrase"])
        masters[fmt.key_id_of(key)] = key
        if rotation and rotation.get("passphrase") and next_passphrase is not None:
            key = passphrase_key(next_passphrase, rotation["passphrase"])
            masters[fmt.key_id_of(key)] = key
    else:
        candidates = [key_path]
        if rotation:
            candidates.append(next_key_path(key_path))
        errors = {}
        for path in candidates:
            try:
                key = load_key_file(path)
            except KeyFileError as exc:
                errors[path] = exc
                continue
            masters[fmt.key_id_of(key)] = key
        if not masters:
            raise errors[key_path]
        # Retired keys open blobs that a server started before a rotation still wrapped with
        # the old key; they never wrap anything new.
        for path in sorted(key_path.parent.glob(key_path.name + ".retired-*")):
            try:
                key = load_key_file(path)
            except KeyFileError:
                continue
            masters.setdefault(fmt.key_id_of(key), key)
    if expected not in masters:
        if not state.get("passphrase") and key_path in errors:
            raise errors[key_path]  # say the key file is missing, not that .next is foreign
        what = "passphrase is wrong" if state.get("passphrase") else \
            f"master key file {key_path} does not belong to this data directory"
        raise KeyFileError(f"{what} (key id {next(iter(masters)).hex()}, "
                           f"expected {expected.hex()}); nothing was changed")
    try:
        root = fmt.unwrap_key(masters[expected], _unb64(state["root_key"]))
    except (IntegrityError, ValueError):
        raise KeyFileError(f"keyring {keyring_path(data_dir)} is damaged: its root key does "
                           "not unwrap") from None
    current = expected
    if rotation and bytes.fromhex(rotation["to_key_id"]) in masters:
        current = bytes.fromhex(rotation["to_key_id"])  # new blobs go straight to the new key
    return Keyring(masters, current, root)
