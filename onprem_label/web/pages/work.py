"""The labeling and review workspaces: page shells whose logic lives in static/js (no build step)."""

from __future__ import annotations

from flask import Blueprint, render_template
from flask_login import current_user

from onprem_label.web.context import db
from onprem_label.web.login import require
from onprem_label.workflow.members import get_project

bp = Blueprint("work", __name__)

MODES = {"label": ("labeler", "Labeling"), "review": ("reviewer", "Review")}


def _workspace(project_id: int, mode: str):
    role, title = MODES[mode]
    # A project the caller has no part in is a 404, the wrong project role a 403 (web/errors.py).
    project = get_project(db(), project_id, current_user._get_current_object(), role)
    return render_template("work/workspace.html", project=project, mode=mode, title=title)


# Only the project role counts (a labeler made reviewer in one project reviews there), as in the API.
@bp.route("/projects/<id:project_id>/label")
@require()
def label(project_id: int):
    """The labeling workspace of a project: leases the caller's next task (rework first)."""
    return _workspace(project_id, "label")


@bp.route("/projects/<id:project_id>/review")
@require()
def review(project_id: int):
    """The review workspace of a project: leases the next submitted task someone else labeled."""
    return _workspace(project_id, "review")
