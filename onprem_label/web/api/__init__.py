"""JSON API under /api/v1 (contract in DESIGN.md)."""

from flask import Blueprint

bp = Blueprint("api", __name__, url_prefix="/api/v1")

from onprem_label.web.api import accounts, audit, exchange, items, quality, workflow  # noqa: E402,F401  (registers routes)
