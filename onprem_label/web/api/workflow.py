"""API: projects, members and the full-inspection task loop (contract in DESIGN.md)."""

from __future__ import annotations

from typing import Any

from flask import jsonify, request
from flask_login import current_user
from sqlalchemy import select

from onprem_label.audit import AuditAction, record
from onprem_label.auth.roles import Permission
from onprem_label.db.models import TASK_STATES, Project, ProjectMember, Task, User
from onprem_label.db.quality import TASK_PURPOSES
from onprem_label.web.api import bp
from onprem_label.web.api.items import item_json
from onprem_label.web.context import audit_context, db, now
from onprem_label.web.login import require
from onprem_label.workflow import consensus, dashboard, leases, members, qualification, taskrows, tasks
from onprem_label.workflow.errors import Forbidden, Invalid, NotFound
from onprem_label.workflow.projects import counts_for, create_project, set_schema, state_counts
from onprem_label.workflow.settings import validate_settings

PAGE_MAX = 500
REVISIONS_MAX = 100


def _user() -> User:
    # load=False: the caller was read by the login check just now; no second SELECT.
    return db().merge(current_user._get_current_object(), load=False)


def _caller() -> User:
    """The caller as the login check read them: enough for the task loop, which only needs their id,
    name and roles (no ORM session work on every request)."""
    return current_user._get_current_object()


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise Invalid("Send a JSON object.", errors=[{"field": "body", "message": "a JSON object"}])
    return body


def project_json(project: Project, *, counts: dict | None = None) -> dict:
    """A project as the API shows it."""
    out = {"id": project.id, "name": project.name, "description": project.description,
           "label_schema": project.label_schema, "schema_version": project.schema_version,
           "settings": project.settings, "created_at": project.created_at.isoformat()}
    if counts is not None:
        out["counts"] = counts
    return out


def task_json(task: Task) -> dict:
    """A task as the API shows it."""
    stamp = lambda value: value.isoformat() if value else None  # noqa: E731
    return {"id": task.id, "project_id": task.project_id, "item_id": task.item_id, "state": task.state,
            "round": task.round, "version": task.version, "labeler_id": task.labeler_id,
            "reviewer_id": task.reviewer_id, "lease_owner_id": task.lease_owner_id,
            "lease_expires_at": stamp(task.lease_expires_at), "active_seconds": task.active_seconds,
            "submitted_at": stamp(task.submitted_at), "accepted_at": stamp(task.accepted_at)}


def annotation_json(row) -> dict | None:
    """One revision."""
    if row is None:
        return None
    return {"revision": row.revision, "round": row.round, "kind": row.kind, "author_id": row.author_id,
            "source": getattr(row, "source", None), "schema_version": row.schema_version, "shapes": row.shapes, "classifications": row.classifications,
            "created_at": row.created_at.isoformat()}


def review_json(row) -> dict:
    """One review decision."""
    return {"round": row.round, "reviewer_id": row.reviewer_id,
            "reviewer_name": getattr(row, "reviewer_name", None), "decision": row.decision, "comment": row.comment,
            "shape_id": row.shape_id, "annotation_revision": row.annotation_revision,
            "created_at": row.created_at.isoformat()}


# --- projects and members --------------------------------------------------------------------

@bp.get("/projects")
@require()
def list_projects():
    """Projects the caller takes part in (every project for admins and managers)."""
    user, dbs = _user(), db()
    query = select(Project).order_by(Project.id)
    if not members.GLOBAL_MANAGERS & user.role_set:
        query = query.where(Project.id.in_(select(ProjectMember.project_id).where(ProjectMember.user_id == user.id)))
    return jsonify({"projects": [project_json(p) for p in dbs.scalars(query)]})


