"""Pre-label import: COCO and JSON Lines predictions become drafts on the right open tasks, labelers
correct them as new revisions, the share kept unchanged is measured, and an export round-trips."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as coco_mask
from sqlalchemy import select

from imaging_helpers import bearer_for, make_dicom
from onprem_label.cli import cli
from onprem_label.db.models import Annotation, AuditEvent, Task
from onprem_label.exchange.geometry import rle_pixels
from onprem_label.exchange.predictions import rle_counts
from onprem_label.exchange.selection import frame_name
from onprem_label.imaging.ingest import IngestTarget, ingest_stream
from onprem_label.storage import init_keyring, open_keyring
from workflow_helpers import label_and_accept_all, label_and_submit, lease, team

SCHEMA = {"classes": [{"name": "nodule", "color": "#e6194b", "tools": ["bbox", "polygon"]},
                      {"name": "organ", "color": "#3cb44b", "tools": ["mask"]},
                      {"name": "marker", "color": "#4363d8", "tools": ["point"]}],
          "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"], "required": True}]}
SIDE = 16


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIDE, SIDE), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


FILES = [(f"ct{n}.dcm", make_dicom(rows=SIDE, columns=SIDE, seed=500 + n)) for n in range(3)] + \
        [(f"photo{n}.png", _png(n)) for n in range(2)]


def _ingest(app, db, project_id: int, clock) -> list[int]:
    svc, ids = app.extensions["onprem_label"], []
    for name, data in FILES:
        result = ingest_stream(db, svc.store, IngestTarget(project_id, "cli", actor_name="test"), svc.ingest_options,
                               io.BytesIO(data), name, now=clock())
        assert result.status == "imported", result
        ids.append(result.item_id)
    return ids


def _project(client, headers: dict, name: str) -> int:
    made = client.post("/api/v1/projects", headers=headers,
                       json={"name": name, "label_schema": SCHEMA,
                             "settings": {"hidden_gold_rate": 0.0, "spot_check_rate": 0.0}})
    assert made.status_code == 201, made.get_json()
    return made.get_json()["id"]


@pytest.fixture
def site(app, client, db, make_user, clock):
    """A manager, a labeler and a reviewer on a project of three DICOM items and two pictures."""
    manager = bearer_for(db, make_user("boss", "manager"), clock)
    pid = _project(client, manager, "Predictions")
    people = team(client, db, make_user, clock, manager, pid, labelers=1, reviewers=1)
    items = _ingest(app, db, pid, clock)
    return {"pid": pid, "items": items, "manager": manager, "labeler": people["labeler1"],
            "reviewer": people["reviewer1"]}


def _coco(items: list[int], annotations: list[dict], **info) -> bytes:
    images = [{"id": n + 1, "file_name": frame_name(item, 0) + ".png", "width": SIDE, "height": SIDE}
              for n, item in enumerate(items)]
    cats = [{"id": n, "name": c["name"]} for n, c in enumerate(SCHEMA["classes"], 1)] + [{"id": 9, "name": "ghost"}]
    return json.dumps({"info": info, "images": images, "categories": cats, "annotations": annotations}).encode()


def _import(client, site, body: bytes, fmt: str = "coco", name: str = "detector-v2", **args):
    query = "&".join(f"{k}={v}" for k, v in {"format": fmt, "name": name, **args}.items())
    return client.post(f"/api/v1/projects/{site['pid']}/imports?{query}", headers=site["manager"], data=body,
                       content_type="application/json")


def _revisions(db, item_id: int) -> list:
    """The item's task's revisions, oldest first, as plain copies (the read is ended: SQLite has one writer)."""
    task_id = db.scalars(select(Task.id).where(Task.item_id == item_id)).one()
    rows = db.execute(select(Annotation.__table__).where(Annotation.task_id == task_id)
                      .order_by(Annotation.revision)).all()
    db.rollback()
    return [SimpleNamespace(**row._mapping) for row in rows]


def test_coco_predictions_become_drafts_on_the_right_tasks_and_a_correction_is_a_new_revision(client, db, site):
    """Boxes (also as their rectangle), polygons and compressed RLE masks land on their items' tasks as
    import revisions without an author; the labeler sees them, and a save is revision 2 of their own."""
    items = site["items"]
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8, order="F")
    mask[2:6, 3:5] = 1
    compressed = coco_mask.encode(np.asfortranarray(mask))
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 5, 4], "score": 0.9,
         "segmentation": [[1, 2, 6, 2, 6, 6, 1, 6]]},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 9, 9], "score": 0.8,
         "segmentation": [[0, 0, 9, 1, 4, 9]]},
        {"id": 3, "image_id": 4, "category_id": 2, "bbox": [3, 2, 2, 4], "score": 0.7,
         "segmentation": {"size": [SIDE, SIDE], "counts": compressed["counts"].decode()}},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [8, 8, 2, 2], "score": 0.1},  # under min_score
        {"id": 5, "image_id": 1, "category_id": 9, "bbox": [8, 8, 2, 2]},  # a class the project lacks
        {"id": 6, "image_id": 77, "category_id": 1, "bbox": [8, 8, 2, 2]},  # no such image
    ]
    answer = _import(client, site, _coco(items, annotations), min_score="0.5")
    assert answer.status_code == 200, answer.get_json()
    summary = answer.get_json()
    assert (summary["tasks"], summary["shapes"]) == (3, 3)
    assert summary["skipped"] == {"low_score": 1, "unknown_label": 1, "unknown_image": 1}
    box = _revisions(db, items[0])
    assert [(r.revision, r.kind, r.author_id, r.source) for r in box] == [(1, "import", None, "import:detector-v2")]
    assert [{k: v for k, v in s.items() if k != "id"} for s in box[0].shapes] == [
        {"type": "bbox", "label": "nodule", "frame": 0, "x": 1, "y": 2, "width": 5, "height": 4,
         "attributes": {"score": 0.9}}]
    assert _revisions(db, items[1])[0].shapes[0]["points"] == [[0, 0], [9, 1], [4, 9]]
    drawn = _revisions(db, items[3])[0].shapes[0]
    assert drawn["type"] == "mask" and drawn["rle"]["counts"] == rle_counts(compressed["counts"].decode())
    assert _revisions(db, items[2]) == [] and _revisions(db, items[4]) == []

    got = lease(client, site["pid"], site["labeler"])
    assert got["task"]["item_id"] == items[0]
    assert got["annotation"]["shapes"] == box[0].shapes  # the workspace opens on the drafts
    fixed = [{**box[0].shapes[0], "width": 6}]
    saved = client.put(f"/api/v1/tasks/{got['task']['id']}/annotation", headers=site["labeler"],
                       json={"shapes": fixed, "classifications": {}, "version": got["task"]["version"]})
    assert saved.status_code == 200, saved.get_json()
    after = _revisions(db, items[0])
    assert [(r.revision, r.kind, r.source) for r in after] == [(1, "import", "import:detector-v2"), (2, "label", None)]
    assert after[1].author_id is not None and after[1].shapes[0]["width"] == 6 and after[0].shapes[0]["width"] == 5
    actions = list(db.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
    assert actions.count("annotation:import") == 3 and actions.count("import:predictions") == 1


def test_compressed_rle_reads_as_pycocotools_writes_it():
    """The decoder of COCO's compressed counts gives back pycocotools' masks, for many random masks."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = np.asfortranarray((rng.random((h, w)) < rng.random()).astype(np.uint8))
        runs = rle_counts(coco_mask.encode(mask)["counts"].decode())
        assert sum(runs) == h * w
        assert np.array_equal(rle_pixels({"size": [h, w], "counts": runs}), mask.astype(bool))


