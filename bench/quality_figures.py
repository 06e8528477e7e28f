"""Benchmark: the quality figures of a project of 100,000 tasks and 200 people (issue 8).

Goal (issue 8): workflow.quality.project_quality (every figure the quality page and the API show:
per labeler, reviewer, class and project, consensus, the accuracy estimate) in <= 2 s.
Method: a fresh database at head (SQLite file, or a PostgreSQL database made and dropped here), filled
by bulk inserts with what such a project holds: 180 labelers and 20 reviewers; 100,000 work tasks
(80% accepted, 10% waiting for review, 10% new), 7% of the reviewed rejected once and accepted in the
next round; a hidden gold check on 5% of handed-out work (5,000 gold tasks, each scored when handed in
and again when accepted, reviewed like work); spot checks of 5% of accepted work; a work-log line for
each lease. Then `project_quality` is called `--runs` times on one session (the first run counts too:
nothing is cached between calls) and the median is the figure; the API route adds only JSON encoding.
Usage: .venv/bin/python bench/quality_figures.py [--backend sqlite|postgresql] [--runs 5] [--tasks 100000]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

import _common as c

GOAL_S = 2.0
CHUNK = 20_000


def fill(engine, tasks: int, rng: random.Random) -> int:
    """The project's rows (see the module docstring); the project id."""
    from sqlalchemy import insert

    from onprem_label.db.models import Item, Project, Review, Task, User
    from onprem_label.db.quality import GoldCheck, GoldItem, WorkLog

    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(insert(User), [{"id": n, "username": f"person{n:03d}", "password_hash": "x",
                                     "roles": "labeler" if n <= 180 else "reviewer", "created_at": now,
                                     "recovery_codes": []} for n in range(1, 201)])
        conn.execute(insert(Project).values(id=1, name="Quality bench", label_schema={
            "classes": [{"name": "nodule", "color": "#e6194b", "tools": ["bbox"]}],
            "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"]}]},
            settings={}, created_at=now))
        gold_n = tasks // 20
        items = [{"id": i, "project_id": 1, "kind": "dicom", "width": 512, "height": 512, "frames": 1,
                  "modality": rng.choice(("CT", "MR")), "source": "cli", "created_at": now}
                 for i in range(1, tasks + gold_n + 1)]
        for start in range(0, len(items), CHUNK):
            conn.execute(insert(Item), items[start:start + CHUNK])
        conn.execute(insert(GoldItem), [{"item_id": tasks + g, "project_id": 1, "use": "hidden",
                                          "reference": {"shapes": [], "classifications": {}}, "active": True,
                                          "created_at": now, "updated_at": now} for g in range(1, gold_n + 1)])
        rows, reviews, logs, checks = [], [], [], []
        task_id = 0

        def add_task(item_id: int, purpose: str, state: str, origin: int | None = None) -> int:
            nonlocal task_id
            task_id += 1
            labeler, reviewer = rng.randint(1, 180), rng.randint(181, 200)
            rejected = state != "new" and state != "submitted" and rng.random() < 0.07
            rows.append({"id": task_id, "project_id": 1, "item_id": item_id, "purpose": purpose, "slot": 0,
                         "state": state, "round": int(rejected), "version": 5, "labeler_id": None if state == "new"
                         else labeler, "reviewer_id": reviewer if state == "accepted" else None,
                         "active_seconds": 0, "lease_seconds": 0, "origin_task_id": origin, "created_at": now,
                         "updated_at": now, "accepted_at": now if state == "accepted" else None,
                         "submitted_at": None if state == "new" else now})
            if state == "new":
                return task_id
            logs.append({"project_id": 1, "task_id": task_id, "user_id": labeler, "kind": "label",
                         "outcome": "submit", "seconds": rng.randint(20, 200), "ended_at": now})
            if state == "accepted":
                for rnd, decision in ([(0, "reject"), (1, "accept")] if rejected else [(0, "accept")]):
                    reviews.append({"task_id": task_id, "round": rnd, "reviewer_id": reviewer, "decision": decision,
                                    "comment": "", "classes": ["nodule"], "created_at": now})
                    logs.append({"project_id": 1, "task_id": task_id, "user_id": reviewer, "kind": "review",
                                 "outcome": decision, "seconds": rng.randint(5, 60), "ended_at": now})
            if purpose == "gold":
                ok = rng.random() < 0.95
                for stage in ("submitted", "accepted"):
                    checks.append({"project_id": 1, "item_id": item_id, "task_id": task_id, "user_id": labeler,
                                   "purpose": "gold", "stage": stage, "round": 0, "revision": 1,
                                   "score": 1.0 if ok else 0.5, "correct": ok or stage == "accepted",
                                   "detail": {"per_class": {"nodule": {"matched": int(ok), "missed": int(not ok),
                                                                       "extra": 0}}},
                                   "created_at": now})
            return task_id

        for i in range(1, tasks + 1):
            draw = rng.random()
            state = "accepted" if draw < 0.8 else "submitted" if draw < 0.9 else "new"
            made = add_task(i, "work", state)
            if state == "accepted" and rng.random() < 0.05:
                add_task(i, "spot_check", "accepted", origin=made)
        for g in range(1, gold_n + 1):
            add_task(tasks + g, "gold", "accepted")
        for table, values in ((Task, rows), (Review, reviews), (WorkLog, logs), (GoldCheck, checks)):
            for start in range(0, len(values), CHUNK):
                conn.execute(insert(table), values[start:start + CHUNK])
        print(f"filled: {len(rows)} tasks, {len(reviews)} reviews, {len(logs)} work-log lines, "
              f"{len(checks)} gold checks, 200 people")
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    return 1


def main() -> None:
    """Fill, then time project_quality."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=100_000)
    args = parser.parse_args()
    from sqlalchemy.orm import Session

    from onprem_label.db import make_engine, migrate
    from onprem_label.workflow.quality import project_quality
    from onprem_label.workflow.settings import ProjectSettings

    print(c.machine_summary())
    rng = random.Random(8)
    with tempfile.TemporaryDirectory(prefix="onprem-quality-") as tmp, ExitStack() as stack:
        if args.backend == "postgresql":
            url = stack.enter_context(c.postgres_database("onprem_bench_quality"))
        else:
            url = f"sqlite:///{Path(tmp) / 'quality.db'}"
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
            started = time.monotonic()
            project_id = fill(engine, args.tasks, rng)
            print(f"fill took {time.monotonic() - started:.1f} s")
            times = []
            settings = ProjectSettings(consensus_k=1)
            with Session(engine) as db:
                for run in range(args.runs):
                    started = time.perf_counter()
                    figures = project_quality(db, project_id, settings, {"questions": []})
                    times.append(time.perf_counter() - started)
                    db.rollback()
                    print(f"run {run + 1}: {times[-1]:.3f} s ({len(figures['labelers'])} labelers, "
                          f"{len(figures['reviewers'])} reviewers, estimate "
                          f"{figures['project']['estimated_label_accuracy']['value']})")
            med = c.median(times)
            print(f"{args.backend}: project_quality on {args.tasks} tasks, 200 people: median {med:.3f} s of "
                  f"{args.runs} (goal <= {GOAL_S} s: {med / GOAL_S:.2f} x the goal) "
                  f"{'PASS' if med <= GOAL_S else 'FAIL'}")
        finally:
            engine.dispose()


if __name__ == "__main__":
    main()
