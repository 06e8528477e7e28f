"""DICOM SEG and SR exports and images in export zips: read back with highdicom, pydicom and dcmdump."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile

import highdicom as hd
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select

from debian_packages import ensure_program
from imaging_helpers import bearer_for, find_markers, make_dicom, upload
from onprem_label.cli import cli
from onprem_label.db.models import AuditEvent, Item, ItemImage
from onprem_label.exchange import export
from onprem_label.exchange.dicom_source import PRIVATE_SCHEME
from onprem_label.exchange.geometry import rle_pixels
from onprem_label.storage import init_keyring, open_keyring
from test_ingest_api import MARKERS
from workflow_helpers import label_and_submit, lease, team

SIDE = 16
SCHEMA = {"classes": [{"name": "lesion", "color": "#e6194b", "tools": ["bbox", "polygon", "polyline", "point", "mask"]},
                      {"name": "organ", "color": "#3cb44b", "tools": ["mask", "bbox"]}],
          "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"], "required": True}]}
GEOMETRY = {"FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.77", "PixelSpacing": [0.7, 0.7], "SliceThickness": 2.0}


def mask(frame: int, label: str, rows: slice, cols: slice) -> dict:
    """A mask shape on a SIDE x SIDE frame as uncompressed column-major RLE."""
    pixels = np.zeros((SIDE, SIDE), dtype=bool)
    pixels[rows, cols] = True
    flat, counts, value, run = pixels.T.reshape(-1), [], False, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return {"type": "mask", "label": label, "frame": frame, "rle": {"size": [SIDE, SIDE], "counts": counts}}


BOX = {"type": "bbox", "label": "lesion", "frame": 0, "x": 2, "y": 3, "width": 5, "height": 4}
POLYGON = {"type": "polygon", "label": "lesion", "frame": 0, "points": [[1, 1], [9, 2], [5, 8]]}
POLYLINE = {"type": "polyline", "label": "lesion", "frame": 0, "points": [[0.5, 0.5], [10, 12]]}
POINT = {"type": "point", "label": "lesion", "frame": 0, "x": 7.5, "y": 8.25}


def enhanced_ct(study: str) -> bytes:
    """A 3-frame Legacy Converted Enhanced CT (functional groups, a frame of reference) made by highdicom."""
    slices = [pydicom.dcmread(io.BytesIO(make_dicom(study=study, series=study + ".4", rows=SIDE, columns=SIDE,
                                                    z=float(z), number=z + 1, seed=20 + z, **GEOMETRY)))
              for z in range(3)]
    image = hd.legacy.LegacyConvertedEnhancedCTImage(slices, series_instance_uid=hd.UID(), series_number=4,
                                                     sop_instance_uid=hd.UID(), instance_number=1)
    out = io.BytesIO()
    image.save_as(out, enforce_file_format=True)
    return out.getvalue()


def png_bytes() -> bytes:
    """A small RGB picture (not DICOM)."""
    out = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (120, 30, 200)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def keyring(settings):
    """The master key on disk, as the CLI opens it (the suite's usual keyring lives in memory)."""
    init_keyring(settings)
    return open_keyring(settings)


@pytest.fixture
def dicom_project(app, client, db, make_user, clock):
    """Accepted work on five items: a 3-slice stack (masks on slices 0 and 2, a box on 1), one instance
    (box, polygon, polyline, point), two 3-frame instances, an enhanced CT and a CT without a frame of
    reference (each: masks on frames 0 and 2, a box on 1), and a PNG (box, mask)."""
    manager = bearer_for(db, make_user("mgr", "manager"), clock)
    project = client.post("/api/v1/projects", headers=manager, json={
        "name": "Seg", "label_schema": SCHEMA, "settings": {"spot_check_rate": 0.0, "stack_series": True}}).get_json()["id"]
    study = "1.2.826.0.1.3680043.8.498.5"
    files = [(f"s{z}.dcm", make_dicom(study=study, series=study + ".1", rows=SIDE, columns=SIDE, z=float(z),
                                      number=z + 1, seed=z, **GEOMETRY)) for z in range(3)]
    files += [("one.dcm", make_dicom(study=study, series=study + ".2", rows=SIDE, columns=SIDE, seed=7)),
              ("multi.dcm", make_dicom(study=study, series=study + ".3", rows=SIDE, columns=SIDE, frames=3, seed=8)),
              ("enhanced.dcm", enhanced_ct(study)),
              ("picture.png", png_bytes())]
    answer = upload(client, project, files, manager)
    assert answer.status_code in (200, 201, 207), answer.get_json()
    shapes = {}
    for item in db.scalars(select(Item).where(Item.project_id == project)):
        if item.kind == "raster":
            shapes[item.id] = [BOX, mask(0, "organ", slice(1, 4), slice(2, 6))]
        elif len(item.images) == 3:
            shapes[item.id] = [mask(0, "organ", slice(2, 5), slice(3, 6)), {**BOX, "frame": 1},
                               mask(2, "lesion", slice(8, 12), slice(0, 3)), mask(2, "organ", slice(0, 2), slice(0, 16))]
        elif item.frames == 3:
            shapes[item.id] = [mask(0, "organ", slice(0, 3), slice(0, 3)), {**BOX, "frame": 1},
                               mask(2, "organ", slice(4, 9), slice(4, 9))]
        else:
            shapes[item.id] = [BOX, POLYGON, POLYLINE, POINT]
    assert len(shapes) == 5
    db.commit()
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=1)
    while (got := lease(client, project, people["labeler1"])) is not None:
        label_and_submit(client, got["task"], people["labeler1"], shapes[got["task"]["item_id"]])
    while (got := lease(client, project, people["reviewer1"], "review")) is not None:
        assert client.post(f"/api/v1/tasks/{got['task']['id']}/review", headers=people["reviewer1"], json={
            "decision": "accept", "version": got["task"]["version"]}).status_code == 200
    return project, manager, shapes