def test_tasks_under_way_or_done_never_get_drafts(client, db, site):
    """An accepted task, a leased one and a re-run of the same file change nothing; each is counted."""
    items = site["items"]
    done = lease(client, site["pid"], site["labeler"])
    label_and_submit(client, done["task"], site["labeler"])
    reviewed = lease(client, site["pid"], site["reviewer"], "review")
    assert client.post(f"/api/v1/tasks/{reviewed['task']['id']}/review", headers=site["reviewer"],
                       json={"decision": "accept", "version": reviewed["task"]["version"]}).status_code == 200
    got = lease(client, site["pid"], site["labeler"])  # the second item's task is being labeled now
    annotations = [{"id": n + 1, "image_id": n + 1, "category_id": 1, "bbox": [1, 1, 3, 3]} for n in range(5)]
    first = _import(client, site, _coco(items, annotations)).get_json()
    assert first["tasks"] == 3 and first["skipped"] == {"task_started": 2}
    assert [r.kind for r in _revisions(db, done["task"]["item_id"])] == ["label"]
    assert _revisions(db, got["task"]["item_id"]) == []
    again = _import(client, site, _coco(items, annotations)).get_json()
    assert again["tasks"] == 0 and again["skipped"] == {"task_started": 2, "unchanged": 3}


