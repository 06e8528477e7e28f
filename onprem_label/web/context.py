"""Per-app services and per-request helpers: the database session, the clock, audit context."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from flask import current_app, g, request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from onprem_label.audit import AuditContext
from onprem_label.auth.accounts import LockoutPolicy
from onprem_label.auth.ratelimit import AddressRateLimiter
from onprem_label.auth.sessions import SessionPolicy
from onprem_label.config import Settings
from onprem_label.imaging.prepare import PrepareOptions
from onprem_label.storage import EncryptedBlobStore, Keyring


@dataclass
class Services:
    """What the app was built with; stored in app.extensions['onprem_label']."""

    settings: Settings
    engine: Engine
    sessionmaker: sessionmaker[Session]
    clock: Callable[[], datetime]
    totp_key: bytes
    store: EncryptedBlobStore
    lockout: LockoutPolicy
    session_policy: SessionPolicy
    rate_limiter: AddressRateLimiter
    head_revision: str
    keyring: Keyring
    ingest_options: PrepareOptions
    link_key: bytes | None = None
    extra: dict = field(default_factory=dict)


def services() -> Services:
    """The running app's services."""
    return current_app.extensions["onprem_label"]


def now() -> datetime:
    """The app's clock (tests inject a fake one)."""
    return services().clock()


def db() -> Session:
    """The request's database session, opened on first use and closed at teardown."""
    if "db" not in g:
        g.db = services().sessionmaker()
    return g.db


def close_db(_exc: BaseException | None = None) -> None:
    """Teardown: roll back whatever a handler did not commit, and close."""
    session = g.pop("db", None)
    if session is not None:
        session.close()


def request_id() -> str:
    """A random id for this request, echoed in X-Request-Id and written to the audit trail."""
    if "request_id" not in g:
        g.request_id = uuid.uuid4().hex
    return g.request_id


def audit_context() -> AuditContext:
    """Client address, user agent and request id of the current request."""
    return AuditContext(client_addr=request.remote_addr or "",
                        # NUL cannot be stored in PostgreSQL text; the header is only informative.
                        user_agent=request.headers.get("User-Agent", "").replace("\x00", "")[:300],
                        request_id=request_id())


def is_api_request() -> bool:
    """True for the JSON API, whose errors are JSON."""
    return request.path.startswith("/api/")
