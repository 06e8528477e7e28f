"""The `onprem-label` command through click's CliRunner, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, inspect, select, text

from onprem_label.app import create_app
from onprem_label.auth import break_glass, passwords, sessions
from onprem_label.cli import cli
from onprem_label.clock import utcnow
from onprem_label.config import CONFIG_FILE_NAME, ENV_PREFIX, load_settings
from onprem_label.audit.chain import LazyAuditChain, attach
from onprem_label.audit.site import chain_for
from onprem_label.db import make_engine, make_sessionmaker, migrate
from onprem_label.db.models import Item, ApiToken, AuditEvent, LoginSession, Project, User
from onprem_label.storage import init_keyring, open_keyring
from onprem_label.storage.keys import create_key_file

PW = "a perfectly fine passphrase"
TOKEN_RE = re.compile(r"^olt_[A-Za-z0-9_-]{43}$")
UPGRADE = "onprem-label db upgrade"
HEAD = migrate.head_revision(make_engine("sqlite://"))  # the code's head; needs no database


@pytest.fixture(autouse=True)
def no_machine_env(monkeypatch):
    """The machine's own ONPREM_LABEL_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def never_serve(monkeypatch):
    """If `serve` ever got as far as a listening server, fail instead of blocking the suite."""
    import waitress

    real = waitress.create_server

    def create_server(*args, **kwargs):
        server = real(*args, **kwargs)
        server.close()
        raise AssertionError(f"serve bound {kwargs.get('host')}:{kwargs.get('port')} and would run")

    monkeypatch.setattr(waitress, "create_server", create_server)


@dataclass
class Site:
    """A data directory and the environment that points the CLI at its database."""

    data: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
        """Invoke `onprem-label --data-dir DATA ARGS...`."""
        return CliRunner().invoke(cli, ["--data-dir", str(self.data), *args],
                                  env={**self.env, **(env or {})}, input=input)

    @property
    def settings(self):
        """The settings the CLI sees."""
        return load_settings({"data_dir": str(self.data)}, env=self.env)

    @property
    def key_path(self) -> Path:
        """Where the master key belongs."""
        return self.settings.key_path

    def engine(self):
        """An engine on the site's database (dispose it); works even when the config is broken."""
        url = self.env.get("ONPREM_LABEL_DATABASE_URL") or f"sqlite:///{self.data / 'onprem-label.db'}"
        return make_engine(url)

    def query(self, fn):
        """Run fn(session) on the site's database and return its result."""
        engine = self.engine()
        try:
            maker = make_sessionmaker(engine)
            attach(maker, LazyAuditChain(lambda: chain_for(self.settings, open_keyring(self.settings))))
            with maker() as db:
                result = fn(db)
                db.commit()
                return result
        finally:
            engine.dispose()

    def revision(self):
        """The database's Alembic revision (None when empty)."""
        engine = self.engine()
        try:
            return migrate.current_revision(engine)
        finally:
            engine.dispose()

    def tables(self) -> set[str]:
        """Tables in the database."""
        engine = self.engine()
        try:
            return set(inspect(engine).get_table_names())
        finally:
            engine.dispose()


@pytest.fixture
def keyless_site(tmp_path, database_url) -> Site:
    """A data directory whose database is at head, with no users and no key yet."""
    return Site(tmp_path / "data", {"ONPREM_LABEL_DATABASE_URL": database_url} if database_url else {})


@pytest.fixture
def site(keyless_site) -> Site:
    """`keyless_site` with its master key and keyring in place (every command that writes an
    audit event needs the key that seals it; `serve` needs it besides the database)."""
    keyless_site.data.mkdir(mode=0o700, exist_ok=True)
    init_keyring(keyless_site.settings)
    return keyless_site


@pytest.fixture
def keyed_site(site) -> Site:
    """The same as `site` (kept for the tests that say they need the key)."""
    return site


@pytest.fixture
def fresh(tmp_path, empty_database_url) -> Site:
    """A data directory that does not exist yet, and an empty database (SQLite: none at all)."""
    env = {"ONPREM_LABEL_DATABASE_URL": empty_database_url} if empty_database_url else {}
    return Site(tmp_path / "site" / "data", env)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a digest of its content: compare before/after for 'no writes'."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit status 1, nothing on stdout, one line on stderr containing every fragment."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def make_cli_user(site: Site, name: str, *roles: str) -> None:
    """Create a user through the CLI."""
    args = ["user", "create", name, "--password", PW]
    for role in roles or ("labeler",):
        args += ["--role", role]
    result = site.run(*args)
    assert result.exit_code == 0, result.output


