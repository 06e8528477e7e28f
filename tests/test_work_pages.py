"""My work, the workspace pages and the revisions API: who sees what, rework with comments, escaping."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from imaging_helpers import bearer_for
from onprem_label.db.models import AuditEvent, Project
from onprem_label.workflow.members import add_member
from workflow_helpers import BOX, SCHEMA, ingest_items, label_and_submit, lease, team


@pytest.fixture
def project(app, client, db, make_user, clock):
    """A project with 3 items, one labeler and one reviewer; (project id, people's bearer headers)."""
    manager = bearer_for(db, make_user("mgr", "manager"), clock)
    created = client.post("/api/v1/projects", headers=manager,
                          json={"name": "Chest <script>alert(1)</script>", "label_schema": SCHEMA})
    project_id = created.get_json()["id"]
    ingest_items(app, db, project_id, 3, clock)
    people = team(client, db, make_user, clock, manager, project_id, labelers=1, reviewers=1)
    return project_id, people


def reject_first(client, project_id: int, people: dict, comment: str) -> int:
    """Label and submit one task, then reject it with `comment`; its id."""
    task = label_and_submit(client, lease(client, project_id, people["labeler1"])["task"], people["labeler1"])
    got = lease(client, project_id, people["reviewer1"], "review")
    shape_id = got["annotation"]["shapes"][0].get("id")
    answer = client.post(f"/api/v1/tasks/{task['id']}/review", headers=people["reviewer1"],
                         json={"decision": "reject", "comment": comment, "version": got["task"]["version"],
                               "shape_id": shape_id})
    assert answer.status_code == 200, answer.get_json()
    return task["id"]


def test_my_work_lists_rework_with_the_reviewers_comment_escaped(client, auth, project):
    """The labeler's page shows the rework waiting, the comment as text, counts and the workspace link."""
    project_id, people = project
    task_id = reject_first(client, project_id, people, "Redo <b>this</b> & the margin")
    auth.login("labeler1")
    page = client.get("/work").get_data(as_text=True)
    assert "Redo &lt;b&gt;this&lt;/b&gt; &amp; the margin" in page and "<b>this</b>" not in page
    assert f"Task {task_id}" in page and "Continue rework" in page
    assert f'href="/projects/{project_id}/label"' in page
    assert "Chest &lt;script&gt;" in page and "<script>alert" not in page


def test_my_work_counts_and_first_pass_rate(client, auth, project):
    """Two tasks handed in, one rejected and one accepted in the first round: 50% first-pass of 2."""
    project_id, people = project
    for _ in range(2):
        label_and_submit(client, lease(client, project_id, people["labeler1"])["task"], people["labeler1"])
    for decision in ("reject", "accept"):
        got = lease(client, project_id, people["reviewer1"], "review")
        answer = client.post(f"/api/v1/tasks/{got['task']['id']}/review", headers=people["reviewer1"],
                             json={"decision": decision, "comment": "no", "version": got["task"]["version"]})
        assert answer.status_code == 200, answer.get_json()
    auth.login("labeler1")
    page = client.get("/work").get_data(as_text=True)
    assert "50% of 2" in page


def test_reviewer_sees_how_many_tasks_wait(client, auth, project):
    """A reviewer's page offers review with the number of submitted tasks waiting."""
    project_id, people = project
    label_and_submit(client, lease(client, project_id, people["labeler1"])["task"], people["labeler1"])
    auth.login("reviewer1")
    page = client.get("/work").get_data(as_text=True)
    assert "Review next (1 waiting)" in page and f'href="/projects/{project_id}/review"' in page


@pytest.mark.parametrize("who, path, status", [
    ("labeler1", "label", 200), ("labeler1", "review", 403), ("reviewer1", "review", 200),
    ("reviewer1", "label", 403), ("outsider", "label", 404), ("outsider", "review", 404)])
def test_workspace_pages_follow_project_roles(client, auth, make_user, project, who, path, status):
    """The workspace shells need the matching project role; outsiders get 404 (no existence leak)."""
    project_id, _people = project
    if who == "outsider":
        make_user("outsider", ["labeler", "reviewer"])
    auth.login(who)
    response = client.get(f"/projects/{project_id}/{path}")
    assert response.status_code == status
    if status == 200:
        page = response.get_data(as_text=True)
        assert 'type="module"' in page and "<script>" not in page  # no inline script (CSP)
        assert "Chest &lt;script&gt;" in page


def test_revisions_api_lists_revisions_newest_first_and_one_by_number(client, db, project):
    """GET /tasks/<id>/revisions: newest first, ?revision=n for one, audited; another project's task is 404."""
    project_id, people = project
    headers = people["labeler1"]
    task = lease(client, project_id, headers)["task"]
    version = task["version"]
    for x in (1, 2, 3):
        saved = client.put(f"/api/v1/tasks/{task['id']}/annotation", headers=headers,
                           json={"shapes": [{**BOX, "x": x}], "version": version})
        version = saved.get_json()["task"]["version"]
    listed = client.get(f"/api/v1/tasks/{task['id']}/revisions?limit=2", headers=headers).get_json()["revisions"]
    assert [(r["revision"], r["shapes"][0]["x"]) for r in listed] == [(3, 3), (2, 2)]
    one = client.get(f"/api/v1/tasks/{task['id']}/revisions?revision=1", headers=headers).get_json()["revisions"]
    assert [(r["revision"], r["shapes"][0]["x"]) for r in one] == [(1, 1)]
    assert client.get(f"/api/v1/tasks/{task['id']}/revisions?limit=x", headers=headers).status_code == 422
    assert client.get("/api/v1/tasks/999/revisions", headers=headers).status_code == 404
    views = db.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "task:view"))
    db.rollback()
    assert views == 2


def test_reviews_carry_the_reviewers_name(client, project):
    """The labeler's rework lease shows who rejected it, by display name."""
    project_id, people = project
    reject_first(client, project_id, people, "again")
    got = lease(client, project_id, people["labeler1"])
    assert got["kind"] == "rework" and got["reviews"][-1]["reviewer_name"] == "Reviewer1"


def test_a_labeler_made_reviewer_in_one_project_opens_its_review_workspace(client, auth, db, project):
    """The project role is what counts: a global labeler who reviews in this project gets the page."""
    project_id, _people = project
    record = db.get(Project, project_id)
    add_member(db, record, "labeler1", "reviewer", actor=None, now=record.created_at)
    db.commit()
    auth.login("labeler1")
    assert client.get(f"/projects/{project_id}/review").status_code == 200
    assert f'href="/projects/{project_id}/review"' in client.get("/work").get_data(as_text=True)
