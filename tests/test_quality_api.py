"""Gold, qualification, hidden gold checks and the pay ledger through HTTP: the acceptance points of issue 8."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DatabaseError

from imaging_helpers import bearer_for
from onprem_label.db.models import AuditEvent
from onprem_label.db.quality import PayEntry
from onprem_label.workflow import ledger
from onprem_label.exchange import selection
from workflow_helpers import BOX, SCHEMA, ingest_items, label_and_submit, lease, team

RIGHT = {"shapes": [BOX], "classifications": {"quality": "good"}}
WRONG_BOX = {**BOX, "x": 4, "y": 6, "width": 3, "height": 3}  # IoU with BOX far under 0.5


@pytest.fixture
def manager(make_user, db, clock):
    """A global manager's bearer header."""
    return bearer_for(db, make_user("mgr", "manager"), clock)


def make_project(client, manager, **settings) -> int:
    """A project with the test schema and these settings."""
    response = client.post("/api/v1/projects", headers=manager,
                           json={"name": "Gold CT", "label_schema": SCHEMA, "settings": settings})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def mark(client, manager, project: int, item: int, reference=RIGHT, use="both"):
    """PUT a gold item; the response."""
    return client.put(f"/api/v1/projects/{project}/gold/{item}", headers=manager,
                      json={"reference": reference, "use": use})


def answer(client, task: dict, headers: dict, shapes) -> dict:
    """Save and submit; the submit response's JSON."""
    saved = client.put(f"/api/v1/tasks/{task['id']}/annotation", headers=headers,
                       json={"shapes": shapes, "classifications": {"quality": "good"}, "version": task["version"]})
    assert saved.status_code == 200, saved.get_json()
    response = client.post(f"/api/v1/tasks/{task['id']}/submit", headers=headers,
                           json={"version": saved.get_json()["task"]["version"]})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def next_status(client, project: int, headers: dict):
    """POST tasks/next: (status, JSON or None)."""
    response = client.post(f"/api/v1/projects/{project}/tasks/next", headers=headers, json={"kind": "label"})
    return response.status_code, response.get_json(silent=True)


# --- qualification ---------------------------------------------------------------------------------

def test_qualification_gates_live_work_teaches_and_limits_retakes(app, client, db, make_user, clock, manager):
    """A labeler who has not passed gets 403 with the reason; the test shows each answer against the
    reference; a failed test waits out its cool-down; after passing, live work is handed out."""
    project = make_project(client, manager, qualification_items=2, qualification_pass=1.0, qualification_retakes=1,
                           qualification_cooldown_hours=24)
    items = ingest_items(app, db, project, 5, clock)
    for item in items[:2]:
        assert mark(client, manager, project, item, use="qualification").status_code == 200
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=0)
    me = people["labeler1"]

    status, body = next_status(client, project, me)
    assert status == 403 and body["error"]["code"] == "qualification_required"
    assert "qualification test" in body["error"]["message"]
    assert body["error"]["qualification"]["required"] is True

    assert client.post(f"/api/v1/projects/{project}/qualification", headers=me, json={}).status_code == 201
    first = lease(client, project, me)
    assert first["kind"] == "qualification" and first["item"]["id"] in items[:2]
    fed = answer(client, first["task"], me, [WRONG_BOX])
    assert fed["task"]["state"] == "accepted"  # a test question is not reviewed
    assert fed["feedback"]["correct"] is False and fed["feedback"]["score"] == pytest.approx(0.5)
    assert fed["feedback"]["reference"]["shapes"][0]["x"] == BOX["x"]  # the answer shown against the reference
    second = lease(client, project, me)
    fed = answer(client, second["task"], me, [BOX])
    assert fed["feedback"]["correct"] is True
    assert fed["feedback"]["attempt"]["passed"] is False and fed["feedback"]["attempt"]["score"] == 0.5

    status, body = next_status(client, project, me)
    assert status == 403 and "retake it from" in body["error"]["message"]
    refused = client.post(f"/api/v1/projects/{project}/qualification", headers=me, json={})
    assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "qualification_required"

    clock.advance(hours=25)
    assert client.post(f"/api/v1/projects/{project}/qualification", headers=me, json={}).status_code == 201
    for _ in range(2):
        answer(client, lease(client, project, me)["task"], me, [BOX])
    standing = client.get(f"/api/v1/projects/{project}/qualification", headers=me).get_json()
    assert standing["passed"] is True and standing["attempts_left"] == 0
    work = lease(client, project, me)
    assert work["kind"] == "label" and work["item"]["id"] in items[2:]  # gold items are not live work