def get_user(site: Site, name: str) -> User:
    """The user row (detached)."""
    return site.query(lambda db: db.scalar(select(User).where(User.username == name)))


def audit_actions(site: Site) -> list[str]:
    """Audit actions in order."""
    return site.query(lambda db: list(db.scalars(select(AuditEvent.action).order_by(AuditEvent.id))))


# --- init ------------------------------------------------------------------------------------

def _one_time_password(output: str) -> str:
    match = re.search(r"^admin one-time password: (\S+)$", output, re.M)
    assert match, output
    return match.group(1)


def test_init_creates_key_data_dir_database_and_admin(fresh):
    """init makes a 0600 key beside a 0700 data dir, a DB at head and an admin with a one-time password."""
    result = fresh.run("init")
    assert result.exit_code == 0, result.output
    data = fresh.data
    key = data.with_name("data.key")
    assert fresh.key_path == key and key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert fresh.revision() == HEAD
    assert "admin username: admin" in result.stdout
    password = _one_time_password(result.stdout)
    admin = get_user(fresh, "admin")
    assert admin.role_set == {"admin"} and admin.must_change_password and admin.active
    assert passwords.verify_password(password, admin.password_hash)
    assert fresh.query(lambda db: db.scalar(select(func.count(Project.id)))) == 0
    assert audit_actions(fresh).count("system:init") == 1


def test_init_twice_initialises_nothing_twice(fresh):
    """A second init keeps the key, the admin and the database, and prints no password."""
    assert fresh.run("init").exit_code == 0
    key = fresh.key_path.read_bytes()
    admin_hash = get_user(fresh, "admin").password_hash
    second = fresh.run("init")
    assert second.exit_code == 0, second.output
    assert "password" not in second.output.lower()
    assert "already initialised" in second.stdout
    assert fresh.key_path.read_bytes() == key
    assert fresh.query(lambda db: db.scalar(select(func.count(User.id)))) == 1
    assert get_user(fresh, "admin").password_hash == admin_hash
    assert audit_actions(fresh).count("system:init") == 1


def test_init_demo_creates_the_demo_project(fresh):
    """init --demo adds the demo project with a schema and 4 de-identified synthetic images."""
    result = fresh.run("init", "--demo", "--admin", "boss")
    assert result.exit_code == 0, result.output
    assert "admin username: boss" in result.stdout
    assert "demo project with 4 synthetic images" in result.stdout
    projects = fresh.query(lambda db: list(db.scalars(select(Project))))
    assert len(projects) == 1 and projects[0].name.startswith("Demo")
    assert projects[0].label_schema["classes"]
    items = fresh.query(lambda db: list(db.scalars(select(Item))))
    assert [(i.kind, i.width, i.height, i.project_id) for i in items] == [("dicom", 256, 256, projects[0].id)] * 4
    assert audit_actions(fresh).count("item:ingest") == 4


def test_init_bad_env_value_writes_nothing(fresh, tmp_path):
    """A bad env value stops init with one line naming it; no data dir, key or schema appears."""
    before = snapshot(tmp_path)
    result = fresh.run("init", env={"ONPREM_LABEL_SESSION_IDLE_MINUTES": "soon"})
    assert_one_line_error(result, "'session_idle_minutes'", "env ONPREM_LABEL_SESSION_IDLE_MINUTES",
                          "expected an integer")
    assert snapshot(tmp_path) == before and not fresh.data.exists()
    if fresh.env:
        assert fresh.tables() == set()


def test_init_bad_config_file_value_writes_nothing(fresh, tmp_path):
    """A bad value in <data_dir>/onprem-label.toml stops init; no key or database file appears."""
    fresh.data.mkdir(parents=True)
    (fresh.data / CONFIG_FILE_NAME).write_text('threads = "many"\n')
    before = snapshot(tmp_path)
    result = fresh.run("init")
    assert_one_line_error(result, "'threads'", str(fresh.data / CONFIG_FILE_NAME), "expected an integer")
    assert snapshot(tmp_path) == before
    assert not fresh.data.with_name("data.key").exists()
    if fresh.env:
        assert fresh.tables() == set()


