"""The project admin pages in real Chromium: create a project, its schema, members, upload, dashboard."""

from __future__ import annotations

import io
import re
from pathlib import Path
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from browser_helpers import BrowserSession, make_people, start_server
from imaging_helpers import PATIENT, PATIENT_ID, make_dicom
from workflow_helpers import SCHEMA, label_and_submit, lease
from onprem_label.app import create_app
from onprem_label.auth import tokens
from onprem_label.db.models import Project, ProjectMember, User
from onprem_label.imaging.ingest import IngestTarget, ingest_stream
from onprem_label.workflow.members import add_member
from onprem_label.workflow.projects import create_project

pytestmark = pytest.mark.slow

# Chromium logs every 4xx answer to the console; these are the refusals the tests provoke on purpose.
EXPECTED_REFUSAL = re.compile(r"^Failed to load resource: the server responded with a status of (413|422)\b")
HOSTILE = '<img src=x onerror="window.__pwned = 1">'


@pytest.fixture
def site(settings, keyring):
    """The app served on loopback with a manager and a labeler (the real clock runs)."""
    app = create_app(settings, keyring=keyring)
    svc = app.extensions["onprem_label"]
    with svc.sessionmaker() as db:
        make_people(db, ("max", "manager"), ("lena", "labeler"))
    server = start_server(app)
    yield {"app": app, "url": server.url, "server": server}
    server.stop()
    svc.engine.dispose()


def project_row(app, project_id: int) -> Project:
    """The project as the database has it now."""
    with app.extensions["onprem_label"].sessionmaker() as db:
        return db.get(Project, project_id)


def class_input(page, row: int, what: str):
    """An input of the schema editor's class row `row` (name, color, hotkey)."""
    return page.locator(f'#class-rows [data-class-row="{row}"] input[id$="-{what}"]')


def error_text(page, field: str) -> str:
    """The text in the error slot of `field`, once it has one."""
    slot = page.locator(f'[data-error-for="{field}"]')
    slot.locator(".error-line").first.wait_for()
    return slot.inner_text()


def assert_clean(session: BrowserSession, origin: str, refusals: int) -> None:
    """Only our own origin was asked, under the CSP, and the console shows just the provoked 422 answers."""
    assert session.requests and all(url.startswith(origin + "/") for url in session.requests), \
        [u for u in session.requests if not u.startswith(origin + "/")]
    assert session.documents and all("default-src 'self'" in headers.get("content-security-policy", "")
                                      for _, headers in session.documents)
    unexpected = [e for e in session.console_errors if not EXPECTED_REFUSAL.match(e)]
    assert unexpected == []
    assert len(session.console_errors) == refusals, session.console_errors


def wait_preview_key(page, key: str) -> None:
    """Wait until the preview's first class button shows `key` as its hotkey."""
    page.wait_for_function("k => document.querySelector('#preview-classes button .key')?.textContent === k",
                           arg=key)


def read_counts(page) -> dict[str, str]:
    """The dashboard's tasks per state, as shown."""
    script = "rows => rows.map(r => [r.dataset.state, r.querySelector('td.num').textContent])"
    return dict(page.eval_on_selector_all("#dash-counts tbody tr", script))


def assert_named_controls(page) -> None:
    """Every button on the page, drawn by script or not, has a name; every field has a label."""
    nameless = page.evaluate("""() => [...document.querySelectorAll('button')]
        .filter(b => !(b.textContent.trim() || b.getAttribute('aria-label'))).map(b => b.outerHTML)""")
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
        .filter(i => !(i.labels.length || i.getAttribute('aria-label'))).map(i => i.outerHTML)""")
    assert nameless == [] and unlabelled == []


def create_through_the_form(page, name: str) -> int:
    """Fill the create form on the projects page; the new project's id, once its admin page has loaded."""
    page.fill("#project-name", name)
    page.fill("#project-description", "Nodules and devices")
    page.click("button:has-text('Create project')")
    page.wait_for_url(re.compile(r"/projects/\d+/admin$"))
    page.wait_for_selector("#project-admin[data-loaded]")
    return int(page.eval_on_selector("#project-admin", "r => r.dataset.projectId"))


