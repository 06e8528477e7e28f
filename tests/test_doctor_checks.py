"""`onprem-label doctor` on SQLite and PostgreSQL: each planted problem is reported, a clean install exits 0."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import inspect, text

from onprem_label.audit import AuditAction, record
from onprem_label.audit.archive import guard_lifted
from onprem_label.audit.chain import attach, audit_key, head
from onprem_label.audit.checkpoints import CheckpointLog
from onprem_label.audit.site import chain_for
from onprem_label.cli import cli
from onprem_label.clock import utcnow
from onprem_label.config import ENV_PREFIX, load_settings
from onprem_label.db import make_engine, make_sessionmaker, migrate
from onprem_label.db.engine import read_connection
from onprem_label.health import exit_code
from onprem_label.health.doctor import CHECKS
from onprem_label.health.findings import Finding
from onprem_label.health.permissions import check_permissions
from onprem_label.health.system import CLOCK_AHEAD_LIMIT, check_clock
from onprem_label.db.models import Blob
from onprem_label.storage import format as fmt
from onprem_label.storage import open_keyring, open_store

LINE_RE = re.compile(r"(ok|warning|problem|skipped) +([a-z]+) +(\S.*)")


@pytest.fixture(autouse=True)
def no_machine_env(monkeypatch):
    """The machine's own ONPREM_LABEL_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


class Site:
    """A data directory made by `onprem-label init`, and the environment pointing the CLI at it."""

    def __init__(self, data: Path, database_url: str):
        self.data, self.database_url = data, database_url
        self.env = {f"{ENV_PREFIX}DATABASE_URL": database_url} if database_url else {}

    def run(self, *args: str, env: dict | None = None) -> Result:
        """Invoke `onprem-label --data-dir DATA ARGS...`."""
        return CliRunner().invoke(cli, ["--data-dir", str(self.data), *args], env={**self.env, **(env or {})})

    def doctor(self, *args: str, env: dict | None = None) -> tuple[int, list[tuple[str, str, str]]]:
        """(exit code, [(check, severity, detail)]) of `doctor --json ARGS`, checked against the text output."""
        result = self.run("doctor", "--json", *args, env=env)
        assert result.stderr == "", result.stderr
        report = json.loads(result.stdout)
        found = [(f["check"], f["severity"], f["detail"]) for f in report["findings"]]
        assert report["exit_code"] == result.exit_code
        text_run = self.run("doctor", *args, env=env)
        assert text_run.exit_code == result.exit_code
        *lines, summary = text_run.stdout.splitlines()
        assert summary.startswith("doctor: ")
        parsed = []
        for line in lines:
            match = LINE_RE.fullmatch(line)
            assert match, line
            parsed.append((match.group(2), match.group(1), match.group(3)))
        # The clock's time and the free space move between the two runs; the rest must agree exactly.
        moving = ("clock", "disk")
        assert [(c, sev, d if c not in moving else "") for c, sev, d in parsed] == \
            [(c, sev, d if c not in moving else "") for c, sev, d in found]
        return result.exit_code, found

    @property
    def settings(self):
        """The settings the CLI sees."""
        return load_settings({"data_dir": str(self.data), "database_url": self.database_url}, env={})

    def engine(self):
        """A new engine on the site's database (dispose it)."""
        return make_engine(self.settings.effective_database_url)

    def record_event(self, when) -> None:
        """One audit event stamped `when`, sealed with the site's key."""
        engine = self.engine()
        try:
            maker = make_sessionmaker(engine)
            attach(maker, chain_for(self.settings, open_keyring(self.settings)))
            with maker() as db:
                record(db, AuditAction.SYSTEM_INIT, object_type="system", details={"test": True}, now=when)
                db.commit()
        finally:
            engine.dispose()

    def sql(self, *statements: str, lift_guard: bool = False) -> None:
        """Run statements on the database (with the audit tables' append-only guard lifted)."""
        engine = self.engine()
        try:
            with engine.begin() as conn:
                if lift_guard:
                    with guard_lifted(conn):
                        for statement in statements:
                            conn.execute(text(statement))
                else:
                    for statement in statements:
                        conn.execute(text(statement))
        finally:
            engine.dispose()

    def dump(self) -> dict[str, list]:
        """Every row of every table (as text), to prove the doctor changed nothing."""
        engine = self.engine()
        try:
            with read_connection(engine) as conn:
                tables = table_names(conn)
                return {t: sorted(map(repr, conn.execute(text(f'SELECT * FROM "{t}"')).all())) for t in tables}
        finally:
            engine.dispose()


