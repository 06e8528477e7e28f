"""Issue 8's review findings, each pinned by a test: hidden gold stays hidden, nothing blocks or strands work."""

from __future__ import annotations

import random
import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from imaging_helpers import bearer_for
from onprem_label.db.models import AuditEvent, Review, Task, User
from onprem_label.db.quality import QualificationAttempt, RoleProposal, WorkLog
from onprem_label.workflow import consensus, gold, leases, promotion, spotcheck
from onprem_label.workflow.members import add_member
from onprem_label.workflow.settings import ProjectSettings
from quality_helpers import add_items, label_next, make_project, review_next
from workflow_helpers import SCHEMA as API_SCHEMA, BOX, ingest_items, label_and_accept_all, label_and_submit, lease, team

ANSWER = {"shapes": [{"type": "bbox", "label": "nodule", "frame": 0, "x": 1, "y": 1, "width": 20, "height": 20}],
          "classifications": {"quality": "good"}}


@pytest.fixture
def people(db, make_user, clock):
    """A manager, two labelers and two reviewers, members of a fresh project (no hidden gold, no spot checks)."""
    manager = make_user("boss", "manager")
    project = make_project(db, manager, clock, settings={"hidden_gold_rate": 0.0, "spot_check_rate": 0.0})
    out = {"manager": manager, "project": project}
    for name, role in (("lab", "labeler"), ("lab2", "labeler"), ("rev", "reviewer"), ("rev2", "reviewer")):
        out[name] = make_user(name, role)
        add_member(db, project, name, role, actor=manager, now=clock())
    db.commit()
    return out


def test_a_reviewer_of_an_item_never_draws_it_as_hidden_gold(db, clock, people):
    """Touching an item is remembered by its reviews and revisions, not only by the task's columns
    (which a later reviewer or a release overwrites)."""
    project = people["project"]
    (item,) = add_items(db, project, 1, clock)
    task_id = db.scalar(select(Task.id).where(Task.item_id == item))
    db.execute(insert(Review).values(task_id=task_id, round=0, reviewer_id=people["rev"].id, decision="accept",
                                     comment="", created_at=clock()))
    db.commit()
    gold.mark_gold(db, project, item, ANSWER, use="hidden", actor=people["manager"], now=clock())
    db.commit()
    draw = gold.draw_hidden_gold(db.connection(), project.id, people["rev"].id, 1.0, random.Random(1))
    other = gold.draw_hidden_gold(db.connection(), project.id, people["lab2"].id, 1.0, random.Random(1))
    assert (draw, other) == (None, item)


def test_a_lapsed_lease_keeps_its_holders_time_in_the_work_log(db, clock, people):
    """Heartbeat time on a lease that expires becomes its holder's work-log line when the task is handed on."""
    project = people["project"]
    add_items(db, project, 1, clock)
    held = leases.lease_next_task(db, project, people["lab"], review=False, now=clock()).task
    for _ in range(3):
        clock.advance(minutes=1)
        leases.renew_lease(db, held, people["lab"], now=clock())
    db.commit()
    clock.advance(hours=2)
    taken = leases.lease_next_task(db, project, people["lab2"], review=False, now=clock())
    db.commit()
    assert taken.task.id == held.id
    line = db.scalar(select(WorkLog).where(WorkLog.task_id == held.id))
    assert (line.user_id, line.outcome, line.seconds) == (people["lab"].id, "expired", 180)


def test_auto_promotion_of_a_disabled_labeler_never_blocks_an_acceptance(db, clock, people):
    """With auto_promote, an inactive labeler who crosses the thresholds is not proposed, and the
    reviewer's acceptance goes through."""
    project = people["project"]
    project.settings = {**project.settings, "promote_min_accepted": 10, "promote_min_gold": 0, "auto_promote": True,
                        "promote_first_pass": 0.0}
    db.commit()
    add_items(db, project, 10, clock)
    for n in range(10):
        label_next(db, project, people["lab"], lambda task: ANSWER, clock)
        if n == 9:
            db.execute(update(User).where(User.id == people["lab"].id).values(active=False))
            db.commit()
        assert review_next(db, project, people["rev"], lambda task, latest: ("accept", ""), clock).state == "accepted"
    assert promotion.proposals(db, project.id) == []


def test_the_open_proposal_index_keeps_one_proposal_per_person_and_kind(db, clock, people):
    """Two evaluations at once can insert only one open proposal; the loser gets None, not an error."""
    project = people["project"]
    db.add(RoleProposal(project_id=project.id, user_id=people["lab"].id, kind="promote", status="open",
                        figures={}, reason="", created_at=clock()))
    db.commit()
    assert promotion._propose(db, project, people["lab"].id, "promote", {}, "again", clock(), None, None) is None
    db.add(RoleProposal(project_id=project.id, user_id=people["lab"].id, kind="promote", status="open",
                        figures={}, reason="", created_at=clock()))
    with pytest.raises(IntegrityError):
        db.flush()
    db.rollback()


