"""Encrypted storage and key management (no Flask, no database)."""

from __future__ import annotations

import os
from pathlib import Path

from onprem_label.config import PASSPHRASE_ENV, Settings
from onprem_label.storage.blobstore import BlobNotFound, BlobRef, EncryptedBlobStore, InvalidBlobId
from onprem_label.storage.format import IntegrityError
from onprem_label.storage.keyring import (Keyring, create_keyring, keyring_path, load_keyring,
                                          new_passphrase_params, passphrase_key)
from onprem_label.storage.keys import KeyFileError, create_key_file, load_key_file


__all__ = ["BlobNotFound", "BlobRef", "EncryptedBlobStore", "IntegrityError", "InvalidBlobId",
           "KeyFileError", "Keyring", "blob_root", "init_keyring", "open_keyring", "open_store"]


def blob_root(settings: Settings) -> Path:
    """Folder of the encrypted blobs inside the data directory."""
    return settings.data_path / "blobs"


def open_keyring(settings: Settings, *, passphrase: str | None = None) -> Keyring:
    """The data directory's keyring, opened with the key file or the passphrase."""
    if settings.key_source == "passphrase" and passphrase is None:
        passphrase = os.environ.get(PASSPHRASE_ENV)
    return load_keyring(settings.data_path, settings.key_path, passphrase=passphrase)


def open_store(settings: Settings, keyring: Keyring) -> EncryptedBlobStore:
    """The blob store of the data directory."""
    return EncryptedBlobStore(blob_root(settings), keyring, chunk_size=settings.blob_chunk_size)


def init_keyring(settings: Settings, *, passphrase: str | None = None) -> tuple[Keyring, list[str]]:
    """First run: make the master key (file mode) and the keyring. Later runs: just open them.

    An existing but broken or foreign key stops this before anything is written.
    """
    data = settings.data_path
    if keyring_path(data).exists():
        return open_keyring(settings, passphrase=passphrase), []
    notes = []
    params = None
    if settings.key_source == "passphrase":
        passphrase = passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV)
        if not passphrase:
            raise KeyFileError(f"key_source is 'passphrase': set {PASSPHRASE_ENV} or enter it "
                               "when asked")
        params = new_passphrase_params()
        master = passphrase_key(passphrase, params)
    else:
        key_path = settings.key_path
        if not key_path.exists():
            data.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_key_file(key_path)
            notes.append(f"created master key {key_path} (mode 0600) - keep a copy off this "
                         "machine; without it the encrypted data cannot be read")
        master = load_key_file(key_path)
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    create_keyring(data, master, passphrase_params=params)
    return load_keyring(data, settings.key_path, passphrase=passphrase), notes
