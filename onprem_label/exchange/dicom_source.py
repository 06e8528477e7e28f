"""What DICOM SEG and SR exports share: the de-identified source headers, label codes, the zip they fill.

The headers are read from the encrypted store, as ingest de-identified them (UIDs, patient and study
modules as stored, never the originals, which the server does not keep); pixel data is not read.
A label class becomes a code of a project-local scheme (designator PRIVATE_SCHEME, the class name as
meaning and, where it is plain ASCII, as code value): label schemas carry no codes.
"""

from __future__ import annotations

import hashlib
import io
import json
from contextlib import contextmanager
from typing import Callable, Iterator

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from onprem_label import __version__
from onprem_label.exchange.selection import ExportRow
from onprem_label.imaging.renditions import image_index
from onprem_label.storage import BlobNotFound, EncryptedBlobStore, IntegrityError

PRIVATE_SCHEME = "99ONPREMLABEL"  # "99" opens a private coding scheme designator (PS3.16 8.2)
MANUFACTURER = "onprem-label"
# Type 2 attributes of the patient and study modules a SEG or SR must carry (empty is allowed);
# de-identification removed some of them from the source, so they are written empty, never invented.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "StudyID", "AccessionNumber", "ReferringPhysicianName")


class NotDerivable(Exception):
    """A task whose images cannot be the source of this object (not DICOM, or geometry highdicom refuses)."""


def class_code(name: str) -> hd.sr.CodedConcept:
    """The code of a label class in the project-local scheme: the name as code value where it is plain
    ASCII (a code value's VR takes nothing else), else C and 15 hex digits of its SHA-256; the name as meaning."""
    plain = name.isascii() and name.isprintable() and "\\" not in name and name == name.strip()
    value = name if plain else "C" + hashlib.sha256(name.encode()).hexdigest()[:15]
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=text(name))


def text(value: str, limit: int = 64) -> str:
    """Free text as one DICOM LO value: a backslash (the value separator) as '/', control characters out."""
    return "".join(c for c in value.replace("\\", "/") if c.isprintable())[:limit]


def read_header(store: EncryptedBlobStore, blob_id: str) -> Dataset:
    """The de-identified header of one stored instance (no pixel data), Type 2 patient and study
    attributes present (empty where de-identification removed them); NotDerivable if unreadable."""
    try:
        with store.open(blob_id) as reader:
            ds = pydicom.dcmread(reader, stop_before_pixels=True)
    except (BlobNotFound, IntegrityError, InvalidDicomError, OSError) as exc:
        # Damage in the store (doctor --storage reports it): this task is left out, the export goes on.
        raise NotDerivable(f"the stored file could not be read ({type(exc).__name__})") from None
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def common(sop_instance_uid: str) -> dict:
    """The keyword arguments every derived object of ours takes (series, instance, equipment)."""
    return {"series_instance_uid": hd.UID(), "series_number": 1, "sop_instance_uid": sop_instance_uid,
            "instance_number": 1, "manufacturer": MANUFACTURER}


def mark_deidentified(derived: Dataset, source: Dataset, names: list[str]) -> Dataset:
    """Carry the source's de-identification flags onto a derived object (it holds only their values);
    UTF-8 when a class name in it is not ASCII (pydicom re-encodes the text copied from the source)."""
    if not all(name.isascii() for name in names):
        # Only then: plain ASCII files keep the source's character set, which every reader checks.
        derived.SpecificCharacterSet = "ISO_IR 192"
    for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
                    "LongitudinalTemporalInformationModified"):
        if keyword in source:
            derived[keyword] = source[keyword]
    return derived


def encode(ds: Dataset) -> bytes:
    """A derived object as a Part 10 file."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def locate(row: ExportRow, frame: int) -> tuple[int, int]:
    """(index of the item's image, frame inside it) of the item's frame `frame`; NotDerivable past the end."""
    try:
        return image_index(row.images, frame)
    except ValueError:
        raise NotDerivable("a shape's frame is not one of the item's frames") from None


@contextmanager
def refusals():
    """highdicom's refusals of a source or a shape (its ValueError and kin) as NotDerivable."""
    try:
        yield
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise NotDerivable(f"{type(exc).__name__}: {exc}") from None


def dicom_files(rows: Callable[[], Iterator[ExportRow]], schema: dict, info: dict, *, store: EncryptedBlobStore,
                folder: str, build: Callable[..., Dataset | None]) -> Iterator[tuple[str, object]]:
    """`<folder>/task-<id>.dcm` per task `build(row, header, classes)` makes an object for (`header(i)`
    reads the de-identified header of the item's image i; `classes` are the schema's class names), then
    info.json: what was written and why the rest was not (no such shapes; not DICOM; unsupported)."""
    classes = [c["name"] for c in schema.get("classes", [])]
    counts = {"written": 0, "no_shapes": 0, "not_dicom": 0, "unsupported": 0}
    problems: list[dict] = []
    for row in rows():
        try:
            if row.item.kind != "dicom" or not row.images or any(not i.instance_uid for i in row.images):
                raise NotDerivable("not_dicom")
            derived = build(row, lambda index, row=row: read_header(store, row.images[index].blob_id), classes)
        except NotDerivable as exc:
            reason = "not_dicom" if str(exc) == "not_dicom" else "unsupported"
            counts[reason] += 1
            if reason == "unsupported" and len(problems) < 100:
                problems.append({"task_id": row.task.id, "item_id": row.item.id, "reason": str(exc)[:200]})
            continue
        if derived is None:
            counts["no_shapes"] += 1
        else:
            counts["written"] += 1
            yield f"{folder}/task-{row.task.id}.dcm", encode(derived)
    yield "info.json", json.dumps({**info, "software_version": __version__, "coding_scheme": PRIVATE_SCHEME,
                                   "files": counts, "unsupported": problems}, indent=1) + "\n"