def table_names(conn) -> list[str]:
    """The names of the tables in the database."""
    return sorted(inspect(conn).get_table_names())


def by_check(found, check: str) -> list[tuple[str, str]]:
    """(severity, detail) of one check's findings."""
    return [(sev, detail) for name, sev, detail in found if name == check]


def not_ok(found) -> list[tuple[str, str, str]]:
    """The findings that are neither ok nor skipped."""
    return [f for f in found if f[1] not in ("ok", "skipped")]


@pytest.fixture
def site(tmp_path, database_url) -> Site:
    """An initialised data directory (its database copied at head from the template)."""
    site = Site(tmp_path / "data", database_url)
    result = site.run("init")
    assert result.exit_code == 0, result.output
    return site


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under `root` with a digest of its content and its mode (SQLite's -shm index left out)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mode)
            for p in sorted(root.rglob("*")) if not p.name.endswith(("-shm", "-wal"))}


# --- a clean install --------------------------------------------------------------------------

def test_clean_install_passes_every_check(tmp_path, empty_database_url):
    """`init` on nothing, then `doctor`: one ok line per check, in order, exit 0 (text and JSON)."""
    site = Site(tmp_path / "data", empty_database_url)
    assert site.run("init").exit_code == 0
    code, found = site.doctor()
    assert code == 0, found
    assert [check for check, _sev, _d in found] == list(CHECKS)
    assert all(sev == "ok" for _c, sev, _d in found), found
    result = site.run("doctor")
    assert result.stdout.splitlines()[-1] == "doctor: every check ok"
    if not empty_database_url:  # init made the SQLite file itself: private from the start
        assert (site.data / "onprem-label.db").stat().st_mode & 0o777 == 0o600


def test_doctor_writes_nothing(site, tmp_path):
    """A doctor run, even one full of findings, changes no file and no row."""
    site.record_event(utcnow() + timedelta(days=1))  # clock problem
    (site.data / "blobs" / "tmp").mkdir(exist_ok=True)
    (site.data / "blobs" / "tmp" / "x.part").write_bytes(b"x")  # temp leftover (--repair would remove it)
    site.data.chmod(0o750)
    before, rows = tree(tmp_path), site.dump()
    code, _found = site.doctor("--storage", "--audit-full")
    assert code == 2
    assert tree(tmp_path) == before and site.dump() == rows
    site.data.chmod(0o700)


# --- each planted problem ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o750, 0o755, 0o701])
def test_data_directory_open_to_others(site, mode):
    """A data directory with any group or other permission is a problem naming the fix."""
    site.data.chmod(mode)
    try:
        code, found = site.doctor()
    finally:
        site.data.chmod(0o700)
    assert code == 2
    assert by_check(found, "permissions") == [
        ("problem", f"data directory {site.data} is open to others (mode {mode:o}); run 'chmod 700 {site.data}'")]


def test_key_file_open_to_others(site):
    """A key file readable by others: a permissions problem, and the key check refuses it too."""
    key = site.settings.key_path
    key.chmod(0o640)
    code, found = site.doctor()
    key.chmod(0o600)
    assert code == 2
    assert ("problem", f"master key file {key} is open to others (mode 640); run 'chmod 600 {key}'") in \
        by_check(found, "permissions")
    assert by_check(found, "key")[0][0] == "problem"
    assert by_check(found, "storage") == [("skipped", "skipped: no master key")]


def test_database_and_checkpoint_files_open_to_others_warn(site):
    """The database (SQLite) and checkpoint files sit in the 0700 directory: open to others is a warning."""
    checkpoints = site.settings.audit_checkpoint_path
    checkpoints.chmod(0o644)
    files = [checkpoints]
    if not site.database_url:
        files.append(site.data / "onprem-label.db")
        files[-1].chmod(0o644)
    code, found = site.doctor()
    assert code == 1, found
    assert sorted(by_check(found, "permissions")) == sorted(
        ("warning", f"{p} is open to others (mode 644); run 'chmod 600 {p}'") for p in files)


