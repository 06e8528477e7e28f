"""Test helpers for imaging: synthetic DICOM files, upload requests, API users and raw-store scans."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from onprem_label.auth import tokens
from onprem_label.workflow.projects import create_project

PATIENT = "Smithfield^Johanna^Q"  # a marker no de-identified output may contain
PATIENT_ID = "MRN-7741-0032"


def make_dicom(*, study: str = "1.2.826.0.1.3680043.8.498.1", series: str | None = None,
               instance: str | None = None, rows: int = 32, columns: int = 48, frames: int = 1,
               modality: str = "CT", z: float = 0.0, number: int = 1, patient: str = PATIENT,
               seed: int = 0, **extra) -> bytes:
    """A small valid Part 10 file (16-bit signed CT-like pixels) with identifying attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = instance or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or study + ".1"
    ds.PatientName = patient
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19610412"
    ds.StudyDate = "20240102"
    ds.AccessionNumber = "ACC99231"
    ds.InstitutionName = "Saint Elsewhere Hospital"
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    pixels = np.random.default_rng(seed).integers(0, 2000, size=(frames, rows, columns), dtype=np.int16)
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def multipart(files: list[tuple[str, bytes]]) -> dict:
    """`data=` for the Flask test client: files under the field name `files`."""
    return {"files": [(io.BytesIO(content), name) for name, content in files]}


def upload(client, project_id: int, files: list[tuple[str, bytes]], headers: dict | None = None):
    """POST files to a project's items endpoint."""
    return client.post(f"/api/v1/projects/{project_id}/items", data=multipart(files),
                       content_type="multipart/form-data", headers=headers or {})


def new_project(db, name: str = "Chest CT", **settings) -> int:
    """A committed project; its id."""
    from datetime import datetime, timezone

    project = create_project(db, name, settings=settings, actor_name="test",
                             now=datetime(2026, 11, 29, tzinfo=timezone.utc))
    db.commit()
    return project.id


def bearer_for(db, user, clock) -> dict:
    """An Authorization header with a fresh API token of `user`."""
    secret, _row = tokens.create_token(db, user, "test", now=clock())
    db.commit()
    return {"Authorization": f"Bearer {secret}"}


def raw_files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (a data directory) with its raw bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def find_markers(data: bytes, markers: list[str]) -> list[str]:
    """The markers that occur in `data` (as ASCII, case-sensitive)."""
    return [m for m in markers if re.search(re.escape(m.encode()), data)]
