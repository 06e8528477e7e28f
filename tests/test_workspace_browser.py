"""The labeling and review workspaces in real Chromium: draw, submit, reject, rework, accept, conflicts."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from sqlalchemy import select

from browser_helpers import BrowserSession, make_people, start_server
from imaging_helpers import PATIENT, PATIENT_ID, make_dicom
from onprem_label.app import create_app
from onprem_label.db.models import Annotation, Review, Task
from onprem_label.imaging.ingest import IngestTarget, ingest_stream
from onprem_label.workflow.members import add_member
from onprem_label.workflow.projects import create_project

pytestmark = pytest.mark.slow

SCHEMA = {"classes": [{"name": "nodule", "color": "#e6194b", "hotkey": "1", "tools": ["bbox", "polygon"]},
                      {"name": "device", "color": "#4363d8", "hotkey": "2", "tools": ["point", "mask"]}],
          "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"], "required": True}]}
WIDTH, HEIGHT = 256, 200
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.fixture
def items() -> int:
    """Items in the served project."""
    return 2


@pytest.fixture
def site(settings, keyring, items):
    """A served project with a labeler, a reviewer and `items` DICOM items (the real clock runs)."""
    app = create_app(settings, keyring=keyring)
    svc = app.extensions["onprem_label"]
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    with svc.sessionmaker() as db:
        people = make_people(db, ("lena", "labeler"), ("rita", "reviewer"), ("max", "manager"))
        project = create_project(db, "Chest CT", label_schema=SCHEMA, actor_name="test", now=now)
        add_member(db, project, "lena", "labeler", actor=None, now=now)
        add_member(db, project, "rita", "reviewer", actor=None, now=now)
        db.commit()
        for n in range(items):
            result = ingest_stream(db, svc.store, IngestTarget(project.id, "cli", actor_name="test"),
                                   svc.ingest_options, io.BytesIO(make_dicom(rows=HEIGHT, columns=WIDTH, seed=70 + n)),
                                   f"{n}.dcm", now=now)
            assert result.status == "imported", result
        project_id = project.id
    server = start_server(app)
    yield {"app": app, "url": server.url, "project_id": project_id, "people": people, "server": server}
    server.stop()
    svc.engine.dispose()


def open_workspace(session: BrowserSession, project_id: int, mode: str = "label"):
    """Go to the workspace and wait until its task's first frame is painted."""
    page = session.page
    page.goto(f"/projects/{project_id}/{mode}")
    page.wait_for_selector("#canvas[data-painted-frame]")
    return page


def transform(page) -> tuple[float, float, float, dict]:
    """(scale, tx, ty, canvas box) of the viewer: screen = image * scale + t, inside the canvas box."""
    data = page.eval_on_selector("#canvas", "c => [c.dataset.scale, c.dataset.tx, c.dataset.ty]")
    return float(data[0]), float(data[1]), float(data[2]), page.locator("#canvas").bounding_box()


def to_screen(page, x: float, y: float) -> tuple[float, float]:
    """The page coordinates of image pixel (x, y)."""
    scale, tx, ty, box = transform(page)
    return box["x"] + tx + x * scale, box["y"] + ty + y * scale


def drag(page, start, end, steps: int = 8) -> None:
    """Mouse down at image point `start`, move, up at `end`."""
    page.mouse.move(*to_screen(page, *start))
    page.mouse.down()
    page.mouse.move(*to_screen(page, *end), steps=steps)
    page.mouse.up()


def click_at(page, x: float, y: float) -> None:
    """A click on image pixel (x, y)."""
    page.mouse.click(*to_screen(page, x, y))


def latest(app, task_id: int) -> Annotation:
    """The task's newest revision in the database."""
    with app.extensions["onprem_label"].sessionmaker() as db:
        return db.scalar(select(Annotation).where(Annotation.task_id == task_id)
                         .order_by(Annotation.revision.desc()).limit(1))


def task_row(app, task_id: int) -> Task:
    """The task as the database has it now."""
    with app.extensions["onprem_label"].sessionmaker() as db:
        return db.get(Task, task_id)


def near(a: float, b: float) -> bool:
    """Within one image pixel."""
    return abs(a - b) <= 1.0


def answer_quality(page) -> None:
    """Tick the required question."""
    page.check("#questions input[value=good]")


def test_smoke_workspace_loads_without_errors(site, browser):
    """The labeling workspace opens a task and paints its image with no script error."""
    session = BrowserSession(browser, site["server"])
    session.login("lena")
    page = open_workspace(session, site["project_id"])
    assert page.eval_on_selector("#workspace", "w => w.dataset.taskId")
    assert session.console_errors == []
    session.close()




