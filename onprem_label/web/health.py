"""/healthz: liveness for monitors and load balancers, no login needed, no details leaked."""

from __future__ import annotations

import os

from flask import Blueprint, jsonify
from sqlalchemy import text

from onprem_label.db import migrate
from onprem_label.web.context import db, services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """200 when the database answers and is at head and the data directory is writable; else 503."""
    checks = {}
    try:
        dbs = db()
        dbs.execute(text("SELECT 1"))
        dbs.rollback()
        checks["database"] = "ok"
        at_head = migrate.current_revision(services().engine) == services().head_revision
        checks["migrations"] = "ok" if at_head else "not at head"
    except Exception:  # any failure to reach the database is "down", not a 500
        checks["database"] = "unreachable"
        checks["migrations"] = "unknown"
    data = services().settings.data_path
    checks["storage"] = "ok" if data.is_dir() and os.access(data, os.W_OK | os.X_OK) else "unavailable"
    healthy = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ok" if healthy else "unavailable", "checks": checks}), (
        200 if healthy else 503)
