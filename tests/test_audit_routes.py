"""Every route's audit trail, table-driven over the url_map: one successful call leaves exactly its events.

AUDIT names each (endpoint, method) of the app: who calls it, how (arranging what the call needs
first), and the multiset of audit actions that one call adds, or READ_ONLY for a route that
changes nothing and shows neither image data nor item metadata. A new route fails
test_every_route_is_in_the_table until it is added; a row whose route is gone fails too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
from sqlalchemy import delete, func, select

from conftest import PASSWORD, csrf_from
from imaging_helpers import bearer_for, make_dicom, multipart
from onprem_label.audit import AuditAction as A
from onprem_label.auth import accounts, break_glass, tokens, totp
from onprem_label.db.models import AuditEvent, Project, Task, User
from onprem_label.db.quality import RoleProposal
from onprem_label.workflow import gold
from onprem_label.workflow.members import add_member
from onprem_label.workflow.projects import create_project
from test_routes import ANON, AUTOMATIC, caller
from workflow_helpers import BOX, SCHEMA, ingest_items, label_and_submit, lease

ADDR = "192.0.2.7"  # the caller's address: events must carry it (not the test client's default)
READ_ONLY = "read-only"  # changes nothing, shows no image data or item metadata: leaves no event
NEW_PASSWORD = "a quite different passphrase"


@dataclass(frozen=True)
class Call:
    """One request: a path and its body (JSON, form fields, or files as a multipart upload)."""

    path: str
    json: dict | None = None
    data: dict | None = None
    upload: bool = False


@dataclass(frozen=True)
class Case:
    """How to call a route successfully, and what that one call must add to the audit trail."""

    who: str  # the signed-in caller's role, or ANON
    call: Callable[["World", object], Call]  # (world, client) -> the request; arranges what it needs
    events: tuple[A, ...] | str  # the actions one call adds (a multiset), or READ_ONLY
    status: int = 200
    actor: str | None = None  # whose id the events carry when not the caller's (a login form's account)


class World:
    """One test's rows: a user per role and a target account, a project with a schema, members, items."""

    def __init__(self, app, db, make_user, clock):
        self.app, self.db, self.clock = app, db, clock
        self.setup = app.test_client()  # arranging requests (bearer tokens), never measured
        self.totp_key = app.extensions["onprem_label"].totp_key
        self.ids = {name: make_user(name, "labeler" if name == "target" else name).id
                    for name in ("admin", "manager", "labeler", "reviewer", "auditor", "target")}
        project = create_project(db, "Chest CT", label_schema=SCHEMA, settings={"max_rounds": 1},
                                 actor_name="test", now=clock())
        for name in ("labeler", "reviewer"):
            add_member(db, project, name, name, actor=None, now=clock())
        db.commit()
        self.project = project.id
        self.items = ingest_items(app, db, project.id, 2, clock)
        self.tasks = list(db.scalars(select(Task.id).order_by(Task.id)))
        db.commit()  # SQLite: an open read would hold the write lock the app needs
        self._bearers: dict[str, dict] = {}

    def user(self, who: str) -> User:
        """The stored account of a role."""
        user = self.db.get(User, self.ids[who])
        self.db.commit()
        return user

    def bearer(self, who: str) -> dict:
        """An Authorization header for arranging work as `who` (one token per role)."""
        if who not in self._bearers:
            self._bearers[who] = bearer_for(self.db, self.user(who), self.clock)
        return self._bearers[who]

    def leased(self) -> dict:
        """The labeler's leased task."""
        return lease(self.setup, self.project, self.bearer("labeler"))["task"]

    def saved(self) -> dict:
        """The labeler's leased task with one saved revision."""
        task = self.leased()
        response = self.setup.put(f"/api/v1/tasks/{task['id']}/annotation", headers=self.bearer("labeler"),
                                  json={"shapes": [BOX], "classifications": {"quality": "good"},
                                        "version": task["version"]})
        assert response.status_code == 200, response.get_json()
        return response.get_json()["task"]

    def submitted(self) -> dict:
        """A labeled task, handed in for review."""
        return label_and_submit(self.setup, self.leased(), self.bearer("labeler"))

    def reviewing(self) -> dict:
        """A submitted task, leased by the reviewer."""
        self.submitted()
        return lease(self.setup, self.project, self.bearer("reviewer"), "review")["task"]

    def escalated(self) -> dict:
        """A task rejected in its last round (max_rounds 1): it waits for a manager."""
        task = self.reviewing()
        response = self.setup.post(f"/api/v1/tasks/{task['id']}/review", headers=self.bearer("reviewer"),
                                   json={"decision": "reject", "comment": "redo", "version": task["version"]})
        assert response.get_json()["task"]["state"] == "escalated", response.get_json()
        return response.get_json()["task"]


