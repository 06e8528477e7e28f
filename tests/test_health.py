"""/healthz: no login, 200 when database, migrations and storage are fine, 503 otherwise."""

from __future__ import annotations

from sqlalchemy import text

from onprem_label.db import migrate


def test_healthz_ok_without_login(client):
    """A fresh app answers 200 with every check ok, to an anonymous caller."""
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok",
                             "checks": {"database": "ok", "migrations": "ok", "storage": "ok"}}


def test_healthz_reports_database_behind_head(app, client):
    """A database moved off head makes /healthz answer 503 naming the migrations check."""
    engine = app.extensions["onprem_label"].engine
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json["checks"]["migrations"] == "not at head"
    assert migrate.schema_status(engine)[0] is False


def test_healthz_reports_missing_data_directory(app, client, settings, tmp_path):
    """When the data directory is gone (unmounted disk), /healthz says storage is unavailable."""
    data = settings.data_path
    moved = tmp_path / "moved"
    data.rename(moved)
    try:
        response = client.get("/healthz")
        if settings.is_sqlite:
            # The SQLite file went with the directory: the database check fails too.
            assert response.json["checks"]["database"] in ("ok", "unreachable")
        assert response.status_code == 503
        assert response.json["checks"]["storage"] == "unavailable"
    finally:
        moved.rename(data)
