"""Benchmark: the labeling workspace in Debian's Chromium against `onprem-label serve` on loopback.

Goals (issue 6):
  - next frame: time from pressing the next-frame key to the new frame painted, on a 100-frame
    series, with rendering cached: median <= 150 ms;
  - submit: time from pressing Submit to the next task shown (its image painted): median <= 500 ms.
Usage: .venv/bin/python bench/workspace_latency.py [--rounds 3] [--frames 100] [--tasks 12]

Setup: a data directory with a stack-series project holding one 100-slice CT series (512 x 512,
the synthetic slices of ingest_throughput.py, through `onprem-label ingest`), and a second project
of `--tasks` single slices; one labeler. Every frame is first requested once through the API so
the server's rendition cache holds it ("rendering cached"). Each round then opens the workspace
in a new browser context (so the browser's own image cache starts empty) and:
  - presses the right arrow key `frames - 1` times, each press as soon as the previous frame is
    painted ("back to back", prefetching gets no head start), then once more through the series
    at a human pace of one press every 250 ms; the time of each press is taken in the page when
    the keydown event arrives, the time of painting when the workspace reports the frame painted;
  - on the second project, draws a box, answers the question and presses Submit, `--tasks - 1`
    times; the time runs from the click (in the page) to the next task's first frame painted.
Figures are medians over all presses of all rounds (p90 beside them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import numpy as np
from ingest_throughput import ct_slice, phantom
from pydicom.uid import generate_uid

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
FRAME_GOAL_MS, SUBMIT_GOAL_MS = 150.0, 500.0
PASSWORD = "a long workspace timing passphrase"
UID_ROOT = "1.2.826.0.1.3680043.8.498."
SCHEMA = {"classes": [{"name": "nodule", "color": "#e6194b", "hotkey": "1", "tools": ["bbox", "polygon"]}],
          "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"], "required": True}]}


def write_series(folder: Path, slices: int, *, one_series: bool) -> None:
    """`slices` CT slices as files; one series (a stack) or a series each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    base = phantom(rng, 0.0)
    study, frame_uid, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    for n in range(slices):
        noise = rng.integers(-6, 7, size=base.shape, dtype=np.int16)
        ds = ct_slice(patient=1, series_uid=series if one_series else generate_uid(UID_ROOT), study_uid=study,
                      frame_uid=frame_uid, number=n + 1, z=-1.0 * n, pixels=base + noise)
        ds.save_as(folder / f"IM{n:04d}.dcm", enforce_file_format=True)


def prepare(base: Path, frames: int, tasks: int) -> tuple[Path, int, int]:
    """Data directory, the series project's id and the tasks project's id (labeler 'bench')."""
    from datetime import datetime, timezone

    from onprem_label.auth import accounts
    from onprem_label.config import load_settings
    from onprem_label.db import make_engine
    from onprem_label.workflow.members import add_member
    from onprem_label.workflow.projects import create_project

    data = c.init_data_dir(base)
    settings = load_settings({"data_dir": str(data)}, env={})
    engine = make_engine(settings.effective_database_url)
    now = datetime.now(timezone.utc)
    with c.site_sessionmaker(data, engine)() as db:
        accounts.create_user(db, "bench", PASSWORD, ["labeler"], must_change_password=False, now=now)
        ids = []
        for name, stack in (("Series", True), ("Tasks", False)):
            project = create_project(db, name, label_schema=SCHEMA, settings={"stack_series": stack},
                                     actor_name="bench", now=now)
            add_member(db, project, "bench", "labeler", actor=None, now=now)
            ids.append(project.id)
        db.commit()
    engine.dispose()
    write_series(base / "series", frames, one_series=True)
    write_series(base / "single", tasks, one_series=False)
    c.run_cli(data, "ingest", "Series", str(base / "series"), timeout=600)
    c.run_cli(data, "ingest", "Tasks", str(base / "single"), timeout=600)
    return data, ids[0], ids[1]


def warm_renditions(page, item_id: int, frames: int) -> None:
    """Ask the server once for every frame at the file's own window (fills its rendition cache)."""
    page.evaluate("async ([id, n]) => { for (let f = 0; f < n; f++) {"
                  " await fetch(`/api/v1/items/${id}/image?frame=${f}`); } }", [item_id, frames])