# --- arranging helpers for the table -------------------------------------------------------------

def _password_step(w: World, client) -> User:
    """The labeler, enrolled in TOTP, has passed the password step on `client`; a fresh code is due."""
    user = w.user("labeler")
    totp.begin_enrolment(w.db, user, w.totp_key, now=w.clock())
    code = totp.current_code(user, w.totp_key, w.clock())
    totp.confirm_enrolment(w.db, user, w.totp_key, code, now=w.clock())
    w.db.commit()
    response = client.post("/login", data={"username": "labeler", "password": PASSWORD,
                                           "csrf_token": csrf_from(client, "/login")})
    assert response.status_code == 302, response.get_data(as_text=True)
    w.clock.advance(seconds=totp.TIME_STEP)  # the enrolment's code is spent (no replay)
    return user


def _totp_page(w: World, client) -> Call:
    """The second-factor form, with the password step done."""
    _password_step(w, client)
    return Call("/login/totp")


def _totp_code(w: World, client) -> Call:
    """The second step's right code."""
    user = _password_step(w, client)
    return Call("/login/totp", data={"code": totp.current_code(user, w.totp_key, w.clock())})


def _break_glass(w: World, _client) -> Call:
    """The admin's password with a one-time code issued at the console."""
    code = break_glass.issue_code(w.db, w.user("admin"), now=w.clock())
    w.db.commit()
    return Call("/login/break-glass", data={"username": "admin", "password": PASSWORD, "code": code})


def _totp_confirm(w: World, _client) -> Call:
    """The code that confirms an enrolment begun a moment ago."""
    user = w.user("labeler")
    totp.begin_enrolment(w.db, user, w.totp_key, now=w.clock())  # what POST action=start does
    w.db.commit()
    return Call("/account/totp", data={"code": totp.current_code(user, w.totp_key, w.clock())})


def _revoke(w: World, _client) -> Call:
    """One of the caller's live tokens."""
    _, row = tokens.create_token(w.db, w.user("labeler"), "old", now=w.clock())
    w.db.commit()
    return Call(f"/api/v1/tokens/{row.id}")


def _admin_action(action: str, data: dict | None = None, disabled: bool = False):
    """An admin action on the target account (disabled first, when the action is to enable it)."""
    def call(w: World, _client) -> Call:
        if disabled:
            accounts.set_active(w.db, w.user("target"), False, now=w.clock())
            w.db.commit()
        return Call(f"/admin/users/{w.ids['target']}/{action}", data=data or {})
    return call


def _on_task(suffix: str, arrange: str, **fields):
    """A JSON call on a task in the state a World method arranges, based on its version."""
    def call(w: World, _client) -> Call:
        task = getattr(w, arrange)()
        return Call(f"/api/v1/tasks/{task['id']}{suffix}", json={**fields, "version": task["version"]})
    return call


def _revisions(w: World, _client) -> Call:
    """The revisions of a task with one saved."""
    return Call(f"/api/v1/tasks/{w.saved()['id']}/revisions")


def _next(kind: str, arrange: str | None = None):
    """Ask for the next task of a kind, after arranging what the queue holds (a World method)."""
    def call(w: World, _client) -> Call:
        if arrange:
            getattr(w, arrange)()
        return Call(f"/api/v1/projects/{w.project}/tasks/next", json={"kind": kind})
    return call