def test_config_link_is_judged_by_the_file_it_names(tmp_path):
    """install.sh's link from the data directory to /etc's 0640 config is fine; the file opened to others is not."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    etc = tmp_path / "etc" / "onprem-label.toml"
    etc.parent.mkdir()
    etc.write_text('database_url = "postgresql+psycopg://onprem:s3cret@db.example/onprem"\n')
    etc.chmod(0o640)
    (data / "onprem-label.toml").symlink_to(etc)
    assert [f.severity for f in check_permissions(load_settings({"data_dir": str(data)}, env={}))] == ["ok"]
    etc.chmod(0o644)
    found = check_permissions(load_settings({"data_dir": str(data)}, env={}))
    assert [(f.severity, str(etc.resolve()) in f.detail) for f in found] == [("problem", True)]


def test_config_file_with_database_password_open_to_others(tmp_path):
    """A config file holding the database password must be closed to others (its mode alone is fine otherwise)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    config = data / "onprem-label.toml"
    config.write_text('database_url = "postgresql+psycopg://onprem:s3cret@db.example/onprem"\n')
    config.chmod(0o644)
    found = check_permissions(load_settings({"data_dir": str(data)}, env={}))
    assert found == [Finding("permissions", "problem", f"config file {config} holds the database password and is "
                             f"open to others (mode 644); run 'chmod o-rwx,g-w {config.resolve()}'")]
    config.chmod(0o600)
    assert [f.severity for f in check_permissions(load_settings({"data_dir": str(data)}, env={}))] == ["ok"]
    config.write_text('port = 8443\n')
    config.chmod(0o644)
    assert [f.severity for f in check_permissions(load_settings({"data_dir": str(data)}, env={}))] == ["ok"]


def test_missing_key_is_reported_and_what_needs_it_skipped(site):
    """No key file: a key problem with the fix; storage and audit say they skipped; the rest still run."""
    key = site.settings.key_path
    key.rename(key.with_name("elsewhere"))
    code, found = site.doctor()
    assert code == 2
    assert by_check(found, "key") == [("problem", f"master key file {key} not found (run 'onprem-label init', "
                                                  "or set key_file to where the key is kept)")]
    assert by_check(found, "storage") == [("skipped", "skipped: no master key")]
    assert by_check(found, "audit") == [("skipped", "skipped: no master key")]
    assert [sev for _s, sev, _d in found if _s in ("settings", "database", "clock", "disk")] == ["ok"] * 4


def test_passphrase_key_without_a_passphrase_is_a_finding(site):
    """key_source = passphrase, no passphrase given and no terminal to ask on: a key problem, not a prompt or a crash."""
    code, found = site.doctor(env={f"{ENV_PREFIX}KEY_SOURCE": "passphrase"})
    assert code == 2
    assert by_check(found, "key") == [("problem", "key_source is 'passphrase': set ONPREM_LABEL_KEY_PASSPHRASE "
                                                  "(no terminal to ask on)")]
    assert by_check(found, "audit") == [("skipped", "skipped: no master key")]


def test_invalid_settings_are_reported_and_the_rest_skipped(site):
    """A bad value in the config file: a settings problem naming it; every other check says it skipped."""
    (site.data / "onprem-label.toml").write_text('port = "eighty"\n')
    code, found = site.doctor()
    assert code == 2
    assert found[0] == ("settings", "problem", f"setting 'port' from {site.data / 'onprem-label.toml'}: "
                                               "expected an integer (got 'eighty')")
    assert [(check, sev) for check, sev, _d in found[1:]] == [(c, "skipped") for c in CHECKS[1:]]


