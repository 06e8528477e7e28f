"""CLI for projects and image ingest: `project create|list`, `ingest PROJECT PATH...`."""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from collections import Counter
from contextlib import ExitStack

import click

from onprem_label.clock import utcnow


def _root(ctx: click.Context):
    from onprem_label.cli import settings_from

    return settings_from(ctx.find_root())


def console_name() -> str:
    """Who runs a console command, for the audit trail."""
    try:
        return f"console:{getpass.getuser()}"[:64]
    except (KeyError, OSError):
        return "console"


@click.group("project")
def project_group() -> None:
    """Projects (schemas and members come with the workflow issue)."""


@project_group.command("create")
@click.argument("name")
@click.option("--description", default="", help="What the project is for.")
@click.option("--schema", "schema_file", type=click.File("r", encoding="utf-8"), default=None,
              help="Label schema as JSON (classes and questions; see DESIGN.md). Tasks are handed out "
                   "only once a project has one.")
@click.option("--stack-series/--no-stack-series", default=False, show_default=True,
              help="Group the DICOM instances of one series into one item (a stack).")
@click.pass_context
def project_create(ctx, name: str, description: str, schema_file, stack_series: bool) -> None:
    """Create a project."""
    from onprem_label.cli import CliError, open_database
    from onprem_label.workflow.errors import WorkflowError
    from onprem_label.workflow.projects import create_project

    schema = None
    if schema_file is not None:
        try:
            schema = json.load(schema_file)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CliError(f"the schema file is not JSON: {exc}") from None
    engine, make_session = open_database(_root(ctx))
    try:
        with make_session() as db:
            try:
                project = create_project(db, name, description=description, label_schema=schema,
                                         settings={"stack_series": stack_series},
                                         actor_name=console_name(), now=utcnow())
            except WorkflowError as exc:
                details = "; ".join(f"{e['field']}: {e['message']}" for e in exc.extra.get("errors", [])[:5])
                raise CliError(f"{exc}{' (' + details + ')' if details else ''}") from None
            db.commit()
            click.echo(f"created project {project.id}: {project.name}")
    finally:
        engine.dispose()


@project_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def project_list(ctx, as_json: bool) -> None:
    """List projects with their item counts."""
    from sqlalchemy import func, select

    from onprem_label.cli import open_database
    from onprem_label.db.engine import read_only
    from onprem_label.db.models import Item, Project

    engine, make_session = open_database(_root(ctx))
    try:
        with make_session() as db, read_only(db):
            counts = dict(db.execute(select(Item.project_id, func.count()).group_by(Item.project_id)).all())
            rows = [{"id": p.id, "name": p.name, "items": counts.get(p.id, 0)}
                    for p in db.scalars(select(Project).order_by(Project.id))]
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    for row in [] if as_json else rows:
        click.echo(f"{row['id']:>5}  {row['items']:>7} items  {row['name']}")


