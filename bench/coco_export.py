"""Benchmark: COCO export of 100,000 accepted tasks with the CLI, its time and memory (issue 9).

Goal (issue 9): `onprem-label export PROJECT --format coco --out FILE` of 100,000 accepted tasks in
<= 30 s, with RSS growth <= 128 MiB.
Method: `onprem-label init` makes a data directory (SQLite inside it, or a PostgreSQL database made
and dropped here); bulk inserts then fill project 1 with 100,000 DICOM items of 512 x 512 (one
stored image each, with its de-identified SOP Instance UID) and their accepted work tasks, each with
a final revision of two boxes and a polygon, every tenth also a mask of a 512 x 512 frame (a few
hundred runs), and a review; project 2 is the same with one task. Each run is a fresh CLI process
(`export 1 --format coco`), timed from start to exit; its peak RSS is the VmHWM the process reads
of itself as it exits. RSS growth = the peak of the 100,000-task export minus the peak of the
one-task export (the same process doing the same work on one task: what the size of the export
adds). Runs alternate the two and the medians are the figures. The output is checked: it parses and
holds 100,000 images.
Usage: .venv/bin/python bench/coco_export.py [--backend sqlite|postgresql] [--runs 5] [--tasks 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import _common as c

GOAL_S = 30.0
GOAL_RSS_MIB = 128.0
CHUNK = 20_000
SIDE = 512


def _mask_counts(rng: random.Random) -> list[int]:
    """Column-major runs of a 512 x 512 frame: a blob over ~40 columns (two runs per column)."""
    counts, at = [], 0
    left, top, width, height = rng.randint(0, 400), rng.randint(0, 400), 40, rng.randint(30, 100)
    for column in range(left, left + width):
        start = column * SIDE + top
        counts += [start - at, height]
        at = start + height
    counts.append(SIDE * SIDE - at)
    return counts


def fill(engine, project_id: int, tasks: int, rng: random.Random, first_item: int) -> None:
    """The project's items, images, accepted tasks, final revisions and reviews (bulk inserts)."""
    from sqlalchemy import insert

    from onprem_label.db.models import Annotation, Blob, Item, ItemImage, Project, Review, Task

    now = datetime.now(timezone.utc)
    schema = {"classes": [{"name": "nodule", "color": "#e6194b", "tools": ["bbox", "polygon"]},
                          {"name": "organ", "color": "#3cb44b", "tools": ["mask"]}], "questions": []}
    with engine.begin() as conn:
        conn.execute(insert(Project).values(id=project_id, name=f"COCO bench {project_id}", label_schema=schema,
                                            settings={}, created_at=now))
        for start in range(0, tasks, CHUNK):
            ids = range(first_item + start, first_item + min(start + CHUNK, tasks))
            conn.execute(insert(Blob), [{"id": f"{i:064x}", "size": 600_000, "created_at": now} for i in ids])
            conn.execute(insert(Item), [{"id": i, "project_id": project_id, "kind": "dicom", "width": SIDE,
                                         "height": SIDE, "frames": 1, "modality": "CT", "study_uid": f"2.25.{i // 100}",
                                         "series_uid": f"2.25.{i // 100}.1", "source": "cli", "created_at": now}
                                        for i in ids])
            conn.execute(insert(ItemImage), [{"item_id": i, "project_id": project_id, "position": 0,
                                              "blob_id": f"{i:064x}", "source_digest": f"{i:064x}",
                                              "instance_uid": f"2.25.{i}.{rng.getrandbits(60)}", "frames": 1,
                                              "width": SIDE, "height": SIDE, "meta": {}, "deid_report": {},
                                              "created_at": now} for i in ids])
            conn.execute(insert(Task), [{"id": i, "project_id": project_id, "item_id": i, "state": "accepted",
                                         "version": 5, "labeler_id": None, "reviewer_id": None, "created_at": now,
                                         "updated_at": now, "submitted_at": now, "accepted_at": now} for i in ids])
            revisions = []
            for i in ids:
                x, y = rng.randint(0, 400), rng.randint(0, 400)
                shapes = [{"id": "a", "type": "bbox", "label": "nodule", "frame": 0, "x": x, "y": y, "width": 40,
                           "height": 30},
                          {"id": "b", "type": "bbox", "label": "nodule", "frame": 0, "x": y, "y": x, "width": 25,
                           "height": 60},
                          {"id": "c", "type": "polygon", "label": "nodule", "frame": 0,
                           "points": [[x, y], [x + 50, y + 5], [x + 30, y + 70], [x - 5, y + 40]]}]
                if i % 10 == 0:
                    shapes.append({"id": "d", "type": "mask", "label": "organ", "frame": 0,
                                   "rle": {"size": [SIDE, SIDE], "counts": _mask_counts(rng)}})
                revisions.append({"task_id": i, "revision": 1, "round": 0, "kind": "label", "schema_version": 1,
                                  "shapes": shapes, "classifications": {}, "created_at": now})
            conn.execute(insert(Annotation), revisions)
            conn.execute(insert(Review), [{"task_id": i, "round": 0, "decision": "accept", "comment": "",
                                           "annotation_revision": 1, "created_at": now} for i in ids])