def test_qualification_without_retakes_left_says_ask_a_manager(app, client, db, make_user, clock, manager):
    """After the last allowed attempt fails, the 403 says so, and no new test starts even after the cool-down."""
    project = make_project(client, manager, qualification_items=1, qualification_retakes=0)
    items = ingest_items(app, db, project, 2, clock)
    mark(client, manager, project, items[0], use="qualification")
    me = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=0)["labeler1"]
    client.post(f"/api/v1/projects/{project}/qualification", headers=me, json={})
    answer(client, lease(client, project, me)["task"], me, [WRONG_BOX])
    clock.advance(days=30)
    status, body = next_status(client, project, me)
    assert status == 403 and "no retakes left" in body["error"]["message"]
    assert client.post(f"/api/v1/projects/{project}/qualification", headers=me, json={}).status_code == 403


def test_qualification_bad_requests_are_clear(app, client, db, make_user, clock, manager):
    """No test configured -> 409; too few test items -> 409 naming the count; outsiders 404."""
    plain = make_project(client, manager)
    me = team(client, db, make_user, clock, manager, plain, labelers=1, reviewers=0)["labeler1"]
    response = client.post(f"/api/v1/projects/{plain}/qualification", headers=me, json={})
    assert response.status_code == 409 and "no qualification test" in response.get_json()["error"]["message"]
    db.execute(text("UPDATE projects SET settings = :s WHERE id = :p"),
               {"s": '{"qualification_items": 3}', "p": plain})
    db.commit()
    response = client.post(f"/api/v1/projects/{plain}/qualification", headers=me, json={})
    assert response.status_code == 409 and "needs 3 gold items" in response.get_json()["error"]["message"]
    stranger = bearer_for(db, make_user("stranger", "labeler"), clock)
    assert client.get(f"/api/v1/projects/{plain}/qualification", headers=stranger).status_code == 404


# --- gold items ---------------------------------------------------------------------------------------

def test_marking_gold_validates_and_refuses_clearly(app, client, db, make_user, clock, manager):
    """A bad reference is 422 naming the field; an unknown item 404; an item under way 409; labelers 403."""
    project = make_project(client, manager)
    items = ingest_items(app, db, project, 2, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=0)
    bad = mark(client, manager, project, items[0], reference={"shapes": [{**BOX, "label": "tumour"}]})
    assert bad.status_code == 422 and any(e["field"].startswith("reference") for e in bad.get_json()["error"]["errors"])
    assert mark(client, manager, project, items[0], use="sometimes").status_code == 422
    assert mark(client, manager, project, 999_999).status_code == 404
    leased = lease(client, project, people["labeler1"])
    assert mark(client, manager, project, leased["item"]["id"]).status_code == 409
    assert mark(client, people["labeler1"], project, items[1]).status_code == 403
    assert client.put(f"/api/v1/projects/{project}/gold/{items[1]}", headers=manager, data="x").status_code == 422
    listed = client.get(f"/api/v1/projects/{project}/gold", headers=manager).get_json()["gold"]
    assert listed == []  # nothing was marked by any refused call


def test_a_gold_item_is_held_back_from_work_and_returns_when_unmarked(app, client, db, make_user, clock, manager):
    """Marking a new item gold takes its work task out of the queue; unmarking puts it back."""
    project = make_project(client, manager, hidden_gold_rate=0.0)
    items = ingest_items(app, db, project, 1, clock)
    me = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=0)["labeler1"]
    assert mark(client, manager, project, items[0]).status_code == 200
    assert next_status(client, project, me)[0] == 204
    counts = client.get(f"/api/v1/projects/{project}", headers=manager).get_json()["counts"]
    assert counts["new"] == 0
    assert client.delete(f"/api/v1/projects/{project}/gold/{items[0]}", headers=manager).status_code == 204
    assert lease(client, project, me)["item"]["id"] == items[0]


# --- hidden gold -----------------------------------------------------------------------------------------

