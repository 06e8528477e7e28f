"""Exports (COCO, YOLO, VOC, CSV, JSON Lines): each parses with its own readers and matches the database."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from xml.etree import ElementTree

import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools.coco import COCO
from sqlalchemy import select, update

from onprem_label.app import create_app
from onprem_label.cli import cli
from onprem_label.db.models import AuditEvent, Item, Task
from onprem_label.db.engine import read_connection
from onprem_label.exchange import export
from onprem_label.exchange.geometry import area, bounds, rle_pixels
from onprem_label.exchange.selection import ExportFilter, parse_filter
from onprem_label.storage import init_keyring, open_keyring
from onprem_label.workflow.members import add_member
from onprem_label.workflow.projects import create_project
from quality_helpers import add_items, label_next, review_next

SCHEMA = {"classes": [{"name": "nodule", "color": "#e6194b", "tools": ["bbox", "polygon"]},
                      {"name": "organ", "color": "#3cb44b", "tools": ["mask"]},
                      {"name": "marker", "color": "#4363d8", "tools": ["point"]}],
          "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"], "required": True}]}
BOX = {"type": "bbox", "label": "nodule", "frame": 0, "x": 4, "y": 6, "width": 20, "height": 10}
POLYGON = {"type": "polygon", "label": "nodule", "frame": 0, "points": [[10, 10], [40, 12], [30, 40]]}
# A 64 x 64 mask: counts column-major, starting with zeros (rows 2..5 of columns 3..4 set).
MASK = {"type": "mask", "label": "organ", "frame": 0,
        "rle": {"size": [64, 64], "counts": [3 * 64 + 2, 4, 60, 4, 64 * 64 - 3 * 64 - 2 - 4 - 60 - 4]}}
POINT = {"type": "point", "label": "marker", "frame": 0, "x": 30, "y": 31}
ANSWERS = [[BOX], [POLYGON], [MASK], [POINT, {**BOX, "x": 30}]]


@pytest.fixture
def keyed(settings):
    """The app on a data directory whose key is on disk (the CLI opens it)."""
    init_keyring(settings)
    app = create_app(settings, keyring=open_keyring(settings))
    yield app
    app.extensions["onprem_label"].engine.dispose()


@pytest.fixture
def project(keyed, make_user, clock):
    """Four accepted tasks (box; polygon rejected once; mask; point and box), one submitted, one accepted
    but held for a pixel check; the project row."""
    db = keyed.extensions["onprem_label"].sessionmaker()
    manager, labeler, reviewer = make_user("boss", "manager"), make_user("lab", "labeler"), make_user("rev", "reviewer")
    made = create_project(db, "Export", label_schema=SCHEMA, actor=manager, now=clock(),
                          settings={"hidden_gold_rate": 0.0, "spot_check_rate": 0.0})
    add_member(db, made, "lab", "labeler", actor=manager, now=clock())
    add_member(db, made, "rev", "reviewer", actor=manager, now=clock())
    db.commit()
    items = add_items(db, made, 6, clock)
    answers = dict(zip(items, ANSWERS + [[BOX], [BOX]]))
    rejected = set()

    def decide(task, latest):
        if task.item_id == items[1] and task.item_id not in rejected:
            rejected.add(task.item_id)
            return "reject", "tighter"
        return "accept", ""

    while label_next(db, made, labeler, lambda t: {"shapes": answers[t.item_id],
                                                   "classifications": {"quality": "good"}}, clock):
        while review_next(db, made, reviewer, decide, clock):
            pass
    # Item 4 as if still waiting for its review; item 5 suspected of burned-in text.
    db.execute(update(Task).where(Task.item_id == items[4]).values(state="submitted", accepted_at=None))
    db.execute(update(Item).where(Item.id == items[5]).values(needs_pixel_check=True))
    db.commit()
    yield made, items, db
    db.close()


def run_export(app, project, fmt: str, **flt) -> tuple[bytes, dict]:
    """The whole export in memory, and its counts."""
    engine = app.extensions["onprem_label"].engine
    db = app.extensions["onprem_label"].sessionmaker()
    chosen = parse_filter(flt) if flt else ExportFilter()
    try:
        with read_connection(engine) as conn:
            counts = export.begin(db, conn, project, fmt, chosen, now=app.extensions["onprem_label"].clock())
        db.commit()
        with read_connection(engine) as conn:
            data = b"".join(export.chunks(conn, project, fmt, chosen, counts, now=app.extensions["onprem_label"].clock()))
    finally:
        db.close()
    return data, counts


# pycocotools' mask decoding predates NumPy 2's copy keyword; the warning is theirs, not ours.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_loads_with_pycocotools_and_matches_the_database(keyed, project, tmp_path):
    """Boxes, polygons and masks as COCO annotations on the right images; points skipped and counted."""
    made, items, _ = project
    data, counts = run_export(keyed, made, "coco")
    assert counts == {"tasks": 4, "withheld_pixel_check": 1}
    (tmp_path / "coco.json").write_bytes(data)
    coco = COCO(str(tmp_path / "coco.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert list(names.values()) == ["nodule", "organ", "marker"]
    image_of = {img["onprem_label"]["item_id"]: img for img in coco.loadImgs(coco.getImgIds())}
    assert sorted(image_of) == items[:4] and all(i["width"] == 64 for i in image_of.values())
    anns = coco.loadAnns(coco.getAnnIds())
    got = sorted((next(k for k, v in image_of.items() if v["id"] == a["image_id"]), names[a["category_id"]],
                  tuple(a["bbox"])) for a in anns)
    expected = sorted((item, s["label"], bounds(s)) for item, shapes in zip(items, ANSWERS) for s in shapes
                      if s["type"] != "point")
    assert got == expected
    mask_ann = next(a for a in anns if names[a["category_id"]] == "organ")
    assert np.array_equal(coco.annToMask(mask_ann).astype(bool), rle_pixels(MASK["rle"]))
    polygon_ann = next(a for a in anns if a["segmentation"] and a["bbox"] == list(bounds(POLYGON)))
    assert coco.annToMask(polygon_ann).sum() > 0
    assert json.loads(data)["skipped_shapes"] == 1  # the point
    assert {a["iscrowd"] for a in anns} == {0}  # every shape one object to learn and score


def test_yolo_and_voc_files_parse_and_match(keyed, project):
    """YOLO: data.yaml names and one normalised box line per shape; VOC: one XML per frame with bndboxes."""
    made, items, _ = project
    data, _ = run_export(keyed, made, "yolo")
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert "nc: 3" in archive.read("data.yaml").decode() and '  1: "organ"' in archive.read("data.yaml").decode()
    line = archive.read(f"labels/item-{items[0]}-frame-0000.txt").decode().split()
    assert line[0] == "0" and [float(v) for v in line[1:]] == pytest.approx([14 / 64, 11 / 64, 20 / 64, 10 / 64])
    mask_line = archive.read(f"labels/item-{items[2]}-frame-0000.txt").decode().split()
    assert mask_line[0] == "1" and [float(v) for v in mask_line[1:]] == pytest.approx([4 / 64, 4 / 64, 2 / 64, 4 / 64])
    assert len(archive.read(f"labels/item-{items[3]}-frame-0000.txt").decode().splitlines()) == 1  # no point line
    voc = zipfile.ZipFile(io.BytesIO(run_export(keyed, made, "voc")[0]))
    root = ElementTree.fromstring(voc.read(f"Annotations/item-{items[0]}-frame-0000.xml"))
    box = root.find("object/bndbox")
    assert root.find("object/name").text == "nodule"
    assert [int(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")] == [5, 7, 24, 16]
    assert sorted(voc.namelist()) == sorted(f"Annotations/item-{i}-frame-0000.xml" for i in items[:4])


def test_csv_round_trips_through_the_csv_module(keyed, project):
    """One row per shape whose cells read back as the stored shapes."""
    made, items, _ = project
    data, _ = run_export(keyed, made, "csv")
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    assert len(rows) == 5
    by_item = {}
    for row in rows:
        by_item.setdefault(int(row["item_id"]), []).append(row)
    box = by_item[items[0]][0]
    assert (box["type"], box["label"], float(box["x"]), float(box["width"])) == ("bbox", "nodule", 4.0, 20.0)
    assert json.loads(by_item[items[1]][0]["points"]) == POLYGON["points"]
    assert json.loads(by_item[items[2]][0]["rle"]) == MASK["rle"]
    assert json.loads(box["classifications"]) == {"quality": "good"}


def test_jsonl_holds_every_revision_and_review(keyed, project):
    """The rejected-then-accepted task has both revisions and both decisions, and names the final one."""
    made, items, _ = project
    lines = [json.loads(line) for line in run_export(keyed, made, "jsonl")[0].decode().splitlines()]
    assert lines[0]["onprem_label_export"] == 1 and lines[0]["label_schema"] == made.label_schema
    reworked = next(line for line in lines[1:] if line["item"]["id"] == items[1])
    assert [r["decision"] for r in reworked["reviews"]] == ["reject", "accept"]
    assert len(reworked["revisions"]) == 2 and reworked["final_revision"] == 2
    assert reworked["revisions"][-1]["shapes"] == [POLYGON]


def test_a_date_past_the_calendar_is_a_filter_error_not_a_crash():
    """until=9999-12-31 names the parameter instead of overflowing."""
    from onprem_label.exchange.selection import FilterError

    with pytest.raises(FilterError) as caught:
        parse_filter({"until": "9999-12-31"})
    assert caught.value.field == "until"


def test_consensus_copies_get_their_own_file_names(keyed, project):
    """Two labelers' copies of one item never share a COCO file name or a zip member."""
    made, items, db = project
    db.execute(update(Task).where(Task.item_id == items[0]).values(slot=1))  # as if it were copy 1
    db.commit()
    names = {img["file_name"] for img in json.loads(run_export(keyed, made, "coco")[0])["images"]}
    assert f"item-{items[0]}-copy-1-frame-0000.png" in names
    members = zipfile.ZipFile(io.BytesIO(run_export(keyed, made, "yolo")[0])).namelist()
    assert f"labels/item-{items[0]}-copy-1-frame-0000.txt" in members


