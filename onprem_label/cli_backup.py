"""CLI for backups: `backup DEST`, `backup verify DEST` and `restore SRC` (the work is in onprem_label.backup)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from onprem_label.audit import AuditAction, record
from onprem_label.backup import BackupError
from onprem_label.clock import utcnow
from onprem_label.config import PASSPHRASE_ENV
from onprem_label.storage import open_keyring
from onprem_label.storage.keyring import KEYRING_FILE, load_keyring
from onprem_label.storage.keys import KeyFileError


def _bar(label: str, total: int):
    """A progress bar on stderr (stdout stays for the summary and --json)."""
    return click.progressbar(length=max(total, 1), label=label, file=sys.stderr)


def _gib(count: int) -> str:
    return f"{count / (1 << 30):.2f} GiB" if count >= 1 << 28 else f"{count / (1 << 20):.1f} MiB"


def _passphrase_for(folder: Path):
    """The passphrase when a backup's keyring says its master key comes from one (env, else asked once)."""
    from onprem_label.cli import CliError

    asked: list[str] = []

    def get(_settings=None) -> str | None:
        try:
            state = json.loads((folder / KEYRING_FILE).read_text())
        except (OSError, ValueError):
            return None  # the restore or verify itself names the damaged keyring
        if not state.get("passphrase"):
            return None
        if os.environ.get(PASSPHRASE_ENV):
            return os.environ[PASSPHRASE_ENV]
        if not asked:
            if not sys.stdin.isatty():
                raise CliError(f"this backup's master key comes from a passphrase: set {PASSPHRASE_ENV}")
            asked.append(click.prompt("Master key passphrase", hide_input=True))
        return asked[0]

    return get


def _record_live(settings, action: AuditAction, details: dict, outcome: str = "success") -> bool:
    """Record an event in the site's own database; False when there is none to record in (off-site)."""
    from onprem_label.cli import CliError, open_database
    from onprem_label.cli_ingest import console_name

    try:
        engine, make_session = open_database(settings)
    except CliError:
        return False
    try:
        with make_session() as db:
            record(db, action, actor_name=console_name(), object_type="system", outcome=outcome,
                   details=details, now=utcnow())
            db.commit()
    finally:
        engine.dispose()
    return True