def test_drafts_handed_in_as_they_are_become_the_labelers_revision(client, db, site):
    """Submitting the drafts without a save stores them again as the labeler's label revision (what
    review, consensus and exports read); the import stays the revision before it."""
    item = site["items"][0]
    line = {"item": {"id": item}, "shapes": [{"id": "m1", "type": "bbox", "label": "nodule", "frame": 0, "x": 1, "y": 1,
                                              "width": 4, "height": 4}], "classifications": {"quality": "good"}}
    assert _import(client, site, json.dumps(line).encode(), fmt="jsonl").get_json()["tasks"] == 1
    got = lease(client, site["pid"], site["labeler"])
    submitted = client.post(f"/api/v1/tasks/{got['task']['id']}/submit", headers=site["labeler"],
                            json={"version": got["task"]["version"]})
    assert submitted.status_code == 200, submitted.get_json()
    draft, own = _revisions(db, item)
    assert (draft.kind, own.kind, own.author_id is not None) == ("import", "label", True)
    assert (own.shapes, own.classifications) == (draft.shapes, draft.classifications)
    report = client.get(f"/api/v1/projects/{site['pid']}/imports", headers=site["manager"]).get_json()
    assert report["kept_unchanged"]["value"] == 1.0


def test_gold_items_keep_drafts_for_their_hidden_checks_and_tests_get_none(app, client, db, site, clock):
    """An item that is gold holds its drafts on the held-back task; a hidden check on it opens with them
    (so it looks like work), a qualification question without them, and neither sees the reference."""
    from onprem_label.db.models import Project, User
    from onprem_label.workflow import gold

    item = site["items"][0]
    project = db.get(Project, site["pid"])
    manager = db.scalars(select(User).where(User.username == "boss")).one()
    reference = {"shapes": [{"type": "bbox", "label": "nodule", "frame": 0, "x": 9, "y": 9, "width": 3, "height": 3}],
                 "classifications": {"quality": "good"}}
    gold.mark_gold(db, project, item, reference, use="both", actor=manager, now=clock())
    db.commit()
    coco = _coco([item], [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 5, 4]}])
    assert _import(client, site, coco).get_json()["tasks"] == 1
    held = db.scalars(select(Task).where(Task.item_id == item, Task.purpose == "held")).one()
    labeler = db.scalars(select(User).where(User.username == "labeler1")).one()
    conn = db.connection()
    check = gold.new_gold_task(conn, project_id=site["pid"], item_id=item, user_id=labeler.id, purpose="gold",
                               now=clock())
    question = gold.new_gold_task(conn, project_id=site["pid"], item_id=item, user_id=labeler.id,
                                  purpose="qualification", now=clock())
    db.commit()
    by_task = {t: db.execute(select(Annotation.__table__).where(Annotation.task_id == t)).all()
               for t in (held.id, check.id, question.id)}
    db.rollback()
    assert [r.kind for r in by_task[held.id]] == ["import"] and by_task[question.id] == []
    assert [(r.kind, r.source, r.author_id) for r in by_task[check.id]] == [("import", "import:detector-v2", None)]
    assert by_task[check.id][0].shapes == by_task[held.id][0].shapes != reference["shapes"]