def test_init_unknown_key_in_config_file_is_refused(fresh, tmp_path):
    """A misspelt setting in the config file stops init with one line naming it."""
    fresh.data.mkdir(parents=True)
    (fresh.data / CONFIG_FILE_NAME).write_text("prot = 8081\n")
    before = snapshot(tmp_path)
    assert_one_line_error(fresh.run("init"), "'prot'", "unknown setting")
    assert snapshot(tmp_path) == before


def test_init_refuses_a_broken_key_file(fresh, tmp_path):
    """An existing key file that is not a key stops init before anything is written."""
    fresh.key_path.parent.mkdir(parents=True)
    fresh.key_path.write_bytes(b"short")
    fresh.key_path.chmod(0o600)
    before = snapshot(tmp_path)
    assert_one_line_error(fresh.run("init"), str(fresh.key_path), "expected 32")
    assert snapshot(tmp_path) == before and not fresh.data.exists()


# --- user ------------------------------------------------------------------------------------

def _users_json(site: Site) -> dict[str, dict]:
    result = site.run("user", "list", "--json")
    assert result.exit_code == 0, result.output
    return {row["username"]: row for row in json.loads(result.stdout)}


def test_user_create_and_list(site):
    """user create stores the roles; user list shows them, in text and JSON."""
    result = site.run("user", "create", "Alice", "--role", "reviewer", "--role", "labeler",
                      "--password", PW, "--display-name", "Dr Alice")
    assert result.exit_code == 0, result.output
    assert "created user alice (labeler reviewer)" in result.stdout
    user = get_user(site, "alice")
    assert user.display_name == "Dr Alice" and user.must_change_password
    assert passwords.verify_password(PW, user.password_hash)
    assert _users_json(site) == {"alice": {"username": "alice", "roles": ["labeler", "reviewer"],
                                           "active": True, "locked": False, "totp": False}}
    text_out = site.run("user", "list").stdout.split()
    assert text_out == ["alice", "labeler", "reviewer", "active"]
    assert "user:create" in audit_actions(site)


def test_user_create_script_account_without_password_change(site):
    """--no-must-change makes an account whose API tokens work without a first browser login."""
    result = site.run("user", "create", "robot", "--role", "labeler", "--password", PW,
                      "--no-must-change")
    assert result.exit_code == 0, result.output
    assert get_user(site, "robot").must_change_password is False


def test_user_create_prompts_for_the_password(site):
    """Without --password the password is asked for twice, hidden."""
    result = site.run("user", "create", "bob", "--role", "labeler", input=f"{PW}\n{PW}\n")
    assert result.exit_code == 0, result.output
    assert PW not in result.output
    assert passwords.verify_password(PW, get_user(site, "bob").password_hash)


@pytest.mark.parametrize("args, fragments", [
    (["carol", "--role", "labeler", "--password", "too short"], ["at least 12 characters"]),
    (["carol", "--role", "labeler", "--password", "password1234"], ["common passwords"]),
    (["carol", "--role", "labeler", "--password", "hello-carol-123"], ["username"]),
    (["no spaces allowed", "--role", "labeler", "--password", PW], ["username must be"]),
])
def test_user_create_refusals(site, args, fragments):
    """A refused account is one line naming the rule, and no user or audit row is written."""
    assert_one_line_error(site.run("user", "create", *args), *fragments)
    assert _users_json(site) == {}
    assert audit_actions(site) == []


def test_user_create_duplicate_is_refused(site):
    """A second account with the same name (any case) is refused."""
    make_cli_user(site, "dave")
    assert_one_line_error(site.run("user", "create", "DAVE", "--role", "admin", "--password", PW),
                          "'dave' already exists")
    assert get_user(site, "dave").role_set == {"labeler"}


def _start_sessions(site: Site, name: str, count: int) -> None:
    def start(db):
        user = db.scalar(select(User).where(User.username == name))
        for _ in range(count):
            sessions.start_session(db, user, policy=sessions.SessionPolicy(), now=utcnow())
    site.query(start)


def _session_count(site: Site, name: str) -> int:
    user = get_user(site, name)
    return site.query(lambda db: db.scalar(select(func.count(LoginSession.id))
                                           .where(LoginSession.user_id == user.id)))


