"""CLI for keys and storage health: `key rotate|status` and `doctor [--storage] [--repair]`."""

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
              help="Also compare blob files with database rows and authenticate blobs.")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="With --storage: authenticate only this many random blobs (default: all).")
@click.option("--repair", is_flag=True,
              help="Remove temp leftovers; every other finding is only reported.")
@click.pass_context
def doctor(ctx: click.Context, check_blobs: bool, sample: int | None, repair: bool) -> None:
    """Check settings, key, database and (with --storage) the blob store; exit 1 on any finding."""
    from onprem_label.cli import ask_passphrase, open_database
    from onprem_label.doctor import check_storage

    settings = _settings(ctx)
    click.echo("settings: ok")
    keyring = open_keyring(settings, passphrase=ask_passphrase(settings))
    click.echo(f"master key: ok ({keyring.current_id.hex()})")
    engine, make_session = open_database(settings)
    click.echo("database: at head")
    if not check_blobs:
        engine.dispose()
        return
    try:
        with make_session() as db:
            report = check_storage(db, open_store(settings, keyring), sample=sample, repair=repair)
    finally:
        engine.dispose()
    for line in report.lines():
        click.echo(line)
    if report.removed_temp:
        _audit(settings, AuditAction.STORAGE_REPAIR, {"temp_files_removed": report.removed_temp})
        click.echo(f"removed {report.removed_temp} temp leftovers")
    click.echo(f"storage: {report.checked} blobs authenticated, "
               f"{'no faults' if report.ok else str(len(report.lines())) + ' faults'}")
    if not report.ok:
        sys.exit(1)