def edit_schema(page, app, project_id: int) -> None:
    """A reserved hotkey is refused beside its field; a good schema is saved and the preview follows live."""
    class_input(page, 0, "name").fill("nodule")
    class_input(page, 0, "hotkey").fill("a")
    wait_preview_key(page, "A")
    assert page.locator("#preview-classes button").inner_text().startswith("nodule")
    page.click("#save-schema")
    assert "reserved by the workspace (accept (review))" in error_text(page, "classes[0].hotkey")
    assert class_input(page, 0, "hotkey").get_attribute("aria-invalid") == "true"
    assert page.evaluate("() => document.activeElement.id").endswith("-hotkey")  # focus went to the field
    assert page.eval_on_selector("#schema-status", "s => s.dataset.kind") == "error"
    assert project_row(app, project_id).label_schema == {}

    class_input(page, 0, "hotkey").fill("1")
    wait_preview_key(page, "1")
    page.click("#add-class")
    class_input(page, 1, "name").fill("device")
    class_input(page, 1, "color").fill("#4363d8")
    page.uncheck('#class-rows [data-class-row="1"] input[value="polygon"]')
    page.check('#class-rows [data-class-row="1"] input[value="point"]')
    page.click("#add-class")  # one too many: removed again, and the preview follows
    assert page.locator("#preview-classes button").count() == 3
    page.click("button[aria-label='Remove class 3']")
    assert page.locator("#preview-classes button").count() == 2
    assert page.evaluate("() => document.activeElement.id") == "add-class"
    page.click("#add-question")
    page.fill('#question-rows [data-question-row="0"] input[id$="-name"]', "quality")
    page.fill('#question-rows [data-question-row="0"] textarea', "good\npoor\n")
    page.check('#question-rows [data-question-row="0"] input[type=checkbox]')
    legend = page.locator("#preview-questions legend")
    assert legend.inner_text() == "quality" and legend.get_attribute("class") == "required"
    assert page.locator("#preview-questions input[type=radio]").count() == 2
    swatch = page.eval_on_selector_all("#preview-classes .swatch",
                                       "s => s.map(e => getComputedStyle(e).backgroundColor)")
    assert swatch[1] == "rgb(67, 99, 216)"

    page.click("#save-schema")
    page.wait_for_selector("#schema-status[data-kind=ok]")
    assert page.locator("#schema-version").inner_text() == "2"
    assert_named_controls(page)
    row = project_row(app, project_id)
    assert row.schema_version == 2
    assert row.label_schema == {
        "classes": [{"name": "nodule", "color": "#e6194b", "hotkey": "1", "tools": ["bbox", "polygon"]},
                    {"name": "device", "color": "#4363d8", "hotkey": "2", "tools": ["bbox", "point"]}],
        "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"], "required": True}]}


def add_members(page, app, project_id: int) -> None:
    """An unknown username is refused beside the field; a real one appears in the members table."""
    page.fill("#member-username", "nobody")
    page.click("#add-member")
    assert "no such active user" in error_text(page, "username")
    page.fill("#member-username", "lena")
    page.select_option("#member-role", "labeler")
    page.click("#add-member")
    page.wait_for_selector("#member-rows tr[data-username=lena][data-role=labeler]")
    assert page.locator("[data-error-for=username] .error-line").count() == 0
    with app.extensions["onprem_label"].sessionmaker() as db:
        roles = db.scalars(select(ProjectMember.role).where(ProjectMember.project_id == project_id)).all()
    assert roles == ["labeler"]


def upload(page) -> None:
    """Two files: the bar reaches 100% and the table has one imported and one rejected row."""
    page.evaluate("""() => {  // every value the bar shows, in order
        const bar = document.getElementById('upload-progress');
        window.progressSeen = [];
        new MutationObserver(() => window.progressSeen.push(bar.value))
          .observe(bar, { attributes: true, attributeFilter: ['value'] });
    }""")
    page.set_input_files("#upload-files", files=[
        {"name": "chest.dcm", "mimeType": "application/dicom", "buffer": make_dicom(rows=64, columns=64)},
        {"name": "notes.dcm", "mimeType": "application/dicom", "buffer": b"this is not an image" * 50}])
    page.click("#upload-start")
    page.wait_for_selector("#project-admin[data-upload-state=done]", timeout=60000)
    assert page.eval_on_selector("#upload-progress", "p => p.value") == 100
    assert page.locator("#upload-percent").inner_text() == "100%"
    seen = page.evaluate("() => window.progressSeen")
    assert seen and seen[-1] == 100 and seen == sorted(seen)
    rows = page.locator("#upload-results tbody tr")
    assert rows.count() == 2
    by_name = {rows.nth(i).locator("td").first.inner_text(): rows.nth(i) for i in range(2)}
    assert by_name["chest.dcm"].get_attribute("data-status") == "imported"
    assert re.fullmatch(r"/items/\d+", by_name["chest.dcm"].locator("a").get_attribute("href"))
    assert by_name["notes.dcm"].get_attribute("data-status") == "rejected"
    assert by_name["notes.dcm"].locator("td").nth(3).inner_text()  # the code says why
    assert "1 imported, 0 already in the project, 1 rejected" in page.locator("#upload-status").inner_text()