def wait_shown(page, previous: str | None = None) -> str:
    """Wait until the workspace shows a task other than `previous` (or says there is none); its id."""
    page.wait_for_function("p => { const w = document.getElementById('workspace');"
                           " return w.dataset.taskId !== undefined && w.dataset.taskId !== p &&"
                           " (w.dataset.taskId === '' || document.getElementById('canvas').dataset.paintedFrame !== undefined); }",
                           arg=previous if previous is not None else "__none__")
    return page.eval_on_selector("#workspace", "w => w.dataset.taskId")


def set_zoom(page, scale: float) -> None:
    """1:1, then zoom in by steps of sqrt(2) up to `scale`."""
    page.keyboard.press("Shift+F")
    while float(page.eval_on_selector("#canvas", "c => c.dataset.scale")) < scale - 1e-9:
        page.keyboard.press("+")
    assert float(page.eval_on_selector("#canvas", "c => c.dataset.scale")) == pytest.approx(scale)


def shapes_by_type(annotation: Annotation) -> dict[str, list[dict]]:
    """The revision's shapes grouped by type."""
    out: dict[str, list[dict]] = {}
    for shape in annotation.shapes:
        out.setdefault(shape["type"], []).append(shape)
    return out


def assert_box(shape: dict, x0: float, y0: float, x1: float, y1: float) -> None:
    """The box spans the mouse path from (x0, y0) to (x1, y1) within one image pixel."""
    assert near(shape["x"], x0) and near(shape["y"], y0), shape
    assert near(shape["x"] + shape["width"], x1) and near(shape["y"] + shape["height"], y1), shape


def test_label_review_rework_accept_in_the_browser(site, browser):
    """Label (preset, box, polygon), reject with a pinned comment, rework at zoom 2, accept: right coordinates."""
    app, project_id = site["app"], site["project_id"]
    lena = BrowserSession(browser, site["server"])
    lena.login("lena")
    page = lena.page
    page.click("text=Label next")
    page.wait_for_selector("#canvas[data-painted-frame]")
    first = wait_shown(page)
    page.keyboard.press("Shift+1")  # lung window, rendered by the server
    page.wait_for_function("() => document.getElementById('wl').value.startsWith('Lung')")
    page.wait_for_function("() => performance.getEntriesByType('resource').some(e => e.name.includes('preset=lung'))")
    set_zoom(page, 1)
    drag(page, (20, 30), (80, 90))
    page.keyboard.press("g")
    polygon = [(120, 40), (180, 50), (170, 110)]
    for point in polygon:
        click_at(page, *point)
    page.keyboard.press("Enter")
    answer_quality(page)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "labeling-workspace.png"))
    page.click("#submit")
    second = wait_shown(page, first)  # submit moves to the next task
    assert second and second != first
    revision = latest(app, int(first))
    got = shapes_by_type(revision)
    assert_box(got["bbox"][0], 20, 30, 80, 90)
    assert all(near(a, b) for p, q in zip(got["polygon"][0]["points"], polygon) for a, b in zip(p, q))
    assert revision.classifications == {"quality": "good"} and task_row(app, int(first)).state == "submitted"
    box_id = got["bbox"][0]["id"]
    page.click("#release")  # give the second task back; back to my work
    page.wait_for_url("**/work")

    rita = BrowserSession(browser, site["server"])
    rita.login("rita")
    review = open_workspace(rita, project_id, "review")
    assert wait_shown(review) == first
    set_zoom(review, 1)
    review.keyboard.press("v")
    click_at(review, 50, 60)  # select the box: the comment is pinned to it
    review.keyboard.press("r")
    review.click("#reject-form button[type=submit]")  # no comment yet: refused in place
    assert review.is_visible("#reject-dialog") and task_row(app, int(first)).state == "reviewing"
    review.fill("#reject-comment", "The box is too wide; take it down to the lesion.")
    review.click("#reject-form button[type=submit]")
    wait_shown(review, first)
    rejection = latest_review(app, int(first))
    assert (rejection.decision, rejection.shape_id) == ("reject", box_id)
    assert task_row(app, int(first)).state == "rework"

    page.goto("/work")
    assert "The box is too wide" in page.inner_text(".rework-list")
    page.click("text=Continue rework")
    page.wait_for_selector("#canvas[data-painted-frame]")
    assert wait_shown(page) == first
    assert "The box is too wide" in page.inner_text("#comments")
    set_zoom(page, 2)
    page.keyboard.press("v")
    drag(page, (50, 60), (60, 65))  # move the box by (10, 5)
    page.keyboard.press("b")
    drag(page, (200, 150), (230, 180))  # and draw one more at zoom 2
    page.click("#submit")
    wait_shown(page, first)
    got = shapes_by_type(latest(app, int(first)))
    boxes = {shape["id"]: shape for shape in got["bbox"]}
    assert_box(boxes[box_id], 30, 35, 90, 95)
    [added] = [shape for key, shape in boxes.items() if key != box_id]
    assert_box(added, 200, 150, 230, 180)
    assert all(near(a, b) for p, q in zip(got["polygon"][0]["points"], polygon) for a, b in zip(p, q))
    assert task_row(app, int(first)).round == 1

    review.goto(f"/projects/{project_id}/review")
    review.wait_for_selector("#canvas[data-painted-frame]")
    assert wait_shown(review) == first
    review.wait_for_selector("#compare-section:not([hidden])")  # the rejected revision beside the current one
    review.screenshot(path=str(SCREENSHOTS / "review-workspace.png"))
    review.keyboard.press("a")
    wait_shown(review, first)
    assert task_row(app, int(first)).state == "accepted"

    for session in (lena, rita):
        origin = site["url"]
        assert session.requests and all(url.startswith(origin + "/") for url in session.requests), \
            [u for u in session.requests if not u.startswith(origin + "/")]
        assert session.documents and all("default-src 'self'" in headers.get("content-security-policy", "")
                                         for _, headers in session.documents)
        assert session.console_errors == []
        leaked = [u for u in session.requests if any(m in u for m in (PATIENT, PATIENT_ID, "Smithfield"))]
        assert leaked == []  # no identifying value in any URL
        assert session.titles and all("Smithfield" not in title for title in session.titles)
        session.close()


