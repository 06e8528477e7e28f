"""`backup verify DEST`: is the backup complete and unchanged, and (with the key) does all of it authenticate?

Without the master key: the manifest is there (else the backup is incomplete), every file it lists
is present with its size and SHA-256, no file is extra, and a SQLite snapshot's row counts and blob
list agree with the manifest. With the key, also: the manifest's HMAC, every blob decrypts and
matches its id, every blob's master key is at hand, and the audit chain in a SQLite snapshot
verifies against the checkpoints in the backup. A PostgreSQL dump is checked by its checksum;
its rows and chain are checked when it is restored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from onprem_label.audit.chain import audit_key
from onprem_label.audit.checkpoints import read_checkpoint_file
from onprem_label.audit.verify import verify_database
from onprem_label.backup import copying, database, manifest
from onprem_label.backup.snapshot import CHECKPOINT_NAME
from onprem_label.storage.blobstore import BlobNotFound, EncryptedBlobStore
from onprem_label.storage.format import IntegrityError
from onprem_label.storage.keyring import Keyring


@dataclass
class VerifyReport:
    """Findings (empty: the backup is sound) and what was checked."""

    body: dict
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    blobs_authenticated: int = 0
    audit_events: int | None = None

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.findings

    def as_dict(self) -> dict:
        """JSON-able form (`--json`)."""
        return {"ok": self.ok, "findings": self.findings, "notes": self.notes,
                "files_checked": self.files_checked, "bytes_checked": self.bytes_checked,
                "blobs_authenticated": self.blobs_authenticated, "audit_events_verified": self.audit_events,
                "created_at": self.body.get("created_at"), "backend": self.body.get("backend")}


def blob_ids(body: dict) -> list[str]:
    """The blob ids a manifest lists (its files under blobs/)."""
    return sorted(name.rsplit("/", 1)[1] for name in body["files"] if name.startswith("blobs/"))


def check_files(folder: Path, body: dict, progress: Callable = copying.no_progress) -> tuple[list[str], int, int]:
    """(findings, files hashed, bytes hashed): missing, extra and changed files."""
    listed, present = body["files"], manifest.files_on_disk(folder)
    findings = [f"missing: {name}" for name in sorted(set(listed) - present)]
    findings += [f"extra file not in the manifest: {name}" for name in sorted(present - set(listed))]
    jobs = sorted(set(listed) & present)

    def work(name, buffer):
        return name, *copying.hash_file(folder / name, buffer)

    total = sum(listed[name]["size"] for name in jobs)
    with progress("checking files", total) as bar:
        results = copying.parallel(jobs, work, bar.update, weight=lambda r: r[1])
    for name, size, sha in results:
        if size != listed[name]["size"] or sha != listed[name]["sha256"]:
            findings.append(f"changed: {name} (size {size}, manifest says {listed[name]['size']}; "
                            "checksum differs)" if size != listed[name]["size"] else
                            f"changed: {name} (checksum differs from the manifest)")
    return findings, len(results), sum(r[1] for r in results)


def authenticate_blobs(root: Path, keyring: Keyring, ids: list[str], progress: Callable = copying.no_progress) -> list[str]:
    """Decrypt every blob and check its content against its id; a finding per blob that fails."""
    store = EncryptedBlobStore(root, keyring)

    def work(blob_id, _buffer):
        try:
            store.verify(blob_id)
        except (IntegrityError, BlobNotFound, ValueError) as exc:
            return f"blob {blob_id} fails authentication: {exc or 'missing'}"
        return None

    with progress("authenticating blobs", len(ids)) as bar:
        return [r for r in copying.parallel(ids, work, bar.update) if r]


def check_key_ids(body: dict, keyring: Keyring) -> list[str]:
    """A finding per master key id blobs are wrapped with that the keyring lacks (a retired key)."""
    held = {k.hex() for k in keyring.masters}
    return [f"{count} blobs are wrapped with master key {key_id}, which was not given (a retired "
            f"key: put it beside the key file as <key>.retired-...)"
            for key_id, count in sorted(body.get("blob_key_ids", {}).items()) if key_id not in held]


def compare_facts(facts: database.SnapshotFacts, body: dict) -> list[str]:
    """Findings where a database's counts, blob list or audit head differ from the manifest."""
    findings = []
    rows = body.get("database", {}).get("rows", {})
    for table in sorted(set(rows) | set(facts.rows)):
        if rows.get(table) != facts.rows.get(table):
            findings.append(f"table {table}: {facts.rows.get(table)} rows, manifest says {rows.get(table)}")
    if sorted(b for b, _ in facts.blobs) != blob_ids(body):
        findings.append("the database's blob list differs from the blob files in the manifest")
    audit = body.get("audit", {})
    if (facts.audit_last_id, facts.audit_head) != (audit.get("last_id"), audit.get("head")):
        findings.append(f"the audit chain ends at event {facts.audit_last_id}, the manifest says "
                        f"{audit.get('last_id')}")
    return findings


def verify_backup(folder: Path, keyring: Keyring | None = None, *,
                  progress: Callable = copying.no_progress) -> VerifyReport:
    """Check a backup folder; ManifestError when it has no (readable) manifest, i.e. is incomplete."""
    folder = Path(folder).expanduser().resolve()
    body = manifest.read_manifest(folder)
    report = VerifyReport(body)
    found, report.files_checked, report.bytes_checked = check_files(folder, body, progress)
    report.findings += found
    db_file = folder / body.get("database", {}).get("file", "")
    damaged = {f.split(": ", 1)[1].split(" (", 1)[0] for f in found}
    snapshot_ok = body.get("backend") == "sqlite" and db_file.is_file() and db_file.name not in damaged
    if keyring is not None:
        if not manifest.authentic(body, keyring.purpose_key(manifest.MAC_PURPOSE)):
            report.findings.append("manifest.json does not authenticate with this key (rewritten, or "
                                   "another site's backup)")
        report.findings += check_key_ids(body, keyring)
        ids = [b for b in blob_ids(body) if (folder / "blobs" / b[:2] / b[2:4] / b).is_file()]
        failed = authenticate_blobs(folder / "blobs", keyring, ids, progress)
        report.findings += failed
        report.blobs_authenticated = len(ids) - len(failed)
    else:
        report.notes.append("no key given: blobs, the manifest's HMAC and the audit chain were not "
                            "authenticated (files were checked against their checksums)")
    if snapshot_ok:
        report.findings += _check_sqlite_snapshot(folder, db_file, body, keyring, report)
    elif body.get("backend") == "postgresql":
        report.notes.append("PostgreSQL dump checked by its checksum; its rows and audit chain are "
                            "checked by 'onprem-label restore'")
    return report


def _check_sqlite_snapshot(folder: Path, db_file: Path, body: dict, keyring, report: VerifyReport) -> list[str]:
    """Counts and blob list of the snapshot against the manifest; with the key, its audit chain."""
    import sqlalchemy.exc

    try:
        with database.sqlite_file_connection(db_file) as conn:
            findings = compare_facts(database.read_facts(conn), body)
            if keyring is not None:
                checkpoints, bad = read_checkpoint_file(folder / CHECKPOINT_NAME)
                result = verify_database(conn, audit_key(keyring), checkpoints, bad)
                report.audit_events = result.events
                if not result.ok:
                    findings.append(f"audit chain in the snapshot: {result.problem.kind} at event "
                                    f"{result.problem.event_id}: {result.problem.message}")
            return findings
    except sqlalchemy.exc.DBAPIError as exc:
        return [f"the database snapshot cannot be read: {str(exc.orig).strip()}"]