def one_accepted_item(client, db, make_user, clock, name: str, content: bytes, shapes: list[dict],
                      schema: dict = SCHEMA) -> tuple[int, dict]:
    """A project with one uploaded file (its pixel check cleared) labelled with `shapes` and accepted;
    (project id, the manager's headers)."""
    manager = bearer_for(db, make_user("pm", "manager"), clock)
    project = client.post("/api/v1/projects", headers=manager, json={
        "name": name, "label_schema": schema, "settings": {"spot_check_rate": 0.0}}).get_json()["id"]
    item = upload(client, project, [(name, content)], manager).get_json()["results"][0]["item_id"]
    # A secondary capture may carry burned-in text: ingest holds it until a manager has looked.
    assert client.post(f"/api/v1/items/{item}/pixel-check", headers=manager).status_code == 200
    people = team(client, db, make_user, clock, manager, project, labelers=1, reviewers=1)
    got = lease(client, project, people["labeler1"])
    label_and_submit(client, got["task"], people["labeler1"], shapes)
    got = lease(client, project, people["reviewer1"], "review")
    assert client.post(f"/api/v1/tasks/{got['task']['id']}/review", headers=people["reviewer1"],
                       json={"decision": "accept", "version": got["task"]["version"]}).status_code == 200
    return project, manager


