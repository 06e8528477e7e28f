"""Consensus: agreement measures, k copies per item that never meet one labeler twice, low agreement first."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from onprem_label.db.models import Task
from onprem_label.workflow import consensus, leases, quality
from onprem_label.workflow.members import add_member
from onprem_label.workflow.metrics import Thresholds
from onprem_label.workflow.settings import project_settings
from quality_helpers import SCHEMA, add_items, label_next, make_project

T = Thresholds()
BOX = {"type": "bbox", "label": "nodule", "frame": 0, "x": 0, "y": 0, "width": 10, "height": 10}

# Fleiss (1971) as tabulated on Wikipedia: 10 subjects, 14 raters, 5 categories; kappa 0.210.
FLEISS = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
          [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_fleiss_kappa_matches_the_published_example():
    """Fleiss' kappa of the classic table is 0.210."""
    answers = [[category for category, n in enumerate(row) for _ in range(n)] for row in FLEISS]
    assert consensus.fleiss_kappa(answers) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_needs_equal_raters_and_some_spread():
    """Unequal numbers of raters, or one category only, give None rather than a made-up number."""
    assert consensus.fleiss_kappa([["a", "b"], ["a", "b", "b"]]) is None
    assert consensus.fleiss_kappa([["a", "a"], ["a", "a"]]) is None


@pytest.mark.parametrize("values,expected", [(["a", "a", "a"], 1.0), (["a", "a", "b"], 1 / 3), (["a", "b", "c"], 0.0),
                                             ([["x", "y"], ["y", "x"]], 1.0)])
def test_question_agreement_is_the_share_of_agreeing_pairs(values, expected):
    """P_i: pairs that agree over all pairs; multiple-choice answers compare as sets."""
    assert consensus.question_agreement(values) == pytest.approx(expected)


def test_item_agreement_is_mean_pairwise_shape_similarity_and_question_agreement():
    """Shapes: matched IoU over the longer list, averaged over pairs; the item: the mean with each question."""
    half = {**BOX, "x": 5}  # IoU with BOX: 50 / 150
    copies = [{"shapes": [BOX], "classifications": {"quality": "good"}},
              {"shapes": [BOX], "classifications": {"quality": "good"}},
              {"shapes": [half], "classifications": {"quality": "poor"}}]
    result = consensus.item_agreement(copies, SCHEMA, T)
    # pairs: (BOX, BOX) matched with IoU 1; (BOX, half) twice, IoU 1/3 < 0.5: no match, 0 -> mean 1/3
    assert result["shapes"] == pytest.approx((1 + 0 + 0) / 3)
    assert result["questions"]["quality"] == pytest.approx(1 / 3)
    assert result["agreement"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert consensus.pair_agreement([], [], T) == 1.0 and consensus.pair_agreement([BOX], [], T) == 0.0


def test_consensus_project_gives_k_copies_to_different_labelers_and_reviews_low_agreement_first(db, make_user, clock):
    """k=3: each item has three copies, no labeler gets two of one item, the agreement is stored once all
    are in, and the reviewer's queue starts with the item whose copies disagree most."""
    manager = make_user("boss", "manager")
    project = make_project(db, manager, clock, settings={"consensus_k": 3, "hidden_gold_rate": 0.0})
    names = ["a", "b", "c", "d"]
    people = {n: make_user(n, "labeler") for n in names}
    reviewer = make_user("rev", "reviewer")
    for user in people.values():
        add_member(db, project, user.username, "labeler", actor=manager, now=clock())
    add_member(db, project, "rev", "reviewer", actor=manager, now=clock())
    db.commit()
    items = add_items(db, project, 2, clock)
    assert consensus.ensure_copies(db, project.id, 3, now=clock()) == 4  # two more copies of each
    db.commit()
    disagree = items[1]

    def draw(task):
        if task.item_id == disagree:  # everyone puts the box somewhere else
            return {"shapes": [{**BOX, "x": 40 * (task.slot % 2), "y": 20 * task.slot}],
                    "classifications": {"quality": "good" if task.slot else "poor"}}
        return {"shapes": [BOX], "classifications": {"quality": "good"}}

    taken: dict[str, list[int]] = {n: [] for n in names}
    progress = True
    while progress:
        progress = False
        for name in names:
            task = label_next(db, project, people[name], draw, clock)
            if task is not None:
                taken[name].append(task.item_id)
                progress = True
    for name, got in taken.items():
        assert len(got) == len(set(got)), (name, got)  # never two copies of one item
    assert sum(map(len, taken.values())) == 6
    rows = db.execute(select(Task.item_id, Task.agreement).where(Task.project_id == project.id)).all()
    agreement = {item: sorted({a for i, a in rows if i == item}) for item in items}
    assert agreement[items[0]] == [pytest.approx(1.0)]  # the same value on every copy
    assert len(agreement[disagree]) == 1 and agreement[disagree][0] < 0.5
    first = leases.lease_next_task(db, project, reviewer, review=True, now=clock())
    assert first.task.item_id == disagree
    db.commit()
    figures = quality.project_quality(db, project.id, project_settings(project), SCHEMA)["consensus"]
    assert figures["k"] == 3 and figures["items_complete"] == 2 and figures["low_agreement_items"] == 1
    assert "quality" in figures["fleiss_kappa"]


def test_ingest_and_raising_k_make_the_copies(app, client, db, make_user, clock):
    """Items ingested into a k=2 project get two copies; raising k to 3 through the API adds the third."""
    from imaging_helpers import bearer_for
    from workflow_helpers import SCHEMA as API_SCHEMA, ingest_items

    manager = bearer_for(db, make_user("mgr", "manager"), clock)
    created = client.post("/api/v1/projects", headers=manager,
                          json={"name": "k", "label_schema": API_SCHEMA, "settings": {"consensus_k": 2}})
    project = created.get_json()["id"]
    items = ingest_items(app, db, project, 2, clock)
    slots = sorted(db.execute(select(Task.item_id, Task.slot).where(Task.project_id == project)).all())
    db.commit()
    assert slots == [(items[0], 0), (items[0], 1), (items[1], 0), (items[1], 1)]
    response = client.patch(f"/api/v1/projects/{project}", headers=manager, json={"settings": {"consensus_k": 3}})
    assert response.status_code == 200 and response.get_json()["counts"]["new"] == 6
    assert client.patch(f"/api/v1/projects/{project}", headers=manager,
                        json={"settings": {"consensus_k": 11}}).status_code == 422