@bp.post("/projects")
@require(Permission.MANAGE_PROJECTS)
def create_project_api():
    """Create a project: `name`, optional `description`, `label_schema`, `settings`."""
    body, dbs = _body(), db()
    name = body.get("name")
    if not isinstance(name, str):
        raise Invalid("name is required.", errors=[{"field": "name", "message": "a string"}])
    project = create_project(dbs, name, description=body.get("description", ""), settings=body.get("settings"),
                             label_schema=body.get("label_schema"), actor=_user(), context=audit_context(), now=now())
    dbs.commit()
    return jsonify(project_json(project, counts=state_counts(dbs, project.id))), 201


@bp.get("/projects/<id:project_id>")
@require()
def get_project(project_id: int):
    """One project with its task counts per state."""
    dbs, user = db(), _user()
    project = members.get_project(dbs, project_id, user)
    return jsonify(project_json(project, counts=counts_for(dbs, project.id, members.project_roles(dbs, project.id, user),
                                                           user.id)))


@bp.patch("/projects/<id:project_id>")
@require()
def update_project(project_id: int):
    """Managers: change `description`, `label_schema` (a new version) or `settings`."""
    body, dbs, user = _body(), db(), _user()
    project = members.get_project(dbs, project_id, user, "manager")
    changes: dict[str, Any] = {}
    if "description" in body:
        if not isinstance(body["description"], str) or len(body["description"]) > 5000:
            raise Invalid("description is text.", errors=[{"field": "description", "message": "<= 5000 characters"}])
        project.description = changes["description"] = body["description"]
    added = 0
    if "settings" in body:
        consensus.refuse_lower_k(dbs, project.id, body["settings"])
        project.settings = changes["settings"] = validate_settings({**(project.settings or {}), **(body["settings"] or {})}
                                                                   if isinstance(body["settings"], dict) else body["settings"])
        # Consensus raised: every item gets its further copies now (lowering it keeps what exists).
        added = consensus.ensure_copies(dbs, project.id, project.settings["consensus_k"], now=now())
    if "label_schema" in body:
        changes["label_schema"] = set_schema(dbs, project, body["label_schema"], actor=user, context=audit_context(),
                                             now=now())
    record(dbs, AuditAction.PROJECT_UPDATE, actor=user, object_type="project", object_id=project.id,
           details={"fields": sorted(changes), **({"copies_added": added} if added else {})},
           context=audit_context(), now=now())
    dbs.commit()
    return jsonify(project_json(project, counts=counts_for(dbs, project.id, members.project_roles(dbs, project.id, user),
                                                           user.id)))


@bp.get("/projects/<id:project_id>/members")
@require()
def list_members(project_id: int):
    """Members and their project roles."""
    dbs = db()
    members.get_project(dbs, project_id, _user())
    return jsonify({"members": [{"user_id": u.id, "username": u.username, "display_name": u.display_name,
                                 "role": role} for u, role in members.list_members(dbs, project_id)]})


@bp.post("/projects/<id:project_id>/members")
@require()
def add_member(project_id: int):
    """Managers: add `{"username": ..., "role": "labeler"|"reviewer"|"manager"}`."""
    body, dbs, user = _body(), db(), _user()
    project = members.get_project(dbs, project_id, user, "manager")
    member = members.add_member(dbs, project, body.get("username"), body.get("role"), actor=user,
                                context=audit_context(), now=now())
    dbs.commit()
    return jsonify({"user_id": member.user_id, "role": member.role}), 201


@bp.get("/projects/<id:project_id>/dashboard")
@require()
def project_dashboard(project_id: int):
    """Managers and reviewers: state counts, per-labeler quality, throughput, reviewer load."""
    dbs = db()
    members.get_project(dbs, project_id, _user(), "manager", "reviewer")
    return jsonify(dashboard.project_numbers(dbs, project_id, now=now()))


# --- tasks -------------------------------------------------------------------------------------