def test_one_qualification_test_under_way_per_person(db, clock, people):
    """The database refuses a second open attempt (two requests racing to start a test)."""
    project = people["project"]
    for _ in range(2):
        db.add(QualificationAttempt(project_id=project.id, user_id=people["lab"].id, item_ids=[], pass_mark=0.8,
                                    answered=0, correct=0, started_at=clock()))
    with pytest.raises(IntegrityError):
        db.flush()
    db.rollback()


def test_spot_checks_need_a_reviewer_other_than_the_first_and_the_labeler(db, clock, people):
    """A spot check is made only when an active reviewer other than the accepting one (and not the
    labeler) can take it; else it would wait for ever."""
    project = people["project"]
    (item,) = add_items(db, project, 1, clock)
    task = db.execute(select(Task).where(Task.item_id == item)).scalar_one()
    row = leases.taskrows.load_task(db.connection(), task.id)
    row.labeler_id = people["rev2"].id  # the only other reviewer labeled it
    settings = ProjectSettings(spot_check_rate=1.0)
    annotation = type("A", (), {"shapes": [], "classifications": {}, "schema_version": 1, "revision": 1})()
    assert spotcheck.maybe_spot_check(db, row, annotation, settings, reviewer=people["rev"], now=clock()) is None
    row.labeler_id = people["lab"].id
    assert spotcheck.maybe_spot_check(db, row, annotation, settings, reviewer=people["rev"], now=clock()) is not None
    db.rollback()


def test_raising_k_leaves_gold_items_alone_and_k_cannot_be_lowered(db, clock, people):
    """More copies are made of work items only (a held gold item stays out of work); lowering k below
    the copies made is refused, so one labeler can never get two copies of an item."""
    project = people["project"]
    _, held = add_items(db, project, 2, clock)
    gold.mark_gold(db, project, held, ANSWER, actor=people["manager"], now=clock())
    db.commit()
    assert consensus.ensure_copies(db, project.id, 3, now=clock()) == 2
    db.commit()
    assert db.scalar(select(Task.id).where(Task.item_id == held, Task.purpose == "work")) is None
    with pytest.raises(consensus.Invalid):
        consensus.refuse_lower_k(db, project.id, {"consensus_k": 2})
    consensus.refuse_lower_k(db, project.id, {"consensus_k": 3})  # as many as made: fine


def test_in_a_consensus_project_gold_is_reviewed_before_items_still_waiting_for_copies(db, clock, people):
    """Gold checks have no agreement: they are reviewed among the others, not after every copy of the
    project (where a steady backlog would starve them)."""
    project = people["project"]
    project.settings = {**project.settings, "consensus_k": 2, "hidden_gold_rate": 1.0}
    db.commit()
    add_items(db, project, 2, clock)
    consensus.ensure_copies(db, project.id, 2, now=clock())
    (gold_item,) = add_items(db, project, 1, clock)
    db.execute(update(Task).where(Task.item_id == gold_item, Task.slot > 0).values(purpose="held"))
    gold.mark_gold(db, project, gold_item, ANSWER, use="hidden", actor=people["manager"], now=clock())
    db.commit()
    first = label_next(db, project, people["lab"], lambda task: ANSWER, clock, rng=random.Random(3))
    second = label_next(db, project, people["lab"], lambda task: ANSWER, clock, rng=random.Random(3))
    kinds = sorted(db.get(Task, t.id).purpose for t in (first, second))
    assert kinds == ["gold", "work"]  # a check and one copy of a work item (its twin not in yet)
    got = leases.lease_next_task(db, project, people["rev"], review=True, now=clock())
    assert db.get(Task, got.task.id).purpose == "gold"
    db.rollback()


def test_unqualified_labelers_keep_their_rework_when_a_test_is_asked_for(db, clock, people):
    """Rework from before the project asked for a test is still handed to its labeler."""
    project = people["project"]
    add_items(db, project, 1, clock)
    label_next(db, project, people["lab"], lambda task: ANSWER, clock)
    review_next(db, project, people["rev"], lambda task, latest: ("reject", "again"), clock)
    project.settings = {**project.settings, "qualification_items": 1}
    db.commit()
    lease = leases.lease_next_task(db, project, people["lab"], review=False, now=clock())
    assert lease.kind == "rework"
    db.rollback()


# --- through HTTP --------------------------------------------------------------------------------

@pytest.fixture
def manager(make_user, db, clock):
    """A global manager's bearer header."""
    return bearer_for(db, make_user("mgr", "manager"), clock)