def dashboard_counts(page) -> dict[str, str]:
    """Open the dashboard, refresh it, and read its tasks per state."""
    page.click(".section-nav a[href='#dashboard']")
    loads = int(page.eval_on_selector("#project-admin", "r => r.dataset.dashboardLoads || '0'"))
    page.click("#dashboard-refresh")
    page.wait_for_function("n => Number(document.getElementById('project-admin').dataset.dashboardLoads) > n",
                           arg=loads)
    assert page.locator("#dashboard-heading").is_visible()
    return read_counts(page)


def change_settings(page, app, project_id: int) -> None:
    """An out-of-range review rate is refused beside its field; good values are saved, a low rate flagged."""
    page.fill("#setting-review_rate", "0")
    page.click("#save-settings")
    assert "must be from 0.01 to 1.0" in error_text(page, "settings.review_rate")
    page.fill("#setting-review_rate", "0.5")
    page.fill("#setting-lease_minutes", "45")
    page.click("#save-settings")
    page.wait_for_selector("#settings-status[data-kind=ok]")
    assert page.locator("#review-rate-warning").is_visible()
    settings = project_row(app, project_id).settings
    assert settings["review_rate"] == 0.5 and settings["lease_minutes"] == 45 and settings["max_rounds"] == 3


def test_manager_sets_up_a_project_in_the_browser(site, browser, tmp_path):
    """Create; schema (error by field, saved, live preview); member; upload with progress; dashboard."""
    app = site["app"]
    session = BrowserSession(browser, site["server"])
    session.login("max")
    page = session.page
    assert page.url.endswith("/projects")
    project_id = create_through_the_form(page, "Chest CT")
    assert "Project created" in page.locator(".flash").inner_text()
    edit_schema(page, app, project_id)
    add_members(page, app, project_id)
    upload(page)
    counts = dashboard_counts(page)
    assert counts == {"new": "1", "labeling": "0", "submitted": "0", "reviewing": "0", "rework": "0",
                      "escalated": "0", "accepted": "0"}
    assert page.eval_on_selector("#dash-counts tr[data-state=new] .bar-fill", "b => b.style.width") == "100%"
    assert page.locator("#schema-started").is_hidden()  # no work yet under the schema
    change_settings(page, app, project_id)
    shown = page.content() + page.title() + " ".join(session.requests)
    assert PATIENT.split("^")[0] not in shown and PATIENT_ID not in shown  # the DICOM's patient, nowhere
    # Usable at 1366 x 768: nothing sticks out sideways.
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(tmp_path / "project-admin.png"), full_page=True)

    page.goto("/projects")
    row = page.locator(f"tr[data-project-id='{project_id}']")
    assert row.locator("[data-count=items]").inner_text() == "1"
    assert row.locator("a").get_attribute("href") == f"/projects/{project_id}/admin"
    assert_clean(session, site["url"], refusals=3)  # schema, member, settings
    session.close()


def test_markup_in_names_stays_text_in_the_browser(site, browser):
    """A class named like markup and a member's display name with markup show as text; no script runs."""
    app = site["app"]
    svc = app.extensions["onprem_label"]
    now = datetime.now(timezone.utc)
    with svc.sessionmaker() as db:
        schema = {"classes": [{"name": HOSTILE, "color": "#e6194b", "hotkey": "1", "tools": ["bbox"]}],
                  "questions": [{"name": "q<b>x</b>", "type": "multiple", "options": ["<i>a</i>", "b"]}]}
        project = create_project(db, "Hostile <script>", label_schema=schema, actor_name="test", now=now)
        db.scalar(select(User).where(User.username == "lena")).display_name = HOSTILE
        db.commit()
        project_id = project.id
    session = BrowserSession(browser, site["server"])
    session.login("max")
    page = session.page
    page.goto(f"/projects/{project_id}/admin")
    page.wait_for_selector("#project-admin[data-loaded]")
    page.fill("#member-username", "lena")
    page.click("#add-member")
    page.wait_for_selector("#member-rows tr[data-username=lena]")
    assert page.locator("#member-rows tr[data-username=lena] td").nth(1).inner_text() == HOSTILE
    assert class_input(page, 0, "name").input_value() == HOSTILE
    assert page.locator("#preview-classes button").inner_text().startswith(HOSTILE)
    assert page.locator("#preview-questions legend").inner_text() == "q<b>x</b>"
    assert page.locator("#preview-questions input[type=checkbox]").count() == 2
    assert page.locator("#project-admin img, #project-admin b, #project-admin i").count() == 0
    assert page.title().startswith("Admin · Hostile <script>")
    assert page.evaluate("() => window.__pwned") is None
    assert_clean(session, site["url"], refusals=0)
    session.close()


