"""`onprem-label serve` with one experimental change patched in, for api_what_if.py.

The variant comes from the BENCH_VARIANT environment variable:
  shipped          no change
  joined           the token lookup loads its user in the same query (joinedload)
  deferred         SQLite transactions start with a plain (deferred) BEGIN, not BEGIN IMMEDIATE
  deferred+joined  both of the above
  cached-auth      each token is looked up once, then its user is served from memory: a lower
                   bound on what any cheaper token check could reach (NOT safe: ignores revocation)
The patches copy production code as it was when written; if they no longer match the code,
fix them or drop the variant. Never used by the application or the tests.
"""

from __future__ import annotations

import os
import sys

from sqlalchemy import event, select
from sqlalchemy.orm import joinedload

import onprem_label.db.engine as engine_module
from onprem_label.auth import tokens
from onprem_label.db.models import ApiToken

VARIANTS = ("shipped", "joined", "deferred", "deferred+joined", "cached-auth")


def _deferred_sqlite(engine) -> None:
    """engine._configure_sqlite without BEGIN IMMEDIATE."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={engine_module.SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        connection.exec_driver_sql("BEGIN")


def _joined_authenticate_token(db, token, *, now):
    """tokens.authenticate_token with the user joined into the one query."""
    if not token.startswith(tokens.TOKEN_PREFIX) or len(token) > 100:
        return None
    row = db.scalar(select(ApiToken).options(joinedload(ApiToken.user))
                    .where(ApiToken.token_hash == tokens._hash(token),
                           ApiToken.revoked_at.is_(None)))
    if row is None or not row.user.active:
        return None
    if row.last_used_at is None or now - row.last_used_at >= tokens.LAST_USED_RESOLUTION:
        row.last_used_at = now
    return row.user


def _cached(original):
    users: dict = {}

    def authenticate_token(db, token, *, now):
        if token not in users and len(users) < 1000:
            users[token] = original(db, token, now=now)
        return users.get(token) or original(db, token, now=now)

    return authenticate_token


def main() -> None:
    variant = os.environ.get("BENCH_VARIANT", "shipped")
    if variant not in VARIANTS:
        sys.exit(f"unknown BENCH_VARIANT {variant!r}; one of {', '.join(VARIANTS)}")
    if variant in ("deferred", "deferred+joined"):
        engine_module._configure_sqlite = _deferred_sqlite
    if variant in ("joined", "deferred+joined"):
        tokens.authenticate_token = _joined_authenticate_token
    if variant == "cached-auth":
        tokens.authenticate_token = _cached(tokens.authenticate_token)
    from onprem_label.cli import main as cli_main

    sys.argv[0] = "onprem-label"
    cli_main()


if __name__ == "__main__":
    main()
