"""Consensus: k labelers label an item independently; their agreement per item, and low agreement reviewed first.

Per item (once every copy has been handed in, and again after each rework):
- shapes: the mean over pairs of copies of their matched similarity (IoU for boxes and polygons, Dice
  for masks, workflow.metrics for points and lines), an unmatched shape counting 0;
- each question: the share of agreeing pairs of copies (Fleiss' P_i);
- the item's agreement: the mean of those parts, stored on each copy; the review queue of a consensus
  project takes the lowest first.
Per project: Fleiss' kappa per question over the items with all copies in (quality figures).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from itertools import combinations

from sqlalchemy import bindparam, case, func, insert, select, text, update
from sqlalchemy.orm import Session

from onprem_label.workflow import gold
from onprem_label.workflow.errors import Invalid
from onprem_label.workflow.metrics import Thresholds, shapes_match, similarity
from onprem_label.workflow.settings import ProjectSettings
from onprem_label.workflow.taskrows import ANNOTATIONS as A, TASKS as T, TaskRow


def pair_agreement(a: list[dict], b: list[dict], t: Thresholds) -> float:
    """Matched similarity of two shape lists over the longer list (1.0 when both are empty)."""
    if not a and not b:
        return 1.0
    pairs = sorted(((similarity(x, y), i, j) for i, x in enumerate(a) for j, y in enumerate(b)
                    if shapes_match(x, y, t)), key=lambda p: (-p[0], p[1], p[2]))
    used_a, used_b, total = set(), set(), 0.0
    for value, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            total += value
    return total / max(len(a), len(b))


def _key(value) -> str:
    return repr(sorted(value)) if isinstance(value, list) else repr(value)


def question_agreement(values: list) -> float:
    """Fleiss' P_i: the share of agreeing pairs among the copies' answers to one question."""
    k = len(values)
    if k < 2:
        return 1.0
    counts = Counter(_key(v) for v in values)
    return sum(n * (n - 1) for n in counts.values()) / (k * (k - 1))


def item_agreement(copies: list[dict], schema: dict, t: Thresholds) -> dict:
    """The agreement of k annotations of one item: shapes, each question, and their mean."""
    shapes = [sum(pair_agreement(a.get("shapes", []), b.get("shapes", []), t) for a, b in pairs) / len(pairs)
              for pairs in [list(combinations(copies, 2))] if pairs]
    questions = {q["name"]: question_agreement([c.get("classifications", {}).get(q["name"]) for c in copies])
                 for q in schema.get("questions", [])}
    parts = shapes + list(questions.values())
    return {"shapes": shapes[0] if shapes else None, "questions": questions,
            "agreement": sum(parts) / len(parts) if parts else 1.0}


def fleiss_kappa(answers_per_item: list[list]) -> float | None:
    """Fleiss' kappa of one question over items each answered by the same number (>= 2) of raters."""
    items = [a for a in answers_per_item if len(a) >= 2]
    if not items or len({len(a) for a in items}) != 1:
        return None
    k = len(items[0])
    p_bar = sum(question_agreement(a) for a in items) / len(items)
    totals = Counter(_key(v) for a in items for v in a)
    p_e = sum((n / (len(items) * k)) ** 2 for n in totals.values())
    return None if p_e >= 1 else (p_bar - p_e) / (1 - p_e)


_ONE_ITEM = text("SELECT pg_advisory_xact_lock(hashtextextended('onprem-label consensus ' || :item_id, 0))")
_COPIES = select(T.c.id, T.c.submitted_at).where(T.c.item_id == bindparam("item_id"), T.c.purpose == "work")
_LATEST = (select(A.c.shapes, A.c.classifications).where(A.c.task_id == bindparam("task_id"), A.c.kind == "label")
           .order_by(A.c.revision.desc()).limit(1))


