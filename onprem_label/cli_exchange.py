"""CLI for dataset exchange: `export PROJECT --format F --out FILE`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from onprem_label.clock import utcnow
from onprem_label.cli_ingest import _root, console_name


@click.command("export")
@click.argument("project")
@click.option("--format", "fmt", required=True,
              type=click.Choice(["coco", "yolo", "voc", "csv", "jsonl", "dicom-seg", "dicom-sr"]),
              help="coco (JSON), yolo or voc (zip of label files), csv (one row per shape), jsonl (every "
                   "revision and review), dicom-seg (zip of DICOM SEG of masks), dicom-sr (zip of DICOM SR "
                   "measurement reports of boxes, points and lines).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The file to write (written beside it first, then renamed: never half a file).")
@click.option("--state", default="accepted", show_default=True, help="Task states, comma-separated.")
@click.option("--since", default=None, help="Accepted (or last changed) on or after this date, YYYY-MM-DD.")
@click.option("--until", default=None, help="... and on or before this date.")
@click.option("--label", default=None, help="Only shapes of these classes, comma-separated.")
@click.option("--images", "with_images", default=None, type=click.Choice(["png", "dicom"]),
              help="Put each exported frame's PNG, or the de-identified DICOM files, in the output (then a zip).")
@click.pass_context
def export_command(ctx, project: str, fmt: str, out_path: str, state: str, since, until, label,
                   with_images) -> None:
    """Export PROJECT's labels (audited; items awaiting a pixel check never leave)."""
    from onprem_label.cli import CliError, ask_passphrase, open_database, start_logging
    from onprem_label.db.engine import read_connection
    from onprem_label.exchange import export
    from onprem_label.exchange.selection import FilterError, parse_filter
    from onprem_label.storage import BlobNotFound, IntegrityError, open_keyring, open_store
    from onprem_label.workflow.projects import UnknownProject, find_project

    try:
        flt = parse_filter({"state": state, "since": since, "until": until, "label": label})
    except FilterError as exc:
        raise CliError(f"--{exc.field}: {exc}") from None
    target = Path(out_path)
    partial = target.with_name(target.name + ".partial")
    settings = _root(ctx)
    start_logging(settings, "export")  # its warnings in the site's log format, to its own file
    engine, make_session = open_database(settings)
    try:
        with make_session() as db:
            try:
                found = find_project(db, project)
            except UnknownProject as exc:
                raise CliError(str(exc)) from None
            moment = utcnow()
            passes = export.passes(fmt, with_images)
            store = None
            if with_images or fmt in export.DICOM:  # only these read stored images: the key stays shut otherwise
                store = open_store(settings, open_keyring(settings, passphrase=ask_passphrase(settings)))
            # One snapshot for the count (in the audit event) and the file; the output opened first,
            # so an unwritable path leaves no event of an export that never happened.
            with read_connection(engine, snapshot=True) as conn, open(partial, "wb") as out:
                counts = export.begin(db, conn, found, fmt, flt, now=moment, actor_name=console_name(),
                                      with_images=with_images)
                db.commit()
                with click.progressbar(length=counts["tasks"] * passes, label=f"exporting {fmt}",
                                      file=sys.stderr) as bar:
                    for chunk in export.chunks(conn, found, fmt, flt, counts, now=moment, progress=bar.update,
                                               store=store, with_images=with_images):
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, target)
    except (BlobNotFound, IntegrityError) as exc:
        # A stored image damaged midway (images=dicom): the file is not left as if whole.
        raise CliError(f"a stored image could not be read ({type(exc).__name__}); run 'onprem-label doctor "
                       "--storage'") from None
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
        engine.dispose()
    withheld = counts["withheld_pixel_check"]
    click.echo(f"exported {counts['tasks']} tasks of project {found.id} as {fmt}"
               + (f" with {with_images} images" if with_images else "") + f" to {target}"
               + (f"; {withheld} held back until their pixels are checked" if withheld else ""))


@click.command("import")
@click.argument("project")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["coco", "jsonl"]),
              help="coco (a COCO file with images, categories, annotations) or jsonl (our export, or one "
                   "item per line with shapes).")
@click.option("--name", required=True, help="The model or run; the drafts' author is import:<name>.")
@click.option("--min-score", default=0.0, show_default=True, type=float,
              help="Leave out COCO predictions scoring below this.")
@click.pass_context
def import_command(ctx, project: str, file: str, fmt: str, name: str, min_score: float) -> None:
    """Attach FILE's predictions to PROJECT's open tasks as drafts that labelers correct (audited)."""
    from onprem_label.cli import CliError, open_database
    from onprem_label.exchange.predictions import PredictionError, read
    from onprem_label.workflow.errors import Invalid
    from onprem_label.workflow.prelabels import attach, check_name
    from onprem_label.workflow.projects import UnknownProject, find_project

    try:
        check_name(name)
    except Invalid as exc:
        raise CliError(f"--name: {exc}") from None
    engine, make_session = open_database(_root(ctx))
    try:
        with make_session() as db, open(file, "rb") as stream:
            try:
                schema = find_project(db, project).label_schema or {}
                db.rollback()  # no transaction (on SQLite: the writer lock) while a big file is parsed
                predictions, skipped = read(stream, fmt, schema, min_score=min_score)
                found = find_project(db, project)
            except UnknownProject as exc:
                raise CliError(str(exc)) from None
            except PredictionError as exc:
                raise CliError(f"{file}: {exc}") from None
            summary = attach(db, found, predictions, name=name, skipped=skipped, actor_name=console_name(),
                             now=utcnow())
    finally:
        engine.dispose()
    left = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.skipped.items()))
    click.echo(f"imported {summary.shapes} shapes onto {summary.tasks} tasks of project {found.id} as "
               f"import:{summary.name}" + (f"; left out: {left}" if left else ""))
    for example in summary.examples:
        click.echo(f"  {example['where']}: {example['reason']}" + (f" ({example['message']})"
                                                                     if "message" in example else ""))