def test_one_prediction_per_item_and_a_bad_shape_costs_only_itself(client, db, site):
    """A second JSON Lines line for an item is left out (not a silent replacement); a shape past the edge
    is dropped and counted while the item's other shapes land."""
    item = site["items"][0]
    good = {"id": "ok", "type": "bbox", "label": "nodule", "frame": 0, "x": 1, "y": 1, "width": 4, "height": 4}
    outside = {**good, "id": "out", "x": SIDE - 1, "width": 9}
    lines = [{"item": {"id": item}, "shapes": [good, outside]}, {"item": {"id": item}, "shapes": [good]}]
    summary = _import(client, site, b"\n".join(json.dumps(line).encode() for line in lines), fmt="jsonl").get_json()
    assert (summary["tasks"], summary["shapes"]) == (1, 1)
    assert summary["skipped"] == {"invalid_shape": 1, "duplicate_item": 1}
    assert [s["id"] for s in _revisions(db, item)[0].shapes] == ["ok"]


MALFORMED_COCO = [
    b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's recursion limit
    json.dumps({"images": [], "annotations": [], "categories": 5}).encode(),
    json.dumps({"images": [{"id": [1]}], "annotations": [{"image_id": [1]}], "categories": [{"id": [1], "name": 2}]}).encode(),
    json.dumps({"images": [{"id": 1, "file_name": "item-" + "9" * 5000 + "-frame-0.png"}],
                "annotations": [], "categories": []}).encode(),
]


@pytest.mark.parametrize("body", MALFORMED_COCO + [b"{}"])
def test_malformed_coco_files_are_422s(client, db, site, body):
    """Whatever shape the file takes, the answer is 200 or 422, never a 500, and nothing is attached."""
    answer = _import(client, site, body)
    assert answer.status_code in (200, 422), answer.status_code
    assert all(_revisions(db, item) == [] for item in site["items"])


def test_malformed_coco_entries_are_left_out_one_by_one(client, db, site):
    """Bad ids, scores, polygons, masks and file names skip their own entry; the good box still lands."""
    items = site["items"]
    body = json.loads(_coco(items[:1], []))
    body["images"] += [{"id": [2]}, {"id": 3, "file_name": "item-" + "9" * 40 + "-frame-0.png"}, {"id": 1}]
    body["annotations"] = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]},
        {"image_id": [1], "category_id": 1, "bbox": [1, 1, 3, 3]},
        {"image_id": 1, "category_id": {"a": 1}, "bbox": [1, 1, 3, 3]},
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "score": int("9" * 400)},
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "segmentation": [[1, 1, 5, 1, 5]]},
        {"image_id": 1, "category_id": 1, "bbox": [10 ** 400, 1, 3, 3]},
        {"image_id": 1, "category_id": 2, "bbox": [1, 1, 3, 3], "segmentation": {"size": [SIDE, SIDE],
                                                                               "counts": "o" * 100_000 + "0"}},
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "segmentation": [[[1, 2], [3, 4]]]},
    ]
    answer = _import(client, site, json.dumps(body).encode())
    assert answer.status_code == 200, answer.get_json()
    summary = answer.get_json()
    assert (summary["tasks"], summary["shapes"]) == (1, 1)
    assert summary["skipped"] == {"bad_image": 2, "unknown_image": 2, "unknown_label": 1, "bad_score": 1,
                                  "bad_segmentation": 3, "no_geometry": 1}


@pytest.mark.parametrize("line", [
    {"item": {"sop_instance_uids": 5}, "shapes": []},
    {"item": {"id": 1, "source_digests": 3}, "shapes": []},
    {"item": {"id": 1}, "revisions": 5},
    {"item": {"id": 1}, "shapes": [{"label": [1], "type": "bbox"}, 7]},
    {"item": {"id": 1}, "shapes": {"a": 1}},
    {"item": {"id": 1}, "classifications": [1]},
])
def test_malformed_jsonl_lines_are_left_out(client, db, site, line):
    """A line of wrong types is counted and skipped; the import answers 200."""
    if "id" in line["item"]:
        line = {**line, "item": {**line["item"], "id": site["items"][0]}}
    answer = _import(client, site, json.dumps(line).encode(), fmt="jsonl")
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["tasks"] == 0 and answer.get_json()["skipped"]
    assert _revisions(db, site["items"][0]) == []


