"""create_app: the Flask application for given settings, with every extension and blueprint."""

from __future__ import annotations

from datetime import timedelta
from importlib.resources import files
from typing import Callable

from flask import Flask
from werkzeug.routing import IntegerConverter

from onprem_label.audit import chain
from onprem_label.audit.site import chain_for
from onprem_label.auth.accounts import LockoutPolicy
from onprem_label.auth.ratelimit import AddressRateLimiter
from onprem_label.auth.sessions import SessionPolicy
from onprem_label.clock import utcnow
from onprem_label.config import Settings, load_settings
from onprem_label.db import make_engine, make_sessionmaker, migrate
from onprem_label.imaging.prepare import link_key, prepare_options
from onprem_label.storage import Keyring, open_keyring, open_store
from onprem_label.web import access, errors, login, security, uploads
from onprem_label.web.context import Services, close_db
from onprem_label.web.sessions import ServerSessionInterface

SESSION_COOKIE = "olsession"
MAX_FORM_BYTES = 1 << 20  # upload endpoints get their own streamed limit (web/uploads.py)


class RowIdConverter(IntegerConverter):
    """`<id:name>` in a route: a row id. Out of range is a 404, not a database overflow (500)."""

    def __init__(self, url_map):
        super().__init__(url_map, min=1, max=2**31 - 1)  # ids are 32-bit INTEGER columns


def create_app(settings: Settings | None = None, *, clock: Callable = utcnow,
               keyring: Keyring | None = None) -> Flask:
    """Build the app. Raises KeyFileError for a missing or wrong key; does no other I/O but connect."""
    settings = settings or load_settings()
    if keyring is None:
        keyring = open_keyring(settings)
    web = files("onprem_label.web")
    app = Flask("onprem_label", template_folder=str(web / "templates"),
                static_folder=str(web / "static"))
    app.config.update(
        SECRET_KEY=keyring.purpose_key("flask-signing"),
        SESSION_COOKIE_NAME=("__Host-" if settings.https else "") + SESSION_COOKIE,
        SESSION_COOKIE_SECURE=settings.https,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH="/",
        MAX_CONTENT_LENGTH=MAX_FORM_BYTES,
        MAX_FORM_MEMORY_SIZE=MAX_FORM_BYTES,
        TRAP_HTTP_EXCEPTIONS=False,
        PROPAGATE_EXCEPTIONS=False,
        SEND_FILE_MAX_AGE_DEFAULT=3600,
    )
    engine = make_engine(settings.effective_database_url)
    maker = make_sessionmaker(engine)
    chain.attach(maker, chain_for(settings, keyring))
    app.extensions["onprem_label"] = Services(
        settings=settings, engine=engine, sessionmaker=maker, clock=clock,
        totp_key=keyring.purpose_key("totp-secrets"),
        store=open_store(settings, keyring),
        lockout=LockoutPolicy.from_settings(settings),
        session_policy=SessionPolicy.from_settings(settings),
        rate_limiter=AddressRateLimiter(settings.address_rate_limit,
                                        timedelta(minutes=settings.address_rate_window_minutes)),
        head_revision=migrate.head_revision(engine),
        keyring=keyring,
        ingest_options=prepare_options(settings, keyring),
        link_key=link_key(settings, keyring),
    )
    app.url_map.converters["id"] = RowIdConverter
    app.session_interface = ServerSessionInterface()
    app.teardown_appcontext(close_db)

    # Order matters: who is calling, unstorable input, CSRF (bearer calls are exempt), the gate.
    app.before_request(uploads.limit_streamed_upload)  # before anything could read the body
    login.init_app(app)
    access.init_app(app)  # its clock starts before every other hook; the user is known from here
    app.before_request(security.reject_nul_bytes)
    app.before_request(security.check_csrf)
    app.before_request(login.enforce_gate)
    security.init_app(app)
    errors.init_app(app)

    from onprem_label.web.api import bp as api_bp
    from onprem_label.web.health import bp as health_bp
    from onprem_label.web.pages import admin, audit, auth, home, items, projects, work

    for blueprint in (health_bp, auth.bp, home.bp, admin.bp, items.bp, work.bp, projects.bp,
                      audit.bp, api_bp):
        app.register_blueprint(blueprint)
    return app