@bp.post("/projects/<id:project_id>/tasks/next")
@require()
def next_task(project_id: int):
    """Lease the caller's next task; `{"kind": "review"}` asks for review work; 204 when none."""
    body = request.get_json(silent=True) or {}
    if not isinstance(body, dict) or body.get("kind", "label") not in ("label", "review"):
        raise Invalid("kind is label or review.", errors=[{"field": "kind", "message": "label or review"}])
    dbs, user = db(), _caller()
    project = members.get_project_row(dbs, project_id, user)
    if not project.label_schema:
        raise Invalid("This project has no label schema yet.", errors=[{"field": "label_schema", "message": "missing"}])
    lease = leases.lease_next_task(dbs, project, user, review=body.get("kind") == "review", now=now(),
                                   context=audit_context())
    if lease is None:
        dbs.commit()
        return "", 204
    item, images = taskrows.load_item(dbs.connection(), lease.task.item_id)
    answer = {"task": task_json(lease.task), "item": item_json(item, images), "kind": lease.kind,
              "annotation": annotation_json(tasks.latest_annotation(dbs, lease.task.id)),
              "reviews": [review_json(r) for r in tasks.reviews_of(dbs, lease.task.id)]}
    dbs.commit()
    return jsonify(answer)


@bp.get("/projects/<id:project_id>/tasks")
@require()
def list_tasks(project_id: int):
    """Managers and reviewers: tasks by id, `?state=&after=&limit=` (<= 500); managers may ask for
    `?purpose=gold|qualification|held` (the real work otherwise) and then see each task's purpose."""
    dbs, user = db(), _user()
    members.get_project(dbs, project_id, user, "manager", "reviewer")
    state, purpose = request.args.get("state"), request.args.get("purpose", "work")
    if purpose not in TASK_PURPOSES or (purpose != "work" and "manager" not in members.project_roles(dbs, project_id,
                                                                                                    user)):
        raise Invalid("Bad purpose.", errors=[{"field": "purpose", "message": " | ".join(TASK_PURPOSES) + " (managers)"}])
    try:
        after, limit = int(request.args.get("after", 0)), min(int(request.args.get("limit", 100)), PAGE_MAX)
    except ValueError:
        raise Invalid("after and limit are whole numbers.", errors=[{"field": "after", "message": "integer"}]) from None
    if state is not None and state not in TASK_STATES or limit < 1 or after < 0:
        raise Invalid("Bad filter.", errors=[{"field": "state", "message": " | ".join(TASK_STATES)}])
    query = select(Task).where(Task.project_id == project_id, Task.id > after, Task.purpose == purpose)
    if state:
        query = query.where(Task.state == state)
    rows = dbs.scalars(query.order_by(Task.id).limit(limit)).all()
    shown = [task_json(t) if purpose == "work" else {**task_json(t), "purpose": t.purpose} for t in rows]
    return jsonify({"tasks": shown,
                    "next_after": rows[-1].id if len(rows) == limit else None})


@bp.get("/tasks/<id:task_id>")
@require()
def get_task(task_id: int):
    """A task, its current annotation and its review history (audited as a read)."""
    dbs, user = db(), _user()
    task = tasks.get_task(dbs, task_id, user, reading=True)
    answer = {"task": task_json(task), "annotation": annotation_json(tasks.latest_annotation(dbs, task.id)),
              "reviews": [review_json(r) for r in tasks.reviews_of(dbs, task.id)]}
    record(dbs, AuditAction.TASK_VIEW, actor=user, object_type="task", object_id=task.id,
           details={"project_id": task.project_id}, context=audit_context(), now=now())
    dbs.commit()
    return jsonify(answer)