REFERENCE = {"shapes": [BOX], "classifications": {"quality": "good"}}


def _gold_marked(w: World, _client) -> Call:
    """The first item made gold."""
    project = w.db.get(Project, w.project)
    gold.mark_gold(w.db, project, w.items[0], REFERENCE, actor=w.user("manager"), now=w.clock())
    w.db.commit()
    return Call(f"/api/v1/projects/{w.project}/gold/{w.items[0]}")


def _test_ready(w: World, client) -> Call:
    """A project that asks for a one-question test, its gold item ready."""
    _gold_marked(w, client)
    project = w.db.get(Project, w.project)
    project.settings = {**project.settings, "qualification_items": 1}
    w.db.commit()
    return Call(f"/api/v1/projects/{w.project}/qualification", json={})


def _fresh_start(w: World, client) -> Call:
    """A project with a test; the labeler may start afresh."""
    _test_ready(w, client)
    return Call(f"/api/v1/projects/{w.project}/qualification/{w.ids['labeler']}/fresh-start", json={})


def _promotable(w: World, _client) -> Call:
    """Thresholds of one accepted task, and the labeler has one."""
    project = w.db.get(Project, w.project)
    project.settings = {**project.settings, "promote_min_accepted": 1, "promote_first_pass": 0.0,
                        "promote_min_gold": 0, "promote_gold_accuracy": 0.0}
    w.db.commit()
    task = w.reviewing()
    response = w.setup.post(f"/api/v1/tasks/{task['id']}/review", headers=w.bearer("reviewer"),
                            json={"decision": "accept", "version": task["version"]})
    assert response.status_code == 200, response.get_json()
    w.db.execute(delete(RoleProposal))  # the acceptance may have proposed them already
    w.db.commit()
    return Call(f"/api/v1/projects/{w.project}/people/evaluate", json={})


def _proposal(w: World, _client) -> Call:
    """An open proposal to make the labeler a reviewer."""
    row = RoleProposal(project_id=w.project, user_id=w.ids["labeler"], kind="promote", status="open", figures={},
                       reason="test", created_at=w.clock())
    w.db.add(row)
    w.db.commit()
    return Call(f"/api/v1/projects/{w.project}/people/proposals/{row.id}", json={"confirm": True})


def path(template: str):
    """A call without a body: `template` formatted with the world's project, item, task and target."""
    return lambda w, _c: Call(template.format(p=w.project, i=w.items[0], t=w.tasks[0],
                                              u=w.ids["target"]))


def form(template: str, **data):
    """A form post (the CSRF field is added when sent)."""
    return lambda w, _c: Call(template.format(p=w.project, u=w.ids["target"]), data=data)


def body(template: str, **json):
    """A JSON call on a project-, item- or task-level path."""
    return lambda w, _c: Call(template.format(p=w.project, i=w.items[0]), json=json)


NEW_CLASS = {"name": "scar", "color": "#3cb44b", "hotkey": "3", "tools": ["bbox"]}
NEW_SCHEMA = {**SCHEMA, "classes": SCHEMA["classes"] + [NEW_CLASS]}
UPLOAD = lambda w, _c: Call(f"/api/v1/projects/{w.project}/items", upload=True,  # noqa: E731
                            data=multipart([("new.dcm", make_dicom(rows=16, columns=16, seed=77))]))