def test_user_disable_and_enable(site):
    """disable marks the user inactive and ends their sessions; enable reverses it."""
    make_cli_user(site, "erin")
    _start_sessions(site, "erin", 2)
    result = site.run("user", "disable", "erin")
    assert result.exit_code == 0, result.output
    assert _users_json(site)["erin"]["active"] is False
    assert _session_count(site, "erin") == 0
    assert "disabled" in site.run("user", "list").stdout
    assert site.run("user", "enable", "erin").exit_code == 0
    assert _users_json(site)["erin"]["active"] is True


def test_user_disable_refuses_the_last_admin(site):
    """The last active admin cannot be disabled from the console either."""
    make_cli_user(site, "root", "admin")
    assert_one_line_error(site.run("user", "disable", "root"), "last active admin")
    assert get_user(site, "root").active


def test_user_unlock(site):
    """unlock lifts a lockout and clears the failure count."""
    make_cli_user(site, "frank")

    def lock(db):
        user = db.scalar(select(User).where(User.username == "frank"))
        user.locked_until, user.failed_logins = utcnow() + timedelta(minutes=10), 3
    site.query(lock)
    assert _users_json(site)["frank"]["locked"] is True
    assert "locked" in site.run("user", "list").stdout
    result = site.run("user", "unlock", "frank")
    assert result.exit_code == 0 and "unlocked frank" in result.stdout
    user = get_user(site, "frank")
    assert user.locked_until is None and user.failed_logins == 0
    assert _users_json(site)["frank"]["locked"] is False


def test_user_reset_password(site):
    """reset-password prints a working one-time password, retires the old one and ends sessions."""
    make_cli_user(site, "gina")
    _start_sessions(site, "gina", 1)
    result = site.run("user", "reset-password", "gina")
    assert result.exit_code == 0, result.output
    match = re.fullmatch(r"one-time password for gina: (\S+)\n", result.stdout)
    assert match, result.stdout
    user = get_user(site, "gina")
    assert passwords.verify_password(match.group(1), user.password_hash)
    assert not passwords.verify_password(PW, user.password_hash)
    assert user.must_change_password
    assert _session_count(site, "gina") == 0


def test_user_end_sessions(site):
    """end-sessions deletes every session row of the user and says how many."""
    make_cli_user(site, "hank")
    make_cli_user(site, "ivy")
    _start_sessions(site, "hank", 2)
    _start_sessions(site, "ivy", 1)
    result = site.run("user", "end-sessions", "hank")
    assert result.exit_code == 0 and "ended 2 sessions and revoked 0 API tokens of hank" in result.stdout
    assert _session_count(site, "hank") == 0 and _session_count(site, "ivy") == 1


def test_user_break_glass_for_an_admin(site):
    """break-glass prints a one-use code that redeems once for an admin."""
    make_cli_user(site, "root", "admin")
    result = site.run("user", "break-glass", "root")
    assert result.exit_code == 0, result.output
    code = result.stdout.strip().rsplit(": ", 1)[1]
    user = get_user(site, "root")
    assert user.break_glass_hash and code not in user.break_glass_hash

    def redeem_twice(db):
        root = db.scalar(select(User).where(User.username == "root"))
        return (break_glass.redeem_code(db, root, code, now=utcnow()),
                break_glass.redeem_code(db, root, code, now=utcnow()))
    assert site.query(redeem_twice) == (True, False)
    assert get_user(site, "root").break_glass_hash is None


def test_user_break_glass_refused_for_non_admin(site):
    """break-glass for a non-admin is refused and leaves no code behind."""
    make_cli_user(site, "jack")
    assert_one_line_error(site.run("user", "break-glass", "jack"), "only for admins")
    assert get_user(site, "jack").break_glass_hash is None


@pytest.mark.parametrize("command, action", [
    ("disable", "user:disable"), ("enable", "user:enable"), ("unlock", "user:unlock"),
    ("reset-password", "user:password_reset"), ("end-sessions", "user:sessions_end"),
    ("break-glass", "auth:break_glass_issued"),
])
def test_user_commands_are_audited(site, command, action):
    """Each account change made at the console writes its audit event."""
    make_cli_user(site, "root", "admin")
    make_cli_user(site, "kim", "admin")
    assert site.run("user", command, "kim").exit_code == 0
    events = site.query(lambda db: list(db.scalars(select(AuditEvent).order_by(AuditEvent.id))))
    assert events[-1].action == action
    assert events[-1].client_addr == "console"
    assert events[-1].object_id == str(get_user(site, "kim").id)


