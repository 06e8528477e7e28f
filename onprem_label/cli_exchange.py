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
@click.option("--format", "fmt", required=True, type=click.Choice(["coco", "yolo", "voc", "csv", "jsonl"]),
              help="coco (JSON), yolo or voc (zip of label files), csv (one row per shape), jsonl (every "
                   "revision and review).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The file to write (written beside it first, then renamed: never half a file).")
@click.option("--state", default="accepted", show_default=True, help="Task states, comma-separated.")
@click.option("--since", default=None, help="Accepted (or last changed) on or after this date, YYYY-MM-DD.")
@click.option("--until", default=None, help="... and on or before this date.")
@click.option("--label", default=None, help="Only shapes of these classes, comma-separated.")
@click.pass_context
def export_command(ctx, project: str, fmt: str, out_path: str, state: str, since, until, label) -> None:
    """Export PROJECT's labels (audited; items awaiting a pixel check never leave)."""
    from onprem_label.cli import CliError, open_database
    from onprem_label.db.engine import read_connection
    from onprem_label.exchange import export
    from onprem_label.exchange.selection import FilterError, parse_filter
    from onprem_label.workflow.projects import UnknownProject, find_project

    try:
        flt = parse_filter({"state": state, "since": since, "until": until, "label": label})
    except FilterError as exc:
        raise CliError(f"--{exc.field}: {exc}") from None
    target = Path(out_path)
    partial = target.with_name(target.name + ".partial")
    engine, make_session = open_database(_root(ctx))
    try:
        with make_session() as db:
            try:
                found = find_project(db, project)
            except UnknownProject as exc:
                raise CliError(str(exc)) from None
            moment = utcnow()
            passes = export.FORMATS[fmt][2]
            # One snapshot for the count (in the audit event) and the file; the output opened first,
            # so an unwritable path leaves no event of an export that never happened.
            with read_connection(engine, snapshot=True) as conn, open(partial, "wb") as out:
                counts = export.begin(db, conn, found, fmt, flt, now=moment, actor_name=console_name())
                db.commit()
                with click.progressbar(length=counts["tasks"] * passes, label=f"exporting {fmt}",
                                      file=sys.stderr) as bar:
                    for chunk in export.chunks(conn, found, fmt, flt, counts, now=moment, progress=bar.update):
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, target)
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
        engine.dispose()
    withheld = counts["withheld_pixel_check"]
    click.echo(f"exported {counts['tasks']} tasks of project {found.id} as {fmt} to {target}"
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
                found = find_project(db, project)
                predictions, skipped = read(stream, fmt, found.label_schema or {}, min_score=min_score)
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