# The CLI run in a child that reports its own VmHWM as it exits: the kernel's rusage of a child counts
# the memory of the parent it was forked from (ours, full of the fill's rows), VmHWM starts anew at exec.
_CHILD = ("import atexit, re, sys\n"
          "def hwm():\n"
          "    text = open('/proc/self/status').read()\n"
          "    sys.stderr.write('VmHWM ' + re.search(r'VmHWM:\\s+(\\d+)', text).group(1) + '\\n')\n"
          "atexit.register(hwm)\n"
          "from onprem_label.cli import main\n"
          "sys.argv = ['onprem-label'] + sys.argv[1:]\n"
          "main()\n")


def export_once(env: dict, data: Path, project_id: int, out: Path) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one `onprem-label export PROJECT --format coco` process."""
    argv = [sys.executable, "-c", _CHILD, "--data-dir", str(data), "export", str(project_id), "--format", "coco",
            "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"export failed: {done.stderr[-2000:]}")
    return seconds, int(done.stderr.rsplit("VmHWM ", 1)[1].split()[0]) * 1024  # KiB


def main() -> None:
    """Init, fill, then time alternating exports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=100_000)
    args = parser.parse_args()
    from onprem_label.db import make_engine

    print(c.machine_summary())
    rng = random.Random(9)
    with tempfile.TemporaryDirectory(prefix="onprem-coco-") as tmp, ExitStack() as stack:
        data, env = Path(tmp) / "data", c.clean_env()
        if args.backend == "postgresql":
            env["ONPREM_LABEL_DATABASE_URL"] = stack.enter_context(c.postgres_database("onprem_bench_coco"))
        subprocess.run([*c.onprem_label_command(), "--data-dir", str(data), "init"], env=env, check=True,
                       capture_output=True)
        engine = make_engine(env.get("ONPREM_LABEL_DATABASE_URL") or f"sqlite:///{data / 'onprem-label.db'}")
        started = time.monotonic()
        fill(engine, 1, args.tasks, rng, first_item=1)
        fill(engine, 2, 1, rng, first_item=args.tasks + 1)
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
        engine.dispose()
        print(f"filled {args.tasks} accepted tasks in {time.monotonic() - started:.1f} s")
        big, small = [], []
        out = Path(tmp) / "coco.json"
        for run in range(args.runs):
            small.append(export_once(env, data, 2, out))
            big.append(export_once(env, data, 1, out))
            print(f"run {run + 1}: {big[-1][0]:.2f} s, peak RSS {big[-1][1] / 2**20:.1f} MiB "
                  f"(one-task export: {small[-1][0]:.2f} s, {small[-1][1] / 2**20:.1f} MiB)")
        with out.open("rb") as f:
            doc = json.load(f)
        assert len(doc["images"]) == args.tasks, len(doc["images"])
        print(f"output: {out.stat().st_size / 2**20:.1f} MiB, {len(doc['images'])} images, "
              f"{len(doc['annotations'])} annotations")
        seconds = c.median([t for t, _ in big])
        growth = (c.median([r for _, r in big]) - c.median([r for _, r in small])) / 2**20
        verdict = "PASS" if seconds <= GOAL_S and growth <= GOAL_RSS_MIB else "FAIL"
        print(f"{args.backend}: COCO export of {args.tasks} accepted tasks: median {seconds:.2f} s of {args.runs} "
              f"({seconds / GOAL_S:.2f} x the 30 s goal); RSS growth {growth:.1f} MiB "
              f"({growth / GOAL_RSS_MIB:.2f} x the 128 MiB goal) {verdict}")

if __name__ == "__main__":
    main()