@pytest.mark.parametrize("command", ["disable", "enable", "unlock", "reset-password", "end-sessions",
                                     "break-glass"])
def test_user_commands_on_unknown_user(site, command):
    """Naming a user who does not exist is one line, exit 1, nothing written."""
    assert_one_line_error(site.run("user", command, "ghost"), "no user named 'ghost'")
    assert audit_actions(site) == []


# --- tokens ----------------------------------------------------------------------------------

def test_token_create_works_as_bearer_and_revoke_stops_it(keyed_site):
    """The token, alone on the last line, works as a bearer on an app over the same data dir until revoked."""
    site = keyed_site
    make_cli_user(site, "script", "manager")
    result = site.run("token", "create", "script", "--name", "nightly export")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    token = lines[-1]
    assert TOKEN_RE.match(token), lines
    assert token not in "\n".join(lines[:-1])
    row = site.query(lambda db: db.scalar(select(ApiToken)))
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest() and token not in row.token_hash
    assert row.name == "nightly export"

    def password_changed(db):  # as if the user had replaced the one-time password
        db.scalar(select(User).where(User.username == "script")).must_change_password = False
    site.query(password_changed)

    app = create_app(site.settings)  # reads the key file, as `serve` does
    try:
        client = app.test_client()
        auth = {"Authorization": f"Bearer {token}"}
        me = client.get("/api/v1/me", headers=auth)
        assert me.status_code == 200, me.get_data(as_text=True)
        assert me.get_json()["username"] == "script"
        listed = site.run("token", "list", "script")
        assert listed.exit_code == 0
        assert re.search(rf"^\s*{row.id} script\s+nightly export\s+live\s+last used 20", listed.stdout, re.M)

        revoked = site.run("token", "revoke", str(row.id))
        assert revoked.exit_code == 0 and f"revoked token {row.id}" in revoked.stdout
        assert client.get("/api/v1/me", headers=auth).status_code == 401
        assert "revoked" in site.run("token", "list").stdout
    finally:
        app.extensions["onprem_label"].engine.dispose()
    assert audit_actions(site)[-1] == "token:revoke" and "token:create" in audit_actions(site)


def test_token_list_all_users(site):
    """token list without a name shows every user's tokens, newest first."""
    make_cli_user(site, "lee")
    make_cli_user(site, "mo")
    assert site.run("token", "create", "lee").exit_code == 0
    assert site.run("token", "create", "mo", "--name", "backup").exit_code == 0
    lines = site.run("token", "list").stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[1:4] == ["mo", "backup", "live"] and lines[0].endswith("never")
    assert lines[1].split()[1:4] == ["lee", "cli", "live"]


def test_token_errors(site):
    """Unknown user, unknown or already revoked token: one line, exit 1, nothing written."""
    assert_one_line_error(site.run("token", "create", "nobody"), "no user named 'nobody'")
    assert_one_line_error(site.run("token", "revoke", "999"), "no live token with id 999")
    make_cli_user(site, "nina")
    token_id = site.run("token", "create", "nina").stdout.split()[1]
    assert site.run("token", "revoke", token_id).exit_code == 0
    count = len(audit_actions(site))
    assert_one_line_error(site.run("token", "revoke", token_id), f"no live token with id {token_id}")
    assert len(audit_actions(site)) == count


# --- db --------------------------------------------------------------------------------------

def _downgrade_to_base(site: Site) -> None:
    engine = site.engine()
    try:
        migrate.downgrade(engine, "base")
    finally:
        engine.dispose()


def test_db_current_and_check_at_head(site):
    """db current shows the revision and the head; db check exits 0 at head."""
    head = site.revision()
    result = site.run("db", "current")
    assert result.exit_code == 0 and result.stdout == f"current: {head}\nhead: {head}\n"
    check = site.run("db", "check")
    assert check.exit_code == 0 and f"database at head ({head})" in check.stdout


def test_db_check_behind_names_the_upgrade_and_upgrade_fixes_it(site):
    """At base, db check fails naming `onprem-label db upgrade`; db upgrade brings it to head."""
    _downgrade_to_base(site)
    assert_one_line_error(site.run("db", "check"), UPGRADE)
    assert site.run("db", "current").stdout.startswith("current: empty\n")
    result = site.run("db", "upgrade")
    assert result.exit_code == 0, result.output
    head = site.revision()
    assert f"database upgraded from empty to {head}" in result.stdout
    assert site.run("db", "check").exit_code == 0
    again = site.run("db", "upgrade")
    assert again.exit_code == 0 and f"from {head} to {head}" in again.stdout


