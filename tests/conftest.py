"""Shared fixtures: each DB test runs on SQLite and on PostgreSQL, in its own fresh database."""

from __future__ import annotations

import functools
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from browser_helpers import CHROMIUM_ARGS, ensure_chromium
from debian_packages import under_ci
from onprem_label.app import create_app
from onprem_label.auth import passwords
from onprem_label.config import load_settings
from onprem_label.db import make_engine, make_sessionmaker, migrate
from onprem_label.db.models import User
from onprem_label.storage.format import key_id_of
from onprem_label.storage.keyring import Keyring

PG_ADMIN_URL = os.environ.get("ONPREM_LABEL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


class FakeClock:
    """A settable clock: tests move time instead of sleeping."""

    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2026, 11, 28, 9, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs) -> None:
        """Move the clock forward by a timedelta given as keyword arguments."""
        self.now += timedelta(**kwargs)


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock shared by the app and the test."""
    return FakeClock()


# --- databases -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> str:
    """A SQLite file migrated to head once; each test copies it."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    engine.dispose()
    return str(path)


def _pg_admin_engine():
    return make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


@pytest.fixture(scope="session")
def pg_template():
    """A PostgreSQL database migrated to head once; each test clones it (CREATE ... TEMPLATE)."""
    engine = _pg_admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # unreachable server
        engine.dispose()
        message = f"PostgreSQL at {PG_ADMIN_URL} unreachable: {exc.__class__.__name__}"
        if under_ci():
            pytest.fail(message + " (CI requires PostgreSQL)")
        pytest.skip(message)
    name = f"onprem_tmpl_{os.getpid()}"
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    tmpl_engine = make_engine(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    migrate.upgrade(tmpl_engine)
    tmpl_engine.dispose()
    yield engine, name
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@contextmanager
def private_pg_database(admin, prefix: str, template: str | None = None):
    """A new PostgreSQL database (empty, or a clone of `template`) for one test: its URL; dropped after."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"{clause}'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    """The database backend under test."""
    return request.param


@pytest.fixture
def database_url(backend, request, tmp_path):
    """A fresh database at head, private to this test."""
    if backend == "sqlite":
        path = tmp_path / "data" / "onprem-label.db"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        path.chmod(0o600)  # as `init` makes it (the copy would follow the umask)
        yield ""  # the default: SQLite inside the data directory
        return
    admin, template = request.getfixturevalue("pg_template")
    with private_pg_database(admin, "onprem_t", template) as url:
        yield url


@pytest.fixture
def restore_url(backend, pg_template):
    """A second empty database, for a restore: '' (SQLite in the new data directory) or a new PostgreSQL one."""
    if backend == "sqlite":
        yield ""
        return
    with private_pg_database(pg_template[0], "onprem_r") as url:
        yield url


@pytest.fixture
def pg_client_programs(backend):
    """pg_dump and pg_restore from Debian's postgresql-client, for the PostgreSQL runs of backup tests."""
    if backend == "postgresql":
        from debian_packages import ensure_program

        ensure_program("/usr/bin/pg_dump", "postgresql-client")
        ensure_program("/usr/bin/pg_restore", "postgresql-client")


@pytest.fixture
def empty_database_url(backend, request):
    """A fresh database with no tables at all, private to this test ('' = SQLite in the data dir).

    For SQLite nothing is created: the database is the data directory's default file, made by
    whatever first opens it.
    """
    if backend == "sqlite":
        yield ""
        return
    admin, _template = request.getfixturevalue("pg_template")
    with private_pg_database(admin, "onprem_e") as url:
        yield url


@pytest.fixture
def overrides() -> dict:
    """Extra settings for the app of one test (parametrise it to change them)."""
    return {}


@pytest.fixture
def settings(tmp_path, database_url, overrides):
    """Settings for a test: its own data directory and database, no machine environment."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    return load_settings({"data_dir": str(data), "database_url": database_url, **overrides}, env={})


@pytest.fixture
def keyring() -> Keyring:
    """A keyring with one random master key (key files and keyring.json are tested on their own)."""
    master = os.urandom(32)
    key_id = key_id_of(master)
    return Keyring({key_id: master}, key_id, os.urandom(32))


@pytest.fixture
def app(settings, clock, keyring):
    """The app on a fresh database, with the fake clock."""
    application = create_app(settings, clock=clock, keyring=keyring)
    application.config["TESTING"] = True
    yield application
    application.extensions["onprem_label"].engine.dispose()


@pytest.fixture
def client(app):
    """A test client (cookies kept between requests)."""
    return app.test_client()


@pytest.fixture
def db(app):
    """A database session on the app's database, for arranging and checking."""
    session = app.extensions["onprem_label"].sessionmaker()
    yield session
    session.close()


@functools.cache
def cached_hash(password: str) -> str:
    """scrypt at full cost takes a while; tests reuse one hash per password."""
    return passwords.hash_password(password)


@pytest.fixture
def make_user(db, clock):
    """Create a user directly (no audit row), with a known password and given roles."""

    def make(username: str, roles="labeler", *, password: str = PASSWORD,
             must_change: bool = False, active: bool = True) -> User:
        user = User(username=username, display_name=username.title(),
                    password_hash=cached_hash(password),
                    roles=roles if isinstance(roles, str) else " ".join(roles), active=active,
                    must_change_password=must_change, failed_logins=0, created_at=clock(),
                    recovery_codes=[], totp_enabled=False)
        db.add(user)
        db.commit()
        return user

    return make


def csrf_from(client, path: str = "/login") -> str:
    """GET a page and return the CSRF token in its forms."""
    response = client.get(path)
    match = CSRF_RE.search(response.get_data(as_text=True))
    assert match, f"no CSRF token on {path} (status {response.status_code})"
    return match.group(1)


def login(client, username: str, password: str = PASSWORD, *, follow: bool = False):
    """Log in through the form, as a browser would."""
    token = csrf_from(client, "/login")
    return client.post("/login", data={"username": username, "password": password,
                                       "csrf_token": token}, follow_redirects=follow)


@pytest.fixture
def auth(client):
    """Helpers to log in and out through the real forms."""

    class Auth:
        def login(self, username: str, password: str = PASSWORD, **kw):
            return login(client, username, password, **kw)

        def logout(self):
            token = csrf_from(client, "/account/password")
            return client.post("/logout", data={"csrf_token": token})

        def csrf(self, path: str = "/account/password") -> str:
            return csrf_from(client, path)

    return Auth()


# --- browsers --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium under Playwright (never a downloaded browser), for the whole session."""
    from playwright.sync_api import sync_playwright

    path = ensure_chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