def test_filters_by_state_label_and_date(keyed, project, clock):
    """state, label and since/until narrow what leaves; the withheld item never does."""
    made, items, _ = project
    rows = list(csv.DictReader(io.StringIO(run_export(keyed, made, "csv", label="organ")[0].decode())))
    assert {r["label"] for r in rows if r["type"]} == {"organ"}
    lines = run_export(keyed, made, "jsonl", label="organ")[0].decode().splitlines()[1:]
    assert {s["label"] for line in lines for r in json.loads(line)["revisions"] for s in r["shapes"]} == {"organ"}
    waiting = list(csv.DictReader(io.StringIO(run_export(keyed, made, "csv", state="submitted")[0].decode())))
    assert {int(r["item_id"]) for r in waiting} == {items[4]}
    later = (clock() + __import__("datetime").timedelta(days=2)).date().isoformat()
    assert run_export(keyed, made, "csv", since=later)[1]["tasks"] == 0
    every = list(csv.DictReader(io.StringIO(run_export(keyed, made, "csv", state="accepted,submitted")[0].decode())))
    assert items[5] not in {int(r["item_id"]) for r in every}


def test_the_api_streams_an_audited_export_and_refuses_bad_requests(keyed, project):
    """Managers download it with the counts in the headers and in the audit event; others cannot;
    a bad format or date is 422 naming it."""
    from imaging_helpers import bearer_for

    made, items, db = project
    client = keyed.test_client()
    clock = keyed.extensions["onprem_label"].clock
    from onprem_label.db.models import User
    manager = bearer_for(db, db.scalar(select(User).where(User.username == "boss")), clock)
    labeler = bearer_for(db, db.scalar(select(User).where(User.username == "lab")), clock)
    response = client.get(f"/api/v1/projects/{made.id}/export?format=coco", headers=manager)
    assert response.status_code == 200 and response.headers["X-Export-Tasks"] == "4"
    assert "attachment" in response.headers["Content-Disposition"]
    assert len(json.loads(response.get_data())["images"]) == 4
    event = db.scalars(select(AuditEvent).where(AuditEvent.action == "export:project")
                       .order_by(AuditEvent.id.desc())).first()
    db.commit()
    assert event.details["tasks"] == 4 and event.details["withheld_pixel_check"] == 1 and event.details["format"] == "coco"
    assert client.get(f"/api/v1/projects/{made.id}/export?format=coco", headers=labeler).status_code == 403
    for query, field in (("format=xlsx", "format"), ("format=csv&since=yesterday", "since"),
                         ("format=csv&state=done", "state")):
        bad = client.get(f"/api/v1/projects/{made.id}/export?{query}", headers=manager)
        assert bad.status_code == 422 and bad.get_json()["error"]["errors"][0]["field"] == field


