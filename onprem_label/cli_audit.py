"""`onprem-label audit ...`: verify the chain, export it, check an export offline, archive, checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from onprem_label.audit import AuditAction, record
from onprem_label.audit.atna import iter_messages
from onprem_label.audit.archive import ArchiveError, archive_before, file_sha256, verify_archive
from onprem_label.audit.chain import GENESIS_HASH, audit_key, head
from onprem_label.audit.export import FORMATS, public_key_hex, signing_key, stream_export, verify_export
from onprem_label.audit.search import FilterError, count_matching, parse_filter, parse_time, stream
from onprem_label.audit.site import chain_for
from onprem_label.audit.text import escape_text
from onprem_label.audit.verify import Problem, VerifyResult, verify_and_record
from onprem_label.clock import utcnow
from onprem_label.db.engine import read_connection
from onprem_label.db.models import AuditAnchor
from onprem_label.storage import open_keyring


def _site(ctx: click.Context):
    """(settings, keyring, chain, engine, sessionmaker) of the data directory."""
    from onprem_label.audit.chain import attach
    from onprem_label.cli import ask_passphrase, open_database, settings_from

    settings = settings_from(ctx.find_root())
    keyring = open_keyring(settings, passphrase=ask_passphrase(settings))
    chain = chain_for(settings, keyring)
    engine, maker = open_database(settings)
    attach(maker, chain)
    return settings, keyring, chain, engine, maker


def _print_result(result: VerifyResult, as_json: bool, what: str) -> None:
    """The verdict in one line (or JSON), warnings after; exit status 1 when something is wrong."""
    if as_json:
        click.echo(json.dumps(result.as_dict(), sort_keys=True))
    elif result.ok:
        click.echo(f"{what}: OK, {result.events} events verified (ids {result.first_id or '-'}..{result.last_id}, "
                   f"head {result.head[:16]}), {result.checkpoints} checkpoints agree")
    else:
        click.echo(f"{what}: FAILED at event {result.problem.event_id or '-'}: {result.problem.kind}: "
                   f"{escape_text(result.problem.message)}")
    for warning in result.warnings:
        click.echo(f"note: {escape_text(warning)}", err=True)
    if not result.ok:
        sys.exit(1)


@click.group("audit")
def audit_group() -> None:
    """The audit trail: verify, export, verify-export, archive, checkpoint, export-key."""


@audit_group.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--archives/--no-archives", default=True, show_default=True,
              help="Also verify the archive files the chain's anchors name.")
@click.pass_context
def audit_verify(ctx: click.Context, as_json: bool, archives: bool) -> None:
    """Walk the whole chain and the checkpoints; name the first bad event (exit 1)."""
    from onprem_label.cli_ingest import console_name

    settings, _, chain, engine, maker = _site(ctx)

    def check_archives(result: VerifyResult) -> None:
        if not (archives and result.ok):
            return
        with read_connection(engine) as conn:
            anchors = list(conn.execute(AuditAnchor.__table__.select().order_by(AuditAnchor.__table__.c.last_id)))
        result.problem = _verify_archives(settings.data_path / "audit" / "archive", chain.key, anchors)
        result.warnings = [w for w in result.warnings if "were archived" not in w or result.problem]

    try:
        with maker() as db:
            result = verify_and_record(db, engine, chain, actor_name=console_name(), extra=check_archives)
    finally:
        engine.dispose()
    _print_result(result, as_json, "audit chain")


def _verify_archives(folder: Path, key: bytes, anchors) -> Problem | None:
    """Each anchor's file: the SHA-256 its anchor holds, and the events its anchor says, linked."""
    start, prev = 1, GENESIS_HASH
    for anchor in anchors:
        # The anchor's HMAC (checked by the chain walk for the last one) binds file_name; it is
        # still never used as more than a name inside the archive folder.
        path = folder / Path(anchor.file_name).name
        if file_sha256(path) != anchor.file_sha256:
            return Problem("missing" if not path.exists() else "edited", anchor.first_id,
                           f"archive {path.name} (events {anchor.first_id}..{anchor.last_id}) is missing or altered")
        part = verify_archive(path, key, start_id=start, start_prev=prev)
        if not part.ok:
            return part.problem
        if part.last_id != anchor.last_id or part.head != anchor.last_hash:
            return Problem("truncated", anchor.last_id, f"archive {path.name} does not end in event "
                           f"{anchor.last_id} as its anchor says")
        start, prev = anchor.last_id + 1, anchor.last_hash
    return None


@audit_group.command("export")
@click.option("--format", "fmt", type=click.Choice((*FORMATS, "dicom")), default="jsonl", show_default=True,
              help="CSV (formula cells neutralised) or JSON Lines, both signed; or dicom: DICOM PS3.15 "
                   "A.5 audit messages (XML) for an audit record repository.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True), required=True,
              help="File to write ('-' for stdout).")
