"""Quality figures: per labeler, reviewer, label class and project, with the accuracy estimate beside its target.

Definitions (docs/quality-and-people.md):
- first-pass acceptance: of a labeler's work tasks a reviewer decided in round 0, the share accepted
  as they were (a correction or a rejection is not a pass);
- gold accuracy: of a labeler's first answers on hidden gold checks, the share scored correct
  (workflow.metrics), with a 95% Wilson interval and its count;
- rework rounds: rejections per reviewed task; time per task: logged active seconds per task;
- reviewer agreement with gold: a reviewer's decisions on gold checks that match the score (accepting a
  correct answer, rejecting or correcting a wrong one);
- estimated label accuracy: of hidden gold checks that full inspection accepted, the share whose
  accepted labels match the reference: the same path every real task takes, so an unbiased sample.
"""

from __future__ import annotations

import math
from collections import defaultdict

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from onprem_label.db.models import User
from onprem_label.db.quality import GoldCheck, WorkLog
from onprem_label.workflow import consensus, spotcheck
from onprem_label.workflow.settings import ProjectSettings
from onprem_label.workflow.taskrows import REVIEWS as R, TASKS as T

CHECKS, WORK = GoldCheck.__table__, WorkLog.__table__
Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (None without observations)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> dict:
    """A measured share with its count and 95% interval."""
    interval = wilson(successes, n)
    return {"value": round(successes / n, 4) if n else None, "count": n, "successes": successes,
            "ci95": [round(interval[0], 4), round(interval[1], 4)] if interval else None}


def labeler_figures(db: Session, project_id: int, labeler_id: int) -> dict | None:
    """One labeler's figures (what promotion looks at after an acceptance), or None without any."""
    return _labelers(db, project_id, labeler_id).get(labeler_id)


def project_quality(db: Session, project_id: int, settings: ProjectSettings, schema: dict | None = None) -> dict:
    """Every quality figure of the project, in a few grouped queries (consensus figures need the schema)."""
    names = dict(db.execute(select(User.id, User.username)).all())
    labelers, reviewers = _labelers(db, project_id), _reviewers(db, project_id)
    accepted_checks = _counts(db, select(func.count(), func.sum(case((CHECKS.c.correct, 1), else_=0)))
                              .where(CHECKS.c.project_id == project_id, CHECKS.c.purpose == "gold",
                                     CHECKS.c.stage == "accepted"))
    first_checks = _counts(db, select(func.count(), func.sum(case((CHECKS.c.correct, 1), else_=0)))
                           .where(*_FIRST_GOLD(project_id)))
    reviewed = sum(v["first_pass"]["count"] for v in labelers.values())
    passed = sum(v["first_pass"]["successes"] for v in labelers.values())
    spot = [0, 0]
    for n, ok in spotcheck.second_review_agreement(db, project_id).values():
        spot[0], spot[1] = spot[0] + n, spot[1] + ok
    # Pooled: accepted gold checks whose labels match the reference, and spot-checked acceptances a
    # second reviewer upheld. Both sample accepted work through the path all work takes.
    estimate = proportion(accepted_checks[1] + spot[1], accepted_checks[0] + spot[0])
    meets = None if estimate["ci95"] is None else estimate["ci95"][0] >= settings.target_accuracy
    return {
        "project": {"first_pass_acceptance": proportion(passed, reviewed), "gold_accuracy": proportion(*first_checks[::-1]),
                    "estimated_label_accuracy": estimate, "target": settings.target_accuracy, "meets_target": meets,
                    "accepted_gold": proportion(*accepted_checks[::-1]), "spot_checks": proportion(spot[1], spot[0]),
                    "estimated_from": "hidden gold checks accepted by full inspection, and spot checks"},
        "consensus": consensus.project_consensus(db, project_id, schema or {}, settings),
        "labelers": [{"user_id": uid, "username": names.get(uid, ""), **figures}
                     for uid, figures in sorted(labelers.items(), key=lambda kv: names.get(kv[0], ""))],
        "reviewers": [{"user_id": uid, "username": names.get(uid, ""), **figures}
                      for uid, figures in sorted(reviewers.items(), key=lambda kv: names.get(kv[0], ""))],
        "classes": _classes(db, project_id),
    }


def _counts(db: Session, query) -> tuple[int, int]:
    n, ok = db.execute(query).one()
    return int(n or 0), int(ok or 0)


def _FIRST_GOLD(project_id: int) -> tuple:
    """A labeler's first answer on each gold check: what gold accuracy is measured on."""
    return (CHECKS.c.project_id == project_id, CHECKS.c.purpose == "gold", CHECKS.c.stage == "submitted",
            CHECKS.c.round == 0)


