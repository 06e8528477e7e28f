"""`onprem-label ingest` through click's CliRunner: reports, summary, zip limits, workers, stacks, audit."""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner, Result
from PIL import Image
from sqlalchemy import select

from imaging_helpers import make_dicom
from onprem_label.cli import cli
from onprem_label.config import CONFIG_FILE_NAME, ENV_PREFIX, load_settings
from onprem_label.db import make_engine, make_sessionmaker
from onprem_label.db.models import AuditEvent, Item, ItemImage, Project
from onprem_label.storage import init_keyring

SUMMARY_RE = re.compile(r"^ingest: (\d+) imported, (\d+) duplicates, (\d+) rejected "
                        r"\((\d+) files in [\d.]+ s, [\d.]+ files/s\)$", re.M)
NOT_AN_IMAGE = "neither a DICOM file nor a PNG, JPEG, TIFF or BMP picture"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: a DICOM object without pixels
SR_REASON = "no pixel data (Basic Text SR Storage): nothing to label"


@pytest.fixture(autouse=True)
def no_machine_env(monkeypatch):
    """The machine's own ONPREM_LABEL_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def backend() -> str:
    """SQLite only, unless a test parametrises `backend` itself."""
    return "sqlite"


@dataclass
class Site:
    """A keyed data directory at head and the environment that points the CLI at its database."""

    data: Path
    env: dict[str, str]

    def run(self, *args: str, env: dict[str, str] | None = None) -> Result:
        """Invoke `onprem-label --data-dir DATA ARGS...`."""
        return CliRunner().invoke(cli, ["--data-dir", str(self.data), *args], env={**self.env, **(env or {})})

    def ingest(self, project: str, *paths: Path | str, report: Path, env: dict[str, str] | None = None,
               workers: int = 1) -> tuple[Result, list[dict]]:
        """Run ingest with a report file; (result, report lines)."""
        result = self.run("ingest", project, *map(str, paths), "--report", str(report),
                          "--workers", str(workers), env=env)
        lines = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
        return result, lines

    def query(self, fn):
        """Run fn(session) on the site's database and return its result."""
        url = self.env.get("ONPREM_LABEL_DATABASE_URL") or f"sqlite:///{self.data / 'onprem-label.db'}"
        engine = make_engine(url)
        try:
            with make_sessionmaker(engine)() as db:
                return fn(db)
        finally:
            engine.dispose()

    def project_id(self, name: str) -> int:
        """The id of a project by name."""
        return self.query(lambda db: db.scalar(select(Project.id).where(Project.name == name)))


@pytest.fixture
def site(tmp_path, database_url) -> Site:
    """A data directory with its key and a database at head, and one project 'Chest CT'."""
    data = tmp_path / "data"
    env = {"ONPREM_LABEL_DATABASE_URL": database_url} if database_url else {}
    data.mkdir(mode=0o700, exist_ok=True)
    init_keyring(load_settings({"data_dir": str(data)}, env=env))
    made = Site(data, env)
    created = made.run("project", "create", "Chest CT")
    assert created.exit_code == 0, created.output
    return made


def summary(result: Result) -> tuple[int, int, int, int]:
    """(imported, duplicates, rejected, files) from the summary line."""
    match = SUMMARY_RE.search(result.stdout)
    assert match, (result.stdout, result.stderr)
    return tuple(int(v) for v in match.groups())


def png_bytes() -> bytes:
    """A small grey PNG."""
    out = io.BytesIO()
    Image.new("L", (20, 10), 90).save(out, "PNG")
    return out.getvalue()