def test_an_import_stopped_midway_keeps_its_batches_and_says_so(app, db, site, clock):
    """A reader failing after the first batch: the committed drafts stay and a failure event says how far it got."""
    from onprem_label.db.models import Project
    from onprem_label.exchange.predictions import Prediction
    from onprem_label.workflow import prelabels

    def predictions():
        yield Prediction(where="line 1", item_id=site["items"][0], shapes=[
            {"type": "point", "label": "marker", "frame": 0, "x": 2, "y": 2}])
        raise OSError("the disk went away")

    with pytest.raises(OSError):
        prelabels.attach(db, db.get(Project, site["pid"]), predictions(), name="cut", actor_name="test", now=clock(),
                         batch=1)
    events = db.execute(select(AuditEvent.action, AuditEvent.outcome).where(
        AuditEvent.action.in_(("import:predictions", "annotation:import")))).all()
    db.rollback()
    assert [tuple(e) for e in events] == [("annotation:import", "success"), ("import:predictions", "failure")]
    assert [r.source for r in _revisions(db, site["items"][0])] == ["import:cut"]


def test_kept_unchanged_share_per_import(client, db, site):
    """Of three imported shapes the labeler keeps one, moves one and deletes one: 1/3 kept, with its interval."""
    items = site["items"]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]},
                   {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 3, 3]},
                   {"id": 3, "image_id": 1, "category_id": 1, "bbox": [9, 9, 3, 3]}]
    assert _import(client, site, _coco(items[:1], annotations)).status_code == 200
    got = lease(client, site["pid"], site["labeler"])
    drafts = got["annotation"]["shapes"]
    shapes = [drafts[0], {**drafts[1], "x": 6}]
    saved = client.put(f"/api/v1/tasks/{got['task']['id']}/annotation", headers=site["labeler"],
                       json={"shapes": shapes, "classifications": {"quality": "good"}, "version": got["task"]["version"]})
    report = client.get(f"/api/v1/projects/{site['pid']}/imports", headers=site["manager"]).get_json()
    assert report["imported_shapes"] == 0  # still being labeled: nothing decided yet
    submitted = client.post(f"/api/v1/tasks/{got['task']['id']}/submit", headers=site["labeler"],
                            json={"version": saved.get_json()["task"]["version"]})
    assert submitted.status_code == 200, submitted.get_json()
    report = client.get(f"/api/v1/projects/{site['pid']}/imports", headers=site["manager"]).get_json()
    kept = report["by_source"]["import:detector-v2"]["kept_unchanged"]
    assert (report["tasks"], report["imported_shapes"]) == (1, 3)
    assert (kept["successes"], kept["count"], kept["value"]) == (1, 3, 0.3333)
    assert kept["ci95"][0] < 1 / 3 < kept["ci95"][1]


def test_jsonl_round_trip_into_a_new_project_gives_identical_shapes_and_labels(app, client, db, site, clock):
    """Export JSON Lines -> ingest the same files into a new project -> import: every task's drafts are
    the exported final labels, exactly (matched by de-identified SOP Instance UIDs and picture digests)."""
    shapes_by_item = {}
    for n, item in enumerate(site["items"]):
        shapes_by_item[item] = [{"id": f"s{n}", "type": "bbox", "label": "nodule", "frame": 0, "x": n, "y": 1,
                                 "width": 4, "height": 3},
                                {"id": f"p{n}", "type": "point", "label": "marker", "frame": 0, "x": 2.5, "y": n}]
    while (got := lease(client, site["pid"], site["labeler"])) is not None:
        saved = client.put(f"/api/v1/tasks/{got['task']['id']}/annotation", headers=site["labeler"],
                           json={"shapes": shapes_by_item[got["task"]["item_id"]], "classifications": {"quality": "poor"},
                                 "version": got["task"]["version"]})
        client.post(f"/api/v1/tasks/{got['task']['id']}/submit", headers=site["labeler"],
                    json={"version": saved.get_json()["task"]["version"]})
    label_and_accept_all(client, site["pid"], site["labeler"], site["reviewer"])
    exported = client.get(f"/api/v1/projects/{site['pid']}/export?format=jsonl", headers=site["manager"])
    assert exported.status_code == 200
    lines = [json.loads(line) for line in exported.data.decode().splitlines()[1:]]
    assert len(lines) == 5

    new_pid = _project(client, site["manager"], "Round trip")
    new_items = _ingest(app, db, new_pid, clock)
    answer = client.post(f"/api/v1/projects/{new_pid}/imports?format=jsonl&name=roundtrip", headers=site["manager"],
                         data=exported.data, content_type="application/x-ndjson")
    assert answer.status_code == 200, answer.get_json()
    assert (answer.get_json()["tasks"], answer.get_json()["skipped"]) == (5, {})
    for old, new in zip(site["items"], new_items):
        draft = _revisions(db, new)
        assert len(draft) == 1 and draft[0].kind == "import"
        assert draft[0].shapes == shapes_by_item[old]
        assert draft[0].classifications == {"quality": "poor"}


