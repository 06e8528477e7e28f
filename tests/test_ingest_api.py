"""Upload API: import, duplicates, rejections, limits, streaming, stacks, pixel checks, linkage, reads."""

from __future__ import annotations

import io

import pydicom
import pytest
from PIL import Image
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart
from sqlalchemy import func, select

from imaging_helpers import (PATIENT, PATIENT_ID, bearer_for, find_markers, make_dicom, new_project,
                             raw_files, upload)
from onprem_label.db.models import AuditEvent, Blob, DeidLink, Item, ItemImage, Rendition
from onprem_label.imaging.ingest import open_link

MARKERS = [PATIENT, PATIENT.split("^")[0], PATIENT_ID, "ACC99231", "Saint Elsewhere", "Welby", "19610412"]


@pytest.fixture
def manager(make_user, db, clock):
    """A manager with an API token header."""
    return bearer_for(db, make_user("mona", "manager"), clock)


@pytest.fixture
def project(db) -> int:
    """A project without stacking."""
    return new_project(db)


def actions(db) -> list[str]:
    """Audit actions in order."""
    db.expire_all()
    found = list(db.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
    db.rollback()  # SQLite: an open read transaction of the test would hold the write lock
    return found


def test_upload_imports_a_dicom_and_reads_it_back(client, db, manager, project, app):
    """One CT upload: imported, item metadata de-identified, PNG of the true size, each read audited."""
    response = upload(client, project, [("ct.dcm", make_dicom(rows=32, columns=48))], manager)
    assert response.status_code == 200, response.get_json()
    [result] = response.get_json()["results"]
    assert result["status"] == "imported" and result["kind"] == "dicom" and result["frames"] == 1
    item = client.get(f"/api/v1/items/{result['item_id']}", headers=manager)
    assert item.status_code == 200
    body = item.get_json()
    assert (body["width"], body["height"], body["modality"]) == (48, 32, "CT")
    assert body["study_uid"] != "1.2.826.0.1.3680043.8.498.1" and body["study_uid"].startswith("2.25.")
    png = client.get(f"/api/v1/items/{result['item_id']}/image?preset=lung", headers=manager)
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert "no-store" in png.headers["Cache-Control"]
    assert Image.open(io.BytesIO(png.data)).size == (48, 32)
    assert actions(db)[-3:] == ["item:ingest", "item:view", "image:read"]


def test_nothing_identifying_is_stored_rendered_or_answered(client, db, manager, project, app):
    """The stored copy (decrypted), the raw data directory, the PNG and the JSON hold no marker."""
    item_id = upload(client, project, [("ct.dcm", make_dicom())], manager).get_json()["results"][0]["item_id"]
    store = app.extensions["onprem_label"].store
    image = db.scalars(select(ItemImage)).one()
    with store.open(image.blob_id) as reader:
        stored = reader.read()
    parsed = pydicom.dcmread(io.BytesIO(stored))
    assert parsed.PatientIdentityRemoved == "YES" and parsed.preamble == b"\0" * 128
    answers = [client.get(f"/api/v1/items/{item_id}", headers=manager).data,
               client.get(f"/api/v1/items/{item_id}/image", headers=manager).data,
               client.get(f"/api/v1/items/{item_id}/thumbnail", headers=manager).data]
    for blob in [stored, *answers, *raw_files(app.extensions["onprem_label"].settings.data_path).values()]:
        assert find_markers(blob, MARKERS) == []


def test_same_file_twice_is_a_duplicate(client, db, manager, project):
    """Re-uploading a file, or another file of the same instance, is reported as a duplicate."""
    data = make_dicom(instance="1.2.826.0.1.3680043.8.498.77")
    first = upload(client, project, [("a.dcm", data)], manager).get_json()["results"][0]
    again = upload(client, project, [("a.dcm", data)], manager).get_json()["results"][0]
    other_bytes = make_dicom(instance="1.2.826.0.1.3680043.8.498.77", seed=5)
    same_instance = upload(client, project, [("b.dcm", other_bytes)], manager).get_json()["results"][0]
    assert again == {"name": "a.dcm", "status": "duplicate", "item_id": first["item_id"],
                     "reason": "already imported into this project"}
    assert same_instance["status"] == "duplicate" and same_instance["item_id"] == first["item_id"]
    assert db.scalar(select(func.count()).select_from(Item)) == 1


def test_one_study_keeps_one_new_study_uid(client, db, manager, project):
    """Two files of one study get the same new StudyInstanceUID, different from the original."""
    results = upload(client, project, [("1.dcm", make_dicom(seed=1)), ("2.dcm", make_dicom(seed=2))],
                     manager).get_json()["results"]
    items = [db.get(Item, r["item_id"]) for r in results]
    assert items[0].study_uid == items[1].study_uid != "1.2.826.0.1.3680043.8.498.1"
    assert items[0].series_uid == items[1].series_uid and items[0].id != items[1].id


@pytest.mark.parametrize("name, data, code", [
    ("report.dcm", "sr", "no_pixel_data"),
    ("noise.bin", b"\x13\x37" * 500, "not_an_image"),
    ("empty.dcm", b"", "not_an_image"),
    ("cut.dcm", "truncated", "truncated"),
])
def test_rejected_file_leaves_nothing_behind(client, db, manager, project, app, name, data, code):
    """A rejected file: 422 with its reason, no item, no blob row, no blob file, a failure audit event."""
    if data == "sr":
        data = make_dicom()
        ds = pydicom.dcmread(io.BytesIO(data))
        del ds.PixelData
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
        out = io.BytesIO()
        ds.save_as(out)
        data = out.getvalue()
    elif data == "truncated":
        data = make_dicom()[:-100]
    store = app.extensions["onprem_label"].store
    response = upload(client, project, [(name, data)], manager)
    assert response.status_code == 422
    [result] = response.get_json()["results"]
    assert (result["status"], result["code"]) == ("rejected", code) and result["reason"]
    assert db.scalar(select(func.count()).select_from(Item)) == 0
    assert db.scalar(select(func.count()).select_from(Blob)) == 0
    assert list(store.iter_blobs()) == []
    events = db.scalars(select(AuditEvent).where(AuditEvent.action == "item:reject")).all()
    assert [e.outcome for e in events] == ["failure"] and events[0].details["code"] == code


class Untouchable(io.RawIOBase):
    """A request body that fails the test if anybody reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise AssertionError("the request body was read")


def raw_post(client, project_id: int, headers: dict, body, length: int | None = None,
             content_type: str = "multipart/form-data; boundary=XyZ"):
    """POST an exact body (bytes or a stream) to the upload endpoint."""
    stream = io.BytesIO(body) if isinstance(body, bytes) else body
    environ = {"CONTENT_TYPE": content_type, "wsgi.input": stream}
    if length is not None:
        environ["CONTENT_LENGTH"] = str(length)
    return client.post(f"/api/v1/projects/{project_id}/items", headers=headers, environ_overrides=environ)


def test_too_long_upload_is_refused_before_the_body_is_read(client, manager, project, app):
    """A Content-Length over the limit: 413 and the body is never read."""
    limit = app.extensions["onprem_label"].settings.upload_max_file_bytes
    response = raw_post(client, project, manager, Untouchable(), length=limit + (2 << 20))
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "request_entity_too_large"


@pytest.mark.parametrize("overrides", [{"upload_max_file_bytes": 4096}])
def test_file_over_the_limit_is_refused_while_streaming(client, db, manager, project, app):
    """A file part past the per-file limit: 413, nothing imported, nothing staged or stored."""
    small, big = make_dicom(rows=8, columns=8), make_dicom(rows=64, columns=64)
    assert len(small) < 4096 < len(big)
    response = upload(client, project, [("small.dcm", small), ("big.dcm", big)], manager)
    assert response.status_code == 413 and "nothing was imported" in response.get_json()["error"]["message"]
    data = app.extensions["onprem_label"].settings.data_path
    assert db.scalar(select(func.count()).select_from(Item)) == 0
    assert list(app.extensions["onprem_label"].store.iter_blobs()) == []
    assert not any((data / "staging").rglob("*")) if (data / "staging").exists() else True


@pytest.mark.parametrize("content_type, body, code", [
    ("multipart/form-data", b"--XyZ\r\n", "malformed_upload"),  # no boundary
    ("application/octet-stream", b"DICM", "malformed_upload"),
    ("multipart/form-data; boundary=XyZ",
     b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n\r\nDICMDICM', "malformed_upload"),
    ("multipart/form-data; boundary=XyZ", b"--XyZ--\r\n", "no_files"),
    ("multipart/form-data; boundary=XyZ",
     b'--XyZ\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--XyZ--\r\n', "no_files"),
])
def test_malformed_upload_is_a_400(client, db, manager, project, content_type, body, code):
    """Broken or empty multipart bodies: 400 with a code, nothing stored."""
    response = raw_post(client, project, manager, body, length=len(body), content_type=content_type)
    assert response.status_code == 400 and response.get_json()["error"]["code"] == code
    assert db.scalar(select(func.count()).select_from(Item)) == 0


def test_browser_upload_needs_the_csrf_header_and_is_not_parsed_without_it(client, make_user, auth, project):
    """A session upload without X-CSRF-Token: 403 before the body is read; with it, imported."""
    make_user("mia", "manager")
    auth.login("mia")
    refused = raw_post(client, project, {}, Untouchable(), length=5000)
    assert refused.status_code == 403
    token = auth.csrf()
    ok = upload(client, project, [("ct.dcm", make_dicom())], {"X-CSRF-Token": token})
    assert ok.status_code == 200 and ok.get_json()["results"][0]["status"] == "imported"


def test_roles_for_upload_and_reading(client, db, make_user, clock, manager, project):
    """Members who label read items but cannot upload; non-members and auditors see nothing (404/403)."""
    item_id = upload(client, project, [("ct.dcm", make_dicom())], manager).get_json()["results"][0]["item_id"]
    labeler = bearer_for(db, make_user("lee", "labeler"), clock)
    stranger = bearer_for(db, make_user("stan", "labeler"), clock)
    auditor = bearer_for(db, make_user("aud", "auditor"), clock)
    added = client.post(f"/api/v1/projects/{project}/members", headers=manager,
                        json={"username": "lee", "role": "labeler"})
    assert added.status_code == 201
    assert upload(client, project, [("x.dcm", make_dicom(seed=3))], labeler).status_code == 403
    assert client.get(f"/api/v1/items/{item_id}", headers=labeler).status_code == 200
    assert client.get(f"/api/v1/items/{item_id}/image", headers=labeler).status_code == 200
    assert client.get(f"/api/v1/items/{item_id}", headers=stranger).status_code == 404
    assert client.get(f"/api/v1/items/{item_id}/image", headers=stranger).status_code == 404
    assert client.get(f"/api/v1/items/{item_id}", headers=auditor).status_code == 403
    assert client.get(f"/api/v1/items/{item_id}/image", headers=auditor).status_code == 403
    assert upload(client, 999, [("x.dcm", make_dicom(seed=4))], manager).status_code == 404
    assert client.get("/api/v1/items/999", headers=labeler).status_code == 404


def test_series_becomes_one_stack_in_slice_order(client, db, manager):
    """With stack_series, instances of one series sent out of order become one item, ordered by z."""
    project = new_project(db, "Stacks", stack_series=True)
    files = [(f"{z}.dcm", make_dicom(series="1.2.826.0.1.3680043.8.498.9", z=float(z), number=n, seed=n))
             for n, z in ((3, 30), (1, 10), (2, 20))]
    results = upload(client, project, files, manager).get_json()["results"]
    assert {r["status"] for r in results} == {"imported"} and len({r["item_id"] for r in results}) == 1
    item = db.get(Item, results[0]["item_id"])
    assert item.is_stack and item.frames == 3
    assert [i.sort_key for i in item.images] == [10.0, 20.0, 30.0]
    item_id = item.id
    db.rollback()  # SQLite: the test's read transaction would hold the write lock
    for frame in range(3):
        assert client.get(f"/api/v1/items/{item_id}/image?frame={frame}", headers=manager).status_code == 200
    assert client.get(f"/api/v1/items/{item_id}/image?frame=3", headers=manager).status_code == 400


def test_burned_in_suspect_needs_a_pixel_check_until_a_manager_clears_it(client, db, manager, project):
    """An ultrasound image is flagged; a manager's clearance is recorded and audited."""
    result = upload(client, project, [("us.dcm", make_dicom(modality="US"))], manager).get_json()["results"][0]
    assert result["needs_pixel_check"] is True
    item = client.get(f"/api/v1/items/{result['item_id']}", headers=manager).get_json()
    assert item["needs_pixel_check"] and item["pixel_check_reasons"]
    cleared = client.post(f"/api/v1/items/{result['item_id']}/pixel-check", headers=manager)
    assert cleared.status_code == 200 and cleared.get_json()["needs_pixel_check"] is False
    assert actions(db)[-1] == "item:pixel_check_clear"
    plain = upload(client, project, [("ct.dcm", make_dicom(seed=9))], manager).get_json()["results"][0]
    assert plain["needs_pixel_check"] is False


@pytest.mark.parametrize("overrides", [{"deid_linkage": True}])
def test_linkage_table_keeps_originals_sealed(client, db, manager, project, app, keyring):
    """With deid_linkage on, the originals are kept sealed per image and open with the install's key."""
    upload(client, project, [("ct.dcm", make_dicom(instance="1.2.826.0.1.3680043.8.498.55"))], manager)
    link = db.scalars(select(DeidLink)).one()
    assert find_markers(link.sealed, MARKERS) == []
    opened = open_link(keyring.purpose_key("deid-linkage"), link.image_id, link.sealed)
    assert opened["PatientID"] == PATIENT_ID and opened["SOPInstanceUID"] == "1.2.826.0.1.3680043.8.498.55"


def test_no_linkage_rows_by_default(client, db, manager, project):
    """Linkage is off unless an admin switches it on."""
    upload(client, project, [("ct.dcm", make_dicom())], manager)
    assert db.scalar(select(func.count()).select_from(DeidLink)) == 0


@pytest.mark.parametrize("query, status", [
    ("preset=bone", 200), ("window=400&level=40", 200), ("", 200), ("preset=unknown", 400),
    ("window=400", 400), ("window=0&level=40", 400), ("window=abc&level=1", 400), ("frame=-1", 400),
    ("frame=x", 400), ("window=nan&level=1", 400),
])
def test_image_query_is_validated(client, manager, project, query, status):
    """Bad frame or window parameters are a 400 naming the problem, never a 500."""
    item_id = upload(client, project, [("ct.dcm", make_dicom())], manager).get_json()["results"][0]["item_id"]
    response = client.get(f"/api/v1/items/{item_id}/image?{query}", headers=manager)
    assert response.status_code == status
    if status == 400:
        assert response.get_json()["error"]["message"]


def test_renditions_are_cached_encrypted(client, db, manager, project, app):
    """A second request for the same window is served from one cached, encrypted rendition."""
    item_id = upload(client, project, [("ct.dcm", make_dicom())], manager).get_json()["results"][0]["item_id"]
    first = client.get(f"/api/v1/items/{item_id}/image?preset=brain", headers=manager).data
    second = client.get(f"/api/v1/items/{item_id}/image?preset=brain", headers=manager).data
    assert first == second
    rows = db.scalars(select(Rendition)).all()
    assert [r.spec for r in rows] == ["c40w80"]
    raw = (app.extensions["onprem_label"].store.path_of(rows[0].blob_id)).read_bytes()
    assert b"PNG" not in raw and b"IHDR" not in raw


def test_raster_upload_is_stripped_of_metadata(client, db, manager, project):
    """A JPEG with EXIF text: imported as a clean PNG page; its EXIF text is gone."""
    picture = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x013B] = "Johanna Smithfield"  # Artist
    exif[0x010E] = PATIENT_ID  # ImageDescription
    out = io.BytesIO()
    picture.save(out, "JPEG", exif=exif)
    result = upload(client, project, [("photo.jpg", out.getvalue())], manager).get_json()["results"][0]
    assert result["status"] == "imported" and result["kind"] == "raster"
    png = client.get(f"/api/v1/items/{result['item_id']}/image", headers=manager)
    assert Image.open(io.BytesIO(png.data)).size == (40, 20)
    assert find_markers(png.data, ["Johanna Smithfield", PATIENT_ID]) == []


