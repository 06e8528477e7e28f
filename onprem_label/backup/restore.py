"""`restore SRC`: a backup into a new, empty data directory (and, for PostgreSQL, an empty database).

Checks come before copying where they can: the manifest, an empty target, the master key (it must
open the backup's keyring, and hold every key the blobs are wrapped with), the manifest's HMAC, an
empty target database. Then every file is copied and checked against its checksum as it is
written, every blob is authenticated, the database is restored, its counts are compared with the
manifest and its audit chain verified; `backup:restore` is recorded last, in the restored database.
Any failure on the way removes everything the restore made: nothing half-made is left to start.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from onprem_label.audit import AuditAction, record
from onprem_label.audit.chain import attach, audit_key, legacy_sealer
from onprem_label.audit.site import chain_for
from onprem_label.audit.checkpoints import read_checkpoint_file
from onprem_label.audit.verify import verify_database
from onprem_label.backup import copying, database, manifest
from onprem_label.backup.errors import BackupError
from onprem_label.storage.durable import fsync_dir, write_atomically
from onprem_label.backup.snapshot import CHECKPOINT_NAME
from onprem_label.backup.verify import (authenticate_blobs, blob_ids, check_key_ids,
                                        compare_facts)
from onprem_label.clock import utcnow
from onprem_label.config import CONFIG_FILE_NAME, RESTORE_MARKER, Settings, load_settings
from onprem_label.db.engine import sqlite_file
from onprem_label.db import make_engine, make_sessionmaker, migrate
from onprem_label.db.engine import read_connection
from onprem_label.storage.keyring import KEYRING_FILE, load_keyring
from onprem_label.storage.keys import KeyFileError


@dataclass
class RestoreReport:
    """What a restore brought back."""

    data_dir: Path
    backend: str
    files: int
    file_bytes: int
    blobs: int
    blobs_authenticated: int
    rows: dict[str, int]
    audit_events: int
    upgraded_from: str | None
    seconds: float


def config_text(original: str, overrides: dict[str, str]) -> str:
    """The backup's config file with some top-level settings replaced (the settings file is flat TOML)."""
    lines = original.splitlines()
    for name in overrides:
        lines = [line for line in lines if not re.match(rf"\s*{re.escape(name)}\s*=", line)]
    lines += [f"{name} = {json.dumps(value)}" for name, value in overrides.items()]
    return "\n".join(lines) + "\n" if lines else ""


def check_target(target: Path, source: Path) -> bool:
    """Refuse a target data directory that is not new or empty, or overlaps the backup.

    A target holding nothing but its settings file counts as empty, and True says to keep that
    file: install.sh links /etc/onprem-label/onprem-label.toml into the service's data directory,
    and the site's settings (database, key file) are the ones to restore under.
    """
    if target == source or source in target.parents or target in source.parents:
        raise BackupError(f"{target} overlaps the backup {source}; restore into a folder of its own")
    if not target.exists():
        return False
    if not target.is_dir():
        raise BackupError(f"{target} is not a folder: restore only into a new or empty data directory")
    names = {child.name for child in target.iterdir()}
    if names - {CONFIG_FILE_NAME}:
        raise BackupError(f"{target} is not empty: restore only into a new or empty data directory")
    return bool(names)


def restore_backup(source: Path, target: Path, *, database_url: str | None = None, key_file: str | None = None,
                   passphrase: Callable[[Settings], str | None] = lambda s: None, sample: int | None = None,
                   progress: Callable = copying.no_progress, actor_name: str = "") -> RestoreReport:
    """Restore the backup `source` into the data directory `target` (new or empty); see the module doc."""
    started = time.monotonic()
    source, target = Path(source).expanduser().resolve(), Path(target).expanduser().resolve()
    body = manifest.read_manifest(source)
    keep_config = check_target(target, source)
    made_dir = not target.exists()
    undo: list[Callable[[], None]] = []
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # An exception undoes the restore below; a SIGKILL cannot, so the marker stops every
        # command (serve included) from starting on what it left.
        write_atomically(target / RESTORE_MARKER, f"restore of {source} began; it did not finish\n".encode())
        settings = _place_config(source, target, body, database_url, key_file, keep_config)
        keyring, secret = _open_backup_keyring(source, settings, body, passphrase)
        report = _restore(source, target, settings, keyring, body, sample, progress, undo)
        _record(settings, target, body, source, report, secret, actor_name)
        (target / RESTORE_MARKER).unlink()
        fsync_dir(target)
        report.seconds = time.monotonic() - started
        return report
    except BaseException:
        for step in reversed(undo):
            step()
        copying.remove_made(target, made_dir, keep={CONFIG_FILE_NAME} if keep_config else set())
        raise


