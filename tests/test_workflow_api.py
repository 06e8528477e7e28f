"""The full-inspection loop through HTTP: end to end, leases, stale saves, roles, errors."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from imaging_helpers import bearer_for
from onprem_label.db.models import AuditEvent, Review, Task
from workflow_helpers import BOX, SCHEMA, ingest_items, label_and_submit, lease, team


@pytest.fixture
def manager(make_user, db, clock):
    """A global manager's bearer header."""
    return bearer_for(db, make_user("mgr", "manager"), clock)


def make_project(client, manager, name="Chest CT", **settings) -> int:
    """A project with the test schema, made through the API."""
    response = client.post("/api/v1/projects", headers=manager,
                           json={"name": name, "label_schema": SCHEMA, "settings": settings})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def test_end_to_end_full_inspection(app, client, db, make_user, clock, manager):
    """3 labelers, 2 reviewers, 50 items: all labeled and reviewed, 10 rejected, reworked, accepted."""
    project = make_project(client, manager, spot_check_rate=0.0)  # exact counts: no random second reviews
    ingest_items(app, db, project, 50, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=3, reviewers=2)
    labelers, reviewers = [people[f"labeler{n}"] for n in (1, 2, 3)], [people[f"reviewer{n}"] for n in (1, 2)]
    labeled_by, comments_sent, rejected = {}, {}, 0
    # Labelers and reviewers take turns, as they would work at the same time.
    while True:
        progress = False
        for n, headers in enumerate(labelers):
            got = lease(client, project, headers)
            if got:
                progress = True
                if got["kind"] == "rework":
                    assert got["reviews"][-1]["comment"] == comments_sent[got["task"]["id"]]
                labeled_by[got["task"]["id"]] = f"labeler{n + 1}"
                label_and_submit(client, got["task"], headers)
        for n, headers in enumerate(reviewers):
            got = lease(client, project, headers, "review")
            if got:
                progress = True
                task = got["task"]
                reject = rejected < 10 and task["round"] == 0 and task["id"] % 5 == 0
                body = {"decision": "reject" if reject else "accept", "version": task["version"],
                        "comment": f"box too small on task {task['id']}" if reject else ""}
                answer = client.post(f"/api/v1/tasks/{task['id']}/review", headers=headers, json=body)
                assert answer.status_code == 200, answer.get_json()
                if reject:
                    rejected += 1
                    comments_sent[task["id"]] = body["comment"]
        if not progress:
            break
    counts = client.get(f"/api/v1/projects/{project}", headers=manager).get_json()["counts"]
    assert counts["accepted"] == 50 and sum(counts.values()) == 50
    assert rejected == 10
    tasks = db.scalars(select(Task)).all()
    reviews = db.scalars(select(Review)).all()
    assert all(t.state == "accepted" for t in tasks)
    assert all(r.reviewer_id != next(t.labeler_id for t in tasks if t.id == r.task_id) for r in reviews)
    assert sorted(t.id for t in tasks if t.round == 1) == sorted(comments_sent)
    actions = [a for a in db.scalars(select(AuditEvent.action))]
    db.rollback()  # SQLite: the test's read transaction would hold the write lock
    assert actions.count("task:submit") == 60 and actions.count("task:review") == 60
    assert actions.count("task:lease") == 120
    numbers = client.get(f"/api/v1/projects/{project}/dashboard", headers=manager).get_json()
    assert sum(l["accepted"] for l in numbers["labelers"]) == 50
    assert len(numbers["recent_rejections"]) == 10


def test_lease_expiry_returns_the_task_and_refuses_the_late_save(app, client, db, make_user, clock, manager):
    """A labeler who vanishes loses the task after the TTL; their late save and submit get 409."""
    project = make_project(client, manager, lease_minutes=30)
    ingest_items(app, db, project, 1, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=2, reviewers=0)
    first = lease(client, project, people["labeler1"])
    assert lease(client, project, people["labeler2"]) is None  # held: nobody else gets it
    clock.advance(minutes=31)
    second = lease(client, project, people["labeler2"])
    assert second["task"]["id"] == first["task"]["id"]
    late = client.put(f"/api/v1/tasks/{first['task']['id']}/annotation", headers=people["labeler1"],
                      json={"shapes": [BOX], "version": first["task"]["version"]})
    assert late.status_code == 409 and late.get_json()["error"]["code"] in ("lease_lost", "stale_version")
    late_submit = client.post(f"/api/v1/tasks/{first['task']['id']}/submit", headers=people["labeler1"],
                              json={"version": first["task"]["version"]})
    assert late_submit.status_code == 409
    holder = db.scalar(select(Task)).lease_owner_id
    db.rollback()
    assert holder is not None and holder != first["task"]["lease_owner_id"]


