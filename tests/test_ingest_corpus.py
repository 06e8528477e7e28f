"""Acceptance: every .dcm file in pydicom's own test data is imported and renders, or is rejected cleanly."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.pixels.utils import get_nr_frames
from sqlalchemy import func, select
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from imaging_helpers import bearer_for, new_project, upload
from onprem_label.db.engine import read_connection
from onprem_label.db.models import Blob, Item, ItemImage

CORPUS_ROOT = Path(pydicom.__file__).parent / "data" / "test_files"
CORPUS = sorted(CORPUS_ROOT.rglob("*.dcm"))
MAX_FRAMES = 40  # a few corpus files have many frames; reading 40 of each proves the point
# The corpus runs on SQLite (one fresh app per file, most of the run time); this file also runs
# on PostgreSQL so that the same path is proven on both backends without doubling the run.
POSTGRES_FILE = "CT_small.dcm"


def _name(path: Path) -> str:
    return path.relative_to(CORPUS_ROOT).as_posix()


CASES = ([pytest.param("sqlite", path, id=f"sqlite-{_name(path)}") for path in CORPUS]
         + [pytest.param("postgresql", path, id=f"postgresql-{_name(path)}")
            for path in CORPUS if _name(path) == POSTGRES_FILE])


@pytest.fixture
def manager(make_user, db, clock):
    """A manager with an API token header."""
    return bearer_for(db, make_user("mona", "manager"), clock)


def stored_state(app) -> dict:
    """What ingest left behind: row counts, blob ids in the store and in the database, stray files."""
    services = app.extensions["onprem_label"]
    # A read-only connection: on SQLite an ordinary session would take the write lock the app needs.
    with read_connection(services.engine) as conn:
        counts = {model.__name__: conn.scalar(select(func.count()).select_from(model))
                  for model in (Item, ItemImage, Blob)}
        blob_rows = set(conn.scalars(select(Blob.id)))
    staging = services.settings.data_path / "staging"
    return {"counts": counts, "blob_rows": blob_rows, "blob_files": set(services.store.iter_blobs()),
            "temp_files": list(services.store.iter_temp()),
            "staged_files": [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []}


def original_geometry(path: Path) -> tuple[int, int, int]:
    """(Columns, Rows, frames) of the file as shipped, read by pydicom itself."""
    ds = pydicom.dcmread(path, force=True)
    return int(ds.Columns), int(ds.Rows), int(get_nr_frames(ds, warn=False))


def assert_renders(client, headers: dict, item_id: int, path: Path) -> None:
    """The item has the file's true size and frame count; each frame and the thumbnail are PNGs."""
    item = client.get(f"/api/v1/items/{item_id}", headers=headers)
    assert item.status_code == 200, item.get_json()
    body = item.get_json()
    columns, rows, frames = original_geometry(path)
    assert (body["width"], body["height"], body["frames"]) == (columns, rows, frames)
    for frame in range(min(body["frames"], MAX_FRAMES)):
        png = client.get(f"/api/v1/items/{item_id}/image?frame={frame}", headers=headers)
        assert png.status_code == 200, (frame, png.get_json())
        assert png.mimetype == "image/png"
        assert Image.open(io.BytesIO(png.data)).size == (columns, rows), frame
    thumbnail = client.get(f"/api/v1/items/{item_id}/thumbnail", headers=headers)
    assert thumbnail.status_code == 200, thumbnail.get_json()
    assert max(Image.open(io.BytesIO(thumbnail.data)).size) <= 256


def test_corpus_is_found():
    """The corpus is where pydicom ships it, subfolder included (an empty list would pass vacuously)."""
    names = [_name(path) for path in CORPUS]
    assert POSTGRES_FILE in names and any(name.startswith("dicomdirtests/") for name in names)


@pytest.mark.parametrize("backend, path", CASES)
def test_corpus_file_is_imported_and_renders_or_is_rejected_cleanly(client, db, manager, app, backend, path):
    """One corpus file alone: imported at its true size with every frame rendering, or rejected cleanly."""
    project = new_project(db)
    response = upload(client, project, [(path.name, path.read_bytes())], manager)
    assert response.status_code in (200, 422), response.data[:500]
    [result] = response.get_json()["results"]
    assert result["name"] == path.name
    assert result["status"] in ("imported", "duplicate", "rejected"), result
    state = stored_state(app)
    assert state["staged_files"] == [] and state["temp_files"] == []
    if result["status"] == "rejected":
        assert response.status_code == 422
        assert result.get("code") and result.get("reason"), result
        assert state["counts"] == {"Item": 0, "ItemImage": 0, "Blob": 0}
        assert state["blob_files"] == set()
        return
    assert response.status_code == 200
    assert_renders(client, manager, result["item_id"], path)
    after = stored_state(app)  # renditions are cached as blobs too: each file has its row
    assert after["blob_files"] == after["blob_rows"] and after["temp_files"] == []


def post_in_memory(client, project_id: int, files: list[tuple[str, bytes]], headers: dict):
    """POST files as one multipart body built in memory.

    Werkzeug's test client spools a body over 500 KB to a temporary file it never closes; the
    ResourceWarning that follows is an error under this suite's warning filter.
    """
    fields = MultiDict([("files", FileStorage(io.BytesIO(data), filename=name, name="files"))
                        for name, data in files])
    boundary, body = encode_multipart(fields)
    return client.post(f"/api/v1/projects/{project_id}/items", data=body, headers=headers,
                       content_type=f"multipart/form-data; boundary={boundary}")


@pytest.mark.parametrize("backend", ["sqlite"])  # one request of every file: the backend adds nothing
def test_whole_corpus_in_one_request_leaves_no_orphan_blob(client, db, manager, app, backend):
    """All corpus files in one request: a result per file, every file accounted for, no blob without a row."""
    project = new_project(db)
    response = post_in_memory(client, project, [(_name(path), path.read_bytes()) for path in CORPUS], manager)
    assert response.status_code == 200, response.data[:500]
    results = response.get_json()["results"]
    # The server echoes the base name only (a client's folders are not its business).
    assert [r["name"] for r in results] == [path.name for path in CORPUS]
    tally = {status: sum(r["status"] == status for r in results)
             for status in ("imported", "duplicate", "rejected")}
    assert sum(tally.values()) == len(CORPUS) and tally["imported"] > 0, tally
    assert all(r.get("code") and r.get("reason") for r in results if r["status"] == "rejected")
    state = stored_state(app)
    assert state["blob_files"] == state["blob_rows"]
    assert state["counts"]["ItemImage"] == tally["imported"]  # one DICOM instance per imported file
    assert state["staged_files"] == [] and state["temp_files"] == []
