"""Dashboard numbers of a project: states, labeler quality, throughput, active time, reviewer load."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from onprem_label.db.models import Review, Task, User
from onprem_label.workflow.projects import state_counts

RECENT_COMMENTS = 50


def project_numbers(db: Session, project_id: int, *, now: datetime) -> dict:
    """Every figure of the dashboard, computed in a few grouped queries."""
    in_project = Review.task_id.in_(select(Task.id).where(Task.project_id == project_id, Task.purpose == "work"))
    names = dict(db.execute(select(User.id, User.username)).all())
    return {"counts": state_counts(db, project_id), "labelers": _labelers(db, project_id, in_project, names),
            "reviewers": _reviewers(db, project_id, in_project, names),
            "throughput": _throughput(db, project_id, now),
            "active_seconds_per_accepted_task": _active_time(db, project_id),
            "recent_rejections": _rejections(db, in_project, names)}


def _labelers(db: Session, project_id: int, in_project, names: dict) -> list[dict]:
    """First-pass acceptance: of a labeler's tasks reviewed at least once, the share accepted in
    round 0 by a reviewer without correction. Rework rounds: rejections per reviewed task."""
    first = dict(db.execute(select(Task.labeler_id, func.count()).join(Review, Review.task_id == Task.id)
                            .where(in_project, Review.round == 0, Review.decision != "auto_accept")
                            .group_by(Task.labeler_id)).all())
    passed = dict(db.execute(select(Task.labeler_id, func.count()).join(Review, Review.task_id == Task.id)
                             .where(in_project, Review.round == 0, Review.decision == "accept")
                             .group_by(Task.labeler_id)).all())
    rejects = dict(db.execute(select(Task.labeler_id, func.count()).join(Review, Review.task_id == Task.id)
                              .where(in_project, Review.decision == "reject").group_by(Task.labeler_id)).all())
    accepted = dict(db.execute(select(Task.labeler_id, func.count()).where(Task.project_id == project_id, Task.purpose == "work",
                                                                          Task.state == "accepted")
                               .group_by(Task.labeler_id)).all())
    out = []
    for labeler in sorted(set(first) | set(accepted), key=lambda i: names.get(i, "")):
        if labeler is None:
            continue
        reviewed = first.get(labeler, 0)
        out.append({"user_id": labeler, "username": names.get(labeler, ""), "accepted": accepted.get(labeler, 0),
                    "reviewed_first_pass": reviewed,
                    "first_pass_acceptance": round(passed.get(labeler, 0) / reviewed, 4) if reviewed else None,
                    "rework_rounds_per_reviewed_task": round(rejects.get(labeler, 0) / reviewed, 4) if reviewed else None})
    return out


def _reviewers(db: Session, project_id: int, in_project, names: dict) -> list[dict]:
    done = dict(db.execute(select(Review.reviewer_id, func.count()).where(in_project, Review.reviewer_id.is_not(None))
                           .group_by(Review.reviewer_id)).all())
    holding = dict(db.execute(select(Task.reviewer_id, func.count()).where(Task.project_id == project_id, Task.purpose == "work",
                                                                          Task.state == "reviewing")
                              .group_by(Task.reviewer_id)).all())
    waiting = db.scalar(select(func.count()).select_from(Task).where(Task.project_id == project_id, Task.purpose == "work",
                                                                     Task.state == "submitted"))
    return [{"user_id": r, "username": names.get(r, ""), "reviews": done.get(r, 0), "reviewing_now": holding.get(r, 0)}
            for r in sorted(set(done) | set(holding) - {None}, key=lambda i: names.get(i, ""))] + \
           [{"waiting_for_review": waiting}]


def _throughput(db: Session, project_id: int, now: datetime) -> dict:
    def accepted_since(delta: timedelta) -> int:
        return db.scalar(select(func.count()).select_from(Task).where(
            Task.project_id == project_id, Task.purpose == "work", Task.state == "accepted", Task.accepted_at > now - delta))
    last_day = accepted_since(timedelta(hours=24))
    return {"accepted_last_hour": accepted_since(timedelta(hours=1)), "accepted_last_24h": last_day,
            "accepted_per_hour_24h": round(last_day / 24, 2)}


def _active_time(db: Session, project_id: int) -> float | None:
    value = db.scalar(select(func.avg(Task.active_seconds)).where(Task.project_id == project_id, Task.purpose == "work",
                                                                 Task.state == "accepted"))
    return None if value is None else round(float(value), 1)


def _rejections(db: Session, in_project, names: dict) -> list[dict]:
    rows = db.execute(select(Review, Task.labeler_id).join(Task, Task.id == Review.task_id)
                      .where(in_project, Review.decision == "reject")
                      .order_by(Review.id.desc()).limit(RECENT_COMMENTS)).all()
    return [{"task_id": r.task_id, "round": r.round, "comment": r.comment, "shape_id": r.shape_id,
             "reviewer": names.get(r.reviewer_id, ""), "labeler": names.get(labeler, ""),
             "created_at": r.created_at.isoformat()} for r, labeler in rows]
