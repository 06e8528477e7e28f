"""Roles and what they may do: the one table every permission check reads."""

from __future__ import annotations

from enum import StrEnum

from onprem_label.config import ROLES


class Permission(StrEnum):
    """Things a request may need the right to do."""

    MANAGE_USERS = "manage_users"
    MANAGE_PROJECTS = "manage_projects"
    LABEL = "label"
    REVIEW = "review"
    READ_AUDIT = "read_audit"
    READ_ITEMS = "read_items"


# Which global role grants which permission. Project roles (issue 5) narrow this per project.
GRANTS: dict[Permission, frozenset[str]] = {
    Permission.MANAGE_USERS: frozenset({"admin"}),
    Permission.MANAGE_PROJECTS: frozenset({"admin", "manager"}),
    Permission.LABEL: frozenset({"labeler", "reviewer"}),
    Permission.REVIEW: frozenset({"reviewer"}),
    Permission.READ_AUDIT: frozenset({"auditor"}),
    # Until project membership narrows it (workflow issue): everyone who works on images.
    Permission.READ_ITEMS: frozenset({"admin", "manager", "labeler", "reviewer"}),
}

assert all(role in ROLES for roles in GRANTS.values() for role in roles)


def has_permission(roles: frozenset[str] | set[str], permission: Permission) -> bool:
    """True when any of `roles` grants `permission`."""
    return bool(GRANTS[permission] & set(roles))


def landing_endpoint(roles: frozenset[str]) -> str:
    """The page a user lands on after login, by their most powerful role."""
    for role, endpoint in (("admin", "admin.users"), ("manager", "home.manager"),
                           ("reviewer", "home.work"), ("labeler", "home.work"),
                           ("auditor", "audit.log")):
        if role in roles:
            return endpoint
    return "home.no_role"