def worked_project(app) -> int:
    """A project where lena labeled two items; rita rejected one (comment in markup) and accepted one."""
    svc, now = app.extensions["onprem_label"], datetime.now(timezone.utc)
    with svc.sessionmaker() as db:
        make_people(db, ("rita", "reviewer"))
        project = create_project(db, "Worked", label_schema=SCHEMA, actor_name="test", now=now)
        headers = {}
        for name, role in (("lena", "labeler"), ("rita", "reviewer")):
            add_member(db, project, name, role, actor=None, now=now)
            user = db.scalar(select(User).where(User.username == name))
            secret, _ = tokens.create_token(db, user, "t", now=now)
            headers[name] = {"Authorization": f"Bearer {secret}"}
        db.commit()
        for n in range(2):
            picture = io.BytesIO(make_dicom(rows=16, columns=16, seed=500 + n))
            target = IngestTarget(project.id, "cli", actor_name="test")
            ingest_stream(db, svc.store, target, svc.ingest_options, picture, f"{n}.dcm", now=now)
        project_id = project.id
    client = app.test_client()  # the served app's own clock: the real one, as the dashboard's
    for _ in range(2):
        label_and_submit(client, lease(client, project_id, headers["lena"])["task"], headers["lena"])
    for decision in ("reject", "accept"):
        task = lease(client, project_id, headers["rita"], "review")["task"]
        answer = client.post(f"/api/v1/tasks/{task['id']}/review", headers=headers["rita"],
                             json={"decision": decision, "comment": "<b>Move</b> the box",
                                   "version": task["version"]})
        assert answer.status_code == 200, answer.get_json()
    return project_id


def test_dashboard_shows_quality_load_and_comments_in_the_browser(site, browser):
    """Counts, first-pass acceptance and its bar, reviewer load, throughput, a rejection comment as text."""
    project_id = worked_project(site["app"])
    session = BrowserSession(browser, site["server"])
    session.login("max")
    page = session.page
    page.goto(f"/projects/{project_id}/admin#dashboard")
    page.wait_for_selector("#project-admin[data-loaded]")
    counts = read_counts(page)
    assert counts["rework"] == "1" and counts["accepted"] == "1" and counts["new"] == "0"
    lena = page.locator("#dash-labelers tr[data-user=lena] td")
    assert [lena.nth(i).inner_text() for i in (0, 1, 2, 4)] == ["1", "2", "50%", "0.5"]
    assert lena.nth(3).locator(".bar-fill").evaluate("b => b.style.width") == "50%"
    rita = page.locator("#dash-reviewers tr[data-user=rita] td")
    assert rita.nth(0).inner_text() == "2" and rita.nth(2).inner_text() == "0"
    throughput = page.locator("#dash-throughput").inner_text()
    assert re.search(r"Accepted in the last hour\s+1", throughput)
    comment = page.locator("#dash-rejections li blockquote")
    assert comment.inner_text() == "<b>Move</b> the box" and comment.locator("b").count() == 0
    assert "rita to lena" in page.locator("#dash-rejections li").inner_text()
    assert page.locator("#schema-started").is_visible()  # work exists under this schema
    shots = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "project-admin.png"), full_page=True)
    assert_clean(session, site["url"], refusals=0)
    session.close()


@pytest.mark.parametrize("overrides", [{"upload_max_file_bytes": 1024}])
def test_refused_uploads_are_said_clearly_in_the_browser(site, browser):
    """A too-large file (413) and a batch with nothing importable (422) each say what happened."""
    svc, now = site["app"].extensions["onprem_label"], datetime.now(timezone.utc)
    with svc.sessionmaker() as db:
        project_id = create_project(db, "Small files", actor_name="test", now=now).id
        db.commit()
    session = BrowserSession(browser, site["server"])
    session.login("max")
    page = session.page
    page.goto(f"/projects/{project_id}/admin#upload")
    page.wait_for_selector("#project-admin[data-loaded]")
    assert "up to 1 KiB each" in page.locator("#upload").inner_text()
    page.set_input_files("#upload-files", files=[{"name": "big.png", "mimeType": "image/png", "buffer": b"x" * 4096}])
    page.click("#upload-start")
    page.wait_for_selector("#project-admin[data-upload-state=error]")
    status = page.locator("#upload-status")
    assert status.inner_text().startswith("Too large: a file is larger than the limit of 1024 bytes")
    assert "nothing was imported" in status.inner_text().lower()
    assert page.locator("#upload-results-wrap").is_hidden()
    assert page.locator("#upload-start").is_enabled()  # ready for the next try

    page.evaluate("() => { delete document.getElementById('project-admin').dataset.uploadState; }")
    page.set_input_files("#upload-files", files=[{"name": "a.txt", "mimeType": "text/plain", "buffer": b"junk"}])
    page.click("#upload-start")
    page.wait_for_selector("#project-admin[data-upload-state=error]")
    assert status.inner_text() == ("No file could be imported; see results. "
                                   "1 file: 0 imported, 0 already in the project, 1 rejected.")
    assert page.locator("#upload-results tbody tr[data-status=rejected]").count() == 1
    assert_clean(session, site["url"], refusals=2)
    session.close()
