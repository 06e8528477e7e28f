"""Master key rotation: re-wrap every data key under a new master key, resumable after a crash.

Content is never re-encrypted: only each blob's header (wrapped data key, key id, header MAC)
changes. A header is first written to a journal file and made durable, then written over the
blob's header; a crash at any point leaves every blob readable with the old or the new key, and
the next run finishes the job. The old key stays usable until no blob needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from onprem_label.storage import format as fmt
from onprem_label.storage.blobstore import EncryptedBlobStore, check_blob_id, fsync_dir, private_opener
from onprem_label.storage.format import IntegrityError
from onprem_label.storage.keyring import (Keyring, _b64, _unb64, new_passphrase_params, next_key_path,
                                          passphrase_key, read_state, write_state)
from onprem_label.storage.keys import KeyFileError, create_key_file, load_key_file

JOURNAL_DIR = "rotation-journal"


@dataclass
class RotationReport:
    """What a rotation run did."""

    old_key_id: str
    new_key_id: str
    rewrapped: int
    already_new: int
    retired_key_file: Path | None


def journal_dir(store: EncryptedBlobStore) -> Path:
    """Folder of pending header rewrites."""
    return store.root / JOURNAL_DIR


def replay_journal(store: EncryptedBlobStore, keyring: Keyring) -> int:
    """Finish header rewrites a crash interrupted; returns how many were applied."""
    folder = journal_dir(store)
    if not folder.is_dir():
        return 0
    applied = 0
    for entry in sorted(folder.iterdir()):
        try:
            blob_id = check_blob_id(entry.name)
            raw = entry.read_bytes()
            header = fmt.parse_header(raw)
            fmt.open_header(header, keyring.key_for(header.key_id))  # only a sound header
            if len(raw) == fmt.HEADER_BYTES and header.blob_id.hex() == blob_id and store.exists(blob_id):
                # A blob deleted and stored again since the crash has a sound header with a fresh
                # data key (other salt): this stale header would make it unreadable. A torn
                # header, on the other hand, is exactly what the entry is there to repair.
                if _sound_salt(store, keyring, blob_id) in (None, header.salt):
                    store.rewrite_header(blob_id, raw)
                    applied += 1
        except (ValueError, IntegrityError):
            pass  # a torn or foreign entry: the blob itself was not touched yet
        entry.unlink()
    fsync_dir(folder)
    return applied


def _sound_salt(store: EncryptedBlobStore, keyring: Keyring, blob_id: str) -> bytes | None:
    """The salt in a blob's current header if that header authenticates, else None."""
    try:
        current = store.read_header(blob_id)
        fmt.open_header(current, keyring.key_for(current.key_id))
    except IntegrityError:
        return None
    return current.salt


def rewrap_blob(store: EncryptedBlobStore, blob_id: str, old_key: bytes, new_id: bytes,
                new_key: bytes) -> None:
    """Re-wrap one blob's data key under the new master key, through the journal."""
    header = store.read_header(blob_id)
    keys = fmt.open_header(header, old_key)
    fresh = fmt.Header(header.chunk_size, new_id, header.salt, fmt.wrap_key(new_key, keys.data_key),
                       header.blob_id, b"")
    raw = fmt.Header(**{**fresh.__dict__, "mac": keys.header_mac(fresh.signed_part())}).to_bytes()
    folder = journal_dir(store)
    temp = folder / (blob_id + ".tmp")
    with open(temp, "wb", opener=private_opener) as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, folder / blob_id)
    fsync_dir(folder)
    store.rewrite_header(blob_id, raw)
    (folder / blob_id).unlink()


