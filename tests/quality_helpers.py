"""Test helpers for quality and people: a project of synthetic items and labelers driven through the core."""

from __future__ import annotations

import random

from sqlalchemy import insert, select

from onprem_label.db.models import Item, Task
from onprem_label.workflow import gold, leases, tasks
from onprem_label.workflow.metrics import score_item
from onprem_label.workflow.projects import create_project

SIDE = 64
SCHEMA = {"classes": [{"name": "nodule", "color": "#e6194b", "hotkey": "1", "tools": ["bbox"]}],
          "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"], "required": True}]}


def truth_for(rng: random.Random) -> dict:
    """A random true answer: one box and one question."""
    x, y = rng.randrange(0, SIDE - 24), rng.randrange(0, SIDE - 24)
    return {"shapes": [{"type": "bbox", "label": "nodule", "frame": 0, "x": x, "y": y, "width": 20, "height": 20}],
            "classifications": {"quality": rng.choice(["good", "poor"])}}


def answer_for(truth: dict, error_rate: float, rng: random.Random) -> dict:
    """What a labeler with this error rate draws: the truth give or take a pixel, or (with that
    probability) a wrong one: the box misplaced or the question answered wrongly."""
    box = dict(truth["shapes"][0])
    box["x"] = min(SIDE - 21, max(0, box["x"] + rng.choice((-1, 0, 1))))
    quality = truth["classifications"]["quality"]
    if rng.random() < error_rate:
        if rng.random() < 0.5:
            box["x"] = (box["x"] + 30) % (SIDE - 21)  # IoU with the truth well under 0.5
        else:
            quality = "poor" if quality == "good" else "good"
    return {"shapes": [box], "classifications": {"quality": quality}}


def is_right(answer: dict, truth: dict) -> bool:
    """The answer matches the truth by the project's default metrics."""
    return score_item(answer, truth).correct


def make_project(db, manager, clock, *, name: str = "quality", settings: dict | None = None):
    """A project with the synthetic schema."""
    project = create_project(db, name, settings=settings or {}, label_schema=SCHEMA, actor=manager, now=clock())
    db.commit()
    return project


def add_items(db, project, count: int, clock) -> list[int]:
    """`count` bare items (no pixels: the loop never reads them) with their work tasks; their ids."""
    now, conn = clock(), db.connection()
    first = (conn.execute(select(Item.id).order_by(Item.id.desc()).limit(1)).scalar() or 0) + 1
    ids = list(range(first, first + count))
    conn.execute(insert(Item.__table__), [{"id": i, "project_id": project.id, "kind": "raster", "width": SIDE,
                                           "height": SIDE, "frames": 1, "modality": "", "is_stack": False,
                                           "needs_pixel_check": False, "pixel_check_reasons": [], "source": "cli",
                                           "created_at": now} for i in ids])
    conn.execute(insert(Task.__table__), [{"project_id": project.id, "item_id": i, "state": "new", "round": 0,
                                           "version": 1, "active_seconds": 0, "created_at": now, "updated_at": now}
                                          for i in ids])
    db.commit()
    return ids


def mark_all_gold(db, project, manager, item_ids, truths: dict, clock, *, use: str = "both") -> None:
    """Every item made gold with its truth as the reference."""
    for item_id in item_ids:
        gold.mark_gold(db, project, item_id, truths[item_id], use=use, actor=manager, now=clock())
    db.commit()


def label_next(db, project, user, draw, clock, rng=None, seconds: int = 0):
    """Lease the labeler's next task and hand in what `draw(task)` answers; the task, or None without work."""
    lease = leases.lease_next_task(db, project, user, review=False, now=clock(), rng=rng)
    if lease is None:
        db.commit()
        return None
    task = lease.task
    saved = tasks.save_annotation(db, task, user, draw(task), task.version, now=clock())
    assert saved.revision >= 1
    clock.advance(seconds=seconds)
    submitted = tasks.submit_task(db, task, user, task.version, now=clock())
    db.commit()
    return submitted


def review_next(db, project, user, decide, clock, rng=None):
    """Lease a review and decide it with `decide(task, latest) -> (decision, comment)`; the task or None."""
    lease = leases.lease_next_task(db, project, user, review=True, now=clock())
    if lease is None:
        db.commit()
        return None
    task = lease.task
    decision, comment = decide(task, tasks.latest_annotation(db, task.id))
    done = tasks.review_task(db, task, user, decision, task.version, comment=comment, now=clock(), rng=rng)
    db.commit()
    return done