INSTALL = """() => {
  window.__bench = { presses: [], paints: [] };
  document.addEventListener('keydown', (e) => { if (e.key === 'ArrowRight') window.__bench.presses.push(performance.now()); }, true);
  // Painted = the next animation frame after the canvas was drawn (when the screen shows it).
  document.getElementById('canvas').addEventListener('framepainted', (e) =>
    requestAnimationFrame(() => window.__bench.paints.push([e.detail.frame, performance.now()])));
}"""


def frame_round(context, url: str, project_id: int, frames: int) -> tuple[list[float], list[float], list[float]]:
    """(back-to-back ms, paced ms, jump ms) of frame changes through the series in a fresh context."""
    page = context.new_page()
    page.goto(f"{url}/projects/{project_id}/label")
    page.wait_for_selector("#canvas[data-painted-frame]")
    page.evaluate(INSTALL)
    page.locator("#canvas").focus()
    back_to_back, paced = [], []
    for pace, out in ((0.0, back_to_back), (0.25, paced)):
        page.evaluate("() => { window.__bench.presses = []; window.__bench.paints = []; }")
        start = int(page.eval_on_selector("#canvas", "c => c.dataset.paintedFrame"))
        if start != 0:
            page.eval_on_selector("#frame", "s => { s.value = '1'; s.dispatchEvent(new Event('input')); }")
            page.wait_for_function("() => document.getElementById('canvas').dataset.paintedFrame === '0'")
            page.evaluate("() => { window.__bench.presses = []; window.__bench.paints = []; }")
        for frame in range(1, frames):
            page.keyboard.press("ArrowRight")
            page.wait_for_function("f => document.getElementById('canvas').dataset.paintedFrame === String(f)",
                                   arg=frame)
            if pace:
                time.sleep(pace)
        # The last paint is recorded one animation frame after the canvas was drawn.
        page.wait_for_function("f => window.__bench.paints.some(p => p[0] === f)", arg=frames - 1)
        presses, paints = page.evaluate("() => [window.__bench.presses, window.__bench.paints]")
        painted_at = {}
        for frame, at in paints:
            painted_at.setdefault(frame, at)
        out.extend(painted_at[frame] - presses[frame - 1] for frame in range(1, frames))
    jumps = jump_times(page, frames)
    page.close()
    return back_to_back, paced, jumps


def jump_times(page, frames: int) -> list[float]:
    """ms from moving the slider to a far frame (nothing prefetched there) to that frame painted."""
    took = []
    for target in [(frames * k) // 7 for k in (3, 6, 1, 5, 2, 4)]:
        took.append(page.evaluate("""f => new Promise((resolve) => {
            const canvas = document.getElementById('canvas'), slider = document.getElementById('frame');
            const t0 = performance.now();
            const done = (e) => { if (e.detail.frame === f) { canvas.removeEventListener('framepainted', done);
                requestAnimationFrame(() => resolve(performance.now() - t0)); } };
            canvas.addEventListener('framepainted', done);
            slider.value = String(f + 1); slider.dispatchEvent(new Event('input'));
        })""", target))
    return took


def submit_round(context, url: str, project_id: int, tasks: int) -> list[float]:
    """ms from Submit to the next task's frame painted, for `tasks - 1` submissions."""
    page = context.new_page()
    page.goto(f"{url}/projects/{project_id}/label")
    page.wait_for_selector("#canvas[data-painted-frame]")
    page.evaluate("() => { window.__shown = [];"
                  " document.getElementById('submit').addEventListener('click', () => window.__clicked = performance.now(), true);"
                  " document.getElementById('workspace').addEventListener('taskshown', (e) => window.__shown.push([window.__clicked, e.detail.at])); }")
    took = []
    for _ in range(tasks - 1):
        before = page.eval_on_selector("#workspace", "w => w.dataset.taskId")
        page.keyboard.press("Shift+F")
        box = page.locator("#canvas").bounding_box()
        scale, tx, ty = (float(v) for v in page.eval_on_selector(
            "#canvas", "c => [c.dataset.scale, c.dataset.tx, c.dataset.ty]"))
        x0, y0 = box["x"] + tx + 100 * scale, box["y"] + ty + 100 * scale
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x0 + 60, y0 + 50, steps=4)
        page.mouse.up()
        page.check("#questions input[value=good]")
        page.click("#submit")
        page.wait_for_function("b => { const w = document.getElementById('workspace'); return w.dataset.taskId !== b"
                               " && w.dataset.taskId !== ''; }", arg=before)
        page.wait_for_function("n => window.__shown.length >= n", arg=len(took) + 1)
        clicked, shown = page.evaluate("() => window.__shown[window.__shown.length - 1]")
        took.append(shown - clicked)
    page.close()
    return took