def test_db_commands_without_a_database(tmp_path):
    """With no SQLite database yet, db commands say to run init and create nothing."""
    data = tmp_path / "data"
    for command in ("check", "current", "upgrade"):
        result = CliRunner().invoke(cli, ["--data-dir", str(data), "db", command], env={})
        assert_one_line_error(result, "no database in", "onprem-label init")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_database_is_one_line(tmp_path):
    """A PostgreSQL URL nobody answers is reported as one line."""
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2"
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path / "d"), "db", "check"],
                                env={"ONPREM_LABEL_DATABASE_URL": url})
    assert_one_line_error(result, "database unreachable")


# --- config ----------------------------------------------------------------------------------

def test_config_show_json_reports_the_sources(site):
    """config show --json gives every value and where it came from; secrets stay masked."""
    result = site.run("config", "show", "--json", env={"ONPREM_LABEL_THREADS": "3"})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["threads"] == {"value": 3, "source": "env ONPREM_LABEL_THREADS"}
    assert shown["data_dir"] == {"value": str(site.data), "source": "command line"}
    if site.env:
        assert shown["database_url"]["source"] == "env ONPREM_LABEL_DATABASE_URL"


def test_config_show_bad_value_is_one_line(tmp_path):
    """A bad value stops even `config show` with one line naming it."""
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path / "d"), "config", "show"],
                                env={"ONPREM_LABEL_LOG_LEVEL": "chatty"})
    assert_one_line_error(result, "'log_level'", "env ONPREM_LABEL_LOG_LEVEL", "expected one of")


# --- serve refusals --------------------------------------------------------------------------

def test_serve_without_key_file(keyed_site, tmp_path):
    """serve with the master key file gone exits 1 naming the key file, and creates none."""
    site = keyed_site
    site.key_path.unlink()
    before = snapshot(tmp_path)
    assert_one_line_error(site.run("serve"), "master key file", str(site.key_path), "not found")
    assert snapshot(tmp_path) == before and not site.key_path.exists()


def test_serve_without_keyring(keyless_site, tmp_path):
    """serve on a data directory never initialised exits 1 saying to run init, writing nothing."""
    site = keyless_site
    site.data.mkdir(mode=0o700, exist_ok=True)
    before = snapshot(tmp_path)
    assert_one_line_error(site.run("serve"), "no keyring", "onprem-label init")
    assert snapshot(tmp_path) == before


def test_serve_with_a_foreign_key_file(keyed_site, tmp_path):
    """A valid key file that belongs to another data directory is refused by key id; nothing written."""
    site = keyed_site
    site.key_path.unlink()
    create_key_file(site.key_path)
    before = snapshot(tmp_path)
    assert_one_line_error(site.run("serve"), "does not belong to this data directory")
    assert snapshot(tmp_path) == before


def test_serve_with_key_readable_by_others(keyed_site):
    """A key file other users could read is refused, with the chmod that fixes it."""
    keyed_site.key_path.chmod(0o644)
    assert_one_line_error(keyed_site.run("serve"), "readable by others", "chmod 600")


@pytest.mark.parametrize("source", ["option", "env", "file"])
def test_serve_bad_port_value(keyed_site, source):
    """An out-of-range port from the option, env or config file is one line naming port and source."""
    site = keyed_site
    args, env, where = ["serve"], {}, "command line"
    if source == "option":
        args += ["--port", "70000"]
    elif source == "env":
        env, where = {"ONPREM_LABEL_PORT": "70000"}, "env ONPREM_LABEL_PORT"
    else:
        site.data.mkdir(exist_ok=True)
        (site.data / CONFIG_FILE_NAME).write_text("port = 70000\n")
        where = str(site.data / CONFIG_FILE_NAME)
    assert_one_line_error(site.run(*args, env=env), "'port'", where, "from 1 to 65535")


