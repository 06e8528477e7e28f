"""Test helpers for the DICOM receiver: a keyed site with projects, the listener in-process or as the CLI, dcmtk runs."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pydicom
from pydicom.uid import RLELossless
from sqlalchemy import func, select

from debian_packages import ensure_program
from imaging_helpers import PATIENT, PATIENT_ID, make_dicom
from onprem_label.cli import open_database
from onprem_label.clock import utcnow
from onprem_label.config import load_settings
from onprem_label.db.models import AuditEvent, Item, ItemImage
from onprem_label.dicomnet.receiver import Receiver, ReceiverConfig
from onprem_label.imaging.prepare import prepare_options
from onprem_label.storage import init_keyring, open_store
from onprem_label.workflow.projects import create_project

AE_TITLE = "LABELSCP"
CALLER = "MODALITY1"
STUDY = "1.2.826.0.1.3680043.8.498.77"
MARKERS = [PATIENT, PATIENT_ID, "ACC99231", "Saint Elsewhere", STUDY]


@dataclass
class Site:
    """A data directory with its key, a database at head, and the settings and keys that open them."""

    data: Path
    database_url: str
    overrides: dict = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Environment for a CLI subprocess on this site (no machine ONPREM_LABEL_* leaks in)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONPREM_LABEL_")}
        if self.database_url:
            env["ONPREM_LABEL_DATABASE_URL"] = self.database_url
        return env

    def settings(self):
        """The site's settings."""
        return load_settings({"data_dir": str(self.data), "database_url": self.database_url, **self.overrides},
                             env={})

    def query(self, fn: Callable):
        """fn(session) on the site's database (with the audit chain attached)."""
        engine, maker = open_database(self.settings())
        try:
            with maker() as db:
                return fn(db)
        finally:
            engine.dispose()

    def project(self, name: str, callers: list[dict], **settings) -> int:
        """A committed project whose dicom_callers are `callers`; its id."""
        def make(db):
            project = create_project(db, name, settings={"dicom_callers": callers, **settings},
                                     actor_name="test", now=utcnow())
            db.commit()
            return project.id
        return self.query(make)

    def items(self, project_id: int) -> int:
        """How many items the project has."""
        return self.query(lambda db: db.scalar(select(func.count()).select_from(Item)
                                               .where(Item.project_id == project_id)))

    def images(self, project_id: int) -> list[ItemImage]:
        """The project's stored images."""
        return self.query(lambda db: db.scalars(select(ItemImage).where(ItemImage.project_id == project_id)
                                                .order_by(ItemImage.id)).all())

    def events(self, action: str) -> list[AuditEvent]:
        """Audit events of one action, oldest first."""
        return self.query(lambda db: db.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                                .order_by(AuditEvent.id)).all())

    def stored_instances(self, project_id: int) -> list[pydicom.Dataset]:
        """The project's stored instances, decrypted and parsed."""
        settings = self.settings()
        store = open_store(settings, init_keyring(settings)[0])
        found = []
        for image in self.images(project_id):
            with store.open(image.blob_id) as stream:
                found.append(pydicom.dcmread(io.BytesIO(stream.read())))
        return found


def make_site(tmp_path: Path, database_url: str, **overrides) -> Site:
    """A keyed data directory on `database_url` ('' = SQLite in the data directory, already at head)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    site = Site(data, database_url, overrides)
    init_keyring(site.settings())
    return site


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def receiver_running(site: Site, *, workers: int = 1, read_timeout: float | None = None) -> Iterator[int]:
    """The receiver in this process on a free loopback port (yields the port); stopped afterwards."""
    settings = site.settings()
    keyring = init_keyring(settings)[0]
    engine, maker = open_database(settings)
    config = ReceiverConfig(AE_TITLE, "127.0.0.1", 0, settings.data_path, workers=workers,
                            **({"read_timeout": read_timeout} if read_timeout is not None else {}))
    receiver = Receiver(config, maker, open_store(settings, keyring), keyring, prepare_options(settings, keyring))
    try:
        yield receiver.start()
    finally:
        receiver.stop()
        engine.dispose()


@contextmanager
def listener_process(site: Site, *extra: str) -> Iterator[tuple[int, subprocess.Popen]]:
    """`onprem-label dicom-listen` as a subprocess on a free port; SIGTERM afterwards (must exit 0)."""
    port = free_port()
    # The installed console script: the command an operator runs (systemd unit, shell).
    command = [str(Path(sys.executable).with_name("onprem-label")), "--data-dir", str(site.data), "dicom-listen",
               "--ae-title", AE_TITLE, "--port", str(port), "--workers", "1", *extra]
    process = subprocess.Popen(command, env=site.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "dicom-listen: AE" in line, (line, process.stderr.read() if process.poll() is not None else "")
        yield port, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=60)  # reads and closes the pipes
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        except ValueError:
            pass  # the test has read the pipes to their end already


def storescu(port: int, paths: list[Path], *, calling: str = CALLER, called: str = AE_TITLE,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """dcmtk's storescu sending `paths` (files or folders) to 127.0.0.1:port in one association."""
    program = ensure_program("/usr/bin/storescu", "dcmtk")
    # -R: propose each file's own transfer syntax, so a compressed file travels compressed.
    return subprocess.run([program, "-aet", calling, "-aec", called, "+sd", "-nh", "-R", *extra, "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True, timeout=300)


def echoscu(port: int, *, calling: str = CALLER, called: str = AE_TITLE) -> subprocess.CompletedProcess:
    """dcmtk's echoscu against 127.0.0.1:port."""
    program = ensure_program("/usr/bin/echoscu", "dcmtk")
    return subprocess.run([program, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not (ok := condition()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return ok


def write_study(folder: Path) -> dict:
    """Two CT series of three slices and a multi-frame in `folder`, an RLE-compressed instance beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for series in (1, 2):
        for number in range(3):
            (folder / f"s{series}_{number}.dcm").write_bytes(make_dicom(
                study=STUDY, series=f"{STUDY}.{series}", number=number, z=float(number), seed=10 * series + number))
    (folder / "multiframe.dcm").write_bytes(make_dicom(study=STUDY, series=f"{STUDY}.3", frames=4, seed=40))
    rle = pydicom.dcmread(io.BytesIO(make_dicom(study=STUDY, series=f"{STUDY}.4", seed=50)))
    rle.compress(RLELossless)
    rle_path = folder.with_name(folder.name + "-rle.dcm")
    rle.save_as(rle_path, enforce_file_format=True)
    return {"folder": folder, "rle": rle_path, "files": 8, "frames": 6 + 4 + 1, "associations": 2}


def send_study(port: int, study: dict, **kw) -> list[subprocess.CompletedProcess]:
    """storescu sends the study's folder, then (proposing RLE, so it travels compressed) its RLE instance."""
    return [storescu(port, [study["folder"]], **kw), storescu(port, [study["rle"]], extra=("-xr",), **kw)]


def truncated_instance() -> bytes:
    """A well-formed data set whose Pixel Data is far shorter than Rows x Columns says (dcmtk sends it)."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(study=STUDY, seed=77)))
    ds.PixelData = ds.PixelData[:100]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