def test_the_cli_writes_the_export_whole_and_names_mistakes(keyed, project, settings, tmp_path):
    """`onprem-label export` writes the file (progress on stderr, a summary line) and refuses bad input."""
    made, items, _ = project
    env = {"ONPREM_LABEL_DATABASE_URL": settings.database_url} if settings.database_url else {}
    out = tmp_path / "labels.csv"
    result = CliRunner().invoke(cli, ["--data-dir", str(settings.data_path), "export", "Export", "--format", "csv",
                                      "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert "exported 4 tasks" in result.output and "1 held back" in result.output
    assert len(list(csv.DictReader(io.StringIO(out.read_text())))) == 5
    assert not (tmp_path / "labels.csv.partial").exists()
    bad = CliRunner().invoke(cli, ["--data-dir", str(settings.data_path), "export", "Export", "--format", "csv",
                                   "--out", str(out), "--since", "soon"], env=env)
    assert bad.exit_code != 0 and "--since" in bad.output
    missing = CliRunner().invoke(cli, ["--data-dir", str(settings.data_path), "export", "Nope", "--format", "csv",
                                       "--out", str(out)], env=env)
    assert missing.exit_code != 0 and "Nope" in missing.output


def test_no_export_holds_anything_identifying(app, client, db, make_user, clock):
    """Issue 4's byte search over every export format: a DICOM ingested with a patient's name, id,
    accession number, institution and physician leaves in none of them."""
    from imaging_helpers import bearer_for, find_markers
    from test_ingest_api import MARKERS
    from workflow_helpers import SCHEMA as API_SCHEMA, ingest_items, label_and_accept_all, team

    manager = bearer_for(db, make_user("mgr", "manager"), clock)
    project = client.post("/api/v1/projects", headers=manager, json={
        "name": "Markers", "label_schema": API_SCHEMA, "settings": {"spot_check_rate": 0.0}}).get_json()["id"]
    ingest_items(app, db, project, 2, clock)
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=1)
    label_and_accept_all(client, project, people["labeler1"], people["reviewer1"])
    for fmt in export.FORMATS:
        response = client.get(f"/api/v1/projects/{project}/export?format={fmt}", headers=manager)
        assert response.status_code == 200 and response.headers["X-Export-Tasks"] == "2", fmt
        data = response.get_data()
        if response.mimetype == "application/zip":  # yolo, voc, dicom-seg, dicom-sr: compressed inside
            archive = zipfile.ZipFile(io.BytesIO(data))
            data = b"".join(archive.read(name) for name in archive.namelist())
        assert find_markers(data, MARKERS) == [], fmt


def test_mask_bounds_and_area_from_runs_equal_the_drawn_mask():
    """Bounds and area read off the runs equal those of the mask drawn pixel by pixel (runs crossing columns too)."""
    rng = np.random.default_rng(11)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        pixels = rng.random((h, w)) < rng.choice([0.02, 0.3, 0.9])
        flat = pixels.T.reshape(-1)  # column-major, as COCO counts
        counts, value, run = [], False, 0
        for p in flat:
            if p != value:
                counts.append(run)
                value, run = not value, 0
            run += 1
        counts.append(run)
        shape = {"type": "mask", "rle": {"size": [h, w], "counts": counts}}
        rows, cols = np.nonzero(pixels)
        expected = None if not len(rows) else (float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1),
                                                float(rows.max() - rows.min() + 1))
        assert bounds(shape) == expected
        assert area(shape) == float(pixels.sum())
