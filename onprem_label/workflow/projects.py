"""Projects: creating them and finding them by id or name (schemas and members: workflow issue)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import Project, User


class ProjectError(ValueError):
    """A project request that cannot be done; the message says why."""


class UnknownProject(ProjectError):
    """No project with that id or name."""


class ProjectExists(ProjectError):
    """The name is taken."""


def check_name(name: str) -> str:
    """A project name, trimmed: 1 to 200 printable characters."""
    name = name.strip()
    if not 1 <= len(name) <= 200 or not name.isprintable():
        raise ProjectError("A project name is 1 to 200 printable characters.")
    return name


def create_project(db: Session, name: str, *, description: str = "", settings: dict[str, Any] | None = None,
                   actor: User | None = None, actor_name: str = "", context: AuditContext = CONSOLE,
                   now: datetime) -> Project:
    """Add a project (audited); the caller commits."""
    name = check_name(name)
    if db.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise ProjectExists(f"A project named {name!r} already exists.")
    project = Project(name=name, description=description, label_schema={}, settings=dict(settings or {}),
                      created_by=actor.id if actor is not None else None, created_at=now)
    db.add(project)
    db.flush()
    record(db, AuditAction.PROJECT_CREATE, actor=actor, actor_name=actor_name, object_type="project",
           object_id=project.id, details={"name": name, "settings": project.settings}, context=context,
           now=now)
    return project


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