@click.command("ingest")
@click.argument("project")
@click.argument("paths", nargs=-1, required=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write one JSON line per file (imported / duplicate / rejected and why); '-' for stdout.")
@click.option("--workers", type=int, default=None,
              help="Processes that decode and de-identify (default: the ingest_workers setting).")
@click.pass_context
def ingest(ctx, project: str, paths: tuple[str, ...], report_path: str | None, workers: int | None) -> None:
    """Import images (files, folders, zip archives) into PROJECT (its id or name)."""
    from onprem_label.cli import CliError, ask_passphrase, open_database, start_logging
    from onprem_label.imaging.batch import StoreBehind, run_batch
    from onprem_label.imaging.ingest import BatchInterrupted, IngestTarget, store_batch
    from onprem_label.imaging.prepare import link_key, prepare_options
    from onprem_label.imaging.sources import ZipLimits, iter_sources
    from onprem_label.storage import open_keyring, open_store
    from onprem_label.workflow.projects import ProjectError, find_project

    settings = _root(ctx)
    start_logging(settings, "ingest")  # a decoder's trace, say: in the site's log format and file
    keyring = open_keyring(settings, passphrase=ask_passphrase(settings))
    store, options = open_store(settings, keyring), prepare_options(settings, keyring)
    workers = workers if workers is not None else settings.ingest_workers or os.cpu_count() or 1
    if workers < 1:
        raise CliError("--workers must be at least 1")
    engine, make_session = open_database(settings)
    limits = ZipLimits(settings.ingest_zip_max_files, settings.ingest_zip_max_bytes)
    counts: Counter = Counter()
    started = time.monotonic()
    with ExitStack() as stack:
        stack.callback(engine.dispose)
        db = stack.enter_context(make_session())
        try:
            project_id = find_project(db, project).id
        except ProjectError as exc:
            raise CliError(str(exc)) from None
        db.rollback()
        target = IngestTarget(project_id, "cli", actor_name=console_name(), link_key=link_key(settings, keyring))
        report = _open_report(stack, report_path)
        # The report itself may sit in a folder being ingested: it is output, not input.
        own = os.path.realpath(report_path) if report_path not in (None, "-") else None
        sources = [s for s in iter_sources(list(paths), limits) if own is None or os.path.realpath(s.path) != own]
        bar = stack.enter_context(click.progressbar(length=len(sources), label="ingest", file=sys.stderr,
                                                    show_pos=True))

        def store_group(group) -> None:
            try:
                results = store_batch(db, store, target, [(source.name, outcome) for source, outcome in group],
                                      now=utcnow())
            except BatchInterrupted as stopped:  # report what was stored before the error, then stop
                report_results(stopped.results)
                raise stopped.__cause__ from None
            report_results(results)

        def report_results(results) -> None:
            for result in results:
                counts[result.status] += 1
                if report is not None:
                    line = result.to_json()
                    report.write(json.dumps({"path": line.pop("name"), **line}) + "\n")
            bar.update(len(results))

        storer = StoreBehind(store_group)
        try:
            run_batch(sources, options, workers, storer, known=_known_files(stack, make_session, project_id, options))
            storer.close()
        except BaseException:
            storer.abort()  # the session is closed below: its thread must be done with it first
            raise
    seconds = time.monotonic() - started
    total = sum(counts.values())
    click.echo(f"ingest: {counts['imported']} imported, {counts['duplicate']} duplicates, "
               f"{counts['rejected']} rejected ({total} files in {seconds:.1f} s, "
               f"{total / seconds if seconds else 0:.1f} files/s)", err=report_path == "-")


def _known_files(stack: ExitStack, make_session, project_id: int, options):
    """run_batch's `known`: a file whose bytes the project already holds is a duplicate, not decoded again.

    Only when the project had images before this run (a first bulk import pays nothing): then each
    file is read once here to find its digest, a small price against decoding it.
    """
    from sqlalchemy import select

    from onprem_label.db.engine import read_only
    from onprem_label.db.models import ItemImage
    from onprem_label.imaging.errors import Rejected
    from onprem_label.imaging.ingest import KnownFile, find_duplicate
    from onprem_label.imaging.prepare import source_digest
    from onprem_label.imaging.sources import open_source

    db = stack.enter_context(make_session())
    read_only(db)
    had_images = db.scalar(select(ItemImage.id).where(ItemImage.project_id == project_id).limit(1))
    db.rollback()
    if had_images is None:
        return None

    def known(source):
        if source.problem is not None:
            return None
        try:
            with open_source(source) as stream:
                digest = source_digest(stream, options.digest_key, options.max_bytes)
        except (Rejected, OSError):
            return None  # the worker reads it again and says what is wrong
        read_only(db)
        item_id = find_duplicate(db, project_id, digest)
        db.rollback()
        return KnownFile(digest, item_id) if item_id is not None else None

    return known


def _open_report(stack: ExitStack, path: str | None):
    if path is None:
        return None
    if path == "-":
        return sys.stdout
    try:
        return stack.enter_context(open(path, "w", encoding="utf-8"))
    except OSError as exc:
        from onprem_label.cli import CliError

        raise CliError(f"cannot write the report {path}: {exc.strerror}") from None