def test_database_behind_head_names_the_fix(site):
    """A database one revision behind: a problem naming `onprem-label db upgrade`; nothing is migrated."""
    engine = site.engine()
    migrate.downgrade(engine, "0006")
    engine.dispose()
    code, found = site.doctor()
    assert code == 2
    head = migrate.head_revision(site.engine())
    assert by_check(found, "database") == [
        ("problem", f"database is at revision 0006, not at head {head}; run 'onprem-label db upgrade'")]
    assert by_check(found, "audit") == [("skipped", "skipped: the database check failed")]
    engine = site.engine()
    assert migrate.current_revision(engine) == "0006"
    engine.dispose()


def test_missing_sqlite_database_is_not_created(tmp_path):
    """No database file: a problem saying to run init, and doctor does not create one."""
    site = Site(tmp_path / "data", "")
    assert site.run("init").exit_code == 0
    (site.data / "onprem-label.db").unlink()
    code, found = site.doctor()
    assert code == 2
    assert by_check(found, "database") == [
        ("problem", f"no database at {site.data / 'onprem-label.db'}; run 'onprem-label init' first")]
    assert not (site.data / "onprem-label.db").exists()


def test_corrupt_blob_found_by_plain_doctor(site):
    """A blob with a flipped byte is a storage problem even without --storage (the sample covers it here)."""
    settings = site.settings
    store = open_store(settings, open_keyring(settings))
    ref = store.put(io.BytesIO(os.urandom(4000)))
    engine = site.engine()
    with make_sessionmaker(engine)() as db:
        db.add(Blob(id=ref.blob_id, size=ref.size, created_at=utcnow()))
        db.commit()
    engine.dispose()
    assert site.doctor()[0] == 0
    path = store.path_of(ref.blob_id)
    raw = bytearray(path.read_bytes())
    raw[fmt.HEADER_BYTES + 10] ^= 0x01
    path.write_bytes(bytes(raw))
    code, found = site.doctor()
    assert code == 2
    assert by_check(found, "storage") == [
        ("problem", f"blob fails authentication: {ref.blob_id} (chunk 0 fails authentication)")]


def _last_event_id(site: Site) -> int:
    engine = site.engine()
    with read_connection(engine) as conn:
        last, _ = head(conn)
    engine.dispose()
    return last


def test_broken_audit_link_after_the_newest_checkpoint(site):
    """An event edited after the newest checkpoint breaks the chain there: an audit problem naming the event."""
    for _ in range(3):
        site.record_event(utcnow())
    last = _last_event_id(site)
    site.sql(f"UPDATE audit_events SET actor_name = 'mallory' WHERE id = {last}", lift_guard=True)
    code, found = site.doctor()
    assert code == 2
    (finding,) = by_check(found, "audit")
    assert finding[0] == "problem" and finding[1].startswith(f"chain broken at event {last}: edited: ")


def test_an_edit_before_the_newest_checkpoint_needs_audit_full(site):
    """The default walk starts at the newest checkpoint; --audit-full walks from the first event and finds an older edit."""
    for _ in range(2):
        site.record_event(utcnow())
    last = _last_event_id(site)
    # Write a checkpoint at the head now, then edit an event before it (not one a checkpoint names).
    settings = site.settings
    chain = chain_for(settings, open_keyring(settings))
    engine = site.engine()
    with read_connection(engine) as conn:
        count, digest = head(conn)
    engine.dispose()
    chain.checkpoints.write(count, digest)
    named = {c.count for c in chain.checkpoints.read()[0]}
    target = next(i for i in range(1, last + 1) if i not in named)
    site.sql(f"UPDATE audit_events SET actor_name = 'mallory' WHERE id = {target}", lift_guard=True)
    code, found = site.doctor()
    assert code == 0, found
    assert "after the newest checkpoint" in by_check(found, "audit")[0][1]
    code, found = site.doctor("--audit-full")
    assert code == 2
    assert by_check(found, "audit")[0][1].startswith(f"chain broken at event {target}: ")


def test_checkpoint_ahead_of_the_log_is_a_truncation(site):
    """A checkpoint (written with the audit key) that saw more events than the log holds: the tail was cut off."""
    settings = site.settings
    key = audit_key(open_keyring(settings))
    last = _last_event_id(site)
    CheckpointLog(settings.audit_checkpoint_path, key).write(last + 5, "ab" * 32)
    code, found = site.doctor()
    assert code == 2
    (finding,) = by_check(found, "audit")
    assert finding[0] == "problem"
    assert f"truncated: the log ends at event {last}" in finding[1]