# (endpoint, method) -> Case, or {variant: Case} where one rule does several things.
AUDIT: dict[tuple[str, str], Case | dict[str, Case]] = {
    ("static", "GET"): Case(ANON, path("/static/style.css"), READ_ONLY),
    ("health.healthz", "GET"): Case(ANON, path("/healthz"), READ_ONLY),
    ("auth.login", "GET"): Case(ANON, path("/login"), READ_ONLY),
    ("auth.login", "POST"): Case(ANON, form("/login", username="labeler", password=PASSWORD),
                                 (A.LOGIN_OK,), 302, actor="labeler"),
    ("auth.login_totp", "GET"): Case(ANON, _totp_page, READ_ONLY),
    ("auth.login_totp", "POST"): Case(ANON, _totp_code, (A.LOGIN_OK,), 302, actor="labeler"),
    ("auth.break_glass_login", "GET"): Case(ANON, path("/login/break-glass"), READ_ONLY),
    ("auth.break_glass_login", "POST"): Case(ANON, _break_glass, (A.BREAK_GLASS_LOGIN,), 302,
                                             actor="admin"),
    ("auth.logout", "POST"): Case("labeler", form("/logout"), (A.LOGOUT,), 302),
    ("auth.change_password", "GET"): Case("labeler", path("/account/password"), READ_ONLY),
    # The change ends every session; the caller's own is renewed as a fresh login.
    ("auth.change_password", "POST"): Case("labeler", form("/account/password", current_password=PASSWORD,
                                                           new_password=NEW_PASSWORD,
                                                           confirm_password=NEW_PASSWORD),
                                           (A.USER_PASSWORD_CHANGE, A.LOGIN_OK), 302),
    ("auth.totp_enrol", "GET"): Case("labeler", path("/account/totp"), READ_ONLY),
    ("auth.totp_enrol", "POST"): {
        "start": Case("labeler", form("/account/totp", action="start"), (A.USER_TOTP_START,)),
        "confirm": Case("labeler", _totp_confirm, (A.USER_TOTP_ENABLE,)),
    },
    ("home.index", "GET"): Case("labeler", path("/"), READ_ONLY, 302),
    ("home.work", "GET"): Case("labeler", path("/work"), READ_ONLY),
    ("home.manager", "GET"): Case("manager", path("/projects"), READ_ONLY),
    # Reading the trail is itself an event (DICOM's "audit log used").
    ("audit.log", "GET"): Case("auditor", path("/audit-log?action=task:"), (A.AUDIT_SEARCH,)),
    ("audit.verify", "GET"): Case("auditor", path("/audit-log/verify"), (A.AUDIT_VERIFY,)),
    ("api.audit_search", "GET"): Case("auditor", path("/api/v1/audit?limit=5"), (A.AUDIT_SEARCH,)),
    ("api.audit_export", "GET"): Case("auditor", path("/api/v1/audit/export?format=csv"), (A.AUDIT_EXPORT,)),
    ("api.audit_verify", "GET"): Case("auditor", path("/api/v1/audit/verify"), (A.AUDIT_VERIFY,)),
    ("home.no_role", "GET"): Case("labeler", path("/welcome"), READ_ONLY),
    ("admin.users", "GET"): Case("admin", path("/admin/users"), READ_ONLY),
    ("admin.create_user", "POST"): Case("admin", form("/admin/users", username="newcomer", roles="labeler"),
                                        (A.USER_CREATE,)),
    ("admin.user_detail", "GET"): Case("admin", path("/admin/users/{u}"), READ_ONLY),
    ("admin.user_action", "POST"): {
        "disable": Case("admin", _admin_action("disable"), (A.USER_DISABLE,), 302),
        "enable": Case("admin", _admin_action("enable", disabled=True), (A.USER_ENABLE,), 302),
        "unlock": Case("admin", _admin_action("unlock"), (A.USER_UNLOCK,), 302),
        "reset-password": Case("admin", _admin_action("reset-password"), (A.USER_PASSWORD_RESET,)),
        "roles": Case("admin", _admin_action("roles", {"roles": "reviewer"}), (A.USER_ROLES,), 302),
        "end-sessions": Case("admin", _admin_action("end-sessions"), (A.USER_SESSIONS_END,), 302),
        "reset-totp": Case("admin", _admin_action("reset-totp"), (A.USER_TOTP_DISABLE,), 302),
    },
    ("api.me", "GET"): Case("labeler", path("/api/v1/me"), READ_ONLY),
    ("api.list_tokens", "GET"): Case("labeler", path("/api/v1/tokens"), READ_ONLY),
    ("api.create_token", "POST"): Case("labeler", body("/api/v1/tokens", name="script"),
                                       (A.TOKEN_CREATE,), 201),
    ("api.revoke_token", "DELETE"): Case("labeler", _revoke, (A.TOKEN_REVOKE,)),
    ("api.list_users", "GET"): Case("admin", path("/api/v1/users"), READ_ONLY),
    ("api.upload_items", "POST"): Case("manager", UPLOAD, (A.ITEM_INGEST,)),
    # Reads that are audited on purpose: item metadata, image data, a task's labels and reviews.
    ("api.list_items", "GET"): Case("manager", path("/api/v1/projects/{p}/items"), (A.ITEM_VIEW,)),
    ("api.get_item", "GET"): Case("labeler", path("/api/v1/items/{i}"), (A.ITEM_VIEW,)),
    ("items.item", "GET"): Case("labeler", path("/items/{i}"), (A.ITEM_VIEW,)),
    ("api.item_image", "GET"): Case("labeler", path("/api/v1/items/{i}/image"), (A.IMAGE_READ,)),
    ("api.item_thumbnail", "GET"): Case("labeler", path("/api/v1/items/{i}/thumbnail"), (A.IMAGE_READ,)),
    # A labeler reads their own tasks only (another's labels on a gold item would be its answer).
    ("api.get_task", "GET"): Case("labeler", lambda w, _c: Call(f"/api/v1/tasks/{w.leased()['id']}"), (A.TASK_VIEW,)),
    ("api.task_revisions", "GET"): Case("labeler", _revisions, (A.TASK_VIEW,)),
    ("api.clear_pixel_check", "POST"): Case("manager", body("/api/v1/items/{i}/pixel-check"),
                                            (A.ITEM_PIXEL_CHECK_CLEAR,)),
    ("api.list_projects", "GET"): Case("labeler", path("/api/v1/projects"), READ_ONLY),
    ("api.create_project_api", "POST"): Case("manager", body("/api/v1/projects", name="Second"),
                                             (A.PROJECT_CREATE,), 201),
    ("api.get_project", "GET"): Case("labeler", path("/api/v1/projects/{p}"), READ_ONLY),
    ("api.update_project", "PATCH"): {
        "description": Case("manager", body("/api/v1/projects/{p}", description="CT"), (A.PROJECT_UPDATE,)),
        "schema": Case("manager", body("/api/v1/projects/{p}", label_schema=NEW_SCHEMA),
                       (A.PROJECT_SCHEMA, A.PROJECT_UPDATE)),
    },
    ("api.list_members", "GET"): Case("manager", path("/api/v1/projects/{p}/members"), READ_ONLY),
    ("api.add_member", "POST"): Case("manager", body("/api/v1/projects/{p}/members", username="target",
                                                     role="labeler"), (A.PROJECT_MEMBER_ADD,), 201),
    ("api.project_dashboard", "GET"): Case("manager", path("/api/v1/projects/{p}/dashboard"), READ_ONLY),
    # The lease answers the task's item metadata too; the lease event covers that read.
    ("api.next_task", "POST"): {
        "label": Case("labeler", _next("label"), (A.TASK_LEASE,)),
        "review": Case("reviewer", _next("review", "submitted"), (A.TASK_LEASE,)),
        "held": Case("labeler", _next("label", "leased"), (A.TASK_VIEW,)),  # the same task again
    },
    ("api.list_tasks", "GET"): Case("manager", path("/api/v1/projects/{p}/tasks"), READ_ONLY),
    ("api.save_annotation", "PUT"): Case("labeler", _on_task("/annotation", "leased", shapes=[BOX]),
                                         (A.ANNOTATION_SAVE,)),
    ("api.heartbeat", "POST"): Case("labeler", _on_task("/heartbeat", "leased"), (A.TASK_HEARTBEAT,)),
    ("api.submit", "POST"): Case("labeler", _on_task("/submit", "saved"), (A.TASK_SUBMIT,)),
    ("api.review", "POST"): {
        "accept": Case("reviewer", _on_task("/review", "reviewing", decision="accept"), (A.TASK_REVIEW,)),
        "reject": Case("reviewer", _on_task("/review", "reviewing", decision="reject", comment="redo"),
                       (A.TASK_REVIEW,)),
    },
    ("api.release", "POST"): Case("labeler", _on_task("/release", "leased"), (A.TASK_RELEASE,)),
    ("api.reassign", "POST"): Case("manager", _on_task("/reassign", "escalated", username="labeler"),
                                   (A.TASK_REASSIGN,)),
    ("api.list_gold", "GET"): Case("manager", path("/api/v1/projects/{p}/gold"), READ_ONLY),
    ("api.mark_gold", "PUT"): Case("manager", body("/api/v1/projects/{p}/gold/{i}", reference=REFERENCE),
                                   (A.GOLD_MARK,)),
    ("api.unmark_gold", "DELETE"): Case("manager", _gold_marked, (A.GOLD_UNMARK,), 204),
    ("api.qualification_status", "GET"): Case("labeler", path("/api/v1/projects/{p}/qualification"), READ_ONLY),
    ("api.start_qualification", "POST"): Case("labeler", _test_ready, (A.QUALIFICATION_START,), 201),
    ("api.project_quality", "GET"): Case("manager", path("/api/v1/projects/{p}/quality"), READ_ONLY),
    ("api.list_proposals", "GET"): Case("manager", path("/api/v1/projects/{p}/people/proposals"), READ_ONLY),
    ("api.evaluate_people", "POST"): Case("manager", _promotable, (A.PEOPLE_PROPOSE,)),
    ("api.decide_proposal", "POST"): Case("manager", _proposal, (A.PEOPLE_DECIDE, A.PROJECT_MEMBER_ADD)),
    ("api.recommended_people", "GET"): Case("manager", path("/api/v1/projects/{p}/people/recommended"), READ_ONLY),
    ("api.qualification_fresh_start", "POST"): Case("manager", _fresh_start, (A.QUALIFICATION_FRESH_START,)),
    ("api.pay_statements", "GET"): Case("manager", path("/api/v1/projects/{p}/pay/statements"), (A.PAY_STATEMENT,)),
    ("projects.create", "POST"): Case("manager", form("/projects", name="Second"), (A.PROJECT_CREATE,), 303),
    ("projects.admin", "GET"): Case("manager", path("/projects/{p}/admin"), READ_ONLY),
    ("projects.quality", "GET"): Case("manager", path("/projects/{p}/quality"), READ_ONLY),
    ("api.export_project", "GET"): Case("manager", path("/api/v1/projects/{p}/export?format=jsonl"), (A.EXPORT_PROJECT,)),
    ("api.import_predictions", "POST"): Case("manager", body("/api/v1/projects/{p}/imports?format=coco&name=m",
                                                             images=[], annotations=[], categories=[]),
                                             (A.IMPORT_PREDICTIONS,)),
    ("api.import_report", "GET"): Case("manager", path("/api/v1/projects/{p}/imports"), READ_ONLY),
    ("work.label", "GET"): Case("labeler", path("/projects/{p}/label"), READ_ONLY),
    ("work.review", "GET"): Case("reviewer", path("/projects/{p}/review"), READ_ONLY),
}