def _shape(value):
    """The JSON's structure: keys and value types, recursively (what a client could tell apart)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return type(value).__name__


def test_hidden_gold_looks_like_work_scores_the_labeler_and_stays_out_of_exports(app, client, db, make_user, clock,
                                                                                 manager):
    """Through the API a hidden gold check has the same fields, kind and audit path as real work, goes
    to review like it, scores the labeler, and never reaches the exported work or the manager's counts."""
    project = make_project(client, manager, hidden_gold_rate=0.5, pay_currency="EUR", pay_label_rate="1.00")
    work_items = ingest_items(app, db, project, 12, clock)
    gold_items = [ingest_items(app, db, project, 1, clock)[0] for _ in range(12)]
    for item in gold_items:
        assert mark(client, manager, project, item, use="hidden").status_code == 200
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=1)
    me, reviewer = people["labeler1"], people["reviewer1"]
    seen = {"gold": [], "work": []}
    while (got := lease(client, project, me)) is not None:
        kind = "gold" if got["item"]["id"] in gold_items else "work"
        before = db.scalar(select(func.max(AuditEvent.id)))
        db.commit()
        submitted = answer(client, got["task"], me, [BOX])
        after = [e.action for e in db.scalars(select(AuditEvent).where(AuditEvent.id > before)
                                              .where(AuditEvent.actor_id.is_not(None)))]
        db.commit()
        seen[kind].append((got, submitted, client.get(f"/api/v1/tasks/{got['task']['id']}", headers=me).get_json(),
                           [a for a in after if a.startswith(("task:", "annotation:"))]))
    assert seen["gold"] and len(seen["work"]) == 12
    gold_lease, gold_submit, gold_get, gold_events = seen["gold"][0]
    work_lease, work_submit, work_get, work_events = seen["work"][0]
    assert gold_lease["kind"] == work_lease["kind"] == "label"
    assert _shape(gold_lease) == _shape(work_lease)
    assert _shape(gold_submit) == _shape(work_submit) and "feedback" not in gold_submit
    assert _shape(gold_get) == _shape(work_get)
    assert gold_events == work_events  # the same steps, the same trail
    assert gold_submit["task"]["state"] == "submitted"  # to review, like any task
    mine = client.get(f"/api/v1/projects/{project}", headers=me).get_json()["counts"]
    assert mine["submitted"] == len(seen["gold"]) + 12  # a labeler's counts: their own tasks, gold included

    while (review := lease(client, project, reviewer, "review")) is not None:
        done = client.post(f"/api/v1/tasks/{review['task']['id']}/review", headers=reviewer,
                           json={"decision": "accept", "version": review["task"]["version"]})
        assert done.status_code == 200
    figures = client.get(f"/api/v1/projects/{project}/quality", headers=manager).get_json()
    labeler = figures["labelers"][0]
    assert labeler["gold_accuracy"]["count"] == len(seen["gold"]) and labeler["gold_accuracy"]["value"] == 1.0
    assert figures["project"]["estimated_label_accuracy"]["count"] == len(seen["gold"])
    exported = {row.item.id for row in selection.rows(db.connection(), project, selection.ExportFilter())}
    db.commit()
    assert exported == set(work_items)
    counts = client.get(f"/api/v1/projects/{project}", headers=manager).get_json()["counts"]
    assert counts["accepted"] == 12
    listed = client.get(f"/api/v1/projects/{project}/tasks?state=accepted", headers=manager).get_json()["tasks"]
    assert {t["item_id"] for t in listed} == set(work_items)
    paid = db.scalars(select(PayEntry.task_id).where(PayEntry.kind == "label")).all()
    assert len(paid) == 12  # gold is not paid unless pay_gold says so


# --- the pay ledger ---------------------------------------------------------------------------------------------

def _run_project(client, project, people, *, reject_first: int):
    """Label everything; the reviewer rejects the first `reject_first` tasks once, then accepts all."""
    me, reviewer = people["labeler1"], people["reviewer1"]
    rejected = set()
    while True:
        got = lease(client, project, me)
        if got is not None:
            label_and_submit(client, got["task"], me)
            continue
        review = lease(client, project, reviewer, "review")
        if review is None:
            return rejected
        decision = "accept"
        if len(rejected) < reject_first and review["task"]["id"] not in rejected:
            decision = "reject"
            rejected.add(review["task"]["id"])
        response = client.post(f"/api/v1/tasks/{review['task']['id']}/review", headers=reviewer,
                               json={"decision": decision, "comment": "redo", "version": review["task"]["version"]})
        assert response.status_code == 200, response.get_json()


