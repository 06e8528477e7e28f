"""`backup DEST`: a consistent copy of a running site: database snapshot first, then what it references.

Order matters:
1. keyring.json, the config file, the audit checkpoint file and the DICOM spool are read first.
   A checkpoint is written only after its events are committed, so every one read now names
   events the snapshot taken next holds (one written later would make the restored chain look
   cut off);
   an instance still in the spool is either in the snapshot too (a harmless duplicate the
   receiver recognises) or acknowledged but not yet stored, and then it is kept this way.
2. The database snapshot (SQLite backup API in one read transaction / pg_dump in an exported
   snapshot), from which the blob ids, row counts, audit head and archive files are read.
3. The blobs that snapshot references, copied as they are (still encrypted) and hashed in one
   pass. Blobs are content-named and never change while the server runs (only `key rotate`,
   which needs the server stopped, rewrites headers: a backup refuses to run during one and
   fails if one started meanwhile), so blobs written after the snapshot are simply not needed.
4. Everything synced, then manifest.json written last and atomically.

The master key is never copied: only keyring.json, where the root key is wrapped by it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from onprem_label import __version__
from onprem_label.backup import copying, database, manifest
from onprem_label.backup.errors import BackupError
from onprem_label.clock import utcnow
from onprem_label.config import CONFIG_FILE_NAME, Settings
from onprem_label.db.engine import sqlite_file
from onprem_label.storage.blobstore import BLOB_ID_RE
from onprem_label.storage.format import HEADER_BYTES, IntegrityError, parse_header
from onprem_label.storage.keyring import KEYRING_FILE, Keyring

CHECKPOINT_NAME = "audit/checkpoints.log"
ARCHIVE_DIR = "audit/archive"
SPOOL_DIR = "dicom-spool"


@dataclass
class BackupReport:
    """What one backup holds, for the summary and the audit event."""

    dest: Path
    manifest_sha256: str
    backend: str
    files: int
    file_bytes: int
    blobs: int
    blob_bytes: int
    rows: dict[str, int]
    audit_last_id: int
    seconds: float


def check_destination(dest: Path, settings: Settings) -> None:
    """Refuse a destination that is not new or empty, or that is inside the data directory (or it in it)."""
    data = settings.data_path
    if dest == data or data in dest.parents:
        raise BackupError(f"{dest} is inside the data directory: a backup there is lost with it")
    if dest in data.parents:
        raise BackupError(f"{dest} contains the data directory; choose a folder of its own")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} is not empty: a backup goes into a new or empty folder")


def key_files(settings: Settings) -> set[Path]:
    """Every file that holds master key material (current, next, retired): never copied."""
    key = settings.key_path
    return {key, key.with_name(key.name + ".next"), *key.parent.glob(key.name + ".retired-*")}


def create_backup(settings: Settings, keyring: Keyring, dest: Path, *,
                  progress: Callable = copying.no_progress) -> BackupReport:
    """Write a complete backup of `settings`' site into the new or empty folder `dest`.

    `progress(label, total)` returns a context whose value has `update(n)` (click.progressbar).
    """
    started = time.monotonic()
    data, dest = settings.data_path, Path(dest).expanduser().resolve()
    check_destination(dest, settings)
    keyring_before = _keyring_bytes(data)
    made = not dest.exists()
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest.chmod(0o700)  # an existing empty folder too: the database copy is readable until its own chmod
    try:
        return _write_backup(settings, keyring, dest, keyring_before, progress, started)
    except BaseException:
        # What an error leaves is no backup (it has no manifest); leave no half of one either.
        # (A SIGKILL leaves the half, which has no manifest, so `backup verify` calls it incomplete.)
        copying.remove_made(dest, made)
        raise


def _write_backup(settings: Settings, keyring: Keyring, dest: Path, keyring_before: bytes,
                  progress: Callable, started: float) -> BackupReport:
    """Every step of create_backup after the checks, into the folder `dest`."""
    data = settings.data_path
    files: dict[str, dict] = {}
    never = key_files(settings)

    def copy(source: Path, name: str, buffer=None, head: int = 0) -> bytes:
        if source.resolve() in never:
            raise BackupError(f"{source} is a master key file; it is never put into a backup")
        size, sha, first = copying.copy_hashed(source, dest / name, head_bytes=head, buffer=buffer)
        files[name] = {"size": size, "sha256": sha}
        return first

    _write(dest / KEYRING_FILE, keyring_before, files, KEYRING_FILE)
    if (data / CONFIG_FILE_NAME).is_file():
        copy(data / CONFIG_FILE_NAME, CONFIG_FILE_NAME)
    checkpoints = _read_whole_lines(settings.audit_checkpoint_path)
    spooled = _copy_spool(data, dest, files, never)

    if settings.is_sqlite:
        backend, db_name = "sqlite", database.SQLITE_FILE
        live = sqlite_file(settings.effective_database_url)
        if live is None or not live.is_file():
            # sqlite3.connect would make an empty file there and back that up as "complete".
            raise BackupError(f"no SQLite database at {live or settings.effective_database_url}; "
                              "nothing to back up (is database_url right?)")
        facts = database.snapshot_sqlite(live, dest / db_name)
    else:
        backend, db_name = "postgresql", database.PG_DUMP_FILE
        facts = database.snapshot_postgresql(settings.effective_database_url, dest / db_name)
    size, sha = copying.hash_file(dest / db_name)
    files[db_name] = {"size": size, "sha256": sha}

    # Copied as read, never filtered: a checkpoint beyond the snapshot's last event can only mean
    # the live chain was cut off, and that evidence must reach `backup verify` and the restore.
    if checkpoints or settings.audit_checkpoint_path.exists():
        _write(dest / CHECKPOINT_NAME, "".join(checkpoints).encode(), files, CHECKPOINT_NAME)
    for file_name in facts.archive_files:
        name = f"{ARCHIVE_DIR}/{Path(file_name).name}"
        try:
            copy(data / "audit" / "archive" / Path(file_name).name, name)
        except FileNotFoundError:
            raise BackupError(f"audit archive {file_name} named by the database is missing from "
                              f"{data / 'audit' / 'archive'}; run 'onprem-label audit verify'") from None

    key_ids = _copy_blobs(data / "blobs", dest, facts.blobs, files, progress)
    if _keyring_bytes(data) != keyring_before:
        raise BackupError("the keyring changed while the backup ran (a key rotation?); run the "
                          "backup again once it is finished")
    copying.sync_tree(dest)
    body = {
        "format": manifest.FORMAT, "version": manifest.VERSION, "created_at": utcnow().isoformat(),
        "onprem_label_version": __version__, "backend": backend, "schema_revision": facts.schema_revision,
        "source": {"data_dir": str(data), "host": socket.gethostname()},
        "master_key_id": json.loads(keyring_before)["master_key_id"], "blob_key_ids": key_ids,
        "database": {"file": db_name, "rows": facts.rows},
        "audit": {"last_id": facts.audit_last_id, "head": facts.audit_head, "checkpoints": len(checkpoints),
                  "archives": len(facts.archive_files)},
        "blobs": {"count": len(facts.blobs), "bytes": sum(s for _, s in facts.blobs)},
        "dicom_spool": spooled, "files": files,
    }
    digest = manifest.write_manifest(dest, manifest.seal(body, keyring.purpose_key(manifest.MAC_PURPOSE)))
    return BackupReport(dest, digest, backend, len(files), sum(f["size"] for f in files.values()),
                        len(facts.blobs), body["blobs"]["bytes"], facts.rows, facts.audit_last_id,
                        time.monotonic() - started)


def _keyring_bytes(data: Path) -> bytes:
    """keyring.json as it is now; a rotation under way stops the backup before anything is written."""
    try:
        raw = (data / KEYRING_FILE).read_bytes()
        state = json.loads(raw)
    except FileNotFoundError:
        raise BackupError(f"no keyring in {data}; run 'onprem-label init'") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"keyring {data / KEYRING_FILE} cannot be read: {exc}") from None
    if state.get("rotation"):
        raise BackupError("a master key rotation is under way: finish it ('onprem-label key rotate') "
                          "before taking a backup")
    return raw


def _write(path: Path, content: bytes, files: dict, name: str) -> None:
    import hashlib

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    files[name] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def _read_whole_lines(path: Path) -> list[str]:
    """The checkpoint file's complete lines (a line being appended this instant is left out)."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    return [line for line in lines if line.endswith("\n")]


