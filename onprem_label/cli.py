"""The `onprem-label` command: init, serve, db, user, token, config."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from contextlib import contextmanager

import click
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from onprem_label import __version__
from onprem_label.audit import AuditAction, chain, record
from onprem_label.audit.site import chain_for
from onprem_label.auth import accounts
from onprem_label.auth.errors import AuthError
from onprem_label.clock import utcnow
from onprem_label.config import RESTORE_MARKER, Settings, SettingsError, load_settings
from onprem_label.db import make_engine, make_sessionmaker, migrate
from onprem_label.db.engine import sqlite_file
from onprem_label.logs import LogFileInUse, configure_logging, log_file_path
from onprem_label.storage import PASSPHRASE_ENV, init_keyring, open_keyring, open_store
from onprem_label.storage.keys import KeyFileError

DB_FILE_NAME = "onprem-label.db"


class CliError(Exception):
    """An operator-facing error: printed as one line, exit status 1."""


class Group(click.Group):
    """Click group that turns every known error into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (CliError, SettingsError, KeyFileError, AuthError) as exc:
            _fail(str(exc))
        except OperationalError as exc:
            _fail(f"database unreachable: {str(exc.orig).strip().splitlines()[0]}")
        except SQLAlchemyError as exc:
            _fail(f"database error: {str(exc).strip().splitlines()[0]}")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def settings_from(ctx: click.Context, **explicit) -> Settings:
    """Settings with the group's --data-dir and a command's own flags as explicit values."""
    return load_settings({"data_dir": ctx.obj.get("data_dir"), **explicit})


def ask_passphrase(settings: Settings, *, confirm: bool = False) -> str | None:
    """The master key passphrase, from the environment or asked on a terminal; None in file mode."""
    if settings.key_source != "passphrase":
        return None
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise CliError(f"key_source is 'passphrase': set {PASSPHRASE_ENV} (no terminal to ask on)")
    return click.prompt("Master key passphrase", hide_input=True, confirmation_prompt=confirm)


def start_logging(settings: Settings, command: str) -> None:
    """The application log of a long-running command, as the log_* settings say (see logs.py)."""
    try:
        configure_logging(settings, command)
    except LogFileInUse as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write the log file {log_file_path(settings, command)}: "
                       f"{exc.strerror or exc}") from None


def refuse_unfinished_restore(settings: Settings) -> None:
    """CliError when a restore into the data directory was cut off (its marker is still there)."""
    if (settings.data_path / RESTORE_MARKER).exists():
        raise CliError(f"a restore into {settings.data_path} did not finish ({RESTORE_MARKER} is there): "
                       "remove the folder (and, for PostgreSQL, empty its database) and restore again")


def open_database(settings: Settings, *, require_head: bool = True):
    """(engine, sessionmaker), refusing a database that is missing or not at head."""
    refuse_unfinished_restore(settings)
    database_file = sqlite_file(settings.effective_database_url)
    if database_file is not None and not database_file.exists():
        # Opening it would create an empty database there (and a command would then act on it).
        where = f"in {settings.data_path}" if not settings.database_url else f"at {database_file}"
        raise CliError(f"no database {where}; run 'onprem-label init' first")
    engine = make_engine(settings.effective_database_url)
    if require_head:
        at_head, message = migrate.schema_status(engine)
        if not at_head:
            engine.dispose()
            raise CliError(message)
    maker = make_sessionmaker(engine)
    # The keyring is opened only if the command writes an audit event (see audit.chain).
    chain.attach(maker, chain.LazyAuditChain(lambda: chain_for(settings, open_keyring(
        settings, passphrase=ask_passphrase(settings)))))
    return engine, maker


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Data directory (default ./onprem-data, or ONPREM_LABEL_DATA_DIR).")
@click.version_option(__version__, prog_name="onprem-label")
@click.pass_context
def cli(ctx: click.Context, data_dir: str | None) -> None:
    """On-premise labeling server with full inspection and an audit trail."""
    ctx.ensure_object(dict)
    ctx.obj["data_dir"] = data_dir


@cli.command()
@click.option("--admin", "admin_name", default="admin", show_default=True,
              help="Username of the first admin.")