def download(client, project: int, headers: dict, query: str) -> zipfile.ZipFile:
    """The export as an open zip (asserting a 200)."""
    response = client.get(f"/api/v1/projects/{project}/export?{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    assert response.mimetype == "application/zip"
    return zipfile.ZipFile(io.BytesIO(response.get_data()))


def dcmdump_reads(archive: zipfile.ZipFile, tmp_path) -> None:
    """dcmdump reads every .dcm in the zip without an error; dcmtk's SR parser (dsrdump) reads every SR
    without an error or a warning (it checks the document's content tree)."""
    program = ensure_program("/usr/bin/dcmdump", "dcmtk")
    for name in archive.namelist():
        if name.endswith(".dcm"):
            path = tmp_path / name.replace("/", "_")
            path.write_bytes(archive.read(name))
            run = subprocess.run([program, "-q", str(path)], capture_output=True, text=True)
            assert run.returncode == 0 and "E:" not in run.stderr, (name, run.stderr)
            if name.startswith("sr/"):
                run = subprocess.run([ensure_program("/usr/bin/dsrdump", "dcmtk"), str(path)],
                                     capture_output=True, text=True)
                # dcmtk's VR checker knows no UTF-8 and says so: not a fault of the file.
                said = [line for line in run.stderr.splitlines() if "not support this Specific Character Set" not in line]
                assert run.returncode == 0 and not said, (name, run.stderr)


def instances(db, item_id: int) -> list[str]:
    """The item's de-identified SOP Instance UIDs in frame order, as the database holds them."""
    return list(db.scalars(select(ItemImage.instance_uid).where(ItemImage.item_id == item_id)
                           .order_by(ItemImage.position)))


def test_dicom_seg_holds_the_masks_on_the_deidentified_instances(client, db, dicom_project, tmp_path):
    """One SEG per task with masks: segments per class with our local codes, the referenced SOP instances
    are the de-identified ones in the database, pixels equal the stored masks; pictures are counted."""
    project, manager, shapes = dicom_project
    archive = download(client, project, manager, "format=dicom-seg")
    info = json.loads(archive.read("info.json"))
    files = [n for n in archive.namelist() if n.endswith(".dcm")]
    # The 3-frame CT instance has no frame of reference, which highdicom requires of a CT source.
    assert info["files"] == {"written": 2, "no_shapes": 1, "not_dicom": 1, "unsupported": 1}
    assert "Frame Of Reference" in info["unsupported"][0]["reason"] and info["coding_scheme"] == PRIVATE_SCHEME
    assert len(files) == 2
    dcmdump_reads(archive, tmp_path)
    stack = next(i for i in db.scalars(select(Item).where(Item.project_id == project)) if len(i.images) == 3)
    uids = instances(db, stack.id)
    seen = set()
    for name in files:
        raw = archive.read(name)
        seg = hd.seg.segread(io.BytesIO(raw))
        plain = pydicom.dcmread(io.BytesIO(raw))
        assert plain.Modality == "SEG" and plain.PatientIdentityRemoved == "YES"
        referenced = [sop for _, _, sop in seg.get_source_image_uids()]
        if referenced[0] not in uids:  # the enhanced CT: one instance, masks on frames 1 and 3 of it
            item = db.scalar(select(ItemImage.item_id).where(ItemImage.instance_uid == referenced[0]))
            assert referenced == instances(db, item) and seg.FrameOfReferenceUID
            assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ"]
            pixels = seg.get_pixels_by_source_frame(referenced[0], source_frame_numbers=[1, 2, 3], segment_numbers=[1])
            assert np.array_equal(pixels[0, :, :, 0], rle_pixels(shapes[item][0]["rle"])) and not pixels[1].any()
            assert np.array_equal(pixels[2, :, :, 0], rle_pixels(shapes[item][2]["rle"]))
            seen.add("enhanced")
            continue
        seen.add("stack")
        assert sorted(referenced) == sorted([uids[0], uids[2]])
        assert seg.StudyInstanceUID == stack.study_uid and seg.FrameOfReferenceUID
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion", "organ"]
        assert {(c.CodeValue, c.CodingSchemeDesignator) for s in seg.SegmentSequence
                for c in s.SegmentedPropertyTypeCodeSequence} == {("lesion", PRIVATE_SCHEME), ("organ", PRIVATE_SCHEME)}
        pixels = seg.get_pixels_by_source_instance([uids[0], uids[2]], segment_numbers=[1, 2])
        stored = shapes[stack.id]
        assert np.array_equal(pixels[0, :, :, 1], rle_pixels(stored[0]["rle"])) and not pixels[0, :, :, 0].any()
        assert np.array_equal(pixels[1, :, :, 0], rle_pixels(stored[2]["rle"]))
        assert np.array_equal(pixels[1, :, :, 1], rle_pixels(stored[3]["rle"]))
    assert seen == {"stack", "enhanced"}


def test_dicom_sr_holds_every_box_point_and_line_on_its_instance(client, db, dicom_project, tmp_path):
    """One TID 1500 report per task with boxes, points or lines: each shape a planar ROI on the right
    de-identified instance and frame, its coordinates the stored ones, its finding the class's code."""
    project, manager, shapes = dicom_project
    archive = download(client, project, manager, "format=dicom-sr")
    info = json.loads(archive.read("info.json"))
    assert info["files"] == {"written": 4, "no_shapes": 0, "not_dicom": 1, "unsupported": 0}
    dcmdump_reads(archive, tmp_path)
    by_item = {}
    for name in (n for n in archive.namelist() if n.endswith(".dcm")):
        sr = hd.sr.srread(io.BytesIO(archive.read(name)))
        assert sr.PatientIdentityRemoved == "YES"
        groups = sr.content.get_planar_roi_measurement_groups()
        refs = [g.roi.ContentSequence[0].ReferencedSOPSequence[0] for g in groups]
        item = db.scalar(select(ItemImage.item_id).where(ItemImage.instance_uid == refs[0].ReferencedSOPInstanceUID))
        by_item[item] = (sr, groups, refs)
    assert sorted(by_item) == sorted(i for i in shapes if shapes[i] != [BOX, mask(0, "organ", slice(1, 4), slice(2, 6))])
    for item_id, (sr, groups, refs) in by_item.items():
        uids = instances(db, item_id)
        expected = [s for s in shapes[item_id] if s["type"] != "mask"]
        assert len(groups) == len(expected)
        assert sr.StudyInstanceUID == db.get(Item, item_id).study_uid
        for group, ref, shape in zip(groups, refs, expected):
            assert (group.finding_type.value, group.finding_type.scheme_designator) == ("lesion", PRIVATE_SCHEME)
            data = np.asarray(group.roi.value, dtype=float)
            if shape["type"] == "point":
                assert group.roi.graphic_type.value == "POINT" and data.tolist() == [[shape["x"], shape["y"]]]
            elif shape["type"] == "bbox":
                x, y, w, h = shape["x"], shape["y"], shape["width"], shape["height"]
                assert data.tolist() == [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
            elif shape["type"] == "polygon":
                assert data.tolist() == shape["points"] + shape["points"][:1]
            else:
                assert data.tolist() == shape["points"]
            if len(uids) == 3:  # the stack: the box is on slice 1
                assert ref.ReferencedSOPInstanceUID == uids[shape["frame"]] and "ReferencedFrameNumber" not in ref
            elif db.get(Item, item_id).frames == 3:  # the multi-frame instance: frame 1 is frame number 2
                assert ref.ReferencedSOPInstanceUID == uids[0] and int(ref.ReferencedFrameNumber) == 2
            else:
                assert ref.ReferencedSOPInstanceUID == uids[0]


def test_images_ride_along_as_png_or_deidentified_dicom(client, db, dicom_project, tmp_path):
    """images=png puts a PNG of the item's size per exported frame under the label files' names;
    images=dicom the de-identified files as stored (pictures counted); each export audits its image read."""
    project, manager, shapes = dicom_project
    archive = download(client, project, manager, "format=yolo&images=png")
    labels = {n[len("labels/"):-4] for n in archive.namelist() if n.startswith("labels/")}
    pictures = {n[len("images/"):-4] for n in archive.namelist() if n.endswith(".png")}
    assert labels == pictures and len(pictures) == 3 + 1 + 3 + 3 + 1
    for name in archive.namelist():
        if name.endswith(".png"):
            with Image.open(io.BytesIO(archive.read(name))) as image:
                assert image.size == (SIDE, SIDE)
    assert json.loads(archive.read("images/index.json"))["written"] == 11
    named = client.get(f"/api/v1/projects/{project}/export?format=csv&images=png", headers=manager)
    assert named.headers["Content-Disposition"].endswith('-csv.zip"') and named.mimetype == "application/zip"
    assert zipfile.ZipFile(io.BytesIO(named.get_data())).namelist()[0] == "labels.csv"
    coco = download(client, project, manager, "format=coco&images=png")
    names = {i["file_name"] for i in json.loads(coco.read("labels.json"))["images"]}
    assert {"images/" + n for n in names} <= set(coco.namelist())
    dicoms = download(client, project, manager, "format=csv&images=dicom")
    assert "labels.csv" in dicoms.namelist()
    stored = {uid for item in shapes for uid in instances(db, item) if uid}
    files = {n[len("images/"):-4]: dicoms.read(n) for n in dicoms.namelist() if n.endswith(".dcm")}
    assert set(files) == stored and json.loads(dicoms.read("images/index.json"))["not_dicom"] == 1
    for uid, raw in files.items():
        ds = pydicom.dcmread(io.BytesIO(raw))
        assert ds.SOPInstanceUID == uid and ds.PatientIdentityRemoved == "YES"
    dcmdump_reads(dicoms, tmp_path)
    reads = db.scalars(select(AuditEvent).where(AuditEvent.action == "image:read", AuditEvent.object_type == "project")
                       .order_by(AuditEvent.id)).all()
    assert [(e.details["export"], e.details["what"]) for e in reads][-4:] == [
        ("yolo", "png"), ("csv", "png"), ("coco", "png"), ("csv", "dicom")]
    assert reads[-1].details["frames"] == {"dicom": 10, "raster": 1} and reads[-1].details["tasks"] == 5
    db.commit()


def test_no_dicom_export_or_image_zip_holds_anything_identifying(client, db, dicom_project):
    """Issue 4's byte search over the SEG and SR zips and the zips with images: no marker of the
    ingested patient, institution or physician leaves (headers are the de-identified ones)."""
    project, manager, _ = dicom_project
    for query in ("format=dicom-seg", "format=dicom-sr", "format=coco&images=dicom", "format=voc&images=png",
                  "format=jsonl&images=dicom", "format=dicom-seg&images=dicom"):
        archive = download(client, project, manager, query)
        data = b"".join(archive.read(name) for name in archive.namelist())
        assert find_markers(data, MARKERS) == [], query


def test_bad_images_value_and_pictures_only_projects_are_answered_not_crashed(client, db, make_user, clock):
    """images=tiff is a 422 naming `images`; a project of pictures asked for dicom-seg gets a zip with
    only info.json saying every task was left out as not DICOM."""
    project, manager = one_accepted_item(client, db, make_user, clock, "a.png", png_bytes(),
                                         [mask(0, "organ", slice(0, 3), slice(0, 3)), BOX])
    bad = client.get(f"/api/v1/projects/{project}/export?format=coco&images=tiff", headers=manager)
    assert bad.status_code == 422 and bad.get_json()["error"]["errors"][0]["field"] == "images"
    for fmt in export.DICOM:
        archive = download(client, project, manager, f"format={fmt}")
        assert archive.namelist() == ["info.json"]
        assert json.loads(archive.read("info.json"))["files"]["not_dicom"] == 1


def test_the_cli_writes_dicom_exports_with_images(app, db, dicom_project, settings, tmp_path):
    """`export --format dicom-sr --images dicom` writes one zip with the reports and the files; a bad
    --images value is refused by name."""
    env = {"ONPREM_LABEL_DATABASE_URL": settings.database_url} if settings.database_url else {}
    out = tmp_path / "sr.zip"
    result = CliRunner().invoke(cli, ["--data-dir", str(settings.data_path), "export", "Seg", "--format", "dicom-sr",
                                      "--images", "dicom", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert "exported 5 tasks" in result.output and "with dicom images" in result.output
    names = zipfile.ZipFile(out).namelist()
    assert sum(n.startswith("sr/") for n in names) == 4 and sum(n.startswith("images/") for n in names) == 3 + 1 + 1 + 1 + 1
    bad = CliRunner().invoke(cli, ["--data-dir", str(settings.data_path), "export", "Seg", "--format", "coco",
                                   "--images", "tiff", "--out", str(out)], env=env)
    assert bad.exit_code != 0 and "--images" in bad.output


def test_a_missing_stored_image_is_counted_not_a_broken_export(app, client, db, dicom_project):
    """With one instance's encrypted file gone, SR and image zips still arrive whole: the task is listed as
    unsupported with the reason, and its frames counted as unreadable."""
    project, manager, shapes = dicom_project
    single = next(i for i in shapes if db.get(Item, i).kind == "dicom" and db.get(Item, i).frames == 1)
    blob = db.scalar(select(ItemImage.blob_id).where(ItemImage.item_id == single))
    db.commit()
    app.extensions["onprem_label"].store.path_of(blob).unlink()
    info = json.loads(download(client, project, manager, "format=dicom-sr").read("info.json"))
    assert info["files"]["unsupported"] == 1 and "could not be read" in info["unsupported"][0]["reason"]
    for kind in ("png", "dicom"):
        index = json.loads(download(client, project, manager, f"format=csv&images={kind}").read("images/index.json"))
        assert index["unreadable"] == 1, kind


def test_a_secondary_capture_without_frame_of_reference_gets_its_seg(client, db, make_user, clock, tmp_path):
    """A single-frame image whose IOD needs no frame of reference (Secondary Capture) is segmented on its
    pixel matrix: the SEG references it and holds the mask."""
    from pydicom.uid import SecondaryCaptureImageStorage

    capture = make_dicom(rows=SIDE, columns=SIDE, modality="OT", SOPClassUID=SecondaryCaptureImageStorage)
    drawn = mask(0, "organ", slice(5, 9), slice(1, 15))
    project, manager = one_accepted_item(client, db, make_user, clock, "sc.dcm", capture, [drawn])
    archive = download(client, project, manager, "format=dicom-seg")
    info = json.loads(archive.read("info.json"))
    assert info["files"]["written"] == 1, (info["files"], info["unsupported"])
    dcmdump_reads(archive, tmp_path)
    seg = hd.seg.segread(io.BytesIO(archive.read(next(n for n in archive.namelist() if n.endswith(".dcm")))))
    uid = db.scalar(select(ItemImage.instance_uid).join(Item).where(Item.project_id == project))
    assert [sop for _, _, sop in seg.get_source_image_uids()] == [uid] and "FrameOfReferenceUID" not in seg
    pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[1])
    assert np.array_equal(pixels[0, :, :, 0], rle_pixels(drawn["rle"]))


def test_class_names_in_any_script_survive_as_utf8_codes(client, db, make_user, clock, tmp_path):
    """A class name with non-ASCII letters or a backslash is the meaning (UTF-8) of a stable hashed code
    value; segment labels and findings read back as the name, and dcmdump reads the files."""
    names = ["Läsion \\ groß", "結節"]
    schema = {"classes": [{"name": names[0], "color": "#e6194b", "tools": ["mask"]},
                          {"name": names[1], "color": "#3cb44b", "tools": ["point"]}],
              "questions": SCHEMA["questions"]}
    shapes = [mask(0, names[0], slice(1, 4), slice(1, 4)), {**POINT, "label": names[1]}]
    source = make_dicom(rows=SIDE, columns=SIDE, **GEOMETRY)
    project, manager = one_accepted_item(client, db, make_user, clock, "one.dcm", source, shapes, schema)
    seg_zip, sr_zip = (download(client, project, manager, f"format={fmt}") for fmt in export.DICOM)
    for archive in (seg_zip, sr_zip):
        dcmdump_reads(archive, tmp_path)
        assert json.loads(archive.read("info.json"))["files"]["written"] == 1
    seg = hd.seg.segread(io.BytesIO(seg_zip.read(next(n for n in seg_zip.namelist() if n.endswith(".dcm")))))
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Läsion / groß" and seg.SpecificCharacterSet == "ISO_IR 192"
    code = segment.SegmentedPropertyTypeCodeSequence[0]
    assert code.CodeMeaning == "Läsion / groß" and code.CodeValue.startswith("C") and len(code.CodeValue) == 16
    sr = hd.sr.srread(io.BytesIO(sr_zip.read(next(n for n in sr_zip.namelist() if n.endswith(".dcm")))))
    finding = sr.content.get_planar_roi_measurement_groups()[0].finding_type
    assert finding.meaning == "結節" and finding.scheme_designator == PRIVATE_SCHEME
