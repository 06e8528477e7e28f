"""A labeler's or reviewer's own page: per project, what waits for them, their counts and their quality."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from onprem_label.db.models import Project, ProjectMember, Review, Task, User

REWORK_SHOWN = 50  # per project; the workspace hands the rest out oldest first anyway


def my_work(db: Session, user: User) -> list[dict]:
    """One entry per project the user is a member of, by name.

    Each has: project id and name, the user's project roles, their tasks per state (as labeler),
    first-pass acceptance (share of their tasks a reviewer accepted in the first round, of those
    reviewed in the first round), the rework waiting for them with the reviewer's latest comment,
    and for reviewers the number of submitted tasks they may review.
    """
    rows = db.execute(select(Project.id, Project.name, ProjectMember.role).join(ProjectMember)
                      .where(ProjectMember.user_id == user.id).order_by(Project.name)).all()
    projects: dict[int, dict] = {}
    for project_id, name, role in rows:
        entry = projects.setdefault(project_id, {"id": project_id, "name": name, "roles": set(), "counts": {},
                                                 "first_pass": None, "reviewed_first_pass": 0, "rework": [],
                                                 "review_waiting": 0})
        entry["roles"].add(role)
    if not projects:
        return []
    ids = list(projects)
    for project_id, state, count in db.execute(
            # their own tasks, hidden gold checks among them as among their leases (never tests or spot checks)
            select(Task.project_id, Task.state, func.count()).where(Task.project_id.in_(ids),
                                                                    Task.labeler_id == user.id,
                                                                    Task.purpose.in_(("work", "gold")))
            .group_by(Task.project_id, Task.state)):
        projects[project_id]["counts"][state] = count
    _first_pass(db, user, projects)
    _rework(db, user, projects)
    for project_id, count in db.execute(
            select(Task.project_id, func.count()).where(Task.project_id.in_(ids), Task.state == "submitted",
                                                        or_(Task.labeler_id.is_(None), Task.labeler_id != user.id))
            .group_by(Task.project_id)):
        projects[project_id]["review_waiting"] = count
    return [{**entry, "roles": sorted(entry["roles"])} for entry in projects.values()]


def _first_pass(db: Session, user: User, projects: dict[int, dict]) -> None:
    first = Review.round == 0
    counted = select(Task.project_id, Review.decision, func.count()).join(Review, Review.task_id == Task.id) \
        .where(Task.project_id.in_(list(projects)), Task.labeler_id == user.id, first,
               Task.purpose.in_(("work", "gold")),
               Review.decision != "auto_accept").group_by(Task.project_id, Review.decision)
    totals: dict[int, dict[str, int]] = defaultdict(dict)
    for project_id, decision, count in db.execute(counted):
        totals[project_id][decision] = count
    for project_id, decisions in totals.items():
        reviewed = sum(decisions.values())
        projects[project_id]["reviewed_first_pass"] = reviewed
        projects[project_id]["first_pass"] = round(decisions.get("accept", 0) / reviewed, 4) if reviewed else None


def _rework(db: Session, user: User, projects: dict[int, dict]) -> None:
    """The user's rework, oldest first, each with the rejection that sent it back."""
    reviewer = User.__table__.alias("reviewer")
    rejection = and_(Review.task_id == Task.id, Review.decision == "reject", Review.round == Task.round - 1)
    rows = db.execute(select(Task.id, Task.project_id, Task.item_id, Task.round, Task.updated_at, Review.comment,
                             Review.shape_id, reviewer.c.display_name, reviewer.c.username)
                      .join(Review, rejection).outerjoin(reviewer, reviewer.c.id == Review.reviewer_id)
                      .where(Task.project_id.in_(list(projects)), Task.labeler_id == user.id,
                             Task.state == "rework")
                      .order_by(Task.updated_at, Task.id)).all()
    for row in rows:
        waiting = projects[row.project_id]["rework"]
        if len(waiting) < REWORK_SHOWN:
            waiting.append({"task_id": row.id, "item_id": row.item_id, "round": row.round, "comment": row.comment,
                            "shape_id": row.shape_id, "reviewer": row.display_name or row.username or "",
                            "since": row.updated_at})