def login(browser, url: str):
    """A browser context logged in as the bench labeler."""
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    page.goto(f"{url}/login")
    page.fill("#username", "bench")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state("load")
    page.close()
    return context


def series_item(url: str, context, project_id: int) -> tuple[int, int]:
    """(item id, frames) of the series project's one item."""
    page = context.new_page()
    page.goto(f"{url}/work")
    got = page.evaluate("async (p) => (await (await fetch(`/api/v1/projects/${p}/items`)).json()).items[0]", project_id)
    page.close()
    return got["id"], got["frames"]


def stats(values: list[float]) -> str:
    """median and p90 in ms."""
    ordered = sorted(values)
    return f"median {c.median(ordered):6.1f} ms  p90 {ordered[int(0.9 * (len(ordered) - 1))]:6.1f} ms  (n={len(ordered)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    print(c.machine_summary(), flush=True)
    base = Path(tempfile.mkdtemp(prefix="onprem-bench-ws-", dir=args.tmp))
    data, series_project, tasks_project = prepare(base, args.frames, args.tasks * args.rounds + 1)
    port = c.free_port()
    proc = c.start_process([*c.onprem_label_command(), "--data-dir", str(data), "serve", "--port", str(port)],
                           base / "serve.log")
    url = f"http://{c.LOOPBACK}:{port}"
    results = {"back_to_back": [], "paced": [], "jump": [], "submit": []}
    try:
        c.wait_for_status(port, "/healthz", proc, timeout=60)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            warm = login(browser, url)
            item_id, frames = series_item(url, warm, series_project)
            page = warm.new_page()
            page.goto(f"{url}/work")
            warm_renditions(page, item_id, frames)
            warm.close()
            print(f"series item {item_id}: {frames} frames; renditions cached", flush=True)
            for r in range(args.rounds):
                busy, _ = c.wait_for_quiet(30)
                context = login(browser, url)
                back, paced, jumps = frame_round(context, url, series_project, frames)
                took = submit_round(context, url, tasks_project, args.tasks)
                context.close()
                results["back_to_back"] += back
                results["paced"] += paced
                results["jump"] += jumps
                results["submit"] += took
                print(f"round {r + 1} (busy before {busy:.0%}): next frame back to back {stats(back)}; "
                      f"paced {stats(paced)}; slider jump {stats(jumps)}; submit -> next task {stats(took)}", flush=True)
            browser.close()
    finally:
        c.stop_process(proc)
    frame_ms, submit_ms = c.median(results["back_to_back"]), c.median(results["submit"])
    print(f"next frame (back to back, new page each round): {stats(results['back_to_back'])}")
    print(f"next frame (one press per 250 ms): {stats(results['paced'])}")
    print(f"slider jump to a frame not prefetched: {stats(results['jump'])}")
    print(f"submit -> next task shown: {stats(results['submit'])}")
    print(f"goal next frame median <= {FRAME_GOAL_MS:g} ms: {frame_ms:.1f} ms -> "
          f"{'PASS' if frame_ms <= FRAME_GOAL_MS else 'FAIL'} ({frame_ms / FRAME_GOAL_MS:.2f} x goal)")
    print(f"goal submit median <= {SUBMIT_GOAL_MS:g} ms: {submit_ms:.1f} ms -> "
          f"{'PASS' if submit_ms <= SUBMIT_GOAL_MS else 'FAIL'} ({submit_ms / SUBMIT_GOAL_MS:.2f} x goal)")
    print(json.dumps({"frame_ms": frame_ms, "submit_ms": submit_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