# One refused authorisation check per role-protected blueprint: the global role (web/login.py)
# or the project role (workflow/members.py, answered in web/errors.py).
DENIED = {
    "admin": ("GET", Case("labeler", path("/admin/users"), (A.ACCESS_DENIED,), 403)),
    "home": ("GET", Case("labeler", path("/audit-log"), (A.ACCESS_DENIED,), 403)),
    "items": ("GET", Case("auditor", path("/items/{i}"), (A.ACCESS_DENIED,), 403)),
    "projects": ("GET", Case("labeler", path("/projects/{p}/admin"), (A.ACCESS_DENIED,), 403)),
    "work": ("GET", Case("manager", path("/projects/{p}/label"), (A.ACCESS_DENIED,), 403)),
    "api": ("GET", Case("labeler", path("/api/v1/users"), (A.ACCESS_DENIED,), 403)),
    "api-project-role": ("POST", Case("manager", _on_task("/review", "leased", decision="accept"),
                                      (A.ACCESS_DENIED,), 403)),
}


def cases() -> list:
    """Every table row (and variant) as its own test id."""
    return [pytest.param(method, case, id="-".join(filter(None, (endpoint, method, name))))
            for (endpoint, method), entry in sorted(AUDIT.items())
            for name, case in (entry.items() if isinstance(entry, dict) else [("", entry)])]