def _place_config(source: Path, target: Path, body: dict, database_url: str | None,
                  key_file: str | None, keep_config: bool) -> Settings:
    """Write the backup's config file (with the restore's own database_url/key_file) and load the settings.

    With `keep_config` the target's own settings file stays as it is and is the one loaded.
    """
    if keep_config:
        if database_url or key_file:
            raise BackupError(f"{target / CONFIG_FILE_NAME} is kept as the restore's settings: put "
                              "database_url or key_file in it instead of giving them as options")
        return _checked_settings(target, body)
    if key_file:  # kept in the settings file: relative to nothing but the restore's working folder
        key_file = str(Path(key_file).expanduser().resolve())
    overrides = {k: v for k, v in (("database_url", database_url), ("key_file", key_file)) if v}
    original = ""
    if CONFIG_FILE_NAME in body["files"]:
        raw = (source / CONFIG_FILE_NAME).read_bytes()
        if hashlib.sha256(raw).hexdigest() != body["files"][CONFIG_FILE_NAME]["sha256"]:
            raise BackupError(f"{CONFIG_FILE_NAME} in the backup does not match its checksum; "
                              "run 'onprem-label backup verify'")
        original = raw.decode()
    text = config_text(original, overrides)
    if text:
        write_atomically(target / CONFIG_FILE_NAME, text.encode())
    return _checked_settings(target, body)


def _checked_settings(target: Path, body: dict) -> Settings:
    """The target's settings, refused when their backend or checkpoint file cannot take this backup."""
    settings = load_settings({"data_dir": str(target)})
    backend = "sqlite" if settings.is_sqlite else "postgresql"
    own_file = target / database.SQLITE_FILE
    if settings.is_sqlite and sqlite_file(settings.effective_database_url) != own_file:
        # The database is copied into the target; checks, upgrade and the restore's audit event
        # must go there too, never into a database elsewhere (the live site's, on the same host).
        raise BackupError(f"the restored settings name the SQLite database "
                          f"{sqlite_file(settings.effective_database_url)}, not the restored {own_file}: "
                          "remove database_url from the settings (SQLite lives in the data directory)")
    if backend != body.get("backend"):
        if body.get("backend") == "postgresql":
            raise BackupError("this backup holds a PostgreSQL dump: give --database-url of an empty "
                              "PostgreSQL database to restore into")
        raise BackupError(f"this backup holds a {body.get('backend')} database; restoring it into "
                          f"{backend} is not supported")
    checkpoint = settings.audit_checkpoint_path
    if target not in checkpoint.parents and checkpoint.exists():
        raise BackupError(f"the audit checkpoint file {checkpoint} already exists (another site's?): "
                          "move it away or set ONPREM_LABEL_AUDIT_CHECKPOINT_FILE for the restore")
    return settings


