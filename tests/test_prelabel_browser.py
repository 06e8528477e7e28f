"""Pre-label drafts in real Chromium: the labeler opens on a model's shapes, hands in, the quality page counts them."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from browser_helpers import BrowserSession, make_people, start_server
from imaging_helpers import make_dicom
from onprem_label.app import create_app
from onprem_label.db.models import Annotation, Task
from onprem_label.exchange.predictions import read
from onprem_label.imaging.ingest import IngestTarget, ingest_stream
from onprem_label.workflow import prelabels
from onprem_label.workflow.members import add_member
from onprem_label.workflow.projects import create_project
from test_workspace_browser import SCHEMA, answer_quality, wait_shown

pytestmark = pytest.mark.slow


@pytest.fixture
def draft_site(settings, keyring):
    """A served project whose one item has two imported boxes waiting for its labeler."""
    app = create_app(settings, keyring=keyring)
    svc = app.extensions["onprem_label"]
    now = datetime.now(timezone.utc)
    with svc.sessionmaker() as db:
        make_people(db, ("lena", "labeler"), ("max", "manager"))
        project = create_project(db, "Drafts", label_schema=SCHEMA, now=now, actor_name="test",
                                 settings={"hidden_gold_rate": 0.0, "spot_check_rate": 0.0})
        add_member(db, project, "lena", "labeler", actor=None, now=now)
        add_member(db, project, "max", "manager", actor=None, now=now)
        db.commit()
        item = ingest_stream(db, svc.store, IngestTarget(project.id, "cli", actor_name="test"), svc.ingest_options,
                             io.BytesIO(make_dicom(rows=200, columns=256, seed=31)), "0.dcm", now=now).item_id
        coco = {"images": [{"id": 1, "file_name": f"item-{item}-frame-0000.png"}],
                "categories": [{"id": 1, "name": "nodule"}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 30, 60, 60]},
                                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [120, 40, 30, 30]}]}
        predictions, skipped = read(io.BytesIO(json.dumps(coco).encode()), "coco", SCHEMA)
        summary = prelabels.attach(db, project, predictions, name="detector", skipped=skipped, actor_name="test",
                                   now=now)
        assert summary.tasks == 1 and summary.shapes == 2
        project_id = project.id
    server = start_server(app)
    yield {"app": app, "project_id": project_id, "item": item, "server": server}
    server.stop()
    svc.engine.dispose()


def test_labeler_opens_on_the_drafts_and_the_quality_page_counts_what_was_kept(draft_site, browser):
    """The workspace shows the model's two boxes and says whose they are; handed in unchanged they count
    as 2 of 2 kept on the managers' quality page; the hand-in is a revision of the labeler's own."""
    session = BrowserSession(browser, draft_site["server"])
    session.login("lena")
    page = session.page
    page.goto(f"/projects/{draft_site['project_id']}/label")
    wait_shown(page, "")
    assert "Drafts from import:detector" in page.locator("#save-state").inner_text()
    assert page.locator("#shape-list li").count() == 2
    answer_quality(page)
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('workspace').dataset.taskId === ''")
    session.close()

    manager = BrowserSession(browser, draft_site["server"])
    manager.login("max")
    page = manager.page
    page.goto(f"/projects/{draft_site['project_id']}/quality")
    page.wait_for_selector("#project-quality[data-loaded=true]")
    row = page.locator("#q-imports tr[data-source='import:detector']")
    assert row.count() == 1 and "100.0% (n = 2" in row.inner_text()
    manager.close()
    with draft_site["app"].extensions["onprem_label"].sessionmaker() as db:
        task = db.scalars(select(Task).where(Task.item_id == draft_site["item"])).one()
        kinds = [(a.kind, a.author_id is None) for a in db.scalars(
            select(Annotation).where(Annotation.task_id == task.id).order_by(Annotation.revision))]
    assert task.state == "submitted" and kinds == [("import", True), ("label", False)]