def routes(app) -> set[tuple[str, str]]:
    """Every (endpoint, method) of the url_map, less the methods Flask answers by itself."""
    return {(rule.endpoint, method) for rule in app.url_map.iter_rules()
            for method in rule.methods - AUTOMATIC}


@pytest.fixture
def world(app, db, make_user, clock) -> World:
    """The rows every case may need."""
    return World(app, db, make_user, clock)


def send(client, method: str, call: Call, csrf: str):
    """Send `call` from ADDR with the CSRF token (header, and form field for a form)."""
    options = {"method": method, "headers": {"X-CSRF-Token": csrf}, "environ_base": {"REMOTE_ADDR": ADDR}}
    if call.upload:
        return client.open(call.path, data=call.data, content_type="multipart/form-data", **options)
    if call.json is not None:
        return client.open(call.path, json=call.json, **options)
    if method == "GET":
        return client.open(call.path, **options)
    return client.open(call.path, data={**(call.data or {}), "csrf_token": csrf}, **options)


def last_event_id(app) -> int:
    """The newest audit event's id (0 for none)."""
    with app.extensions["onprem_label"].sessionmaker() as session:
        return session.scalar(select(func.max(AuditEvent.id))) or 0


def events_after(app, event_id: int) -> list[AuditEvent]:
    """The audit events newer than `event_id`, oldest first."""
    with app.extensions["onprem_label"].sessionmaker() as session:
        query = select(AuditEvent).where(AuditEvent.id > event_id).order_by(AuditEvent.id)
        return list(session.scalars(query))


