"""CLI for keys and health: `key rotate|status` and `doctor [--storage] [--repair] [--json]`."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from onprem_label.audit import AuditAction, record
from onprem_label.clock import utcnow
from onprem_label.config import NEW_PASSPHRASE_ENV
from onprem_label.audit import chain
from onprem_label.audit.site import chain_for
from onprem_label.audit.text import escape_text
from onprem_label.health import PROBLEM, WARNING, exit_code, status
from onprem_label.health.doctor import DEFAULT_SAMPLE, DoctorOptions, run_doctor
from onprem_label.storage import IntegrityError, blob_root, open_keyring, open_store
from onprem_label.storage.blobstore import iter_blob_ids
from onprem_label.storage.rotation import key_usage, rotate_master_key


def _settings(ctx: click.Context):
    from onprem_label.cli import settings_from

    return settings_from(ctx.find_root())


def _audit(settings, action: AuditAction, details: dict, audit_chain=None) -> None:
    """Record a console action in the audit trail (when the database is reachable and at head).

    `audit_chain`: one made before the command changed the keyring (rotation), to seal with.
    """
    from onprem_label.cli import open_database

    engine, make_session = open_database(settings)
    if audit_chain is not None:
        chain.attach(make_session, audit_chain)
    try:
        with make_session() as db:
            record(db, action, object_type="system", details=details, now=utcnow())
            db.commit()
    finally:
        engine.dispose()


@click.group("key")
def key_group() -> None:
    """Master key: rotation and status."""


def _ask_new_passphrase() -> str:
    """The new master key passphrase: from ONPREM_LABEL_NEW_KEY_PASSPHRASE, or asked twice."""
    from onprem_label.cli import CliError

    if os.environ.get(NEW_PASSPHRASE_ENV):
        return os.environ[NEW_PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise CliError(f"set {NEW_PASSPHRASE_ENV} to the new passphrase (no terminal to ask on)")
    return click.prompt("New master key passphrase", hide_input=True, confirmation_prompt=True)


@key_group.command("rotate")
@click.pass_context
def key_rotate(ctx: click.Context) -> None:
    """Make a new master key and re-wrap every blob's data key with it (resumable; stop the server first)."""
    from onprem_label.cli import CliError, ask_passphrase

    settings = _settings(ctx)
    passphrase = ask_passphrase(settings)
    new_passphrase = None
    if settings.key_source == "passphrase":
        new_passphrase = _ask_new_passphrase()  # the core checks both against the keyring
    # The audit key derives from the root key, which rotation keeps; open it while the old key opens it.
    audit_chain = chain_for(settings, open_keyring(settings, passphrase=passphrase))
    from onprem_label.cli import open_database
    open_database(settings)[0].dispose()  # the audit row at the end needs the database: check now
    total = sum(1 for _ in iter_blob_ids(blob_root(settings)))
    with contextlib.ExitStack() as stack:
        bars = []

        def advance(count: int) -> None:
            # The bar starts with the first blob, so an error found before it is the only line.
            if not bars:
                bars.append(stack.enter_context(click.progressbar(
                    length=total, label="re-wrapping data keys", file=sys.stderr)))
            bars[0].update(count)

        try:
            report = rotate_master_key(settings.data_path, settings.key_path,
                                       lambda keyring: open_store(settings, keyring),
                                       progress=advance, passphrase=passphrase,
                                       new_passphrase=new_passphrase)
        except IntegrityError as exc:
            raise CliError(f"{exc}; the rotation is paused: run 'onprem-label doctor --storage', "
                           "deal with that blob, then run 'onprem-label key rotate' again") from None
    _audit(settings, AuditAction.KEY_ROTATE, {"from_key_id": report.old_key_id,
                                              "to_key_id": report.new_key_id,
                                              "rewrapped": report.rewrapped}, audit_chain)
    click.echo(f"master key rotated: {report.old_key_id} -> {report.new_key_id}; "
               f"{report.rewrapped} blobs re-wrapped, {report.already_new} already on the new key")
    if report.retired_key_file:
        click.echo(f"old key kept as {report.retired_key_file}: backups made before now need it; "
                   "destroy it once they have expired")


@key_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def key_status(ctx: click.Context, as_json: bool) -> None:
    """Say which master key is in use and how many blobs each key wraps."""
    from onprem_label.cli import CliError, ask_passphrase
    from onprem_label.storage.keyring import read_state

    settings = _settings(ctx)
    keyring = open_keyring(settings, passphrase=ask_passphrase(settings))
    state = read_state(settings.data_path)
    try:
        usage = key_usage(open_store(settings, keyring))
    except IntegrityError as exc:
        raise CliError(f"{exc}; run 'onprem-label doctor --storage'") from None
    status = {"current_key_id": keyring.current_id.hex(), "key_source": settings.key_source,
              "rotation_in_progress": bool(state.get("rotation")), "blobs_by_key": usage}
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"master key in use: {status['current_key_id']} ({settings.key_source})")
    if status["rotation_in_progress"]:
        click.echo("a rotation is under way: run 'onprem-label key rotate' to finish it")
    for key_id, count in sorted(usage.items()):
        click.echo(f"  {key_id}: {count} blobs")
    if not usage:
        click.echo("  no blobs stored")


@click.command("doctor")
@click.option("--storage", "check_blobs", is_flag=True,
              help="Authenticate every blob (default: a random sample; files and rows are always compared).")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help=f"Authenticate this many random blobs (default {DEFAULT_SAMPLE}; with --storage: all).")
@click.option("--audit-full", is_flag=True,
              help="Walk every audit event (default: the events after the newest checkpoint, and the "
                   "events the checkpoints name).")
@click.option("--repair", is_flag=True,
              help="Remove temp leftovers (an audited action); every other finding is only reported.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for monitoring).")
@click.pass_context
def doctor(ctx: click.Context, check_blobs: bool, sample: int | None, audit_full: bool, repair: bool,
           as_json: bool) -> None:
    """Check settings, permissions, key, database, blobs, audit chain, clock and disk; report each.

    Exit status as monitoring plugins use it: 0 all ok, 1 warnings, 2 problems.
    """
    from onprem_label.cli import ask_passphrase, settings_from

    if sample is None and not check_blobs:
        sample = DEFAULT_SAMPLE
    options = DoctorOptions(sample=sample, repair=repair, audit_full=audit_full)
    report = run_doctor(lambda: settings_from(ctx.find_root()), ask_passphrase, options)
    findings = report.findings
    if report.removed_temp:
        _audit(report.settings, AuditAction.STORAGE_REPAIR, {"temp_files_removed": report.removed_temp})
    code = exit_code(findings)
    if as_json:
        click.echo(json.dumps({"status": status(findings), "exit_code": code,
                               "findings": [f.as_dict() for f in findings]}, indent=2))
    else:
        for finding in findings:
            click.echo(escape_text(finding.line()))
        click.echo(_summary(findings))
    sys.exit(code)


def _summary(findings) -> str:
    """The last line: how many problems and warnings, or that every check is ok."""
    counts = {severity: sum(f.severity == severity for f in findings) for severity in (PROBLEM, WARNING)}
    if not any(counts.values()):
        return "doctor: every check ok"
    parts = [f"{n} {word}{'s' if n != 1 else ''}" for word, n in
             (("problem", counts[PROBLEM]), ("warning", counts[WARNING])) if n]
    return f"doctor: {', '.join(parts)}"
