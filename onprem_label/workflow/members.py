"""Who may do what in a project: members and their project roles."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import PROJECT_ROLES, Project, ProjectMember, User
from onprem_label.workflow.errors import Forbidden, Invalid, NotFound

# Global roles that manage every project without being listed as members.
GLOBAL_MANAGERS = frozenset({"admin", "manager"})


def project_roles(db: Session, project_id: int, user: User) -> set[str]:
    """The user's roles in the project; global admins and managers are managers everywhere."""
    roles = set(db.scalars(select(ProjectMember.role).where(ProjectMember.project_id == project_id,
                                                            ProjectMember.user_id == user.id)))
    if GLOBAL_MANAGERS & user.role_set:
        roles.add("manager")
    return roles


def require_role(db: Session, project_id: int, user: User, *roles: str) -> set[str]:
    """The user's project roles if one of `roles` is among them; else 404 (outsider) or 403."""
    held = project_roles(db, project_id, user)
    if not held:
        raise NotFound("No such project.")
    if not held & set(roles):
        raise Forbidden(f"This needs the project role {' or '.join(roles)}.")
    return held


def get_project(db: Session, project_id: int, user: User, *roles: str) -> Project:
    """The project, if the user may see it (any role unless `roles` narrows it)."""
    project = db.get(Project, project_id)
    if project is None:
        raise NotFound("No such project.")
    require_role(db, project_id, user, *(roles or PROJECT_ROLES))
    return project


def add_member(db: Session, project: Project, username: str, role: str, *, actor: User | None,
               context: AuditContext = CONSOLE, now: datetime) -> ProjectMember:
    """Give a user a role in the project (audited); adding an existing role is a no-op."""
    if role not in PROJECT_ROLES:
        raise Invalid("Unknown project role.", errors=[{"field": "role", "message": f"one of {', '.join(PROJECT_ROLES)}"}])
    user = db.scalar(select(User).where(User.username == username))
    if user is None or not user.active:
        raise Invalid("No such active user.", errors=[{"field": "username", "message": "no such active user"}])
    member = db.get(ProjectMember, (project.id, user.id, role))
    if member is None:
        member = ProjectMember(project_id=project.id, user_id=user.id, role=role, added_at=now)
        db.add(member)
        record(db, AuditAction.PROJECT_MEMBER_ADD, actor=actor, object_type="project", object_id=project.id,
               details={"user_id": user.id, "username": user.username, "role": role}, context=context, now=now)
    return member


def list_members(db: Session, project_id: int) -> list[tuple[User, str]]:
    """(user, role) of every member, by username."""
    return list(db.execute(select(User, ProjectMember.role).join(ProjectMember, ProjectMember.user_id == User.id)
                           .where(ProjectMember.project_id == project_id)
                           .order_by(User.username, ProjectMember.role)).all())