def check(world: World, method: str, case: Case) -> None:
    """Arrange, then call: exactly the expected events are new, each of the caller and this request."""
    client, csrf = caller(world.app, case.who, world.ids)
    call = case.call(world, client)
    before = last_event_id(world.app)
    response = send(client, method, call, csrf)
    answer = response.get_data()
    response.close()
    assert response.status_code == case.status, answer[:300]
    request_id = response.headers["X-Request-Id"]
    new = events_after(world.app, before)
    expected = Counter() if case.events == READ_ONLY else Counter(map(str, case.events))
    assert Counter(e.action for e in new) == expected
    for event in new:  # (anonymous calls that leave events name their account in case.actor)
        assert (event.action, event.actor_id, event.request_id, event.client_addr) == (
            event.action, world.ids[case.actor or case.who], request_id, ADDR)
        if event.action in (A.IMAGE_READ, A.ITEM_PIXEL_CHECK_CLEAR) or (
                event.action == A.ITEM_VIEW and event.object_type == "item"):
            # A read of one item's data names its (de-identified) study, for "who saw this study".
            assert event.study_uid.startswith("2.25."), (event.action, event.study_uid)


# --- the table matches the url_map -----------------------------------------------------------------

def test_every_route_is_in_the_table(app):
    """Each (endpoint, method) of the url_map has a row saying what one call leaves in the audit trail."""
    missing = sorted(routes(app) - AUDIT.keys())
    assert missing == [], f"add these (endpoint, method) to AUDIT with the events they must write: {missing}"


def test_the_table_names_only_existing_routes(app):
    """No AUDIT row is left over from a route that no longer exists."""
    stale = sorted(AUDIT.keys() - routes(app))
    assert stale == [], f"these AUDIT rows match no route; remove them: {stale}"


# --- what each call leaves ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,case", cases())
def test_one_call_leaves_exactly_its_audit_events(world, method, case):
    """A successful call adds exactly its events (none when read-only), with actor, request id and address."""
    check(world, method, case)


@pytest.mark.parametrize("method,case", [pytest.param(m, c, id=name) for name, (m, c) in DENIED.items()])
def test_a_refused_role_check_leaves_access_denied(world, method, case):
    """A caller without the needed global or project role gets 403 and one auth:access_denied of theirs."""
    check(world, method, case)
