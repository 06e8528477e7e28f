"""Projects: creating them, their label schema (versioned) and settings, counts per task state."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import TASK_STATES, Project, SchemaVersion, Task, User
from onprem_label.workflow.errors import Invalid
from onprem_label.workflow.schema import SchemaError, breaking_changes, schema_changes, validate_schema
from onprem_label.workflow.settings import validate_settings


class ProjectError(Invalid):
    """A project request that cannot be done; the message says why (a 422)."""


class UnknownProject(ProjectError):
    """No project with that id or name."""

    status, code = 404, "not_found"


class ProjectExists(ProjectError):
    """The name is taken."""

    status, code = 409, "exists"


def check_name(name: str) -> str:
    """A project name, trimmed: 1 to 200 printable characters."""
    name = name.strip()
    if not 1 <= len(name) <= 200 or not name.isprintable():
        raise ProjectError("A project name is 1 to 200 printable characters.")
    return name


def create_project(db: Session, name: str, *, description: str = "", settings: dict[str, Any] | None = None,
                   label_schema: Any = None, actor: User | None = None, actor_name: str = "",
                   context: AuditContext = CONSOLE, now: datetime) -> Project:
    """Add a project (audited); the caller commits. Without a schema, no task is handed out yet."""
    name = check_name(name)
    if not isinstance(description, str) or len(description) > 5000:
        raise ProjectError("A description is text of up to 5000 characters.")
    schema = {} if label_schema is None else _valid_schema(label_schema)
    values = validate_settings(settings)
    if db.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise ProjectExists(f"A project named {name!r} already exists.")
    project = Project(name=name, description=description, label_schema=schema, schema_version=1,
                      settings=values, created_by=actor.id if actor is not None else None, created_at=now)
    db.add(project)
    db.flush()
    db.add(SchemaVersion(project_id=project.id, version=1, label_schema=schema,
                         created_by=project.created_by, created_at=now))
    record(db, AuditAction.PROJECT_CREATE, actor=actor, actor_name=actor_name, object_type="project",
           object_id=project.id, details={"name": name, "settings": values, "classes": len(schema.get("classes", []))},
           context=context, now=now)
    return project


def set_schema(db: Session, project: Project, raw: Any, *, actor: User | None, context: AuditContext = CONSOLE,
               now: datetime) -> list[str]:
    """Replace the label schema; a change becomes a new version, and saved annotations keep theirs.

    Returns the changes in words (empty when nothing changed).
    """
    schema, old = _valid_schema(raw), project.label_schema or {}
    changes = schema_changes(old, schema) if old else ["first schema"]
    if not changes:
        return []
    breaking = breaking_changes(old, schema)
    project.schema_version += 1
    project.label_schema = schema
    db.add(SchemaVersion(project_id=project.id, version=project.schema_version, label_schema=schema,
                         created_by=actor.id if actor is not None else None, created_at=now))
    record(db, AuditAction.PROJECT_SCHEMA, actor=actor, object_type="project", object_id=project.id,
           details={"version": project.schema_version, "changes": changes[:50], "breaking": breaking[:50]},
           context=context, now=now)
    return changes


def _valid_schema(raw: Any) -> dict:
    try:
        return validate_schema(raw)
    except SchemaError as exc:
        raise Invalid("The label schema is not valid.", errors=exc.errors) from None


def state_counts(db: Session, project_id: int, *, purposes: tuple[str, ...] = ("work",),
                 labeler_id: int | None = None) -> dict[str, int]:
    """Tasks per state, every state present (zeros included): the project's real work by default."""
    counts = dict.fromkeys(TASK_STATES, 0)
    query = select(Task.state, func.count()).where(Task.project_id == project_id, Task.purpose.in_(purposes))
    if labeler_id is not None:
        query = query.where(Task.labeler_id == labeler_id)
    counts.update(db.execute(query.group_by(Task.state)).all())
    return counts


def counts_for(db: Session, project_id: int, roles: set[str], user_id: int) -> dict[str, int]:
    """The counts a caller may see without telling a hidden gold check from real work.

    Managers and reviewers see the real work (as the dashboard does). A labeler sees their own tasks
    only: project-wide counts would give a gold check away (leasing one adds to "labeling" without
    taking from "new").
    """
    if roles & {"manager", "reviewer"}:
        return state_counts(db, project_id)
    return state_counts(db, project_id, purposes=("work", "gold"), labeler_id=user_id)


def find_project(db: Session, ref: str | int) -> Project:
    """A project by id (digits) or by exact name."""
    project = None
    if isinstance(ref, int) or str(ref).isdigit():
        project = db.get(Project, int(ref))
    if project is None:
        project = db.scalar(select(Project).where(Project.name == str(ref)))
    if project is None:
        raise UnknownProject(f"No project {str(ref)!r}.")
    return project