def test_serve_refuses_database_at_base(keyed_site, tmp_path):
    """A database behind head stops serve (and db check) naming `onprem-label db upgrade`; nothing written."""
    site = keyed_site
    _downgrade_to_base(site)
    before = snapshot(tmp_path)
    assert_one_line_error(site.run("serve"), UPGRADE)
    assert_one_line_error(site.run("db", "check"), UPGRADE)
    assert snapshot(tmp_path) == before
    assert site.revision() is None and site.tables() <= {"alembic_version"}


def test_serve_refuses_an_empty_database(tmp_path, empty_database_url):
    """An empty database (SQLite: an empty file) stops serve naming the upgrade; no table is created."""
    site = Site(tmp_path / "data",
                {"ONPREM_LABEL_DATABASE_URL": empty_database_url} if empty_database_url else {})
    site.data.mkdir(mode=0o700)
    init_keyring(site.settings)
    if not empty_database_url:
        (site.data / "onprem-label.db").touch()
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert_one_line_error(site.run("serve"), UPGRADE)
    assert_one_line_error(site.run("db", "check"), UPGRADE)
    assert sorted(p.name for p in tmp_path.rglob("*")) == names
    assert site.tables() == set()


def test_serve_refuses_a_database_newer_than_the_code(keyed_site, tmp_path):
    """A revision the code does not know stops serve, saying to upgrade the software."""
    site = keyed_site
    engine = site.engine()
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed9999'"))
    engine.dispose()
    before = snapshot(tmp_path)
    line = assert_one_line_error(site.run("serve"), "f00dfeed9999", "newer", "upgrade the software")
    assert UPGRADE not in line
    assert_one_line_error(site.run("db", "check"), "newer")
    assert snapshot(tmp_path) == before and site.revision() == "f00dfeed9999"


@pytest.fixture
def busy_port():
    """A loopback port with a listening socket on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


def test_serve_port_in_use(keyed_site, busy_port):
    """serve on a port someone else holds exits 1 naming the port."""
    assert_one_line_error(keyed_site.run("serve", "--port", str(busy_port)),
                          f"port {busy_port}", "already in use")


def test_serve_port_in_use_from_env(keyed_site, busy_port):
    """The port from ONPREM_LABEL_PORT is the one checked and named."""
    assert_one_line_error(keyed_site.run("serve", env={"ONPREM_LABEL_PORT": str(busy_port)}),
                          f"port {busy_port}")


@pytest.mark.parametrize("how", ["option", "env"])
@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.10.20", "::"])
def test_serve_refuses_non_loopback_without_tls(keyed_site, host, how):
    """Listening beyond loopback needs trusted_proxy or --insecure-http; the refusal names both."""
    if how == "option":
        args, env = ["serve", "--host", host], {}
    else:
        args, env = ["serve"], {"ONPREM_LABEL_HOST": host}
    assert_one_line_error(keyed_site.run(*args, env=env), host, "trusted_proxy", "--insecure-http")


def test_serve_refuses_non_loopback_when_the_proxy_is_local(keyed_site):
    """A proxy on loopback means nobody should reach the app directly: a wider bind is refused."""
    result = keyed_site.run("serve", "--host", "0.0.0.0",
                            env={"ONPREM_LABEL_TRUSTED_PROXY": "127.0.0.1", "ONPREM_LABEL_HTTPS": "true"})
    assert_one_line_error(result, "0.0.0.0", "proxy", "loopback")


def test_serve_non_loopback_allowed_behind_trusted_proxy(keyed_site):
    """With a remote trusted_proxy the host check passes (serve goes on to bind; here the port is taken)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    try:
        result = keyed_site.run("serve", "--host", "0.0.0.0", "--port", str(port),
                                env={"ONPREM_LABEL_TRUSTED_PROXY": "192.0.2.10",
                                     "ONPREM_LABEL_HTTPS": "true"})
    finally:
        sock.close()
    assert_one_line_error(result, f"port {port}", "already in use")


def test_serve_insecure_http_warns(keyed_site):
    """--insecure-http lets a non-loopback bind proceed, with a warning about plain HTTP."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    try:
        result = keyed_site.run("serve", "--host", "0.0.0.0", "--port", str(port), "--insecure-http")
    finally:
        sock.close()
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("WARNING: serving plain HTTP on 0.0.0.0")
    assert lines[-1] == f"error: port {port} on 0.0.0.0 is already in use"


def test_serve_help_explains_the_loopback_default():
    """serve --help says why it binds 127.0.0.1 by default."""
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    assert "127.0.0.1" in result.output and "TLS" in result.output