class BackupGroup(click.Group):
    """`backup DEST` is `backup create DEST`; `backup verify DEST` checks one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["create", *args]
        return super().parse_args(ctx, args)


@click.group("backup", cls=BackupGroup)
def backup_group() -> None:
    """Backups: 'backup DEST' takes one while the server runs; 'backup verify DEST' checks one."""


@backup_group.command("create")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def backup_create(ctx: click.Context, dest: str, as_json: bool) -> None:
    """Take a consistent backup of the running site into DEST (a new or empty folder); never the key."""
    from onprem_label.backup.snapshot import create_backup
    from onprem_label.cli import CliError, ask_passphrase, open_database, settings_from

    settings = settings_from(ctx.find_root())
    keyring = open_keyring(settings, passphrase=ask_passphrase(settings))
    open_database(settings)[0].dispose()  # reachable and at head, before anything is written
    try:
        report = create_backup(settings, keyring, Path(dest), progress=_bar)
    except BackupError as exc:
        raise CliError(str(exc)) from None
    _record_live(settings, AuditAction.BACKUP_CREATE, {
        "dest": str(report.dest), "backend": report.backend, "files": report.files,
        "bytes": report.file_bytes, "blobs": report.blobs, "rows": sum(report.rows.values()),
        "audit_last_id": report.audit_last_id, "manifest_sha256": report.manifest_sha256})
    if as_json:
        click.echo(json.dumps({"dest": str(report.dest), "backend": report.backend, "files": report.files,
                               "bytes": report.file_bytes, "blobs": report.blobs, "rows": report.rows,
                               "audit_last_id": report.audit_last_id, "seconds": round(report.seconds, 2),
                               "manifest_sha256": report.manifest_sha256}, indent=2))
        return
    click.echo(f"backup complete: {report.dest} ({report.backend}) holds {report.blobs} encrypted blobs "
               f"({_gib(report.blob_bytes)}), {sum(report.rows.values())} database rows in "
               f"{len(report.rows)} tables and the audit trail up to event {report.audit_last_id}; "
               f"{report.files} files, {_gib(report.file_bytes)}, in {report.seconds:.1f} s "
               f"(manifest sha256 {report.manifest_sha256[:16]}). The master key is not in it: "
               f"keep a copy of {settings.key_path if settings.key_source == 'file' else 'the passphrase'} "
               "apart from the backup. Check it with 'onprem-label backup verify'.")


@backup_group.command("verify")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--key-file", default=None, type=click.Path(dir_okay=False),
              help="Master key to authenticate with (default: this data directory's key).")
@click.option("--no-key", is_flag=True, help="Check files against their checksums only (no key at hand).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def backup_verify(ctx: click.Context, dest: str, key_file: str | None, no_key: bool, as_json: bool) -> None:
    """Check a backup: complete, every file unchanged, and (with the key) every blob and the audit chain."""
    from onprem_label.backup.manifest import ManifestError
    from onprem_label.backup.verify import verify_backup
    from onprem_label.cli import CliError, settings_from

    settings = settings_from(ctx.find_root(), key_file=key_file)
    folder = Path(dest).expanduser().resolve()
    keyring = None
    try:
        if not no_key and not (folder / KEYRING_FILE).is_file() and (folder / "manifest.json").is_file():
            raise CliError(f"{KEYRING_FILE} is missing from the backup: it cannot be authenticated "
                           "(give --no-key to check the other files' checksums only)")
        if not no_key and (folder / KEYRING_FILE).is_file():
            try:
                keyring = load_keyring(folder, settings.key_path, passphrase=_passphrase_for(folder)())
            except KeyFileError as exc:
                raise CliError(f"the master key does not open this backup: {exc}; give --key-file, "
                               "or --no-key to check checksums only") from None
        report = verify_backup(folder, keyring, progress=_bar)
    except ManifestError as exc:
        _record_live(settings, AuditAction.BACKUP_VERIFY, {"dest": str(folder), "problem": str(exc)},
                     "failure")
        if as_json:
            click.echo(json.dumps({"ok": False, "complete": False, "findings": [str(exc)]}))
            sys.exit(1)
        raise CliError(str(exc)) from None
    audited = _record_live(settings, AuditAction.BACKUP_VERIFY, {
        "dest": str(folder), "ok": report.ok, "findings": len(report.findings),
        "first_finding": report.findings[0] if report.findings else None,
        "authenticated": keyring is not None}, "success" if report.ok else "failure")
    if not audited:
        report.notes.append("not audited: no database of this data directory to record in")
    if as_json:
        click.echo(json.dumps({**report.as_dict(), "complete": True}, indent=2))
    else:
        for finding in report.findings:
            click.echo(f"problem: {finding}")
        verdict = "OK" if report.ok else f"FAILED ({len(report.findings)} problems)"
        click.echo(f"backup {folder}: {verdict}; complete (manifest of {report.body.get('created_at')}), "
                   f"{report.files_checked} files ({_gib(report.bytes_checked)}) checked against their "
                   f"checksums, {report.blobs_authenticated} blobs authenticated"
                   + (f", audit chain of {report.audit_events} events verified"
                      if report.audit_events is not None else ""))
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if not report.ok:
        sys.exit(1)


@click.command("restore")
@click.argument("source", type=click.Path(file_okay=False))
@click.option("--database-url", default=None,
              help="PostgreSQL: the empty database to restore into (default: the backup's setting).")
@click.option("--key-file", default=None, type=click.Path(dir_okay=False),
              help="Master key file (default '<data_dir>.key'); written into the restored settings.")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Authenticate only this many random blobs (default: every blob).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def restore(ctx: click.Context, source: str, database_url: str | None, key_file: str | None,
            sample: int | None, as_json: bool) -> None:
    """Restore the backup SOURCE into --data-dir (new or empty), checking everything on the way."""
    from onprem_label.backup.restore import restore_backup
    from onprem_label.cli import CliError, settings_from
    from onprem_label.cli_ingest import console_name

    target = settings_from(ctx.find_root()).data_path
    folder = Path(source).expanduser().resolve()
    try:
        report = restore_backup(folder, target, database_url=database_url, key_file=key_file,
                                passphrase=_passphrase_for(folder), sample=sample, progress=_bar,
                                actor_name=console_name())
    except BackupError as exc:
        raise CliError(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"data_dir": str(report.data_dir), "backend": report.backend,
                               "files": report.files, "bytes": report.file_bytes, "blobs": report.blobs,
                               "blobs_authenticated": report.blobs_authenticated, "rows": report.rows,
                               "audit_events_verified": report.audit_events,
                               "upgraded_from": report.upgraded_from, "seconds": round(report.seconds, 2)},
                              indent=2))
        return
    click.echo(f"restored {folder} into {report.data_dir} ({report.backend}): {report.files} files "
               f"({_gib(report.file_bytes)}) matched their checksums, {report.blobs_authenticated} of "
               f"{report.blobs} blobs authenticated, {sum(report.rows.values())} rows match the manifest, "
               f"audit chain of {report.audit_events} events verified"
               + (f", database upgraded from {report.upgraded_from}" if report.upgraded_from else "")
               + f"; {report.seconds:.1f} s. Start it with 'onprem-label --data-dir {report.data_dir} serve'.")