def sr_without_pixels() -> bytes:
    """A DICOM structured report: valid Part 10, no PixelData."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=9)))
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SR_STORAGE
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    """A deflated zip archive of `members`."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    """Nested folders: four CT files, a PNG, a text file, an SR without pixels and a zip (2 CT + junk)."""
    root = tmp_path / "incoming"
    files = {
        "ct1.dcm": make_dicom(seed=1),
        "notes.txt": b"scanned on Tuesday\n",
        "photo.png": png_bytes(),
        "study/ct2.dcm": make_dicom(seed=2),
        "study/report.dcm": sr_without_pixels(),
        "study/deeper/still/ct3.dcm": make_dicom(seed=3),
        "study/deeper/ct4.dcm": make_dicom(seed=4, rows=64, columns=64),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    write_zip(root / "study" / "archive.zip", {"series/a.dcm": make_dicom(seed=5),
                                                "series/b.dcm": make_dicom(seed=6),
                                                "readme.bin": b"\x00\x01 not an image" * 20})
    return root


def expected_outcomes(root: Path) -> dict[str, tuple[str, str | None]]:
    """Report path -> (status, code) for a first ingest of `tree`."""
    imported = ["ct1.dcm", "photo.png", "study/ct2.dcm", "study/deeper/still/ct3.dcm", "study/deeper/ct4.dcm",
                "study/archive.zip!series/a.dcm", "study/archive.zip!series/b.dcm"]
    rejected = {"notes.txt": "not_an_image", "study/report.dcm": "no_pixel_data",
                "study/archive.zip!readme.bin": "not_an_image"}
    return {**{f"{root}/{n}": ("imported", None) for n in imported},
            **{f"{root}/{n}": ("rejected", code) for n, code in rejected.items()}}


def by_path(lines: list[dict]) -> dict[str, dict]:
    """Report lines keyed by path; fails when a path is reported twice."""
    keyed = {line["path"]: line for line in lines}
    assert len(keyed) == len(lines), [line["path"] for line in lines]
    return keyed


def without_item_ids(lines: list[dict]) -> list[dict]:
    """Report lines with item ids left out (they differ between projects)."""
    return [{k: v for k, v in line.items() if k != "item_id"} for line in lines]


def test_ingest_tree_reports_each_file_and_stores_the_images(site, tree, tmp_path):
    """Folders, zip members, a PNG, text and an SR: one right line each, matching summary and item rows."""
    result, lines = site.ingest("Chest CT", tree, report=tmp_path / "report.jsonl")
    assert result.exit_code == 0, (result.output, result.exception)
    report = by_path(lines)
    expected = expected_outcomes(tree)
    assert {path: (line["status"], line.get("code")) for path, line in report.items()} == expected
    assert report[f"{tree}/study/report.dcm"]["reason"] == SR_REASON
    assert report[f"{tree}/notes.txt"]["reason"] == NOT_AN_IMAGE
    assert report[f"{tree}/study/archive.zip!readme.bin"]["reason"] == NOT_AN_IMAGE
    assert report[f"{tree}/photo.png"]["kind"] == "raster"
    assert report[f"{tree}/study/deeper/ct4.dcm"]["kind"] == "dicom"
    assert summary(result) == (7, 0, 3, 10)
    project_id = site.project_id("Chest CT")
    items = site.query(lambda db: {i.id: (i.kind, i.width, i.height, i.frames, i.source)
                                   for i in db.scalars(select(Item).where(Item.project_id == project_id))})
    reported = {line["item_id"]: line for line in lines if line["status"] == "imported"}
    assert set(items) == set(reported) and len(items) == 7
    assert items[report[f"{tree}/study/deeper/ct4.dcm"]["item_id"]] == ("dicom", 64, 64, 1, "cli")
    assert items[report[f"{tree}/photo.png"]["item_id"]] == ("raster", 20, 10, 1, "cli")
    assert sorted(kind for kind, *_ in items.values()) == ["dicom"] * 6 + ["raster"]
    assert site.query(lambda db: len(db.scalars(select(ItemImage.id)).all())) == 7


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_reingest_reports_every_imported_file_as_duplicate(site, tree, tmp_path):
    """A second run of the same ingest imports nothing: each earlier import is a duplicate of its item."""
    _, first = site.ingest("Chest CT", tree, report=tmp_path / "first.jsonl")
    result, second = site.ingest("Chest CT", tree, report=tmp_path / "second.jsonl")
    assert result.exit_code == 0, (result.output, result.exception)
    before, after = by_path(first), by_path(second)
    assert set(after) == set(before)
    for path, line in before.items():
        if line["status"] == "imported":
            assert after[path] == {"path": path, "status": "duplicate", "item_id": line["item_id"],
                                   "reason": "already imported into this project"}
        else:
            assert after[path] == line
    assert summary(result) == (0, 7, 3, 10)
    assert site.query(lambda db: len(db.scalars(select(Item.id)).all())) == 7


@pytest.mark.parametrize("limit, source, fragment", [
    ("files", "env", "holds 3 files, more than the limit of 2 (ingest_zip_max_files)"),
    ("files", "toml", "holds 3 files, more than the limit of 2 (ingest_zip_max_files)"),
    ("bytes", "env", "more than the limit of 4096 (ingest_zip_max_bytes)"),
    ("bytes", "toml", "more than the limit of 4096 (ingest_zip_max_bytes)"),
])
def test_zip_over_a_limit_is_one_rejected_line(site, tmp_path, limit, source, fragment):
    """An archive over ingest_zip_max_files/bytes (env or config file) is one rejection; none of it lands."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "loose.dcm").write_bytes(make_dicom(seed=20))
    members = {f"m{n}.dcm": make_dicom(seed=30 + n) for n in range(3)}  # ~3.6 KB each, ~11 KB together
    archive = write_zip(folder / "big.zip", members)
    setting, value = {"files": ("ingest_zip_max_files", 2), "bytes": ("ingest_zip_max_bytes", 4096)}[limit]
    env = {}
    if source == "env":
        env[ENV_PREFIX + setting.upper()] = str(value)
    else:
        (site.data / CONFIG_FILE_NAME).write_text(f"{setting} = {value}\n")
    result, lines = site.ingest("Chest CT", folder, report=tmp_path / "report.jsonl", env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    report = by_path(lines)
    assert set(report) == {str(archive), str(folder / "loose.dcm")}
    rejection = report[str(archive)]
    assert (rejection["status"], rejection["code"]) == ("rejected", "too_large")
    assert fragment in rejection["reason"]
    assert report[str(folder / "loose.dcm")]["status"] == "imported"
    assert summary(result) == (1, 0, 1, 2)
    assert site.query(lambda db: len(db.scalars(select(ItemImage.id)).all())) == 1


def test_zip_within_its_limits_is_read(site, tmp_path):
    """The same kind of archive within its limits is imported member by member."""
    archive = write_zip(tmp_path / "ok.zip", {f"m{n}.dcm": make_dicom(seed=30 + n) for n in range(3)})
    env = {"ONPREM_LABEL_INGEST_ZIP_MAX_FILES": "3", "ONPREM_LABEL_INGEST_ZIP_MAX_BYTES": "65536"}
    result, lines = site.ingest("Chest CT", archive, report=tmp_path / "report.jsonl", env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    assert [(line["path"], line["status"]) for line in lines] == [(f"{archive}!m{n}.dcm", "imported")
                                                                 for n in range(3)]


def test_two_workers_give_the_same_report_as_one(site, tree, tmp_path, monkeypatch):
    """--workers 2 (a real process pool) reports and stores what --workers 1 does, in the same order."""
    pools = []
    real_init = ProcessPoolExecutor.__init__

    def spy_init(self, max_workers=None, *args, **kwargs):
        pools.append(max_workers)
        real_init(self, max_workers, *args, **kwargs)

    # The class itself, so the spy sees every pool however the ingest code imports or wraps it.
    monkeypatch.setattr(ProcessPoolExecutor, "__init__", spy_init)
    assert site.run("project", "create", "Twin").exit_code == 0
    one, serial = site.ingest("Chest CT", tree, report=tmp_path / "one.jsonl", workers=1)
    assert set(pools) <= {1}
    del pools[:]
    two, parallel = site.ingest("Twin", tree, report=tmp_path / "two.jsonl", workers=2)
    assert pools == [2]
    assert one.exit_code == two.exit_code == 0, (two.output, two.exception)
    assert without_item_ids(parallel) == without_item_ids(serial)
    assert summary(one)[:3] == summary(two)[:3] == (7, 0, 3)

    def stored(db, name):
        project = db.scalar(select(Project.id).where(Project.name == name))
        rows = db.execute(select(Item.kind, Item.width, Item.height, Item.frames, ItemImage.sort_key,
                                 ItemImage.deid_report).join(ItemImage).where(Item.project_id == project)
                          .order_by(Item.id)).all()
        return [tuple(row) for row in rows]

    assert site.query(lambda db: stored(db, "Twin")) == site.query(lambda db: stored(db, "Chest CT"))


def test_unknown_project_is_one_line_and_writes_nothing(site, tree, tmp_path):
    """An unknown project stops ingest with exit 1 and one line naming it; no report, no items."""
    result, lines = site.ingest("No Such Project", tree, report=tmp_path / "report.jsonl")
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout == ""
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "No Such Project" in errors[0], result.stderr
    assert lines == []
    assert site.query(lambda db: db.scalars(select(Item.id)).all()) == []


def test_missing_path_is_rejected_and_the_batch_continues(site, tmp_path):
    """A path that does not exist is one rejected line; the paths after it are still imported."""
    good = tmp_path / "good.dcm"
    good.write_bytes(make_dicom(seed=40))
    missing = tmp_path / "not-there"
    result, lines = site.ingest("Chest CT", missing, good, report=tmp_path / "report.jsonl")
    assert result.exit_code == 0, (result.output, result.exception)
    assert lines[0] == {"path": str(missing), "status": "rejected", "code": "unreadable",
                        "reason": "no such file or folder"}
    assert (lines[1]["path"], lines[1]["status"]) == (str(good), "imported")
    assert len(lines) == 2 and summary(result) == (1, 0, 1, 2)


@pytest.mark.parametrize("workers", [1, 2])
def test_stack_series_project_stacks_one_series_in_slice_order(site, tmp_path, workers):
    """With --stack-series, 3 instances of a series, top slice first, become one 3-frame item sorted by z."""
    assert site.run("project", "create", "Stacks", "--stack-series").exit_code == 0
    folder = tmp_path / "series"
    folder.mkdir()
    series = "1.2.826.0.1.3680043.8.498.5.1"
    for order, z in enumerate([20.0, 10.0, 0.0]):  # walked in name order: highest z first
        (folder / f"slice{order}.dcm").write_bytes(
            make_dicom(series=series, z=z, number=3 - order, seed=50 + order))
    result, lines = site.ingest("Stacks", folder, report=tmp_path / "report.jsonl", workers=workers)
    assert result.exit_code == 0, (result.output, result.exception)
    assert [line["status"] for line in lines] == ["imported"] * 3
    assert len({line["item_id"] for line in lines}) == 1
    assert [line["frames"] for line in lines] == [1, 2, 3]
    project_id = site.project_id("Stacks")

    def stack(db):
        [item] = db.scalars(select(Item).where(Item.project_id == project_id)).all()
        return item.frames, item.is_stack, [(image.position, image.sort_key) for image in item.images]

    assert site.query(stack) == (3, True, [(0, 0.0), (1, 10.0), (2, 20.0)])


def test_cli_ingest_is_audited_as_the_console(site, tree, tmp_path):
    """Each imported file has an item:ingest event by 'console...' naming its item; rejections too."""
    _, lines = site.ingest("Chest CT", tree, report=tmp_path / "report.jsonl")
    project_id = site.project_id("Chest CT")
    item_events = select(AuditEvent).where(AuditEvent.action.like("item:%")).order_by(AuditEvent.id)
    events = site.query(lambda db: [(e.action, e.actor_name, e.actor_id, e.object_id, e.outcome, e.details)
                                    for e in db.scalars(item_events)])
    ingested = [e for e in events if e[0] == "item:ingest"]
    imported = [line for line in lines if line["status"] == "imported"]
    assert [e[3] for e in ingested] == [str(line["item_id"]) for line in imported]
    for _action, actor_name, actor_id, _object, outcome, details in ingested:
        assert actor_name.startswith("console") and actor_id is None and outcome == "success"
        assert details["source"] == "cli" and details["project_id"] == project_id
    rejects = [e for e in events if e[0] == "item:reject"]
    assert sorted(e[5]["code"] for e in rejects) == ["no_pixel_data", "not_an_image", "not_an_image"]
    assert all(e[1].startswith("console") and e[4] == "failure" for e in rejects)


def test_report_inside_the_ingested_folder_is_not_ingested(site, tree):
    """--report pointing into a folder being ingested: the report is output, never a rejected input."""
    result, lines = site.ingest("Chest CT", tree, report=tree / "report.jsonl")
    assert result.exit_code == 0, result.output
    assert summary(result) == (7, 0, 3, 10)
    assert f"{tree}/report.jsonl" not in by_path(lines)
