"""Quality and people in real Chromium: the qualification test in the workspace, the managers' quality page."""

from __future__ import annotations

import io
import random
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from browser_helpers import BrowserSession, make_people, start_server
from imaging_helpers import make_dicom
from onprem_label.app import create_app
from onprem_label.db.models import ProjectMember, Task
from onprem_label.imaging.ingest import IngestTarget, ingest_stream
from onprem_label.workflow import gold
from onprem_label.workflow.members import add_member
from onprem_label.workflow.projects import create_project
from quality_helpers import add_items, answer_for, label_next, review_next, truth_for
from quality_helpers import SCHEMA as BARE_SCHEMA
from test_workspace_browser import SCHEMA, SCREENSHOTS, answer_quality, drag, set_zoom, wait_shown

pytestmark = pytest.mark.slow
REFERENCE = {"shapes": [{"type": "bbox", "label": "nodule", "frame": 0, "x": 20, "y": 30, "width": 60, "height": 60}],
             "classifications": {"quality": "good"}}


def assert_own_origin(session: BrowserSession, origin: str) -> None:
    """Every request went to the server itself, every page under the CSP, and no script failed."""
    assert session.requests and all(url.startswith(origin + "/") for url in session.requests)
    assert all("default-src 'self'" in headers.get("content-security-policy", "") for _, headers in session.documents)
    assert [e for e in session.console_errors if "status of 403" not in e] == []


@pytest.fixture
def test_site(settings, keyring):
    """A served project that asks for a one-question test (its gold item ready) and has one live item."""
    app = create_app(settings, keyring=keyring)
    svc = app.extensions["onprem_label"]
    now = datetime.now(timezone.utc)
    with svc.sessionmaker() as db:
        people = make_people(db, ("lena", "labeler"), ("max", "manager"))
        project = create_project(db, "Test first", label_schema=SCHEMA, now=now, actor_name="test",
                                 settings={"qualification_items": 1, "qualification_pass": 1.0})
        add_member(db, project, "lena", "labeler", actor=None, now=now)
        db.commit()
        items = []
        for n in range(2):
            result = ingest_stream(db, svc.store, IngestTarget(project.id, "cli", actor_name="test"), svc.ingest_options,
                                   io.BytesIO(make_dicom(rows=200, columns=256, seed=90 + n)), f"{n}.dcm", now=now)
            items.append(result.item_id)
        gold.mark_gold(db, project, items[0], REFERENCE, use="qualification", actor=people["max"], now=now)
        db.commit()
        project_id = project.id
    server = start_server(app)
    yield {"app": app, "url": server.url, "project_id": project_id, "items": items, "server": server}
    server.stop()
    svc.engine.dispose()


def test_qualification_test_in_the_workspace_teaches_then_opens_live_work(test_site, browser):
    """The workspace says a test comes first and starts it; the answer is shown against the reference with
    its score; after passing, the next task is live work."""
    session = BrowserSession(browser, test_site["server"])
    session.login("lena")
    page = session.page
    page.goto(f"/projects/{test_site['project_id']}/label")
    page.wait_for_selector("#workspace[data-qualification=can-start]")
    assert "qualification test" in page.locator("#empty-text").inner_text()
    page.click("#banner-actions button:has-text('Start the test')")
    page.wait_for_selector("#canvas[data-painted-frame]")
    first = wait_shown(page, "")
    assert page.locator("#task-kind").inner_text() == "Qualification test question"
    set_zoom(page, 1)
    drag(page, (21, 31), (79, 89))
    answer_quality(page)
    page.click("#submit")
    page.wait_for_selector("#workspace[data-feedback=right]")
    text = page.locator("#banner-text").inner_text()
    assert text.startswith("Right: score 100%") and "Test passed" in text
    assert page.locator("#compare-section").is_visible()
    assert page.locator("#legend-previous-text").inner_text() == "the reference answer"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "qualification-feedback.png"))
    page.click("#banner-actions button:has-text('Continue')")
    second = wait_shown(page, first)
    assert page.locator("#task-kind").inner_text() == "New task"
    with test_site["app"].extensions["onprem_label"].sessionmaker() as db:
        assert db.get(Task, int(second)).item_id == test_site["items"][1]
    assert_own_origin(session, test_site["url"])
    session.close()