def _labelers(db: Session, project_id: int, only: int | None = None) -> dict[int, dict]:
    work = and_(T.c.project_id == project_id, T.c.purpose == "work",
                *(() if only is None else (T.c.labeler_id == only,)))
    first = {uid: (n, int(ok or 0)) for uid, n, ok in db.execute(
        select(T.c.labeler_id, func.count(), func.sum(case((R.c.decision == "accept", 1), else_=0)))
        .join(R, R.c.task_id == T.c.id).where(work, R.c.round == 0, R.c.reviewer_id.is_not(None))
        .group_by(T.c.labeler_id))}
    rejects = dict(db.execute(select(T.c.labeler_id, func.count()).join(R, R.c.task_id == T.c.id)
                              .where(work, R.c.decision == "reject").group_by(T.c.labeler_id)).all())
    accepted = dict(db.execute(select(T.c.labeler_id, func.count()).where(work, T.c.state == "accepted")
                               .group_by(T.c.labeler_id)).all())
    gold = {uid: (n, int(ok or 0)) for uid, n, ok in db.execute(
        select(CHECKS.c.user_id, func.count(), func.sum(case((CHECKS.c.correct, 1), else_=0)))
        .where(*_FIRST_GOLD(project_id), *(() if only is None else (CHECKS.c.user_id == only,)))
        .group_by(CHECKS.c.user_id))}
    time = _time(db, project_id, "label", only)
    out = {}
    for uid in (set(first) | set(accepted) | set(gold)) - {None}:
        n_first, ok_first = first.get(uid, (0, 0))
        n_gold, ok_gold = gold.get(uid, (0, 0))
        out[uid] = {"accepted": accepted.get(uid, 0), "first_pass": proportion(ok_first, n_first),
                    "gold_accuracy": proportion(ok_gold, n_gold),
                    "rework_rounds_per_task": round(rejects.get(uid, 0) / n_first, 4) if n_first else None,
                    "seconds_per_task": time.get(uid)}
    return out


def _time(db: Session, project_id: int, kind: str, only: int | None = None) -> dict[int, float]:
    rows = db.execute(select(WORK.c.user_id, func.sum(WORK.c.seconds), func.count(func.distinct(WORK.c.task_id)))
                      .where(WORK.c.project_id == project_id, WORK.c.kind == kind,
                             *(() if only is None else (WORK.c.user_id == only,)))
                      .group_by(WORK.c.user_id)).all()
    return {uid: round(int(total or 0) / tasks, 1) for uid, total, tasks in rows if uid is not None and tasks}


def _reviewers(db: Session, project_id: int) -> dict[int, dict]:
    # The check of the same round as the review: what the reviewer saw.
    says_wrong = R.c.decision.in_(("reject", "correct"))
    agree = case((and_(says_wrong, CHECKS.c.correct.is_(False)), 1), (and_(~says_wrong, CHECKS.c.correct.is_(True)), 1),
                 else_=0)
    gold = {uid: (n, int(ok or 0)) for uid, n, ok in db.execute(
        select(R.c.reviewer_id, func.count(), func.sum(agree))
        .join(CHECKS, and_(CHECKS.c.task_id == R.c.task_id, CHECKS.c.round == R.c.round,
                           CHECKS.c.stage == "submitted", CHECKS.c.purpose == "gold"))
        .where(CHECKS.c.project_id == project_id, R.c.reviewer_id.is_not(None)).group_by(R.c.reviewer_id))}
    decided = dict(db.execute(select(R.c.reviewer_id, func.count()).join(T, T.c.id == R.c.task_id)
                              .where(T.c.project_id == project_id, R.c.reviewer_id.is_not(None))
                              .group_by(R.c.reviewer_id)).all())
    time = _time(db, project_id, "review")
    second = spotcheck.second_review_agreement(db, project_id)
    out = {}
    for uid in set(gold) | set(decided):
        n_gold, ok_gold = gold.get(uid, (0, 0))
        out[uid] = {"reviews": decided.get(uid, 0), "gold_agreement": proportion(ok_gold, n_gold),
                    "second_review_agreement": proportion(*second.get(uid, (0, 0))[::-1]),
                    "seconds_per_review": time.get(uid)}
    return out


def _classes(db: Session, project_id: int) -> list[dict]:
    """Per label class: first-pass acceptance, rework rounds and time of the work that drew it (a task
    counts for each class its first reviewed revision has), and from first answers on gold the share
    of reference shapes found and the extra shapes."""
    totals: dict[str, dict[str, int]] = defaultdict(lambda: {"matched": 0, "missed": 0, "extra": 0, "first": 0,
                                                             "passed": 0, "rejects": 0, "seconds": 0, "timed": 0})
    for (detail,) in db.execute(select(CHECKS.c.detail).where(*_FIRST_GOLD(project_id))):
        for name, counts in (detail or {}).get("per_class", {}).items():
            for key in ("matched", "missed", "extra"):
                totals[name][key] += int(counts.get(key, 0))
    seconds = dict(db.execute(select(WORK.c.task_id, func.sum(WORK.c.seconds)).where(
        WORK.c.project_id == project_id, WORK.c.kind == "label").group_by(WORK.c.task_id)).all())
    classes_of: dict[int, list[str]] = {}
    for task_id, round_, decision, classes in db.execute(
            select(R.c.task_id, R.c.round, R.c.decision, R.c.classes).join(T, T.c.id == R.c.task_id)
            .where(T.c.project_id == project_id, T.c.purpose == "work", R.c.reviewer_id.is_not(None))):
        for name in classes or []:
            row = totals[name]
            row["rejects"] += decision == "reject"
            if round_ == 0:
                row["first"] += 1
                row["passed"] += decision == "accept"
        if round_ == 0:
            classes_of[task_id] = classes or []
    for task_id, names in classes_of.items():
        for name in names:
            totals[name]["seconds"] += int(seconds.get(task_id) or 0)
            totals[name]["timed"] += 1
    return [{"label": name, "first_pass": proportion(c["passed"], c["first"]),
             "rework_rounds_per_task": round(c["rejects"] / c["first"], 4) if c["first"] else None,
             "seconds_per_task": round(c["seconds"] / c["timed"], 1) if c["timed"] else None,
             "gold_shape_recall": proportion(c["matched"], c["matched"] + c["missed"]), "extra_shapes": c["extra"]}
            for name, c in sorted(totals.items())]