def test_stale_save_invalid_shapes_wrong_role_and_foreign_task(app, client, db, make_user, clock, manager):
    """Stale save -> 409 with the current version; bad shapes -> 422; labeler reviewing -> 403;
    another project's task -> 404; every error is JSON."""
    project = make_project(client, manager)
    other = make_project(client, manager, name="Other")
    ingest_items(app, db, project, 1, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=0)
    task = lease(client, project, people["labeler1"])["task"]
    url = f"/api/v1/tasks/{task['id']}"
    ok = client.put(f"{url}/annotation", headers=people["labeler1"], json={"shapes": [BOX], "version": task["version"]})
    assert ok.status_code == 200
    stale = client.put(f"{url}/annotation", headers=people["labeler1"], json={"shapes": [], "version": task["version"]})
    assert stale.status_code == 409
    error = stale.get_json()["error"]
    assert error["code"] == "stale_version" and error["version"] == ok.get_json()["task"]["version"]
    bad = client.put(f"{url}/annotation", headers=people["labeler1"],
                     json={"shapes": [{**BOX, "label": "unknown"}], "version": error["version"]})
    assert bad.status_code == 422 and bad.get_json()["error"]["errors"][0]["field"].startswith("shapes[0]")
    review = client.post(f"{url}/review", headers=people["labeler1"], json={"decision": "accept", "version": 1})
    assert review.status_code == 403 and review.get_json()["error"]["code"] == "forbidden"
    outsider = bearer_for(db, make_user("outsider", "labeler"), clock)
    assert client.get(url, headers=outsider).status_code == 404
    client.post(f"/api/v1/projects/{other}/members", headers=manager, json={"username": "outsider", "role": "labeler"})
    foreign = client.put(f"{url}/annotation", headers=outsider, json={"shapes": [], "version": 1})
    assert foreign.status_code == 404 and foreign.get_json()["error"]["code"] == "not_found"


def test_rejected_task_returns_to_its_labeler_first_and_escalates(app, client, db, make_user, clock, manager):
    """Rework comes back to the same labeler ahead of new work; after max_rounds it escalates."""
    project = make_project(client, manager, max_rounds=2)
    ingest_items(app, db, project, 3, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=2, reviewers=1)
    first = lease(client, project, people["labeler1"])["task"]
    label_and_submit(client, first, people["labeler1"])
    for round_ in range(2):
        got = lease(client, project, people["reviewer1"], "review")["task"]
        assert got["id"] == first["id"]
        rejected = client.post(f"/api/v1/tasks/{got['id']}/review", headers=people["reviewer1"],
                               json={"decision": "reject", "comment": f"round {round_}", "shape_id": None,
                                     "version": got["version"]})
        assert rejected.status_code == 200
        if round_ == 0:
            assert lease(client, project, people["labeler2"])["task"]["id"] != first["id"]
            back = lease(client, project, people["labeler1"])
            assert back["kind"] == "rework" and back["task"]["id"] == first["id"]
            assert back["reviews"][-1]["comment"] == "round 0"
            label_and_submit(client, back["task"], people["labeler1"])
    assert rejected.get_json()["task"]["state"] == "escalated"
    no_comment = client.post("/api/v1/tasks/999999/review", headers=people["reviewer1"],
                             json={"decision": "reject", "version": 1})
    assert no_comment.status_code == 404


def test_schema_change_is_versioned_and_keeps_saved_annotations(app, client, db, make_user, clock, manager):
    """Changing the schema after labeling started makes a new version; saved revisions keep theirs."""
    from onprem_label.db.models import Annotation, AuditEvent, SchemaVersion

    project = make_project(client, manager)
    ingest_items(app, db, project, 1, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=0)
    task = lease(client, project, people["labeler1"])["task"]
    client.put(f"/api/v1/tasks/{task['id']}/annotation", headers=people["labeler1"],
               json={"shapes": [BOX], "version": task["version"]})
    narrower = {**SCHEMA, "classes": [SCHEMA["classes"][1]]}  # "nodule" removed: a breaking change
    changed = client.patch(f"/api/v1/projects/{project}", headers=manager, json={"label_schema": narrower})
    assert changed.status_code == 200 and changed.get_json()["schema_version"] == 2
    bad = client.patch(f"/api/v1/projects/{project}", headers=manager, json={"label_schema": {"classes": []}})
    assert bad.status_code == 422 and bad.get_json()["error"]["errors"]
    saved = db.scalars(select(Annotation)).one()
    versions = db.scalars(select(SchemaVersion.version).where(SchemaVersion.project_id == project)).all()
    event = db.scalars(select(AuditEvent).where(AuditEvent.action == "project:schema")).one()
    db.rollback()
    assert saved.schema_version == 1 and saved.shapes == [BOX] and sorted(versions) == [1, 2]
    assert event.details["breaking"]


