"""Full inspection measured: synthetic labelers of known error rates, reviewers who catch 98% of errors."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import select

from onprem_label.db.models import Task
from onprem_label.workflow import promotion, quality, taskrows, tasks
from onprem_label.workflow.members import add_member
from onprem_label.workflow.settings import project_settings
from quality_helpers import add_items, answer_for, is_right, label_next, make_project, mark_all_gold, review_next, truth_for

ERROR_RATES = {"careful": 0.01, "average": 0.05, "sloppy": 0.20}
SECONDS = {"careful": 40, "average": 30, "sloppy": 20}  # active time per hand-in
CATCH = 0.98
ITEMS, GOLD_ITEMS = 1000, 40


@pytest.fixture
def simulated(db, make_user, clock):
    """1,000 items labeled under full inspection with 5% hidden gold; the project, people and truths."""
    rng = random.Random(20261201)
    manager = make_user("boss", "manager")
    labelers = {name: make_user(name, "labeler") for name in ERROR_RATES}
    reviewers = [make_user(f"rev{n}", "reviewer") for n in (1, 2)]
    project = make_project(db, manager, clock, settings={"max_rounds": 20, "hidden_gold_rate": 0.05})
    for user in labelers.values():
        add_member(db, project, user.username, "labeler", actor=manager, now=clock())
    for user in reviewers:
        add_member(db, project, user.username, "reviewer", actor=manager, now=clock())
    db.commit()
    work = add_items(db, project, ITEMS, clock)
    gold_ids = add_items(db, project, GOLD_ITEMS, clock)
    truths = {i: truth_for(rng) for i in work + gold_ids}
    mark_all_gold(db, project, manager, gold_ids, truths, clock, use="hidden")
    people_rng = {name: random.Random(f"labeler {name}") for name in ERROR_RATES}
    review_rng = random.Random("reviewers")

    def reviewer_decides(task, latest):
        answer = {"shapes": latest.shapes, "classifications": latest.classifications}
        if not is_right(answer, truths[task.item_id]) and review_rng.random() < CATCH:
            return "reject", "the box or the answer is wrong"
        return "accept", ""

    busy = True
    while busy:
        busy = False
        for name, user in labelers.items():
            def draw(task, name=name):
                return answer_for(truths[task.item_id], ERROR_RATES[name], people_rng[name])
            busy |= label_next(db, project, user, draw, clock, rng=rng, seconds=SECONDS[name]) is not None
        while any([review_next(db, project, reviewer, reviewer_decides, clock, rng) is not None for reviewer in reviewers]):
            busy = True  # the two reviewers take turns until the queue is empty
    db.refresh(project)
    return project, labelers, truths


def test_simulated_full_inspection_measures_quality_and_promotes_the_best(db, clock, simulated):
    """Measured gold accuracy and first-pass acceptance hold each labeler's true rate within their 95%
    intervals; the 1% labeler is proposed as reviewer, the 20% one is not; accepted labels are >= 99% right."""
    project, labelers, truths = simulated
    work = db.execute(select(Task.id, Task.item_id, Task.state).where(Task.project_id == project.id,
                                                                      Task.purpose == "work")).all()
    assert len(work) == ITEMS and {row.state for row in work} == {"accepted"}
    figures = quality.project_quality(db, project.id, project_settings(project))
    by_name = {row["username"]: row for row in figures["labelers"]}
    gold_total = 0
    for name, rate in ERROR_RATES.items():
        row = by_name[name]
        gold_total += row["gold_accuracy"]["count"]
        low, high = row["gold_accuracy"]["ci95"]
        assert low <= 1 - rate <= high, (name, row["gold_accuracy"])
        low, high = row["first_pass"]["ci95"]
        assert low <= 1 - rate * CATCH <= high, (name, row["first_pass"])
        assert row["accepted"] > 250
        assert row["seconds_per_task"] >= SECONDS[name]  # rework adds a second lease's time
    assert 0.03 <= gold_total / (ITEMS + gold_total) <= 0.07  # about 5% of handed-out tasks were gold
    (nodule,) = figures["classes"]  # every item has one box: each first-round review counts for it
    assert nodule["label"] == "nodule" and nodule["first_pass"]["count"] == ITEMS
    assert nodule["first_pass"]["successes"] == sum(by_name[n]["first_pass"]["successes"] for n in ERROR_RATES)
    assert nodule["seconds_per_task"] >= min(SECONDS.values())
    wrong = sum(not is_right(_accepted_answer(db, t.id), truths[t.item_id]) for t in work)
    assert wrong / ITEMS <= 0.01, wrong
    accepted_gold, spot = figures["project"]["accepted_gold"], figures["project"]["spot_checks"]
    assert accepted_gold["count"] == gold_total
    assert 0.02 * ITEMS <= spot["count"] <= 0.08 * ITEMS  # spot_check_rate 5% of accepted work
    estimate = figures["project"]["estimated_label_accuracy"]
    assert estimate["count"] == gold_total + spot["count"]
    assert estimate["ci95"][0] <= 1 - wrong / ITEMS <= estimate["ci95"][1]
    checks = db.execute(select(Task.id, Task.origin_task_id).where(Task.purpose == "spot_check")).all()
    assert len(checks) == spot["count"]
    for check in checks:  # the second reviewer is never the first
        first = {r.reviewer_id for r in tasks.reviews_of(db, check.origin_task_id) if r.decision == "accept"}
        assert not first & {r.reviewer_id for r in tasks.reviews_of(db, check.id)}
    for row in figures["reviewers"]:
        assert row["reviews"] > 300
        assert row["second_review_agreement"]["count"] > 0  # each was spot-checked by the other
        assert (row["gold_agreement"]["count"], row["gold_agreement"]["successes"]) == \
            _gold_agreement_by_truth(db, project.id, row["user_id"], truths)

    promotion.evaluate(db, project, now=clock())
    db.commit()
    proposed = {p.user_id for p in promotion.proposals(db, project.id) if p.kind == "promote"}
    assert labelers["careful"].id in proposed
    assert labelers["sloppy"].id not in proposed


def _gold_agreement_by_truth(db, project_id: int, reviewer_id: int, truths: dict) -> tuple[int, int]:
    """(decisions on gold checks, those that agree with the truth), counted from the truth itself."""
    decided = agree = 0
    for task in db.execute(select(Task.id, Task.item_id).where(Task.project_id == project_id,
                                                               Task.purpose == "gold")).all():
        for review in tasks.reviews_of(db, task.id):
            if review.reviewer_id != reviewer_id:
                continue
            seen = taskrows.revisions_of(db.connection(), task.id, limit=1, revision=review.annotation_revision)[0]
            right = is_right({"shapes": seen.shapes, "classifications": seen.classifications}, truths[task.item_id])
            decided += 1
            agree += (review.decision == "accept") == right
    return decided, agree


def _accepted_answer(db, task_id: int) -> dict:
    latest = tasks.latest_annotation(db, task_id)
    return {"shapes": latest.shapes, "classifications": latest.classifications}
