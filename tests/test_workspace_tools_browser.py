"""Workspace tools in real Chromium: frames, polyline, point, vertex edit, undo/redo, brush and eraser,
window/level drag, correct-and-accept, the shortcut overlay, accessible names and the 1366 x 768 layout."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from browser_helpers import BrowserSession, make_people, start_server
from imaging_helpers import make_dicom
from onprem_label.app import create_app
from onprem_label.db.models import Annotation, Review, Task
from onprem_label.imaging.ingest import IngestTarget, ingest_stream
from onprem_label.workflow.members import add_member
from onprem_label.workflow.projects import create_project
from test_workspace_browser import (click_at, drag, latest, near, open_workspace, set_zoom, task_row, to_screen,
                                    wait_shown)

pytestmark = pytest.mark.slow

SCHEMA = {"classes": [{"name": "nodule", "color": "#e6194b", "hotkey": "1", "tools": ["bbox", "polygon"]},
                      {"name": "vessel", "color": "#4363d8", "hotkey": "2", "tools": ["polyline", "point"]},
                      {"name": "fluid", "color": "#3cb44b", "hotkey": "3", "tools": ["mask"]}],
          "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"], "required": True}]}
WIDTH, HEIGHT, FRAMES = 160, 120, 4


@pytest.fixture
def site(settings, keyring):
    """A served project: one labeler, one reviewer, one 4-frame DICOM item."""
    app = create_app(settings, keyring=keyring)
    svc = app.extensions["onprem_label"]
    now = datetime.now(timezone.utc)
    with svc.sessionmaker() as db:
        make_people(db, ("lena", "labeler"), ("rita", "reviewer"))
        project = create_project(db, "Cine", label_schema=SCHEMA, actor_name="test", now=now)
        add_member(db, project, "lena", "labeler", actor=None, now=now)
        add_member(db, project, "rita", "reviewer", actor=None, now=now)
        db.commit()
        data = make_dicom(rows=HEIGHT, columns=WIDTH, frames=FRAMES, seed=5)
        result = ingest_stream(db, svc.store, IngestTarget(project.id, "cli", actor_name="test"),
                               svc.ingest_options, io.BytesIO(data), "cine.dcm", now=now)
        assert result.status == "imported" and result.frames == FRAMES
        project_id = project.id
    server = start_server(app)
    yield {"app": app, "url": server.url, "project_id": project_id, "server": server}
    server.stop()
    svc.engine.dispose()


def painted(page) -> int:
    """The frame on screen now."""
    return int(page.eval_on_selector("#canvas", "c => c.dataset.paintedFrame"))


def wait_frame(page, frame: int) -> None:
    """Until frame `frame` is painted."""
    page.wait_for_function("f => document.getElementById('canvas').dataset.paintedFrame === String(f)", arg=frame)


def decode_rle(rle: dict) -> list[list[int]]:
    """COCO uncompressed RLE (column-major, zeros first) as rows of 0/1."""
    height, width = rle["size"]
    flat, value = [], 0
    for run in rle["counts"]:
        flat.extend([value] * run)
        value = 1 - value
    return [[flat[x * height + y] for x in range(width)] for y in range(height)]


def save_and_wait(page) -> None:
    """Press S and wait for the server to have the draft."""
    page.keyboard.press("s")
    page.wait_for_function("() => document.getElementById('workspace').dataset.saveState === 'saved'")


def test_frames_tools_undo_and_masks(site, browser):
    """Frames by key, wheel and slider; polyline, point, vertex edit, undo/redo, delete; brush and eraser."""
    session = BrowserSession(browser, site["server"])
    session.login("lena")
    page = open_workspace(session, site["project_id"])
    task_id = int(wait_shown(page))
    set_zoom(page, 2)
    assert page.is_visible("#frames")
    page.keyboard.press("ArrowRight")
    wait_frame(page, 1)
    page.keyboard.press("n")
    wait_frame(page, 2)
    page.mouse.move(*to_screen(page, 80, 60))
    page.keyboard.down("Control")
    page.mouse.wheel(0, 120)
    page.keyboard.up("Control")
    wait_frame(page, 3)
    page.keyboard.press("p")
    wait_frame(page, 2)
    page.keyboard.press("2")  # vessel: polyline and point
    page.keyboard.press("l")
    for point in [(20, 20), (60, 30), (100, 25)]:
        click_at(page, *point)
    page.keyboard.press("Enter")
    page.keyboard.press("t")
    click_at(page, 120, 90)
    page.keyboard.press("v")
    click_at(page, 40, 25)  # on the polyline: selects it
    drag(page, (60, 30), (70, 50))  # its middle vertex
    page.keyboard.press("z")
    page.keyboard.press("y")  # undo, then redo the vertex edit
    click_at(page, 120, 90)
    page.keyboard.press("Delete")  # the point goes
    page.eval_on_selector("#frame", "s => { s.value = '2'; s.dispatchEvent(new Event('input')); }")
    wait_frame(page, 1)
    page.keyboard.press("3")  # fluid: mask
    page.keyboard.press("m")
    drag(page, (20, 60), (60, 60), steps=12)
    page.keyboard.press("e")
    click_at(page, 40, 60)
    save_and_wait(page)
    shapes = latest(site["app"], task_id).shapes
    assert sorted((s["type"], s["frame"]) for s in shapes) == [("mask", 1), ("polyline", 2)]
    line = next(s for s in shapes if s["type"] == "polyline")
    expected = [(20, 20), (70, 50), (100, 25)]
    assert all(near(a, b) for p, q in zip(line["points"], expected) for a, b in zip(p, q)), line
    mask = decode_rle(next(s for s in shapes if s["type"] == "mask")["rle"])
    assert len(mask) == HEIGHT and len(mask[0]) == WIDTH
    assert mask[60][25] == 1 and mask[60][55] == 1  # painted along the stroke
    assert mask[60][40] == 0  # erased
    assert mask[90][25] == 0 and mask[20][140] == 0  # untouched elsewhere
    assert session.console_errors == []
    session.close()


def test_box_resize_by_handle_and_autosave(site, browser):
    """Dragging a box's corner resizes it; with no key pressed the draft reaches the server by itself."""
    session = BrowserSession(browser, site["server"])
    session.login("lena")
    page = open_workspace(session, site["project_id"])
    task_id = int(wait_shown(page))
    set_zoom(page, 2)
    drag(page, (20, 20), (60, 50))  # the box tool is the first one the class allows
    page.keyboard.press("v")
    click_at(page, 40, 35)
    drag(page, (60, 50), (80, 70))  # its lower right handle
    page.wait_for_function("() => document.getElementById('workspace').dataset.saveState === 'saved'"
                           " && document.getElementById('save-state').textContent.startsWith('Saved')", timeout=15000)
    [box] = latest(site["app"], task_id).shapes
    assert near(box["x"], 20) and near(box["y"], 20) and near(box["width"], 60) and near(box["height"], 50), box
    assert session.console_errors == []
    session.close()