def test_correct_and_accept_is_a_reviewer_revision_and_a_first_pass_miss(app, client, db, make_user, clock, manager):
    """A correction becomes the reviewer's revision, accepts the task and counts against first pass."""
    from onprem_label.db.models import Annotation

    project = make_project(client, manager)
    ingest_items(app, db, project, 1, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=1)
    label_and_submit(client, lease(client, project, people["labeler1"])["task"], people["labeler1"])
    task = lease(client, project, people["reviewer1"], "review")["task"]
    fixed = {**BOX, "width": 12}
    missing = client.post(f"/api/v1/tasks/{task['id']}/review", headers=people["reviewer1"],
                          json={"decision": "correct", "version": task["version"]})
    assert missing.status_code == 422  # a correction needs the corrected, complete labels
    done = client.post(f"/api/v1/tasks/{task['id']}/review", headers=people["reviewer1"],
                       json={"decision": "correct", "shapes": [fixed], "classifications": {"quality": "good"},
                             "version": task["version"]})
    assert done.status_code == 200 and done.get_json()["task"]["state"] == "accepted"
    revisions = [(r.kind, r.shapes) for r in db.scalars(select(Annotation).order_by(Annotation.revision))]
    db.rollback()
    assert revisions == [("label", [BOX]), ("correction", [fixed])]
    numbers = client.get(f"/api/v1/projects/{project}/dashboard", headers=manager).get_json()
    assert numbers["labelers"][0]["first_pass_acceptance"] == 0.0


def test_review_rate_below_full_skips_with_an_audit_note(app, client, db, make_user, clock, manager):
    """At a 1% review rate most submissions are accepted unreviewed, each with a review row and audit note."""
    project = make_project(client, manager, review_rate=0.01)
    ingest_items(app, db, project, 6, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=0)
    states = []
    while (got := lease(client, project, people["labeler1"])) is not None:
        states.append(label_and_submit(client, got["task"], people["labeler1"])["state"])
    assert len(states) == 6 and states.count("accepted") >= 3  # P(fewer) ~ 2e-5
    auto = [r.comment for r in db.scalars(select(Review).where(Review.decision == "auto_accept"))]
    notes = [e.details for e in db.scalars(select(AuditEvent).where(AuditEvent.action == "task:submit"))]
    db.rollback()
    assert len(auto) == states.count("accepted") and all("review rate" in comment for comment in auto)
    assert sum("auto_accepted" in details for details in notes) == states.count("accepted")


def test_heartbeat_extends_the_lease_and_counts_active_time_release_returns_it(app, client, db, make_user, clock,
                                                                             manager):
    """Heartbeats keep the lease past its TTL and add active time (capped); release puts it back."""
    project = make_project(client, manager, lease_minutes=5)
    ingest_items(app, db, project, 1, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=2, reviewers=0)
    task = lease(client, project, people["labeler1"])["task"]
    for _ in range(3):
        clock.advance(minutes=4)
        beat = client.post(f"/api/v1/tasks/{task['id']}/heartbeat", headers=people["labeler1"])
        assert beat.status_code == 200
    assert beat.get_json()["task"]["active_seconds"] == 3 * 120  # gaps over 2 minutes count as 2
    beats = db.scalars(select(AuditEvent.details).where(AuditEvent.action == "task:heartbeat")).all()
    db.rollback()
    assert [d["active_seconds"] for d in beats] == [120, 240, 360]  # every renewal is audited
    assert lease(client, project, people["labeler2"]) is None  # 12 minutes later, still held
    released = client.post(f"/api/v1/tasks/{task['id']}/release", headers=people["labeler1"])
    assert released.status_code == 200 and released.get_json()["task"]["state"] == "new"
    assert lease(client, project, people["labeler2"])["task"]["id"] == task["id"]


def test_nobody_reviews_their_own_labels(app, client, db, make_user, clock, manager):
    """A person who labels and reviews in one project is never handed their own task for review."""
    project = make_project(client, manager)
    ingest_items(app, db, project, 1, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=1)
    client.post(f"/api/v1/projects/{project}/members", headers=manager, json={"username": "labeler1", "role": "reviewer"})
    label_and_submit(client, lease(client, project, people["labeler1"])["task"], people["labeler1"])
    assert lease(client, project, people["labeler1"], "review") is None
    assert lease(client, project, people["reviewer1"], "review") is not None
