"""Alembic migrations, installed as onprem_label.migrations (the only way the schema changes)."""