def test_window_level_by_right_drag_and_presets(site, browser):
    """Right-drag changes width and level (shown at once, asked of the server); a preset key sets its window."""
    session = BrowserSession(browser, site["server"])
    session.login("lena")
    page = open_workspace(session, site["project_id"])
    before = page.eval_on_selector("#wl", "o => o.value")
    start = to_screen(page, 80, 60)
    page.mouse.move(*start)
    page.mouse.down(button="right")
    page.mouse.move(start[0] + 80, start[1] - 40, steps=6)
    page.mouse.up(button="right")
    after = page.eval_on_selector("#wl", "o => o.value")
    assert after != before
    width, level = (int(v) for v in after.split("/"))
    assert width > 400 and level > 40  # wider to the right, higher level upwards
    page.wait_for_function("() => performance.getEntriesByType('resource')"
                           ".some(e => e.name.includes('window=') && e.name.includes('level='))")
    page.keyboard.press("Shift+3")
    page.wait_for_function("() => document.getElementById('wl').value.startsWith('Bone 1800/400')")
    assert session.console_errors == []
    session.close()


def test_review_correct_and_accept(site, browser):
    """A reviewer moves the labeler's point and presses C: a correction revision by the reviewer, accepted."""
    app, project_id = site["app"], site["project_id"]
    lena = BrowserSession(browser, site["server"])
    lena.login("lena")
    page = open_workspace(lena, project_id)
    task_id = int(wait_shown(page))
    set_zoom(page, 2)
    page.keyboard.press("2")
    page.keyboard.press("t")
    click_at(page, 50, 50)
    page.check("#questions input[value=good]")
    page.click("#submit")
    wait_shown(page, str(task_id))
    rita = BrowserSession(browser, site["server"])
    rita.login("rita")
    review = open_workspace(rita, project_id, "review")
    assert int(wait_shown(review)) == task_id
    set_zoom(review, 2)
    review.keyboard.press("v")
    drag(review, (50, 50), (70, 40))
    review.keyboard.press("c")
    wait_shown(review, str(task_id))
    revision = latest(app, task_id)
    assert revision.kind == "correction" and revision.author_id == rita_id(app)
    [point] = revision.shapes
    assert near(point["x"], 70) and near(point["y"], 40)
    with app.extensions["onprem_label"].sessionmaker() as db:
        decision = db.scalar(select(Review.decision).where(Review.task_id == task_id))
    assert decision == "correct" and task_row(app, task_id).state == "accepted"
    lena.close()
    rita.close()


