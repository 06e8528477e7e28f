"""Run every doctor check in order, each on its own; a check whose ground is missing says why it skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from onprem_label.audit.chain import make_chain
from onprem_label.audit.verify import verify_chain
from onprem_label.clock import utcnow
from onprem_label.config import RESTORE_MARKER, Settings, SettingsError
from onprem_label.db import make_engine, make_sessionmaker, migrate
from onprem_label.db.engine import read_connection, read_only
from onprem_label.health.findings import OK, PROBLEM, WARNING, Finding, skipped
from onprem_label.db.engine import sqlite_file
from onprem_label.health.permissions import check_permissions
from onprem_label.health.storage import check_storage
from onprem_label.health.system import check_clock, check_disk
from onprem_label.storage import open_keyring, open_store
from onprem_label.storage.keyring import read_state

# What a plain `doctor` authenticates: enough to notice a failing disk, cheap enough to run every
# few minutes from a monitoring system (each blob is read and decrypted in full).
DEFAULT_SAMPLE = 20
CHECKS = ("settings", "permissions", "key", "database", "storage", "audit", "clock", "disk")


@dataclass
class DoctorOptions:
    """How far the checks go: `sample` None authenticates every blob; `audit_full` walks every event."""

    sample: int | None = DEFAULT_SAMPLE
    repair: bool = False
    audit_full: bool = False


@dataclass
class DoctorReport:
    """Every finding in check order, the settings when they loaded, and what --repair removed."""

    findings: list[Finding] = field(default_factory=list)
    settings: Settings | None = None
    removed_temp: int = 0


def run_doctor(load: Callable[[], Settings], passphrase: Callable[[Settings], str | None],
               options: DoctorOptions | None = None, *, now: Callable[[], datetime] = utcnow) -> DoctorReport:
    """Run the checks of CHECKS. Nothing is written, except the temp files `options.repair` removes.

    `load` gives the settings (or raises SettingsError); `passphrase` the master key passphrase
    (None in file mode; it may raise, e.g. when there is no terminal to ask on).
    """
    options = options or DoctorOptions()
    report = DoctorReport()
    out = report.findings
    try:
        settings = load()
    except SettingsError as exc:
        out.append(Finding("settings", PROBLEM, str(exc)))
        out += [skipped(name, "the settings are invalid") for name in CHECKS[1:]]
        return report
    report.settings = settings
    from_file = sum(1 for s in settings.sources.values() if s not in ("default", "command line")
                    and not s.startswith("env "))
    from_env = sum(1 for s in settings.sources.values() if s.startswith("env "))
    out.append(Finding("settings", OK, f"valid ({from_file} from the config file, {from_env} from the environment)"))
    out += _guard("permissions", lambda: check_permissions(settings))
    keyring, key_findings = _open_key(settings, passphrase)
    out += key_findings
    engine, database_findings = _open_database(settings)
    out += database_findings
    try:
        why = "no master key" if keyring is None else None
        why = why or ("the database check failed" if engine is None else None)
        if why:
            out += [skipped(name, why) for name in ("storage", "audit")]
        else:
            out += _guard("storage", lambda: _storage(settings, keyring, engine, options, report))
            out += _guard("audit", lambda: _audit(settings, keyring, engine, options))
        if engine is None:
            out.append(skipped("clock", "the database check failed"))
        else:
            out += _guard("clock", lambda: _clock(engine, now()))
    finally:
        if engine is not None:
            engine.dispose()
    out += _guard("disk", lambda: check_disk(settings))
    return report


def _guard(check: str, run: Callable[[], list[Finding]]) -> list[Finding]:
    """The check's findings; an error it meets (a file it cannot read, a lost connection) as a problem."""
    try:
        return run()
    except OSError as exc:
        return [Finding(check, PROBLEM, f"could not run: {exc.strerror or exc} ({exc.filename or ''})".replace(" ()", ""))]
    except SQLAlchemyError as exc:
        return [Finding(check, PROBLEM, f"could not run: database error: {_first_line(exc)}")]
    except Exception as exc:  # noqa: BLE001 - a damaged row (say a timestamp no parser takes) is a finding too
        # Monitoring must read a problem (exit 2), not a traceback whose exit 1 says "warning".
        return [Finding(check, PROBLEM, f"could not run: {type(exc).__name__}: {exc}")]