def test_forged_checkpoint_line_is_reported(site):
    """A checkpoint line not written with the audit key: an audit problem, and a warning saying which line."""
    with open(site.settings.audit_checkpoint_path, "a") as f:
        f.write('{"count":1,"head":"' + "00" * 32 + '","at":"2026-01-01T00:00:00.000Z","mac":"' + "00" * 32 + '"}\n')
    code, found = site.doctor()
    assert code == 2
    audit = by_check(found, "audit")
    assert audit[0][0] == "problem" and "checkpoint" in audit[0][1]
    assert any(sev == "warning" and "does not match its HMAC" in d for sev, d in audit)


def test_no_checkpoint_file_is_a_warning(site):
    """Without checkpoints a cut-off tail could not be noticed: a warning (and the whole chain is walked)."""
    site.settings.audit_checkpoint_path.unlink()
    code, found = site.doctor()
    assert code == 1
    audit = by_check(found, "audit")
    assert audit[0][0] == "warning" and "no checkpoints were found" in audit[0][1]
    assert audit[1][0] == "ok"


def test_low_disk_space_by_threshold(site):
    """Free space below doctor_min_free_disk_mb is a disk warning (exit 1)."""
    env = {f"{ENV_PREFIX}DOCTOR_MIN_FREE_DISK_MB": str(1 << 30)}
    code, found = site.doctor(env=env)
    assert code == 1
    ((severity, detail),) = by_check(found, "disk")
    assert severity == "warning" and detail.endswith(f"below doctor_min_free_disk_mb = {1 << 30}")
    assert site.doctor(env={f"{ENV_PREFIX}DOCTOR_MIN_FREE_DISK_MB": "1"})[0] == 0


def test_clock_behind_the_newest_audit_event(site):
    """An audit event stamped a day ahead of now means the clock went back: a clock problem."""
    site.record_event(utcnow() + timedelta(days=1))
    code, found = site.doctor()
    assert code == 2
    ((severity, detail),) = by_check(found, "clock")
    assert severity == "problem" and "is behind the newest audit event" in detail and "by 24 h" in detail


def test_clock_core_far_ahead_and_database_server_skew(site, backend):
    """check_clock: years past the newest event is a warning; on PostgreSQL so is disagreeing with the server."""
    engine = site.engine()
    try:
        with read_connection(engine) as conn:
            now = utcnow()
            assert [f.severity for f in check_clock(conn, now)] == ["ok"]
            far = check_clock(conn, now + CLOCK_AHEAD_LIMIT + timedelta(days=1))
            assert far[0].severity == "warning" and "is it set far ahead?" in far[0].detail
            skewed = check_clock(conn, now + timedelta(minutes=10))
    finally:
        engine.dispose()
    if backend == "postgresql":
        assert [f.severity for f in skewed] == ["warning"]
        assert "differs from the database server's by 10 min" in skewed[0].detail
    else:
        assert [f.severity for f in skewed] == ["ok"]


def test_exit_codes_are_the_monitoring_convention():
    """0 for ok and skipped findings, 1 with a warning, 2 with a problem."""
    ok, skip = Finding("a", "ok", "x"), Finding("b", "skipped", "skipped: y")
    warn, prob = Finding("c", "warning", "z"), Finding("d", "problem", "w")
    assert exit_code([ok, skip]) == 0 and exit_code([ok, warn]) == 1 and exit_code([warn, prob, ok]) == 2
    assert exit_code([]) == 0
    with pytest.raises(ValueError):
        Finding("e", "fine", "?")


def test_a_check_that_meets_an_unexpected_error_is_a_problem_not_a_traceback():
    """Any error inside a check (a damaged row no parser takes, say) becomes a problem finding, exit 2."""
    from onprem_label.health.doctor import _guard
    from onprem_label.health.findings import PROBLEM

    def broken():
        raise ValueError("Invalid isoformat string: 'garbage'")

    assert _guard("audit", broken) == [Finding("audit", PROBLEM, "could not run: ValueError: Invalid "
                                               "isoformat string: 'garbage'")]