def test_a_labeler_reads_only_their_own_tasks(app, client, db, make_user, clock, manager):
    """Another labeler's task (and so the labels that may have become a gold reference) is 404 to a
    labeler; reviewers and managers still read it."""
    project = client.post("/api/v1/projects", headers=manager, json={"name": "own", "label_schema": API_SCHEMA,
                                                                     "settings": {"spot_check_rate": 0.0}}).get_json()["id"]
    ingest_items(app, db, project, 1, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=2, reviewers=1)
    task = label_and_submit(client, lease(client, project, people["labeler1"])["task"], people["labeler1"])
    assert client.get(f"/api/v1/tasks/{task['id']}", headers=people["labeler1"]).status_code == 200
    assert client.get(f"/api/v1/tasks/{task['id']}", headers=people["labeler2"]).status_code == 404
    assert client.get(f"/api/v1/tasks/{task['id']}/revisions", headers=people["labeler2"]).status_code == 404
    assert client.get(f"/api/v1/tasks/{task['id']}", headers=people["reviewer1"]).status_code == 200
    assert client.get(f"/api/v1/tasks/{task['id']}", headers=manager).status_code == 200


def test_a_labelers_statement_folds_gold_into_label_work_and_takes_whole_days(app, client, db, make_user, clock,
                                                                             manager):
    """With pay_gold on, a labeler's own statement shows no gold line; a time of day or a date past the
    calendar is a 422, never a 500."""
    project = client.post("/api/v1/projects", headers=manager, json={
        "name": "pay", "label_schema": API_SCHEMA,
        "settings": {"spot_check_rate": 0.0, "hidden_gold_rate": 0.5, "pay_currency": "EUR", "pay_label_rate": "1.00",
                     "pay_gold": True}}).get_json()["id"]
    ingest_items(app, db, project, 6, clock)
    gold_items = [ingest_items(app, db, project, 1, clock)[0] for _ in range(6)]
    for item in gold_items:
        client.put(f"/api/v1/projects/{project}/gold/{item}", headers=manager,
                   json={"reference": {"shapes": [BOX], "classifications": {"quality": "good"}}, "use": "hidden"})
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=1)
    label_and_accept_all(client, project, people["labeler1"], people["reviewer1"])
    managers_view = client.get(f"/api/v1/projects/{project}/pay/statements", headers=manager).get_json()
    theirs = {s["username"]: s for s in managers_view["statements"]}["labeler1"]
    assert theirs["gold_tasks"] > 0
    own = client.get(f"/api/v1/projects/{project}/pay/statements", headers=people["labeler1"]).get_json()
    (mine,) = own["statements"]
    assert mine["gold_tasks"] == 0 and mine["label_tasks"] == theirs["label_tasks"] + theirs["gold_tasks"]
    assert mine["total"] == theirs["total"]
    for query in ("to=9999-12-31", "from=2026-12-01T10:00:00"):
        response = client.get(f"/api/v1/projects/{project}/pay/statements?{query}", headers=people["labeler1"])
        assert response.status_code == 422, query


def test_the_skill_profile_is_not_shown_to_its_person(client, manager):
    """No route shows a labeler their own gold counters."""
    assert client.get("/api/v1/users/me/skills", headers=manager).status_code == 404


def test_a_manager_grants_a_fresh_start_after_the_last_retake(app, client, db, make_user, clock, manager):
    """After the last failed attempt a manager lets the labeler start again; the grant is audited."""
    project = client.post("/api/v1/projects", headers=manager, json={
        "name": "fresh", "label_schema": API_SCHEMA,
        "settings": {"qualification_items": 1, "qualification_retakes": 0}}).get_json()["id"]
    items = ingest_items(app, db, project, 2, clock)
    client.put(f"/api/v1/projects/{project}/gold/{items[0]}", headers=manager,
               json={"reference": {"shapes": [BOX], "classifications": {"quality": "good"}}, "use": "qualification"})
    me = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=0)["labeler1"]
    client.post(f"/api/v1/projects/{project}/qualification", headers=me, json={})
    label_and_submit(client, lease(client, project, me)["task"], me, shapes=[{**BOX, "x": 4, "width": 2}])
    assert client.post(f"/api/v1/projects/{project}/qualification", headers=me, json={}).status_code == 403
    user_id = db.scalar(select(User.id).where(User.username == "labeler1"))
    db.commit()
    assert client.post(f"/api/v1/projects/{project}/qualification/{user_id}/fresh-start", headers=me,
                       json={}).status_code == 403  # only managers
    granted = client.post(f"/api/v1/projects/{project}/qualification/{user_id}/fresh-start", headers=manager, json={})
    assert granted.status_code == 200 and granted.get_json()["attempts_left"] == 1, granted.get_json()
    assert client.post(f"/api/v1/projects/{project}/qualification", headers=me, json={}).status_code == 201
    actions = db.scalars(select(AuditEvent.action).where(AuditEvent.action == "qualification:fresh_start")).all()
    db.commit()
    assert len(actions) == 1
    assert client.post(f"/api/v1/projects/{project}/qualification/999999/fresh-start", headers=manager,
                       json={}).status_code == 404
