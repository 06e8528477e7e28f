"""Matching: skill profiles kept from history, the lease's preference within the queue's head, recommendations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sqlalchemy import update

from onprem_label.db.models import Item
from onprem_label.workflow import leases, matching
from onprem_label.workflow.members import add_member
from quality_helpers import add_items, label_next, make_project, review_next

RIGHT = {"shapes": [{"type": "bbox", "label": "nodule", "frame": 0, "x": 1, "y": 1, "width": 20, "height": 20}],
         "classifications": {"quality": "good"}}


def _row(**counts):
    return SimpleNamespace(**{c: counts.get(c, 0) for c in matching.COUNTERS})


@pytest.mark.parametrize("counts,expected", [({}, 0.5), ({"reviewed": 8, "passed": 8}, 0.9),
                                             ({"reviewed": 8, "passed": 0}, 0.1),
                                             ({"reviewed": 4, "passed": 4, "gold": 4, "gold_correct": 2}, 0.7)])
def test_fit_is_smoothed_accuracy_from_reviews_and_gold(counts, expected):
    """(passed + gold_correct + 1) / (reviewed + gold + 2): a newcomer sits at 0.5."""
    assert matching.fit(_row(**counts), None) == pytest.approx(expected)


def test_speed_nudges_but_never_outweighs_accuracy():
    """Twice as fast moves the fit by 2**0.1 at most; a clearly more accurate skill still wins."""
    fast = _row(reviewed=8, passed=7, label_seconds=100, label_tasks=10)
    slow_but_right = _row(reviewed=8, passed=8, label_seconds=400, label_tasks=10)
    assert matching.fit(fast, 20.0) == pytest.approx(0.8 * 2 ** 0.1)
    assert matching.fit(slow_but_right, 20.0) == pytest.approx(0.9 * 0.5 ** 0.1)
    assert matching.fit(fast, 20.0) > matching.fit(_row(reviewed=8, passed=7, label_seconds=200, label_tasks=10), 20.0)


@pytest.fixture
def mixed(db, make_user, clock):
    """A project of 4 CT then 4 MR items, a labeler and a reviewer."""
    manager = make_user("boss", "manager")
    project = make_project(db, manager, clock, settings={"hidden_gold_rate": 0.0, "spot_check_rate": 0.0})
    labeler, reviewer = make_user("lab", "labeler"), make_user("rev", "reviewer")
    add_member(db, project, "lab", "labeler", actor=manager, now=clock())
    add_member(db, project, "rev", "reviewer", actor=manager, now=clock())
    items = add_items(db, project, 8, clock)
    for item, modality in zip(items, ["CT"] * 4 + ["MR"] * 4):
        db.execute(update(Item).where(Item.id == item).values(modality=modality))
    db.commit()
    return project, labeler, reviewer, items


def test_history_builds_the_profile_and_the_lease_prefers_the_strong_modality(db, clock, mixed):
    """Rejected CT work and accepted MR work make MR this labeler's strength: the next lease skips the CT
    task at the head of the queue for an MR one; with match_window 1 the queue order holds."""
    project, labeler, reviewer, items = mixed
    ct, mr = items[:4], items[4:]
    # Lease order is by id: take CT items first, then MR, through the real loop.
    order = []
    for _ in range(2):
        order.append(label_next(db, project, labeler, lambda task: RIGHT, clock, seconds=30).item_id)
    assert order == ct[:2]
    for _ in range(2):
        review_next(db, project, reviewer, lambda task, latest: ("reject", "no"), clock)
    # the rework comes back first; hand it in again and get it accepted
    for _ in range(2):
        label_next(db, project, labeler, lambda task: RIGHT, clock, seconds=30)
        review_next(db, project, reviewer, lambda task, latest: ("accept", ""), clock)
    rows = matching.profile(db.connection(), labeler.id)
    assert (rows[("modality", "CT")].reviewed, rows[("modality", "CT")].passed) == (2, 0)
    assert rows[("class", "nodule")].reviewed == 2 and rows[("modality", "CT")].label_tasks == 4
    # Make MR look strong (as a longer history would).
    matching.bump(db.connection(), labeler.id, [("modality", "MR")], now=clock(), reviewed=10, passed=10)
    db.commit()
    lease = leases.lease_next_task(db, project, labeler, review=False, now=clock())
    assert lease.task.item_id in mr  # ct[2] heads the queue; an MR task fits better
    leases.release_lease(db, lease.task, labeler, now=clock())
    project.settings = {**project.settings, "match_window": 1}
    db.commit()
    lease = leases.lease_next_task(db, project, labeler, review=False, now=clock())
    assert lease.task.item_id == ct[2]  # strict queue order
    db.commit()
    fits = matching.fits(matching.profile(db.connection(), labeler.id))
    assert max(fits, key=fits.get) == "MR" and fits["MR"] > 0.9


def test_a_newcomer_keeps_the_project_order(db, clock, mixed):
    """Without history every modality fits alike (0.5), so the head of the queue is handed out."""
    project, labeler, _, items = mixed
    assert leases.lease_next_task(db, project, labeler, review=False, now=clock()).task.item_id == items[0]


def test_recommendations_rank_labelers_by_fit_on_the_projects_skills(db, make_user, clock, mixed):
    """A labeler strong in the project's modality ranks above a newcomer and a weak one; required skills
    narrow what counts; reviewers-only accounts are not listed."""
    project, labeler, _, _ = mixed
    strong, weak = make_user("strong", "labeler"), make_user("weak", "labeler")
    matching.bump(db.connection(), strong.id, [("modality", "CT"), ("modality", "MR"), ("class", "nodule")],
                  now=clock(), reviewed=20, passed=20)
    matching.bump(db.connection(), weak.id, [("modality", "CT"), ("modality", "MR")], now=clock(), reviewed=20,
                  passed=5)
    db.commit()
    ranked = matching.recommend(db, project)
    assert ranked["needed"] == ["modality:CT", "modality:MR", "class:nodule"]
    names = [p["username"] for p in ranked["people"]]
    assert names[0] == "strong" and names.index("lab") < names.index("weak") and "rev" not in names
    project.settings = {**project.settings, "required_skills": ["class:nodule"]}
    db.commit()
    ranked = matching.recommend(db, project)
    assert ranked["needed"] == ["class:nodule"] and ranked["people"][0]["skills"] == {"class:nodule": 0.9545}