def _first_line(exc: SQLAlchemyError) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


def _open_key(settings: Settings, passphrase) -> tuple[object | None, list[Finding]]:
    """(keyring or None, findings): the master key opens this data directory's keyring."""
    try:
        keyring = open_keyring(settings, passphrase=passphrase(settings))
    except Exception as exc:  # KeyFileError, or the CLI's "no terminal to ask for the passphrase"
        return None, [Finding("key", PROBLEM, str(exc))]
    where = settings.key_path if settings.key_source == "file" else "passphrase"
    findings = [Finding("key", OK, f"master key {keyring.current_id.hex()} ({where}) opens the keyring")]
    if (read_state(settings.data_path).get("rotation") or None) is not None:
        findings = [Finding("key", WARNING, f"a key rotation is under way (new blobs use {keyring.current_id.hex()}): "
                            "run 'onprem-label key rotate' to finish it")]
    return keyring, findings


def _open_database(settings: Settings) -> tuple[Engine | None, list[Finding]]:
    """(engine at head or None, findings): reachable, and at the code's migration head."""
    if (settings.data_path / RESTORE_MARKER).exists():
        return None, [Finding("database", PROBLEM, f"a restore into {settings.data_path} did not finish "
                              f"({RESTORE_MARKER} is there): remove the folder and restore again")]
    database = sqlite_file(settings.effective_database_url)
    if database is not None and not database.exists():
        # Opening it would create an empty database: doctor writes nothing.
        return None, [Finding("database", PROBLEM, f"no database at {database}; run 'onprem-label init' first")]
    try:
        engine = make_engine(settings.effective_database_url)
    except Exception as exc:  # noqa: BLE001 - a URL the driver refuses, a driver not installed
        return None, [Finding("database", PROBLEM, f"cannot open the database: {type(exc).__name__}: {exc}")]
    try:
        at_head, message = migrate.schema_status(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        return None, [Finding("database", PROBLEM, f"database unreachable: {_first_line(exc)}")]
    if not at_head:
        engine.dispose()
        return None, [Finding("database", PROBLEM, message)]
    return engine, [Finding("database", OK, message)]


def _storage(settings, keyring, engine, options: DoctorOptions, report: DoctorReport) -> list[Finding]:
    maker = make_sessionmaker(engine)
    with read_only(maker()) as db:
        result = check_storage(db, open_store(settings, keyring), sample=options.sample, repair=options.repair)
        db.rollback()
    report.removed_temp = result.removed_temp
    return result.findings(sampled=options.sample is not None)


def _audit(settings, keyring, engine, options: DoctorOptions) -> list[Finding]:
    # make_chain, not chain_for: the doctor forwards nothing to syslog, it only reads.
    chain = make_chain(keyring, settings.audit_checkpoint_path)
    with read_connection(engine, snapshot=True) as conn:
        result = verify_chain(conn, chain, since_checkpoint=not options.audit_full)
    notes = [Finding("audit", WARNING, w) for w in result.warnings if "were archived" not in w]
    if not result.ok:
        return [Finding("audit", PROBLEM, f"chain broken at event {result.problem.event_id or '-'}: "
                        f"{result.problem.kind}: {result.problem.message}; run 'onprem-label audit verify'")] + notes
    if options.audit_full or not result.checkpoints:
        walked = f"{result.events} events walked"
    else:
        walked = (f"{result.events} events after the newest checkpoint walked and the events the checkpoints "
                  "name checked ('--audit-full' walks every event)")
    return notes + [Finding("audit", OK, f"chain intact up to event {result.last_id}; {walked}; "
                            f"{result.checkpoints} checkpoints agree")]


def _clock(engine: Engine, now: datetime) -> list[Finding]:
    with read_connection(engine) as conn:
        return check_clock(conn, now)