def _open_backup_keyring(source: Path, settings: Settings, body: dict, passphrase: Callable):
    """(keyring, passphrase or None): the backup's keyring opened with the restore's key; a wrong key
    is one clear line."""
    try:
        state = json.loads((source / KEYRING_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{KEYRING_FILE} of the backup cannot be read ({exc}); run 'onprem-label "
                          "backup verify'; nothing was restored") from None
    secret = passphrase(settings) if state.get("passphrase") else None
    try:
        keyring = load_keyring(source, settings.key_path, passphrase=secret)
    except KeyFileError as exc:
        message = str(exc).replace("; nothing was changed", "")
        raise BackupError(f"the master key does not open this backup: {message}; nothing was restored") from None
    if not manifest.authentic(body, keyring.purpose_key(manifest.MAC_PURPOSE)):
        raise BackupError("manifest.json of the backup does not authenticate with this key: it was "
                          "rewritten, or the backup is another site's; nothing was restored")
    missing = check_key_ids(body, keyring)
    if missing:
        raise BackupError(missing[0] + "; nothing was restored")
    return keyring, secret


def _restore(source: Path, target: Path, settings: Settings, keyring, body: dict, sample: int | None,
             progress: Callable, undo: list) -> RestoreReport:
    """Copy and check the files, authenticate blobs, restore and check the database."""
    pg = body["backend"] == "postgresql"
    url = settings.effective_database_url
    if pg:
        relations, functions_before = database.postgresql_state(url)
        if relations:
            raise BackupError(f"the target database is not empty ({len(relations)} tables and other "
                              "relations): restore only into an empty database")
    checkpoint = settings.audit_checkpoint_path
    if target not in checkpoint.parents:
        undo.append(lambda: checkpoint.unlink(missing_ok=True))
    destinations = {name: target / name for name in body["files"] if name != CONFIG_FILE_NAME}
    if CHECKPOINT_NAME in destinations:
        destinations[CHECKPOINT_NAME] = checkpoint
    db_name = body["database"]["file"]
    if pg:
        del destinations[db_name]  # pg_restore reads it where it is, after its checksum is checked
    copied = _copy_files(source, body, destinations, progress)
    ids = blob_ids(body)
    chosen = ids if sample is None or sample >= len(ids) else random.sample(ids, sample)
    failures = authenticate_blobs(target / "blobs", keyring, chosen, progress)
    if failures:
        raise BackupError(failures[0] + f" ({len(failures)} blobs fail); nothing was restored")
    if pg:
        _, sha = copying.hash_file(source / db_name)
        if sha != body["files"][db_name]["sha256"]:
            raise BackupError(f"{db_name} does not match its checksum; nothing was restored")
        undo.append(lambda: database.undo_postgresql(url, functions_before))
        database.restore_postgresql(url, source / db_name)
    return _check_database(settings, keyring, body, target, copied, len(ids), len(chosen))


def _copy_files(source: Path, body: dict, destinations: dict[str, Path], progress: Callable) -> int:
    """Copy each file to its place, checked against the manifest as it is written; bytes copied."""
    listed = body["files"]

    def work(name, buffer):
        try:
            size, _, _ = copying.copy_hashed(source / name, destinations[name], buffer=buffer,
                                             expect=listed[name]["sha256"])
        except FileNotFoundError:
            raise BackupError(f"{name} is missing from the backup; nothing was restored") from None
        except ValueError:
            raise BackupError(f"{name} in the backup does not match its checksum (damaged or altered); "
                              "nothing was restored") from None
        return size

    names = sorted(destinations)
    with progress("restoring files", sum(listed[n]["size"] for n in names)) as bar:
        return sum(copying.parallel(names, work, bar.update, weight=lambda size: size))


def _check_database(settings: Settings, keyring, body: dict, target: Path, copied: int, blobs: int,
                    authenticated: int) -> RestoreReport:
    """Counts against the manifest, the audit chain against the checkpoints, then bring it to head."""
    engine = make_engine(settings.effective_database_url)
    try:
        at_head, message = migrate.schema_status(engine)
        if not at_head and "newer" in message:
            raise BackupError(f"the backup's {message}")
        with read_connection(engine, snapshot=True) as conn:
            findings = compare_facts(database.read_facts(conn), body)
            if findings:
                raise BackupError(f"the restored database differs from the manifest: {findings[0]}")
            checkpoints, bad = read_checkpoint_file(settings.audit_checkpoint_path)
            result = verify_database(conn, audit_key(keyring), checkpoints, bad)
        if not result.ok:
            raise BackupError(f"the restored audit chain does not verify: {result.problem.kind} at event "
                              f"{result.problem.event_id}: {result.problem.message}")
        upgraded = None
        if not at_head:
            upgraded = migrate.current_revision(engine)
            migrate.upgrade(engine, audit_seal=legacy_sealer(audit_key(keyring)))
    finally:
        engine.dispose()
    return RestoreReport(target, body["backend"], len(body["files"]), copied, blobs, authenticated,
                         body["database"]["rows"], result.events, upgraded, 0.0)


def _record(settings: Settings, target: Path, body: dict, source: Path, report: RestoreReport,
            secret: str | None, actor_name: str) -> None:
    """backup:restore in the restored database, sealed onto its chain with the restored keyring."""
    keyring = load_keyring(target, settings.key_path, passphrase=secret)
    engine = make_engine(settings.effective_database_url)
    try:
        maker = make_sessionmaker(engine)
        attach(maker, chain_for(settings, keyring))
        with maker() as db:
            record(db, AuditAction.BACKUP_RESTORE, actor_name=actor_name, object_type="system", details={
                "source": str(source), "backup_created_at": body.get("created_at"),
                "source_host": body.get("source", {}).get("host"), "backend": body["backend"],
                "blobs": report.blobs, "blobs_authenticated": report.blobs_authenticated,
                "audit_events_verified": report.audit_events, "upgraded_from": report.upgraded_from},
                now=utcnow())
            db.commit()
    finally:
        engine.dispose()
