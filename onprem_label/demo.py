"""Demo content for a first look: one project with a chest X-ray schema and synthetic images."""

from __future__ import annotations

import io
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session

from onprem_label.db.models import Project
from onprem_label.imaging.ingest import IngestResult, IngestTarget, ingest_stream
from onprem_label.imaging.prepare import PrepareOptions
from onprem_label.storage import EncryptedBlobStore

DIGITAL_XRAY = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

DEMO_SCHEMA = {
    "classes": [
        {"name": "nodule", "color": "#e6194b", "hotkey": "1", "tools": ["bbox", "polygon"]},
        {"name": "effusion", "color": "#3cb44b", "hotkey": "2", "tools": ["polygon", "mask"]},
        {"name": "device", "color": "#4363d8", "hotkey": "3", "tools": ["bbox", "point"]},
    ],
    "questions": [
        {"name": "quality", "type": "single", "options": ["diagnostic", "limited", "non-diagnostic"],
         "required": True},
    ],
}


def create_demo_project(db: Session, *, now: datetime) -> Project:
    """Add the demo project; demo_images() fills it."""
    project = Project(name="Demo: chest X-ray findings",
                      description="A sample project to look around in; safe to delete.",
                      label_schema=DEMO_SCHEMA, settings={"review_rate": 1.0}, created_at=now)
    db.add(project)
    return project


def demo_images(count: int = 4, size: int = 256) -> list[bytes]:
    """Synthetic chest-film-like DICOM images (no real person: made from numpy noise and circles)."""
    rng = np.random.default_rng(2026)
    y, x = np.mgrid[0:size, 0:size]
    study, files = generate_uid(), []
    for number in range(1, count + 1):
        lungs = sum(((x - cx) ** 2 / 0.09 + (y - size / 2) ** 2 / 0.25) < (size / 2.2) ** 2
                    for cx in (size * 0.32, size * 0.68))
        spot = ((x - rng.integers(60, size - 60)) ** 2 + (y - rng.integers(60, size - 60)) ** 2) < 80
        # MONOCHROME1 stores film density: air-filled lungs high (shown dark), a nodule lower.
        pixels = (1100 + 1500 * lungs - 900 * spot * lungs + rng.normal(0, 60, (size, size))).clip(0, 4095)
        files.append(_xray(pixels.astype(np.uint16), study, number))
    return files


def _xray(pixels: np.ndarray, study: str, number: int) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DIGITAL_XRAY, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = DIGITAL_XRAY, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientName, ds.PatientID = f"Demo^Patient{number}", f"DEMO-{number:03d}"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.InstanceNumber = "DX", "CHEST", "PA", number
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"  # film-like: bone is white
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 1850, 2400
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def add_demo_images(db: Session, store: EncryptedBlobStore, options: PrepareOptions, project: Project, *,
                    now: datetime) -> list[IngestResult]:
    """Ingest the synthetic images into `project` through the normal path (de-identified, audited)."""
    target = IngestTarget(project.id, "cli", actor_name="init --demo")
    return [ingest_stream(db, store, target, options, io.BytesIO(data), f"demo-{n}.dcm", now=now)
            for n, data in enumerate(demo_images(), start=1)]