@click.option("--demo/--no-demo", default=False, help="Also create a demo project.")
@click.pass_context
def init(ctx: click.Context, admin_name: str, demo: bool) -> None:
    """Create the data directory, the master key, the database and the first admin (once)."""
    settings = settings_from(ctx)
    data = settings.data_path
    keyring, notes = init_keyring(settings, passphrase=ask_passphrase(settings, confirm=True))
    for note in notes:
        click.echo(note)
    open_store(settings, keyring).root.mkdir(mode=0o700, exist_ok=True)
    _create_private_sqlite_file(settings)
    engine = make_engine(settings.effective_database_url)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine, audit_seal=chain.legacy_sealer(chain.audit_key(keyring)))
        if before != migrate.head_revision(engine):
            click.echo(f"database ready ({settings.masked()['database_url'] or data / DB_FILE_NAME})")
        maker = make_sessionmaker(engine)
        chain.attach(maker, chain_for(settings, keyring))
        with maker() as db:
            if accounts.count_users(db):
                click.echo(f"data directory {data} already initialised; nothing else to do")
                return
            now = utcnow()
            password = accounts.generate_password()
            accounts.create_user(db, admin_name, password, ["admin"], display_name="Administrator",
                                 must_change_password=True, now=now)
            record(db, AuditAction.SYSTEM_INIT, object_type="system",
                   details={"data_dir": str(data), "version": __version__}, now=now)
            project = None
            if demo:
                from onprem_label.demo import create_demo_project
                project = create_demo_project(db, now=now)
            db.commit()
            if project is not None:
                from onprem_label.demo import add_demo_images
                from onprem_label.imaging.prepare import prepare_options

                results = add_demo_images(db, open_store(settings, keyring), prepare_options(settings, keyring),
                                          project, now=now)
                click.echo(f"demo project with {sum(r.status == 'imported' for r in results)} synthetic images")
        click.echo(f"admin username: {admin_name}")
        click.echo(f"admin one-time password: {password}")
        click.echo("(it must be changed at first login)")
    finally:
        engine.dispose()


def _create_private_sqlite_file(settings: Settings) -> None:
    """Make a new SQLite database file with mode 0600 (SQLite's own would follow the umask, 0644).

    Its -wal and -shm files take the database file's mode, so they are private too.
    """
    path = sqlite_file(settings.effective_database_url)
    if path is not None and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _raise_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    """Raise CliError when host:port cannot be bound.

    Checked before waitress starts its worker threads: when waitress itself fails to bind, it
    leaves those threads and its sockets behind.
    """
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, socktype, proto, _name, address in addresses:
        try:
            with socket.socket(family, socktype, proto) as probe:
                # The same options waitress sets, so the probe fails exactly when waitress would.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CliError(f"port {port} on {host} is already in use") from None
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


@cli.command()
@click.option("--host", default=None, help="Address to bind. Default 127.0.0.1: only this machine "
              "can connect until a TLS reverse proxy is configured (trusted_proxy), because the "
              "server itself speaks plain HTTP and passwords must not cross the network in clear.")
@click.option("--port", type=int, default=None, help="TCP port (default 8080).")
@click.option("--threads", type=int, default=None, help="Worker threads (default 8).")
@click.option("--insecure-http", is_flag=True,
              help="Allow a non-loopback address without a TLS proxy (testing only; prints a warning).")