def _copy_spool(data: Path, dest: Path, files: dict, never: set[Path]) -> int:
    """Received DICOM instances not yet stored (sealed files); one finished meanwhile is skipped."""
    root, copied = data / SPOOL_DIR, 0
    if not root.is_dir():
        return 0
    for path in sorted(root.rglob("*")):
        if not BLOB_ID_RE.fullmatch(path.name) or path.resolve() in never or not path.is_file():
            continue
        name = path.relative_to(data).as_posix()
        try:
            size, sha, _ = copying.copy_hashed(path, dest / name)
        except FileNotFoundError:
            continue  # stored and taken out of the spool since it was listed: in the snapshot
        files[name] = {"size": size, "sha256": sha}
        copied += 1
    return copied


def _copy_blobs(root: Path, dest: Path, blobs: list[tuple[str, int]], files: dict, progress) -> dict[str, int]:
    """Copy the snapshot's blobs on a few threads, hashed as written; blobs per master key id."""
    jobs = []
    for blob_id, _size in blobs:
        source = root / blob_id[:2] / blob_id[2:4] / blob_id
        try:
            jobs.append((source, source.relative_to(root.parent).as_posix(), source.stat().st_size))
        except FileNotFoundError:
            raise BackupError(f"blob {blob_id} is in the database but its file is missing; run "
                              "'onprem-label doctor --storage'") from None

    def work(job, buffer):
        source, name, _ = job
        size, sha, head = copying.copy_hashed(source, dest / name, head_bytes=HEADER_BYTES, buffer=buffer)
        return name, size, sha, head

    key_ids: dict[str, int] = {}
    with progress("copying blobs", sum(size for _, _, size in jobs)) as bar:
        for name, size, sha, head in copying.parallel(jobs, work, bar.update, weight=lambda r: r[1]):
            files[name] = {"size": size, "sha256": sha}
            try:
                key_id = parse_header(head).key_id.hex()
            except IntegrityError:
                raise BackupError(f"{name} is not a blob file (bad header); run "
                                  "'onprem-label doctor --storage'") from None
            key_ids[key_id] = key_ids.get(key_id, 0) + 1
    return key_ids
