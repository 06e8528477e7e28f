"""Who may do what in a project: members and their project roles."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import CONSOLE, AuditContext, record
from onprem_label.db.models import PROJECT_ROLES, Project, ProjectMember, User
from onprem_label.workflow.errors import Forbidden, Invalid, NotFound
from onprem_label.workflow.taskrows import member_roles, project_and_roles

# Global roles that manage every project without being listed as members.
GLOBAL_MANAGERS = frozenset({"admin", "manager"})


def project_roles(db: Session, project_id: int, user: User) -> set[str]:
    """The user's roles in the project; global admins and managers are managers everywhere.

    Remembered for the rest of the transaction: a request asks more than once.
    """
    cache = _roles_cache(db)
    key = (project_id, user.id)
    if key not in cache:
        _remember_roles(db, project_id, user, member_roles(db.connection(), project_id, user.id))
    return set(cache[key])


_ROLES_CACHE = "onprem_label.project_roles"


def _roles_cache(db: Session) -> dict:
    db.connection()  # the transaction the answers belong to
    cache = db.info.get(_ROLES_CACHE)
    if cache is None or cache[0] is not db.get_transaction():
        cache = db.info[_ROLES_CACHE] = (db.get_transaction(), {})
    return cache[1]


def _remember_roles(db: Session, project_id: int, user: User, roles: set[str]) -> None:
    if GLOBAL_MANAGERS & user.role_set:
        roles = roles | {"manager"}
    _roles_cache(db)[(project_id, user.id)] = frozenset(roles)


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


def get_project_row(db: Session, project_id: int, user: User, *roles: str):
    """get_project as a plain row (id, label_schema, schema_version, settings), for the label loop."""
    project, held = project_and_roles(db.connection(), project_id, user.id)
    if project is None:
        raise NotFound("No such project.")
    _remember_roles(db, project_id, user, held)
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
    db.info.pop(_ROLES_CACHE, None)
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


def remove_member(db: Session, project: Project, user: User, role: str, *, actor: User | None,
                  context: AuditContext = CONSOLE, now: datetime, reason: str = "") -> bool:
    """Take a role in the project away (audited); False when the user did not have it."""
    member = db.get(ProjectMember, (project.id, user.id, role))
    db.info.pop(_ROLES_CACHE, None)
    if member is None:
        return False
    db.delete(member)
    record(db, AuditAction.PROJECT_MEMBER_REMOVE, actor=actor, object_type="project", object_id=project.id,
           details={"user_id": user.id, "username": user.username, "role": role, "reason": reason},
           context=context, now=now)
    return True
