"""Matching people and work: skill profiles from history, the lease's preference, recommended people.

A skill is a modality (an item's DICOM modality, or its kind for pictures) or a label class. Each
person's counters per skill (db.quality.SkillProfile) are updated as their work is reviewed, their
gold answers are scored and their hand-ins are timed, so reading a profile is a few rows.

Scoring (docs/quality-and-people.md, "Matching"):
  accuracy(skill) = (passed + gold_correct + 1) / (reviewed + gold + 2)
      first-round reviews and hidden gold together, smoothed so a newcomer starts at 0.5, not 0 or 1;
  speed(skill)    = the person's seconds per hand-in overall / on this skill, clipped to [0.5, 2];
  fit(skill)      = accuracy(skill) * speed(skill) ** 0.1   (accuracy decides; speed breaks near-ties).
The lease looks at the head of the project's queue only (match_window tasks in the project's own
order, so the project's priorities hold) and hands out the task whose modality fits the person
best (among equally good rows each person starts at a different one, so a crowd with the same
strength does not chase one row).
Label classes are known only after labeling, so they shape recommendations, not the lease.
"""

from __future__ import annotations

import time
from datetime import datetime

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from onprem_label.db.models import Project, User
from onprem_label.db.quality import SkillProfile
from onprem_label.workflow.settings import project_settings
from onprem_label.workflow.taskrows import ITEMS, NOT_MY_ITEM, TASKS as T, TaskRow

SKILLS = SkillProfile.__table__
COUNTERS = ("reviewed", "passed", "gold", "gold_correct", "label_seconds", "label_tasks")
RECOMMEND_MAX = 50


def modality_of(item) -> str:
    """The skill name of an item's kind of image: its DICOM modality, else 'picture'."""
    return (getattr(item, "modality", "") or "").upper() or ("picture" if getattr(item, "kind", "") == "raster" else "OT")


def classes_in(shapes) -> list[str]:
    """The label classes a list of shapes uses, sorted."""
    return sorted({str(s.get("label"))[:64] for s in shapes or [] if s.get("label")})


def skills_of(item, annotation: dict | None) -> list[tuple[str, str]]:
    """The (kind, skill) pairs a piece of work exercises: the item's modality and each class it labels."""
    return [("modality", modality_of(item))] + [("class", name) for name in classes_in((annotation or {}).get("shapes"))]


def bump(conn, user_id: int | None, skills: list[tuple[str, str]], *, now: datetime, **counts: int) -> None:
    """Add to the person's counters in each skill (one upsert per skill)."""
    if user_id is None or not any(counts.values()):
        return
    if any(counts.get(c) for c in ("reviewed", "passed", "gold", "gold_correct")):
        _FITS.pop((_database(conn), user_id), None)  # a verdict moves the fit; a timed hand-in barely does
    maker = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    for kind, skill in skills:
        values = {"user_id": user_id, "kind": kind, "skill": skill, "updated_at": now,
                  **{c: int(counts.get(c, 0)) for c in COUNTERS}}
        statement = maker(SKILLS).values(values)
        conn.execute(statement.on_conflict_do_update(
            index_elements=["user_id", "kind", "skill"],
            set_={"updated_at": now, **{c: SKILLS.c[c] + statement.excluded[c] for c in COUNTERS if counts.get(c)}}))


def fit(row, overall_speed: float | None) -> float:
    """How well a person's history in one skill fits: smoothed accuracy, nudged by relative speed."""
    accuracy = (row.passed + row.gold_correct + 1) / (row.reviewed + row.gold + 2)
    speed = 1.0
    if overall_speed and row.label_tasks and row.label_seconds:
        speed = min(2.0, max(0.5, overall_speed / (row.label_seconds / row.label_tasks)))
    return accuracy * speed ** 0.1


_PROFILE = select(SKILLS).where(SKILLS.c.user_id == bindparam("user_id"))


def profile(conn, user_id: int) -> dict[tuple[str, str], object]:
    """The person's counters per (kind, skill)."""
    return {(row.kind, row.skill): row for row in conn.execute(_PROFILE, {"user_id": user_id})}


def fits(rows: dict, kind: str = "modality") -> dict[str, float]:
    """fit() of each skill of a kind in a profile."""
    seconds = sum(r.label_seconds for (k, _), r in rows.items() if k == "modality")
    handed = sum(r.label_tasks for (k, _), r in rows.items() if k == "modality")
    overall = seconds / handed if handed and seconds else None
    return {skill: fit(row, overall) for (k, skill), row in rows.items() if k == kind}


def _window(*extra):
    return (select(T.c.id, ITEMS.c.modality, ITEMS.c.kind).join(ITEMS, ITEMS.c.id == T.c.item_id)
            .where(T.c.project_id == bindparam("project_id"), T.c.state == "new", T.c.purpose == "work", *extra)
            .order_by(T.c.id).limit(bindparam("window")))