def rita_id(app) -> int:
    """The reviewer's user id."""
    from onprem_label.db.models import User

    with app.extensions["onprem_label"].sessionmaker() as db:
        return db.scalar(select(User.id).where(User.username == "rita"))


def test_shortcuts_overlay_names_fit_and_focus(site, browser):
    """`?` lists every shortcut; every button has a name; 1366 x 768 shows canvas and actions; focus is visible."""
    session = BrowserSession(browser, site["server"])
    session.login("lena")
    page = open_workspace(session, site["project_id"])
    page.keyboard.press("?")
    page.wait_for_selector("#help[open]")
    rows = page.locator("#help-rows tr").all_inner_texts()
    text = "\n".join(rows)
    for needed in ("V\t", "B\t", "G\t", "L\t", "T\t", "M\t", "E\t", "Shift+1", "Shift+5", "Ctrl+Enter", "Z, Ctrl+Z",
                   "vessel", "fluid", "Space+drag", "right drag", "F\t", "Shift+F"):
        assert needed in text, needed
    page.keyboard.press("Escape")
    unnamed = page.eval_on_selector_all("button", "bs => bs.filter(b => !(b.getAttribute('aria-label') "
                                                  "|| b.textContent.trim())).map(b => b.outerHTML)")
    assert unnamed == []
    viewport = page.viewport_size
    for selector in ("#canvas", "#submit", "#save", "#release", "#tools"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["y"] >= 0, selector
        assert box["x"] + box["width"] <= viewport["width"] + 1 and box["y"] + box["height"] <= viewport["height"] + 1, \
            (selector, box)
    page.focus("#submit")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")  # keyboard focus: :focus-visible applies
    outline = page.eval_on_selector("#submit", "b => getComputedStyle(b).outlineStyle + ' ' + getComputedStyle(b).outlineWidth")
    assert outline.split()[0] != "none" and outline.split()[1] != "0px"
    assert session.console_errors == []
    session.close()


def test_a_held_key_decides_only_the_task_on_screen(site, browser):
    """Holding A accepts the task shown, never the next one unseen; C with no change is refused."""
    app, project_id = site["app"], site["project_id"]
    svc = app.extensions["onprem_label"]
    with svc.sessionmaker() as db:  # a second item, so that a repeat would have something to accept
        result = ingest_stream(db, svc.store, IngestTarget(project_id, "cli", actor_name="test"), svc.ingest_options,
                               io.BytesIO(make_dicom(rows=HEIGHT, columns=WIDTH, seed=6)), "b.dcm",
                               now=datetime.now(timezone.utc))
        assert result.status == "imported"
    lena = BrowserSession(browser, site["server"])
    lena.login("lena")
    page = open_workspace(lena, project_id)
    for _ in range(2):
        shown = wait_shown(page)
        set_zoom(page, 2)
        page.keyboard.press("2")
        page.keyboard.press("t")
        click_at(page, 30, 30)
        page.check("#questions input[value=good]")
        page.click("#submit")
        wait_shown(page, shown)
    rita = BrowserSession(browser, site["server"])
    rita.login("rita")
    review = open_workspace(rita, project_id, "review")
    first = int(wait_shown(review))
    review.keyboard.press("c")  # nothing changed: refused, nothing sent
    assert "Nothing was changed" in review.inner_text("#errors")
    assert task_row(app, first).state == "reviewing"
    review.keyboard.down("a")
    review.keyboard.down("a")  # the key held: a repeat
    review.keyboard.down("a")
    review.keyboard.up("a")
    second = int(wait_shown(review, str(first)))
    review.wait_for_timeout(500)  # time for any wrongly sent decision to land
    assert task_row(app, first).state == "accepted"
    assert task_row(app, second).state == "reviewing"  # shown, not decided
    lena.close()
    rita.close()