def test_ledger_totals_are_exact_pay_once_and_the_csv_round_trips(app, client, db, make_user, clock, manager):
    """Totals equal accepted tasks x rates exactly, a rejected-then-accepted task is paid once, the ledger
    refuses changes, and the statements' CSV reads back to the same statements."""
    project = make_project(client, manager, pay_currency="EUR", pay_label_rate="0.405", pay_review_rate="0.10",
                           pay_minimum_hourly="12.50")
    ingest_items(app, db, project, 7, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=1)
    rejected = _run_project(client, project, people, reject_first=3)
    assert len(rejected) == 3
    entries = db.scalars(select(PayEntry)).all()
    db.commit()
    labels = [e for e in entries if e.kind == "label"]
    assert len(labels) == 7 and len({e.task_id for e in labels}) == 7  # paid once each, rework included
    assert {e.amount for e in labels} == {"0.40"}  # 0.405 rounded half-even to 2 places, as stated
    assert len([e for e in entries if e.kind == "review"]) == 7 + 3  # every review decision on accepted work

    response = client.get(f"/api/v1/projects/{project}/pay/statements", headers=manager)
    assert response.status_code == 200
    by_name = {s["username"]: s for s in response.get_json()["statements"]}
    assert by_name["labeler1"]["label_amount"] == str(Decimal("0.40") * 7) == "2.80"
    assert by_name["reviewer1"]["review_amount"] == "1.00" and by_name["reviewer1"]["reviews"] == 10
    assert Decimal(by_name["labeler1"]["total"]) + Decimal(by_name["reviewer1"]["total"]) == Decimal("3.80")

    exported = client.get(f"/api/v1/projects/{project}/pay/statements?format=csv", headers=manager)
    assert exported.mimetype == "text/csv" and "attachment" in exported.headers["Content-Disposition"]
    body = exported.get_data(as_text=True)
    rows = ledger.read_statements_csv(body)
    assert [r.__dict__ for r in rows] == response.get_json()["statements"]
    assert sum(Decimal(r["total"]) for r in csv.DictReader(io.StringIO(body))) == Decimal("3.80")

    with pytest.raises(DatabaseError):
        db.execute(text("UPDATE pay_entries SET amount = '100.00'"))
    db.rollback()
    with pytest.raises(DatabaseError):
        db.execute(text("DELETE FROM pay_entries"))
    db.rollback()
    own = client.get(f"/api/v1/projects/{project}/pay/statements", headers=people["labeler1"]).get_json()
    assert [s["username"] for s in own["statements"]] == ["labeler1"]  # a labeler sees only their own


def test_statement_flags_pay_under_the_minimum_hourly_rate(app, client, db, make_user, clock, manager):
    """Active time comes from heartbeats and hand-ins; pay per active hour under the minimum is flagged."""
    project = make_project(client, manager, pay_currency="EUR", pay_label_rate="1.00", pay_minimum_hourly="12.00")
    ingest_items(app, db, project, 1, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=1)
    got = lease(client, project, people["labeler1"])
    for _ in range(5):  # ten minutes of work, two at a time
        clock.advance(minutes=2)
        assert client.post(f"/api/v1/tasks/{got['task']['id']}/heartbeat", headers=people["labeler1"]).status_code == 200
    label_and_submit(client, got["task"], people["labeler1"])
    review = lease(client, project, people["reviewer1"], "review")
    client.post(f"/api/v1/tasks/{review['task']['id']}/review", headers=people["reviewer1"],
                json={"decision": "accept", "version": review["task"]["version"]})
    statements = client.get(f"/api/v1/projects/{project}/pay/statements", headers=manager).get_json()["statements"]
    mine = next(s for s in statements if s["username"] == "labeler1")
    assert mine["active_seconds"] == 600 and mine["effective_hourly"] == "6.00" and mine["under_minimum"] is True


@pytest.mark.parametrize("query,field", [("from=yesterday", "from"), ("from=2026-12-01&to=2026-11-01", "to"),
                                         ("from=2020-01-01&to=2026-01-01", "to"), ("format=xlsx", "format")])