# (plain, consensus: never a second copy of an item the person labels)
_WINDOW = {False: _window(), True: _window(NOT_MY_ITEM)}
TRIES = 2  # best-fitting rows tried before falling back to the plain queue
_TAKE = (select(T).where(T.c.id == bindparam("task_id"), T.c.state == "new", T.c.purpose == "work")
         .with_for_update(skip_locked=True))


def preferred_new_task(conn, project_id: int, user_id: int, window: int, *, consensus: bool = False) -> TaskRow | None:
    """The new task at the head of the queue whose modality fits the person best, locked; None to use
    the plain queue (no window, one modality or nothing better than the head, or the rows taken).

    Costs one read more than the plain queue: the window (the profile is cached, PROFILE_TTL); the
    chosen row is then taken by its id (FOR UPDATE SKIP LOCKED) in place of the queue's own query.
    People with the same strength would all choose the same row at once; each starts at a different
    one of the best-fitting rows (by user id), and a second is tried before falling back."""
    if window <= 1:
        return None
    head = conn.execute(_WINDOW[consensus], {"project_id": project_id, "window": window, "user_id": user_id}).all()
    if len({modality_of(row) for row in head}) < 2:
        return None  # nothing to choose between: the queue's own order (SKIP LOCKED handles the crowd)
    scores = cached_fits(conn, user_id)
    fit_of = {row.id: scores.get(modality_of(row), 0.5) for row in head}
    top = max(fit_of.values())
    if top <= fit_of[head[0].id]:
        return None  # the head fits as well as anything: keep the project's order
    best = [row for row in head if fit_of[row.id] == top]
    start = user_id % len(best)
    for row in (best[start:] + best[:start])[:TRIES]:
        taken = conn.execute(_TAKE, {"task_id": row.id}).first()
        if taken is not None:
            return TaskRow.of(taken)
    return None



# A person's modality fits, per process, for PROFILE_TTL seconds: a lease reads no profile rows on most
# requests. A new verdict (review, gold) makes bump() forget the person's entry in its own process;
# other processes, and the speed part of every hand-in, catch up within PROFILE_TTL (a fit moves
# slowly: one review changes it by a few hundredths at most).
PROFILE_TTL = 30.0
_FITS: dict[tuple[str, int], tuple[float, dict[str, float]]] = {}  # (database, user id) ->
_FITS_MAX = 10_000


def cached_fits(conn, user_id: int) -> dict[str, float]:
    """fits() of the person's modalities, from the cache while fresh."""
    key = (_database(conn), user_id)
    entry = _FITS.get(key)
    now = time.monotonic()
    if entry is not None and entry[0] > now:
        return entry[1]
    if len(_FITS) >= _FITS_MAX:
        _FITS.clear()
    scores = fits(profile(conn, user_id))
    _FITS[key] = (now + PROFILE_TTL, scores)
    return scores


def _database(conn) -> str:
    """Which database a connection is on (one process may serve tests of many)."""
    return str(conn.engine.url)


def needed_skills(db: Session, project: Project) -> list[tuple[str, str]]:
    """What the project's work asks for: its declared required skills, else its modalities and classes."""
    declared = list(project_settings(project).required_skills)
    if declared:
        return [tuple(s.split(":", 1)) if ":" in s else ("modality", s.upper()) for s in declared]
    modalities = db.execute(select(ITEMS.c.modality, ITEMS.c.kind).where(ITEMS.c.project_id == project.id)
                            .distinct()).all()
    classes = [c["name"] for c in (project.label_schema or {}).get("classes", [])]
    return sorted({("modality", modality_of(r)) for r in modalities}) + [("class", c) for c in classes]


def recommend(db: Session, project: Project) -> dict:
    """Active labelers ranked by their mean fit over the project's needed skills (members marked)."""
    needed = needed_skills(db, project)
    rows = db.execute(select(SKILLS).where(SKILLS.c.kind.in_(("modality", "class")))).all()
    by_user: dict[int, dict] = {}
    for row in rows:
        by_user.setdefault(row.user_id, {})[(row.kind, row.skill)] = row
    member_ids = {uid for (uid,) in db.execute(select(T.c.labeler_id).where(T.c.project_id == project.id).distinct())}
    people = db.scalars(select(User).where(User.active.is_(True))).all()
    out = []
    for user in people:
        if "labeler" not in user.role_set:
            continue
        rows_of = by_user.get(user.id, {})
        scores = {**{("modality", k): v for k, v in fits(rows_of).items()},
                  **{("class", k): v for k, v in fits(rows_of, "class").items()}}
        per_skill = {f"{kind}:{skill}": round(scores.get((kind, skill), 0.5), 4) for kind, skill in needed}
        experience = sum(rows_of[k].reviewed + rows_of[k].gold for k in needed if k in rows_of)
        score = sum(per_skill.values()) / len(per_skill) if per_skill else 0.5
        out.append({"user_id": user.id, "username": user.username, "fit": round(score, 4),
                    "experience": experience, "skills": per_skill, "worked_here": user.id in member_ids})
    out.sort(key=lambda r: (-r["fit"], -r["experience"], r["username"]))
    return {"needed": [f"{k}:{s}" for k, s in needed], "people": out[:RECOMMEND_MAX]}