def rotate_master_key(data_dir: Path, key_path: Path, store_for: Callable[[Keyring], EncryptedBlobStore],
                      *, progress: Callable[[int], None] | None = None,
                      passphrase: str | None = None, new_passphrase: str | None = None,
                      now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> RotationReport:
    """Rotate (or finish rotating) the master key of `data_dir`.

    Key file: 1. make `<key>.next` and record the rotation; 2. re-wrap every blob still on the
    old key; 3. re-wrap the root key and record the new id; 4. retire the old key file and move
    the new one into place. Passphrase: the same, with the new key derived from `new_passphrase`
    under fresh scrypt parameters recorded with the rotation, and no files to move. Each step is
    durable before the next; running again (with the same passphrases) resumes.
    """
    state = read_state(data_dir)
    if state.get("passphrase"):
        keys, rotation = _passphrase_keys(data_dir, state, passphrase, new_passphrase, now)
        return _rewrap_all(data_dir, key_path, state, keys, rotation, store_for, progress)
    next_path = next_key_path(key_path)
    rotation = state.get("rotation")
    if rotation is None:
        old_key = load_key_file(key_path)
        old_id = fmt.key_id_of(old_key)
        if old_id.hex() != state["master_key_id"]:
            raise KeyFileError(f"master key file {key_path} does not belong to this data directory")
        try:
            load_key_file(next_path)  # may exist, whole, from a run that died before recording it
        except KeyFileError:
            # Missing, or cut short by a crash inside create_key_file: nothing is wrapped with
            # it yet (the rotation is not recorded), so a fresh key replaces it.
            next_path.unlink(missing_ok=True)
        create_key_file(next_path)
        fsync_dir(next_path.parent)  # the new key's name must be durable before anything uses it
        new_key = load_key_file(next_path)
        rotation = {"from_key_id": old_id.hex(), "to_key_id": fmt.key_id_of(new_key).hex(),
                    "started_at": now().isoformat()}
        state["rotation"] = rotation
        write_state(data_dir, state)

    keys: dict[bytes, bytes] = {}
    for path in (key_path, next_path, *_retired_paths(key_path)):
        try:
            key = load_key_file(path)
        except KeyFileError:
            continue
        keys[fmt.key_id_of(key)] = key
    if bytes.fromhex(rotation["to_key_id"]) not in keys:
        raise KeyFileError(f"the new master key ({next_path}) of the rotation under way is missing")
    return _rewrap_all(data_dir, key_path, state, keys, rotation, store_for, progress)


def _passphrase_keys(data_dir: Path, state: dict, passphrase: str | None,
                     new_passphrase: str | None, now) -> tuple[dict[bytes, bytes], dict]:
    """Master keys from the old and new passphrases; records the rotation on its first run."""
    rotation = state.get("rotation")
    if not passphrase or not new_passphrase:
        raise KeyFileError("rotating a passphrase key needs the current passphrase "
                           "(ONPREM_LABEL_KEY_PASSPHRASE) and the new one "
                           "(ONPREM_LABEL_NEW_KEY_PASSPHRASE)")
    if rotation is None:
        old_key = passphrase_key(passphrase, state["passphrase"])
        if fmt.key_id_of(old_key).hex() != state["master_key_id"]:
            raise KeyFileError("the current passphrase is wrong; nothing was changed")
        params = new_passphrase_params()
        new_key = passphrase_key(new_passphrase, params)
        rotation = {"from_key_id": fmt.key_id_of(old_key).hex(),
                    "to_key_id": fmt.key_id_of(new_key).hex(), "passphrase": params,
                    "started_at": now().isoformat()}
        state["rotation"] = rotation
        write_state(data_dir, state)
    keys: dict[bytes, bytes] = {}
    # Before the switch the data directory's parameters are the old ones, after it the new.
    for phrase, params in ((passphrase, state["passphrase"]), (new_passphrase, rotation["passphrase"])):
        key = passphrase_key(phrase, params)
        keys[fmt.key_id_of(key)] = key
    if bytes.fromhex(rotation["to_key_id"]) not in keys:
        raise KeyFileError("the new passphrase is not the one this unfinished rotation began with")
    if bytes.fromhex(state["master_key_id"]) not in keys:
        raise KeyFileError("the current passphrase is wrong; nothing was changed")
    return keys, rotation


def _rewrap_all(data_dir: Path, key_path: Path, state: dict, keys: dict[bytes, bytes],
                rotation: dict, store_for, progress) -> RotationReport:
    """Steps 2-4 of a rotation (see rotate_master_key), for either kind of master key."""
    old_id, new_id = bytes.fromhex(rotation["from_key_id"]), bytes.fromhex(rotation["to_key_id"])
    new_key = keys[new_id]
    root_holder = bytes.fromhex(state["master_key_id"])
    keyring = Keyring(dict(keys), new_id, fmt.unwrap_key(keys[root_holder], _unb64(state["root_key"])))
    store = store_for(keyring)
    journal_dir(store).mkdir(mode=0o700, parents=True, exist_ok=True)
    replay_journal(store, keyring)

    rewrapped = already = 0
    for blob_id in store.iter_blobs():
        try:
            header = store.read_header(blob_id)
            if header.key_id == new_id:
                already += 1
            else:
                rewrap_blob(store, blob_id, keyring.key_for(header.key_id), new_id, new_key)
                rewrapped += 1
        except IntegrityError as exc:  # stop: the old key must stay while a blob may need it
            raise IntegrityError(f"blob {blob_id} cannot be re-wrapped ({exc})") from None
        if progress:
            progress(1)

    if state["master_key_id"] != new_id.hex():
        state["root_key"] = _b64(fmt.wrap_key(new_key, keyring.root_key))
        state["master_key_id"] = new_id.hex()
        if rotation.get("passphrase"):
            state["passphrase"] = rotation["passphrase"]
        write_state(data_dir, state)

    retired = None
    next_path = next_key_path(key_path)
    if not rotation.get("passphrase") and next_path.exists():
        if key_path.exists() and fmt.key_id_of(load_key_file(key_path)) != new_id:
            retired = key_path.with_name(f"{key_path.name}.retired-{old_id.hex()}")
            os.replace(key_path, retired)
        os.replace(next_path, key_path)
        fsync_dir(key_path.parent)
    state["rotation"] = None
    write_state(data_dir, state)
    return RotationReport(old_id.hex(), new_id.hex(), rewrapped, already, retired)


def _retired_paths(key_path: Path) -> list[Path]:
    return sorted(key_path.parent.glob(key_path.name + ".retired-*"))


def key_usage(store: EncryptedBlobStore) -> dict[str, int]:
    """How many blobs are wrapped under each master key id (for `key status`)."""
    usage: dict[str, int] = {}
    for blob_id in store.iter_blobs():
        try:
            key_id = store.read_header(blob_id).key_id.hex()
        except IntegrityError as exc:
            raise IntegrityError(f"blob {blob_id} has a damaged header ({exc})") from None
        usage[key_id] = usage.get(key_id, 0) + 1
    return usage
