"""Project admin pages: the projects overview with its create form, and one project's admin page."""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from onprem_label.auth.roles import Permission, has_permission
from onprem_label.db.models import PROJECT_ROLES, TASK_STATES, Item, Project, Task
from onprem_label.web.context import audit_context, db, now, services
from onprem_label.web.login import require
from onprem_label.workflow.members import get_project
from onprem_label.workflow.projects import ProjectError, check_name, create_project
from onprem_label.workflow.schema import RESERVED_HOTKEYS, TOOLS
from onprem_label.workflow.settings import LIMITS, project_settings

bp = Blueprint("projects", __name__)

MAX_DESCRIPTION = 5000  # the limit create_project enforces, checked here to name the field


def overview(dbs) -> list[dict]:
    """Every project with its item count and task counts per state, by name (two grouped queries)."""
    items = dict(dbs.execute(select(Item.project_id, func.count()).group_by(Item.project_id)).all())
    tasks: dict[int, dict[str, int]] = {}
    for project_id, state, count in dbs.execute(select(Task.project_id, Task.state, func.count())
                                                .where(Task.purpose == "work").group_by(Task.project_id, Task.state)):
        tasks.setdefault(project_id, {})[state] = count
    return [{"project": p, "items": items.get(p.id, 0),
             "counts": {state: tasks.get(p.id, {}).get(state, 0) for state in TASK_STATES}}
            for p in dbs.scalars(select(Project).order_by(Project.name))]


def render_overview(errors: dict | None = None, form: dict | None = None, status: int = 200):
    """The projects page, with the create form's errors and values when it was refused."""
    page = render_template("home/manager.html", rows=overview(db()), states=TASK_STATES,
                           errors=errors or {}, form=form or {})
    return page, status


def _form_errors(name: str, description: str) -> dict[str, str]:
    """Field -> message for what create_project would refuse, so each message sits by its field."""
    errors = {}
    try:
        check_name(name)
    except ProjectError as exc:
        errors["name"] = str(exc)
    if len(description) > MAX_DESCRIPTION:
        errors["description"] = f"A description is text of up to {MAX_DESCRIPTION} characters."
    return errors


@bp.post("/projects")
@require(Permission.MANAGE_PROJECTS)
def create():
    """Create a project from the form (name, description) and go to its admin page."""
    dbs = db()
    form = {"name": request.form.get("name", ""), "description": request.form.get("description", "")}
    errors = _form_errors(form["name"], form["description"])
    if not errors:
        try:
            project = create_project(dbs, form["name"], description=form["description"],
                                     actor=dbs.merge(current_user._get_current_object()),
                                     context=audit_context(), now=now())
            dbs.commit()
        except ProjectError as exc:  # the name is taken
            errors["name"] = str(exc)
        except IntegrityError:  # taken by a request that committed between our check and ours
            errors["name"] = f"A project named {form['name'].strip()!r} already exists."
    if errors:
        dbs.rollback()
        return render_overview(errors, form, 422)
    flash("Project created. Give it a label schema, members and images.", "ok")
    return redirect(url_for("projects.admin", project_id=project.id), 303)


@bp.get("/projects/<id:project_id>/admin")
@require()
def admin(project_id: int):
    """A project's admin page: schema editor, members, upload, dashboard and settings (logic in JS)."""
    # An outsider gets a 404, a member without the manager role a 403 (web/errors.py).
    project = get_project(db(), project_id, current_user._get_current_object(), "manager")
    return render_template(
        "projects/admin.html", project=project, tools=TOOLS, reserved=RESERVED_HOTKEYS,
        roles=PROJECT_ROLES, limits=LIMITS, settings=project_settings(project),
        # The upload API needs the global manager role besides the project role.
        can_upload=has_permission(current_user.role_set, Permission.MANAGE_PROJECTS),
        max_file=size_text(services().settings.upload_max_file_bytes))


@bp.get("/projects/<id:project_id>/quality")
@require()
def quality(project_id: int):
    """A project's quality figures, reviewer proposals, recommended people, gold items and pay (logic in JS)."""
    project = get_project(db(), project_id, current_user._get_current_object(), "manager")
    return render_template("projects/quality.html", project=project)


def size_text(size: int) -> str:
    """A byte count for people: "2 GiB", "500 MiB", "64 KiB"."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{round(size / scale, 1):g} {unit}"
    return f"{size} bytes"