def latest_review(app, task_id: int) -> Review:
    """The task's newest review decision."""
    with app.extensions["onprem_label"].sessionmaker() as db:
        return db.scalar(select(Review).where(Review.task_id == task_id).order_by(Review.id.desc()).limit(1))


@pytest.mark.parametrize("items", [1])
def test_two_tabs_saving_one_task_see_the_conflict_and_lose_nothing(site, browser):
    """The second tab's stale save is a visible conflict; keeping either side leaves every save in the history."""
    app, project_id = site["app"], site["project_id"]
    lena = BrowserSession(browser, site["server"])
    lena.login("lena")
    first = open_workspace(lena, project_id)
    second = lena.new_page()
    second.goto(f"/projects/{project_id}/label")  # a reload gets the task it already holds
    second.wait_for_selector("#canvas[data-painted-frame]")
    task_id = wait_shown(first)
    assert wait_shown(second) == task_id
    for page in (first, second):
        page.bring_to_front()  # a tab in the background gets its events late (throttled)
        set_zoom(page, 1)
    first.bring_to_front()
    drag(first, (10, 10), (40, 40))
    first.keyboard.press("s")
    first.wait_for_function("() => document.getElementById('workspace').dataset.saveState === 'saved'"
                            " && document.getElementById('save-state').textContent.includes('version 3')")
    second.bring_to_front()
    second.keyboard.press("2")  # class device
    second.keyboard.press("t")
    click_at(second, 100, 100)
    second.keyboard.press("s")
    second.wait_for_selector("#banner:not([hidden])")
    assert "saved elsewhere" in second.inner_text("#banner")
    assert second.eval_on_selector("#workspace", "w => w.dataset.saveState") == "error"
    second.click("text=Keep editing mine (saves over it)")
    second.wait_for_function("() => document.getElementById('workspace').dataset.saveState === 'saved'")
    with app.extensions["onprem_label"].sessionmaker() as db:
        revisions = db.scalars(select(Annotation).where(Annotation.task_id == int(task_id))
                               .order_by(Annotation.revision)).all()
    assert [[s["type"] for s in r.shapes] for r in revisions] == [["bbox"], ["point"]]  # both saves kept

    first.bring_to_front()
    drag(first, (150, 150), (170, 170))  # the first tab is now the stale one
    first.keyboard.press("s")
    first.wait_for_selector("#banner:not([hidden])")
    first.click("text=Load the saved version")
    first.wait_for_function("() => document.getElementById('banner').hidden")
    assert first.locator("#shape-list .label-text").all_inner_texts() == ["1. device point"]
    first.keyboard.press("z")  # undo brings its own version back
    assert len(first.locator("#shape-list li").all()) == 2
    assert lena.console_errors == [] or all("409" in e for e in lena.console_errors)
    lena.close()
