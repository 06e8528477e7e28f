"""Received instances sealed on disk until their batch commits: what a success status promises."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

from onprem_label.storage import EncryptedBlobStore, Keyring

SPOOL_DIR = "dicom-spool"


class Spool:
    """One project's encrypted spool (`<data_dir>/dicom-spool/<project id>/`), like upload staging.

    An instance is sealed (encrypted, fsynced) here before it is answered with success, and taken
    out once the transaction that stored it has committed; what a crash leaves is ingested at the
    next start of `dicom-listen` (receiver.recover_spool).
    """

    def __init__(self, data_dir: Path, keyring: Keyring, project_id: int):
        self.project_id = project_id
        self.store = EncryptedBlobStore(Path(data_dir) / SPOOL_DIR / str(project_id), keyring)

    @property
    def root(self) -> Path:
        """The folder of the spool's store (a worker process opens it to read an instance)."""
        return self.store.root

    def put(self, data: bytes) -> str:
        """Seal one received instance durably; its id in the spool."""
        return self.store.put(io.BytesIO(data)).blob_id

    def discard(self, blob_id: str) -> None:
        """Take an instance out once it is stored (or refused)."""
        self.store.delete(blob_id)

    def pending(self) -> list[str]:
        """Instances still in the spool (left by a crash), in a stable order."""
        return sorted(self.store.iter_blobs()) if self.store.root.is_dir() else []


def spools_with_leftovers(data_dir: Path, keyring: Keyring) -> Iterator[Spool]:
    """Every project spool that still holds instances."""
    base = Path(data_dir) / SPOOL_DIR
    if not base.is_dir():
        return
    for folder in sorted(base.iterdir(), key=lambda p: p.name):
        if folder.is_dir() and folder.name.isdigit():
            spool = Spool(data_dir, keyring, int(folder.name))
            if spool.pending():
                yield spool