@pytest.fixture
def quality_site(settings, keyring):
    """A served project of 60 bare items labeled and reviewed through the core, with hidden gold and pay."""
    app = create_app(settings, keyring=keyring)
    svc = app.extensions["onprem_label"]
    clock = lambda: datetime.now(timezone.utc)  # noqa: E731
    clock.advance = lambda **kw: None
    rng = random.Random(7)
    with svc.sessionmaker() as db:
        people = make_people(db, ("max", "manager"), ("lena", "labeler"), ("lars", "labeler"), ("rita", "reviewer"),
                             ("rolf", "reviewer"))
        project = create_project(db, "Quality", label_schema=BARE_SCHEMA, now=clock(), actor_name="test",
                                 settings={"hidden_gold_rate": 0.2, "pay_currency": "EUR", "pay_label_rate": "0.50",
                                           "pay_review_rate": "0.20", "promote_min_accepted": 5,
                                           "promote_min_gold": 1, "spot_check_rate": 0.2})
        for name, role in (("lena", "labeler"), ("lars", "labeler"), ("rita", "reviewer"), ("rolf", "reviewer")):
            add_member(db, project, name, role, actor=None, now=clock())
        db.commit()
        work, golds = add_items(db, project, 60, clock), add_items(db, project, 8, clock)
        truths = {i: truth_for(rng) for i in work + golds}
        for item in golds:
            gold.mark_gold(db, project, item, truths[item], use="hidden", actor=people["max"], now=clock())
        db.commit()
        rates = {"lena": 0.0, "lars": 0.3}
        while any([label_next(db, project, people[n], lambda t, n=n: answer_for(truths[t.item_id], rates[n], rng),
                              clock, rng=rng) is not None for n in rates]):
            for reviewer in ("rita", "rolf"):
                while review_next(db, project, people[reviewer], lambda t, latest: ("accept", ""), clock, rng):
                    pass
        project_id = project.id
    server = start_server(app)
    yield {"app": app, "url": server.url, "project_id": project_id, "people": people, "server": server}
    server.stop()
    svc.engine.dispose()


def test_quality_page_shows_accuracy_beside_target_and_confirms_a_reviewer(quality_site, browser):
    """The page shows the estimate with its interval beside the 99% target, labelers and reviewers, the
    pay statement; a manager confirms a proposal there and the labeler becomes a reviewer."""
    session = BrowserSession(browser, quality_site["server"])
    session.login("max")
    page = session.page
    page.goto(f"/projects/{quality_site['project_id']}/quality")
    page.wait_for_selector("#project-quality[data-loaded=true]")
    estimate = page.locator("#q-project tr[data-figure=estimate] td").inner_text()
    assert "n = " in estimate and "95% CI" in estimate
    assert page.locator("#q-project tr[data-figure=target] td").inner_text().startswith("99.0%")
    assert page.locator("#q-labelers tr[data-user=lena]").count() == 1
    assert "95% CI" in page.locator("#q-reviewers tr[data-user=rita]").inner_text()
    assert "EUR" in page.locator("#q-pay tr[data-user=lena]").inner_text()
    assert "format=csv" in page.get_attribute("#pay-csv", "href")
    page.click("#evaluate")
    page.wait_for_selector("#q-proposals tr[data-status=open]")
    page.locator("#q-proposals tr[data-status=open] button:has-text('Confirm')").first.click()
    page.wait_for_selector("#proposals-status[data-kind=ok]")
    page.wait_for_selector("#q-proposals tr[data-status=confirmed]")
    assert page.locator("#q-proposals tr[data-status=confirmed] td").first.inner_text() == "lena"
    with quality_site["app"].extensions["onprem_label"].sessionmaker() as db:
        reviewers = set(db.scalars(select(ProjectMember.user_id).where(ProjectMember.role == "reviewer")))
    assert quality_site["people"]["lena"].id in reviewers  # the careful labeler, proposed and confirmed
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(SCREENSHOTS / "quality-page.png"), full_page=True)
    assert_own_origin(session, quality_site["url"])
    session.close()
