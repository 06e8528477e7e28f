"""Alembic environment: runs online against the engine handed over in config.attributes."""

from alembic import context

from onprem_label.db import models  # noqa: F401  (registers every table on Base.metadata)
from onprem_label.db.base import Base

config = context.config


def render_item(type_, obj, autogen_context):
    """Autogenerate writes UTCDateTime as plain sa.DateTime: revisions must not import models."""
    if type_ == "type" and obj.__class__.__name__ == "UTCDateTime":
        return "sa.DateTime()"
    return False


def run_migrations_online() -> None:
    """Run migrations on the engine the caller configured (see onprem_label.db.migrate)."""
    engine = config.attributes["engine"]
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # A batch migration rebuilds a table (CREATE new, copy, DROP old, rename). With foreign
            # keys on, DROP TABLE deletes the rows of every ON DELETE CASCADE child (a rebuild of
            # tasks would empty annotations and reviews). SQLite's own recipe: switch them off outside
            # the transaction, check every reference afterwards, switch them on again.
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            compare_type=True,
            render_item=render_item,
            # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise RuntimeError(f"migration left broken references: {broken[:5]}")
        connection.commit()
        if sqlite:
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; use 'onprem-label db upgrade'")
run_migrations_online()