@click.option("--since", default="", help="Events at or after this time (ISO 8601, UTC when no zone).")
@click.option("--until", default="", help="Events before this time.")
@click.option("--actor", default="", help="Events of this user name.")
@click.option("--action", default="", help="One action (image:read) or a prefix ending in ':' (task:).")
@click.option("--object-type", default="", help="Events about this kind of object (user, item, task ...).")
@click.option("--object-id", default="", help="Events about this object id.")
@click.option("--outcome", default="", help="success, denied or failure.")
@click.pass_context
def audit_export(ctx: click.Context, fmt: str, out_path: str, **filters) -> None:
    """Export the (filtered) trail with its chain fields and a signed trailer."""
    from onprem_label.cli import CliError
    from onprem_label.cli_ingest import console_name

    try:
        flt = parse_filter({k: v for k, v in filters.items() if v})
    except FilterError as exc:
        raise CliError(str(exc)) from None
    settings, keyring, _, engine, maker = _site(ctx)
    try:
        with read_connection(engine) as conn:
            up_to, _ = head(conn)
            count = count_matching(conn, flt, up_to=up_to)
        with maker() as db:
            # The export is itself an event, written before the file so it cannot be skipped.
            record(db, AuditAction.AUDIT_EXPORT, actor_name=console_name(), object_type="audit",
                   details={"format": fmt, "filters": flt.as_dict(), "events": count, "up_to": up_to})
            db.commit()
        meta = {"filters": flt.as_dict(), "up_to": up_to, "exported_at": utcnow().isoformat()}
        out = sys.stdout.buffer if out_path == "-" else open(out_path, "wb")
        try:
            with read_connection(engine) as conn:
                events = stream(conn, flt, up_to=up_to)
                pieces = (iter_messages(events, source_id=settings.audit_source_id) if fmt == "dicom"
                          else stream_export(events, fmt, signing_key(keyring), meta))
                for piece in pieces:
                    out.write(piece)
        finally:
            if out is not sys.stdout.buffer:
                out.close()
    finally:
        engine.dispose()
    if out_path != "-":
        click.echo(f"exported {count} events to {out_path}", err=True)


@audit_group.command("verify-export")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--public-key", default="", help="The install's export public key (hex) kept off-system.")
@click.option("--no-key", is_flag=True, help="Do not open the data directory's keys (an auditor's machine): "
                                             "check signature and links, not event HMACs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def audit_verify_export(ctx: click.Context, file: str, public_key: str, no_key: bool, as_json: bool) -> None:
    """Check an export file: its trailer and signature, then every event's link (and HMAC)."""
    from onprem_label.cli import ask_passphrase, settings_from

    from onprem_label.cli import CliError

    key = None
    if no_key and not public_key:
        raise CliError("--no-key needs --public-key (the install's key from 'audit export-key', kept "
                       "off-system): the key a file carries proves nothing about who signed it")
    if not no_key:
        settings = settings_from(ctx.find_root())
        keyring = open_keyring(settings, passphrase=ask_passphrase(settings))
        key = audit_key(keyring)
        public_key = public_key or public_key_hex(signing_key(keyring))
    _print_result(verify_export(Path(file), public_key=public_key or None, audit_key=key), as_json, "export")


@audit_group.command("archive")
@click.option("--before", required=True, help="Archive the events older than this time (ISO 8601).")
@click.pass_context
def audit_archive(ctx: click.Context, before: str) -> None:
    """Move the events older than --before into a sealed, encrypted archive file (leaves a checkpoint)."""
    from onprem_label.cli import CliError
    from onprem_label.cli_ingest import console_name

    try:
        when = parse_time("before", before)
    except FilterError as exc:
        raise CliError(str(exc)) from None
    settings, _, _, engine, maker = _site(ctx)
    try:
        with maker() as db:
            report = archive_before(db, when, settings.data_path / "audit" / "archive", now=utcnow(),
                                    actor_name=console_name())
    except ArchiveError as exc:
        raise CliError(str(exc)) from None
    finally:
        engine.dispose()
    click.echo(f"archived events {report.first_id}..{report.last_id} ({report.count}) to {report.path} "
               f"(sha256 {report.file_sha256})")


@audit_group.command("checkpoint")
@click.pass_context
def audit_checkpoint(ctx: click.Context) -> None:
    """Write a checkpoint of the chain now and print it, for an auditor to keep off-system."""
    from onprem_label.cli_ingest import console_name

    _, _, chain, engine, maker = _site(ctx)
    try:
        with maker() as db:
            record(db, AuditAction.AUDIT_CHECKPOINT, actor_name=console_name(), object_type="audit")
            db.commit()
        with read_connection(engine) as conn:
            count, digest = head(conn)
    finally:
        engine.dispose()
    click.echo(chain.checkpoints.write(count, digest).line())


@audit_group.command("export-key")
@click.pass_context
def audit_export_key(ctx: click.Context) -> None:
    """Print the public key that signs exports (keep a copy off-system to check exports with)."""
    from onprem_label.cli import ask_passphrase, settings_from

    settings = settings_from(ctx.find_root())
    click.echo(public_key_hex(signing_key(open_keyring(settings, passphrase=ask_passphrase(settings)))))