@click.pass_context
def serve(ctx: click.Context, host, port, threads, insecure_http: bool) -> None:
    """Run the web server (waitress)."""
    settings = settings_from(ctx, host=host, port=port, threads=threads)
    start_logging(settings, "serve")
    refuse_unfinished_restore(settings)  # before the key: a cut-off restore may have copied no keyring yet
    keyring = open_keyring(settings, passphrase=ask_passphrase(settings))
    if not _is_loopback(settings.host):
        if settings.trusted_proxy and _is_loopback(settings.trusted_proxy) and not insecure_http:
            raise CliError(f"refusing to listen on {settings.host}: the TLS proxy "
                           f"({settings.trusted_proxy}) is on this machine, so keep host on "
                           "loopback; other machines must come through the proxy")
        if not settings.trusted_proxy and not insecure_http:
            raise CliError(f"refusing to listen on {settings.host} without TLS: set trusted_proxy "
                           "to your TLS reverse proxy, or pass --insecure-http for a test")
        if insecure_http and not settings.trusted_proxy:
            click.echo(f"WARNING: serving plain HTTP on {settings.host}; passwords and images "
                       "cross the network unencrypted", err=True)
    engine, _ = open_database(settings)
    engine.dispose()
    _check_port_free(settings.host, settings.port)

    import waitress

    from onprem_label.app import create_app

    app = create_app(settings, keyring=keyring)
    from onprem_label.web.uploads import remove_stale_staging

    remove_stale_staging(settings.data_path)  # uploads a crashed process left half-way (sealed)
    proxy = {}
    if settings.trusted_proxy:
        proxy = {"trusted_proxy": settings.trusted_proxy, "trusted_proxy_count": 1,
                 "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-proto",
                                           "x-forwarded-host", "x-forwarded-port"},
                 "clear_untrusted_proxy_headers": True}
    try:
        server = waitress.create_server(app, host=settings.host, port=settings.port,
                                        threads=settings.threads, ident="onprem-label", **proxy)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CliError(f"port {settings.port} on {settings.host} is already in use") from None
        raise CliError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    click.echo(f"onprem-label {__version__} serving on http://{shown}:{server.effective_port}/ "
               f"(data {settings.data_path}); Ctrl+C stops", err=False)
    sys.stdout.flush()
    log = logging.getLogger("onprem_label.serve")
    log.info("onprem-label %s serving on %s:%s with %d threads", __version__, settings.host,
             server.effective_port, settings.threads)
    # systemd stops services with SIGTERM: leave the loop the same way Ctrl+C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        log.info("stopped")


@cli.group()
def db() -> None:
    """Database schema: upgrade, current revision, check."""


@contextmanager
def _any_revision_engine(ctx: click.Context):
    """An engine on the configured database, whatever its revision; disposed afterwards."""
    engine, _ = open_database(settings_from(ctx.parent), require_head=False)
    try:
        yield engine
    finally:
        engine.dispose()


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply every pending migration."""
    settings = settings_from(ctx.parent)
    with _any_revision_engine(ctx) as engine:
        before = migrate.current_revision(engine)
        if before is not None and not migrate.known_revision(engine, before):
            raise CliError(migrate.schema_status(engine)[1])  # newer than this code: nothing to apply
        # The key seals audit events written before the chain existed (revision 0005).
        keyring = open_keyring(settings, passphrase=ask_passphrase(settings))
        migrate.upgrade(engine, audit_seal=chain.legacy_sealer(chain.audit_key(keyring)))
        click.echo(f"database upgraded from {before or 'empty'} to {migrate.current_revision(engine)}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the database's revision and the code's head."""
    with _any_revision_engine(ctx) as engine:
        click.echo(f"current: {migrate.current_revision(engine) or 'empty'}")
        click.echo(f"head: {migrate.head_revision(engine)}")


@db.command("check")
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Exit 0 when the database is at head, 1 (naming the fix) when not."""
    with _any_revision_engine(ctx) as engine:
        at_head, message = migrate.schema_status(engine)
    if not at_head:
        raise CliError(message)
    click.echo(message)


from onprem_label.cli_accounts import config_group, token_group, user_group  # noqa: E402
from onprem_label.cli_audit import audit_group  # noqa: E402
from onprem_label.cli_backup import backup_group, restore  # noqa: E402
from onprem_label.cli_dicom import dicom_listen  # noqa: E402
from onprem_label.cli_exchange import export_command, import_command  # noqa: E402
from onprem_label.cli_ingest import ingest, project_group  # noqa: E402
from onprem_label.cli_storage import doctor, key_group  # noqa: E402

cli.add_command(key_group)
cli.add_command(doctor)
cli.add_command(user_group)
cli.add_command(token_group)
cli.add_command(config_group)
cli.add_command(project_group)
cli.add_command(ingest)
cli.add_command(audit_group)
cli.add_command(export_command)
cli.add_command(import_command)
cli.add_command(dicom_listen)
cli.add_command(backup_group)
cli.add_command(restore)


def main() -> None:
    """Console-script entry point: usage mistakes, like every other error, are one line."""
    try:
        result = cli.main(prog_name="onprem-label", standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"error: {exc.format_message()} (see 'onprem-label --help')", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        _fail(exc.format_message())
    except click.Abort:
        _fail("aborted")
    sys.exit(result if isinstance(result, int) else 0)
