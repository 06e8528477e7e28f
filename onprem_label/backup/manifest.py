"""manifest.json: what a backup holds (files with SHA-256 and size, counts, key id), written last.

A backup folder without a manifest is incomplete by definition: the manifest is written only after
every other file is durable (temp file, fsync, rename, fsync of the folder), so a backup killed
half-way can never pass for a complete one. An HMAC under a key derived from the data directory's
root key (wrapped in the backup's keyring.json) lets whoever holds the master key check that the
manifest itself was not rewritten to match altered files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from onprem_label.storage.durable import write_atomically
from onprem_label.storage.keyring import KEYRING_FILE
from onprem_label.backup.errors import BackupError

MANIFEST_FILE = "manifest.json"
FORMAT = "onprem-label backup"
VERSION = 1
MAC_PURPOSE = "backup-manifest"


class ManifestError(BackupError):
    """The manifest is missing (an incomplete backup), unreadable or of an unknown format."""


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes the manifest's HMAC covers: every field but `mac`, as compact sorted JSON."""
    return json.dumps({k: v for k, v in body.items() if k != "mac"}, sort_keys=True,
                      separators=(",", ":")).encode()


def seal(body: dict[str, Any], key: bytes) -> dict[str, Any]:
    """The manifest with its HMAC."""
    return {**body, "mac": hmac.new(key, canonical(body), hashlib.sha256).hexdigest()}


def authentic(body: dict[str, Any], key: bytes) -> bool:
    """True when the manifest's HMAC matches (written by a holder of this data directory's key)."""
    mac = body.get("mac")
    return isinstance(mac, str) and hmac.compare_digest(
        mac, hmac.new(key, canonical(body), hashlib.sha256).hexdigest())


def write_manifest(folder: Path, body: dict[str, Any]) -> str:
    """Write manifest.json atomically; its SHA-256 (recorded in the backup:create audit event)."""
    data = (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()
    write_atomically(Path(folder) / MANIFEST_FILE, data)
    return hashlib.sha256(data).hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a backup folder; ManifestError with one line when there is none or it is bad."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a backup folder (it does not exist or is not a directory)")
    path = folder / MANIFEST_FILE
    try:
        body = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"{folder} is an incomplete backup: it has no {MANIFEST_FILE} (the backup "
                            "was interrupted or is still running); do not rely on it") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} cannot be read: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an onprem-label backup manifest")
    if body.get("version") != VERSION:
        raise ManifestError(f"{path} has format version {body.get('version')}; this onprem-label "
                            f"reads version {VERSION}")
    files = body.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
            for v in files.values()):
        raise ManifestError(f"{path} is damaged: its file list is malformed")
    for name in files:
        if not safe_name(name):
            raise ManifestError(f"{path} names a file outside the backup ({name!r})")
    db = body.get("database")
    if not isinstance(db, dict) or db.get("file") not in files or not isinstance(db.get("rows", {}), dict):
        raise ManifestError(f"{path} is damaged: it names no database file of the backup")
    if KEYRING_FILE not in files:
        # Every backup writes it first; without it nothing could authenticate the manifest, so a
        # manifest without it is a rewritten one, not an older kind.
        raise ManifestError(f"{path} does not list {KEYRING_FILE}: the backup was tampered with")
    return body


def safe_name(name: str) -> bool:
    """True for a relative POSIX path inside the backup (no '..', not absolute, not the manifest)."""
    parts = name.split("/")
    return (isinstance(name, str) and bool(name) and not name.startswith("/") and "\\" not in name
            and all(p not in ("", ".", "..") for p in parts) and name != MANIFEST_FILE)


def files_on_disk(folder: Path) -> set[str]:
    """Every regular file under a backup folder, as manifest names (the manifest itself left out)."""
    folder = Path(folder)
    found = set()
    for path in folder.rglob("*"):
        if path.is_file() or path.is_symlink():
            name = path.relative_to(folder).as_posix()
            if name != MANIFEST_FILE:
                found.add(name)
    return found