def after_submit(db: Session, task: TaskRow, project, settings: ProjectSettings) -> float | None:
    """Once every copy of the item is in, store the item's agreement on each copy; the agreement or None."""
    if settings.consensus_k < 2 or task.purpose != "work":
        return None
    conn = db.connection()
    if conn.dialect.name == "postgresql":
        # The last two copies handed in at once would each see the other as not in yet: one at a
        # time per item (READ COMMITTED: the later one's next read sees the earlier one's commit).
        conn.execute(_ONE_ITEM, {"item_id": task.item_id})
    copies = conn.execute(_COPIES, {"item_id": task.item_id}).all()
    if len(copies) < 2 or any(c.submitted_at is None and c.id != task.id for c in copies):
        return None
    labels = [conn.execute(_LATEST, {"task_id": c.id}).first() for c in copies]
    found = [{"shapes": row.shapes, "classifications": row.classifications} for row in labels if row is not None]
    if len(found) < len(copies):
        return None
    result = item_agreement(found, project.label_schema or {}, gold.thresholds(settings))
    task.agreement = result["agreement"]
    conn.execute(update(T).where(T.c.item_id == task.item_id, T.c.purpose == "work", T.c.id != task.id)
                 .values(agreement=result["agreement"]))
    return result["agreement"]


def ensure_copies(db: Session, project_id: int, k: int, *, now: datetime) -> int:
    """Give every item of the project k work copies (after consensus_k was raised); how many were added.
    Lowering k leaves copies already made: they are real work somebody may have begun."""
    conn = db.connection()
    have = conn.execute(select(T.c.item_id, func.max(T.c.slot), func.count()).where(
        T.c.project_id == project_id, T.c.purpose.in_(("work", "held"))).group_by(T.c.item_id)
        # a gold item's work is held back: more copies of it would be work again
        .having(func.sum(case((T.c.purpose == "held", 1), else_=0)) == 0)).all()
    rows = [{"project_id": project_id, "item_id": item_id, "state": "new", "purpose": "work", "slot": slot,
             "round": 0, "version": 1, "active_seconds": 0, "lease_seconds": 0, "created_at": now, "updated_at": now}
            for item_id, top, count in have for slot in range(top + 1, top + 1 + k - count)]
    if rows:
        conn.execute(insert(T), rows)
    return len(rows)


def refuse_lower_k(db: Session, project_id: int, changes) -> None:
    """Invalid when a settings change would lower consensus_k below the copies items already have: the
    lease keeps one person off two copies of an item only while k says copies exist."""
    k = changes.get("consensus_k") if isinstance(changes, dict) else None
    if not isinstance(k, int) or isinstance(k, bool):
        return
    made = db.scalar(select(func.max(T.c.slot)).where(T.c.project_id == project_id, T.c.purpose == "work"))
    if made is not None and k < made + 1:
        raise Invalid("consensus_k cannot go below the copies already made.",
                      errors=[{"field": "settings.consensus_k", "message": f"items have {made + 1} copies"}])


def project_consensus(db: Session, project_id: int, schema: dict, settings: ProjectSettings) -> dict | None:
    """Consensus figures of the project: items with every copy in, their mean agreement, kappa per question."""
    if settings.consensus_k < 2:
        return None
    rows = db.execute(select(T.c.item_id, T.c.agreement).where(T.c.project_id == project_id, T.c.purpose == "work",
                                                               T.c.agreement.is_not(None))).all()
    per_item = {item_id: value for item_id, value in rows}
    answers: dict[str, list[list]] = {q["name"]: [] for q in schema.get("questions", [])}
    if per_item and answers:
        latest = (select(A.c.task_id, func.max(A.c.revision).label("revision")).where(A.c.kind == "label")
                  .group_by(A.c.task_id).subquery())
        by_item: dict[int, list[dict]] = {}
        for item_id, classifications in db.execute(
                select(T.c.item_id, A.c.classifications).join(latest, latest.c.task_id == T.c.id)
                .join(A, (A.c.task_id == T.c.id) & (A.c.revision == latest.c.revision))
                .where(T.c.project_id == project_id, T.c.purpose == "work", T.c.agreement.is_not(None))):
            by_item.setdefault(item_id, []).append(classifications or {})
        for name in answers:
            answers[name] = [[c.get(name) for c in copies] for copies in by_item.values()]
    values = list(per_item.values())
    return {"k": settings.consensus_k, "items_complete": len(values),
            "mean_agreement": round(sum(values) / len(values), 4) if values else None,
            "low_agreement_items": sum(v < 0.5 for v in values),
            "fleiss_kappa": {name: (None if (kappa := fleiss_kappa(a)) is None else round(kappa, 4))
                             for name, a in answers.items()}}