@bp.get("/tasks/<id:task_id>/revisions")
@require()
def task_revisions(task_id: int):
    """The task's saved revisions, newest first: `?limit=` (<= 100, default 20) or `?revision=n` for one."""
    dbs, user = db(), _caller()
    task = tasks.get_task(dbs, task_id, user, reading=True)
    try:
        limit = min(int(request.args.get("limit", 20)), REVISIONS_MAX)
        revision = int(request.args["revision"]) if "revision" in request.args else None
    except ValueError:
        raise Invalid("limit and revision are whole numbers.", errors=[{"field": "limit", "message": "integer"}]) from None
    if limit < 1:
        raise Invalid("limit is at least 1.", errors=[{"field": "limit", "message": ">= 1"}])
    rows = taskrows.revisions_of(dbs.connection(), task.id, limit=limit, revision=revision)
    record(dbs, AuditAction.TASK_VIEW, actor=user, object_type="task", object_id=task.id,
           details={"project_id": task.project_id, "revisions": [r.revision for r in rows]},
           context=audit_context(), now=now())
    dbs.commit()
    return jsonify({"revisions": [annotation_json(r) for r in rows]})


def _locked(task_id: int) -> tuple[taskrows.TaskRow, User]:
    dbs, user = db(), _caller()
    return tasks.get_task(dbs, task_id, user, lock=True), user


@bp.put("/tasks/<id:task_id>/annotation")
@require()
def save_annotation(task_id: int):
    """Save shapes: `{"shapes": [...], "classifications"?: {...}, "version": n}` -> 200 / 409 / 422."""
    body = _body()
    task, user = _locked(task_id)
    annotation = {k: body[k] for k in ("shapes", "classifications") if k in body}
    row = tasks.save_annotation(db(), task, user, annotation, body.get("version"), now=now(), context=audit_context())
    db().commit()
    return jsonify({"task": task_json(task), "annotation": annotation_json(row)})


@bp.post("/tasks/<id:task_id>/heartbeat")
@require()
def heartbeat(task_id: int):
    """Keep the lease alive while the person works."""
    task, user = _locked(task_id)
    leases.renew_lease(db(), task, user, now=now(), context=audit_context())
    db().commit()
    return jsonify({"task": task_json(task)})


@bp.post("/tasks/<id:task_id>/submit")
@require()
def submit(task_id: int):
    """The labeler hands in: `{"version": n}`."""
    body = _body()
    task, user = _locked(task_id)
    tasks.submit_task(db(), task, user, body.get("version"), now=now(), context=audit_context())
    # A test question teaches: the answer against the reference, with its score. (A hidden gold
    # check answers like any other task.)
    answer = {"task": task_json(task)}
    if task.purpose == "qualification":
        answer["feedback"] = qualification.feedback(db(), task)
    db().commit()
    return jsonify(answer)


@bp.post("/tasks/<id:task_id>/review")
@require()
def review(task_id: int):
    """`{"decision": "accept"|"reject"|"correct", "comment", "shape_id"?, "shapes"?, "version"}`."""
    body = _body()
    task, user = _locked(task_id)
    if "reviewer" not in members.project_roles(db(), task.project_id, user):
        raise Forbidden("Only the project's reviewers review.")
    corrected = {k: body[k] for k in ("shapes", "classifications") if k in body}
    tasks.review_task(db(), task, user, body.get("decision"), body.get("version"), comment=body.get("comment", ""),
                      shape_id=body.get("shape_id"), body=corrected, now=now(), context=audit_context())
    db().commit()
    return jsonify({"task": task_json(task)})


@bp.post("/tasks/<id:task_id>/release")
@require()
def release(task_id: int):
    """Give the lease back."""
    task, user = _locked(task_id)
    leases.release_lease(db(), task, user, now=now(), context=audit_context())
    db().commit()
    return jsonify({"task": task_json(task)})


@bp.post("/tasks/<id:task_id>/reassign")
@require()
def reassign(task_id: int):
    """Managers: send an escalated task to `{"username": ..., "version": n}` for rework."""
    body = _body()
    task, user = _locked(task_id)
    labeler = db().scalar(select(User).where(User.username == body.get("username")))
    if labeler is None:
        raise NotFound("No such user.")
    tasks.reassign_task(db(), task, user, labeler, body.get("version"), now=now(), context=audit_context())
    db().commit()
    return jsonify({"task": task_json(task)})