def test_markup_in_dicom_text_shows_as_text(client, db, make_user, auth, manager, project):
    """<script> in PatientName, StudyDescription and kept attributes never reaches a page as markup."""
    attack = "<script>alert(1)</script>"
    data = make_dicom(patient=attack, StudyDescription=attack, BodyPartExamined=attack,
                      Manufacturer='"><img src=x onerror=alert(2)>')
    item_id = upload(client, project, [("x.dcm", data)], manager).get_json()["results"][0]["item_id"]
    make_user("viv", "reviewer")
    client.post(f"/api/v1/projects/{project}/members", headers=manager, json={"username": "viv", "role": "reviewer"})
    auth.login("viv")
    page = client.get(f"/items/{item_id}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the kept body part, shown as text
    assert f"<title>Item {item_id} · onprem-label</title>" in html
    api = client.get(f"/api/v1/items/{item_id}")
    assert api.mimetype == "application/json" and api.headers["X-Content-Type-Options"] == "nosniff"
    assert api.get_json()["images"][0]["meta"]["body_part"] == attack


def test_stale_staging_folders_are_removed_fresh_ones_kept(tmp_path):
    """Staging folders older than a day (a crashed upload) go; a running upload's folder stays."""
    import os

    from onprem_label.web.uploads import STAGING_DIR, remove_stale_staging

    old, fresh = tmp_path / STAGING_DIR / "old", tmp_path / STAGING_DIR / "fresh"
    for folder in (old, fresh):
        (folder / "ab").mkdir(parents=True)
        (folder / "ab" / "blob").write_bytes(b"sealed")
    now = 1_800_000_000
    os.utime(old, (now - 2 * 86400, now - 2 * 86400))
    os.utime(fresh, (now - 60, now - 60))
    assert remove_stale_staging(tmp_path, now=now) == 1
    assert not old.exists() and (fresh / "ab" / "blob").exists()
    assert remove_stale_staging(tmp_path / "nowhere", now=now) == 0


def test_reference_file_leaks_nothing_through_store_png_or_json(client, db, manager, project, app):
    """The PS3.15 reference file (every table tag at three depths, private data, hostile preamble)
    uploaded through the API: no marker, original UID or preamble byte in the stored copy, the
    PNG, the thumbnail, the item JSON or anywhere in the raw data directory."""
    from test_deidentify import PREAMBLE, ROOT, _reference

    out = io.BytesIO()
    _reference().save_as(out, enforce_file_format=True)
    response = upload(client, project, [("reference.dcm", out.getvalue())], manager)
    assert response.status_code == 200, response.get_json()
    item_id = response.get_json()["results"][0]["item_id"]
    svc = app.extensions["onprem_label"]
    with svc.store.open(db.scalars(select(ItemImage)).one().blob_id) as reader:
        stored = reader.read()
    db.rollback()
    answers = [client.get(f"/api/v1/items/{item_id}", headers=manager).data,
               client.get(f"/api/v1/items/{item_id}/image", headers=manager).data,
               client.get(f"/api/v1/items/{item_id}/thumbnail", headers=manager).data]
    assert stored[:128] == b"\0" * 128 and pydicom.dcmread(io.BytesIO(stored)).PatientIdentityRemoved == "YES"
    for blob in [stored, *answers, *raw_files(svc.settings.data_path).values()]:
        assert b"MARK" not in blob and ROOT.encode() not in blob and PREAMBLE[:32] not in blob


def test_large_multi_chunk_upload_streams_through(client, db, manager, project):
    """A 6 MiB DICOM and a 2 MiB one in one request (many reads, many store chunks) both import."""
    big = make_dicom(rows=1024, columns=1024, frames=3, seed=1)
    medium = make_dicom(rows=1024, columns=1024, seed=2)
    assert len(big) > 6 << 20 and len(medium) > 2 << 20
    # Encoded here: the test client would spool a body this big to a temp file it never closes.
    boundary, body = encode_multipart({"files": [FileStorage(io.BytesIO(big), "big.dcm"),
                                                 FileStorage(io.BytesIO(medium), "medium.dcm")]})
    response = raw_post(client, project, manager, body, length=len(body),
                        content_type=f"multipart/form-data; boundary={boundary}")
    results = response.get_json()["results"]
    assert [(r["status"], r["frames"]) for r in results] == [("imported", 3), ("imported", 1)]