def test_bad_imports_are_clear_errors_and_change_nothing(client, db, site, make_user, clock):
    """Malformed file, unknown format, a bad name, bad min_score, a results list: 422 naming the field;
    a labeler of the project: 403; no task gets a revision."""
    cases = [(b"{not json", {}, "file"), (b"[]", {}, "file"), (b"{}", {"format": "voc"}, "format"),
             (b"{}", {"name": ""}, "name"), (b"{}", {"name": "a/b"}, "name"), (b"{}", {"name": "model%0A"}, "name"),
             (b"{}", {"min_score": "x"}, "min_score"),
             (b"{}", {"min_score": "2"}, "min_score"), (b'{"images": 3, "annotations": []}', {}, "file"),
             (b'{"images": [], "annotations": []}', {}, "file")]
    for body, args, field in cases:
        answer = _import(client, site, body, **args)
        assert answer.status_code == 422, (body, args, answer.status_code)
        assert answer.get_json()["error"]["errors"][0]["field"] == field
    labeler = client.post(f"/api/v1/projects/{site['pid']}/imports?format=coco&name=x", headers=site["labeler"],
                          data=_coco(site["items"], []))
    assert labeler.status_code == 403
    assert all(_revisions(db, item) == [] for item in site["items"])


@pytest.mark.parametrize("overrides", [{"upload_max_file_bytes": 4096}])
def test_an_oversized_import_is_refused_unread(client, db, site):
    """A body past the upload limit (and its form allowance) is a 413 and nothing is attached."""
    body = _coco(site["items"], [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]}] * 40000)
    assert len(body) > (1 << 20) + 4096
    answer = _import(client, site, body)
    assert answer.status_code == 413
    assert all(_revisions(db, item) == [] for item in site["items"])


def test_cli_import_attaches_drafts_and_reports_what_it_left_out(settings, make_user, clock, tmp_path):
    """`onprem-label import PROJECT FILE --format coco --name N` prints the counts; a bad file exits 1."""
    from onprem_label.app import create_app
    from onprem_label.workflow.projects import create_project

    init_keyring(settings)
    app = create_app(settings, keyring=open_keyring(settings))
    db = app.extensions["onprem_label"].sessionmaker()
    pid = create_project(db, "CLI", label_schema=SCHEMA, actor_name="test", now=clock()).id
    db.commit()
    items = _ingest(app, db, pid, clock)
    path = tmp_path / "predictions.json"
    path.write_bytes(_coco(items, [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 3, 3]},
                                   {"id": 2, "image_id": 2, "category_id": 9, "bbox": [1, 1, 3, 3]}]))
    runner = CliRunner(env={"ONPREM_LABEL_DATABASE_URL": settings.database_url} if settings.database_url else {})
    args = ["--data-dir", str(settings.data_dir), "import", str(pid), str(path), "--format", "coco"]
    done = runner.invoke(cli, args + ["--name", "model7"])
    assert done.exit_code == 0, done.output
    assert "imported 1 shapes onto 1 tasks" in done.output and "1 unknown_label" in done.output
    assert [r.source for r in _revisions(db, items[1])] == ["import:model7"]
    (tmp_path / "bad.json").write_bytes(b"{")
    bad = runner.invoke(cli, args[:3] + [str(pid), str(tmp_path / "bad.json"), "--format", "coco", "--name", "m"])
    assert bad.exit_code == 1 and "not a JSON document" in bad.output
    db.close()
    app.extensions["onprem_label"].engine.dispose()