def test_statement_bad_queries_are_422(app, client, db, manager, query, field):
    """A malformed period or format names its field; nothing is written."""
    project = make_project(client, manager)
    response = client.get(f"/api/v1/projects/{project}/pay/statements?{query}", headers=manager)
    assert response.status_code == 422 and response.get_json()["error"]["errors"][0]["field"] == field


@pytest.mark.parametrize("values,field", [({"pay_label_rate": "abc"}, "settings.pay_label_rate"),
                                            ({"pay_label_rate": "-1"}, "settings.pay_label_rate"),
                                            ({"pay_currency": "euro"}, "settings.pay_currency"),
                                            ({"hidden_gold_rate": 0.9}, "settings.hidden_gold_rate"),
                                            ({"required_skills": ["size:big"]}, "settings.required_skills"),
                                            ({"consensus_k": 0}, "settings.consensus_k")])
def test_bad_quality_settings_are_refused_by_field(client, manager, values, field):
    """Pay, gold and matching settings are validated like the rest, each error naming its setting."""
    response = client.post("/api/v1/projects", headers=manager, json={"name": "x", "settings": values})
    assert response.status_code == 422
    assert [e["field"] for e in response.get_json()["error"]["errors"]] == [field]


def test_spot_check_is_a_blind_second_review_that_never_reopens_work(app, client, db, make_user, clock, manager):
    """An accepted task drawn for a spot check goes to the other reviewer as ordinary review work (the
    labels as a labeler's revision, no history); a rejection there ends the check, leaves the task
    accepted, sends nothing back to the labeler and counts against the first reviewer's agreement."""
    project = make_project(client, manager, spot_check_rate=1.0, hidden_gold_rate=0.0, pay_currency="EUR",
                           pay_review_rate="0.10")
    ingest_items(app, db, project, 2, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=2)
    me, first, second = people["labeler1"], people["reviewer1"], people["reviewer2"]
    label_and_submit(client, lease(client, project, me)["task"], me)
    label_and_submit(client, lease(client, project, me)["task"], me)
    ordinary = lease(client, project, second, "review")  # a first-round review, to compare with
    review = lease(client, project, first, "review")
    assert client.post(f"/api/v1/tasks/{review['task']['id']}/review", headers=first,
                       json={"decision": "accept", "version": review["task"]["version"]}).status_code == 200
    assert lease(client, project, first, "review") is None  # never their own acceptance
    assert client.post(f"/api/v1/tasks/{ordinary['task']['id']}/review", headers=second,
                       json={"decision": "accept", "version": ordinary["task"]["version"]}).status_code == 200
    check = lease(client, project, second, "review")
    assert check["item"]["id"] == review["item"]["id"] and check["kind"] == "review"
    assert check["reviews"] == [] and check["annotation"]["kind"] == "label"
    assert _shape(check) == _shape(ordinary)
    done = client.post(f"/api/v1/tasks/{check['task']['id']}/review", headers=second,
                       json={"decision": "reject", "comment": "box too loose", "version": check["task"]["version"]})
    assert done.status_code == 200 and done.get_json()["task"]["state"] == "accepted"
    original = client.get(f"/api/v1/tasks/{review['task']['id']}", headers=manager).get_json()["task"]
    assert original["state"] == "accepted"
    assert lease(client, project, me) is None  # no rework from a spot check
    figures = client.get(f"/api/v1/projects/{project}/quality", headers=manager).get_json()
    by_name = {r["username"]: r for r in figures["reviewers"]}
    assert by_name["reviewer1"]["second_review_agreement"] == {"value": 0.0, "count": 1, "successes": 0,
                                                                "ci95": [0.0, 0.7935]}
    events = db.scalars(select(AuditEvent.action).where(AuditEvent.action == "task:spot_check")).all()
    db.commit()
    assert len(events) == 2  # one per acceptance (rate 1.0), each waiting for the other reviewer
    listed = client.get(f"/api/v1/projects/{project}/tasks?purpose=spot_check", headers=manager).get_json()["tasks"]
    assert listed and all(t["purpose"] == "spot_check" for t in listed)
    refused = client.get(f"/api/v1/projects/{project}/tasks?purpose=spot_check", headers=first)
    assert refused.status_code == 422  # reviewers see real work only
