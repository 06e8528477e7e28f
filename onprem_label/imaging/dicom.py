"""Reading DICOM files: parsing (with or without a meta header) and proving the pixels decode."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length, get_nr_frames
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from onprem_label.imaging import errors
from onprem_label.imaging.errors import Rejected

# Parsing problems pydicom reports with these; a file that raises anything else while being
# read is still only a bad file, never a reason to stop a batch (see read_dicom).
_PARSE_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
                 AttributeError, IndexError, OverflowError, NotImplementedError, LookupError)


def looks_like_dicom(head: bytes) -> bool:
    """True for a Part 10 file (preamble + 'DICM') or a bare dataset starting with group 0008."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    # No meta header: the first element is usually (0008,00xx) in either byte order.
    return head[:2] in (b"\x08\x00", b"\x00\x08") and len(head) >= 8


def quiet_validation() -> None:
    """Make pydicom accept odd values silently when reading and writing.

    Files from the field often carry values that break their VR's rules; they are de-identified
    like any other and written back as they came. pydicom's default would warn for each one,
    filling the server log (and failing a test run, where warnings are errors).
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    _ignore_pydicom_warnings()


@functools.cache
def _ignore_pydicom_warnings() -> None:
    # Once per process: filterwarnings adds a filter each time it is called.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def read_dicom(stream: BinaryIO) -> Dataset:
    """Parse a DICOM file; files without a meta header get one naming the encoding they used."""
    quiet_validation()
    try:
        ds = pydicom.dcmread(stream, force=True)
    except _PARSE_ERRORS as exc:
        raise Rejected(errors.CORRUPT, f"not a readable DICOM file ({type(exc).__name__})") from None
    except RecursionError:
        raise Rejected(errors.CORRUPT, "not a readable DICOM file (sequences nested too deeply)") from None
    if not isinstance(ds, Dataset) or len(ds) == 0:
        raise Rejected(errors.NOT_AN_IMAGE, "not a DICOM file")
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = _syntax_from_encoding(ds)
    return ds


def _syntax_from_encoding(ds: Dataset) -> UID:
    """The uncompressed transfer syntax a meta-less dataset was actually read with."""
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


@dataclass(frozen=True)
class PixelFacts:
    """What the pixel data holds: frames of rows x columns, and the syntax it is stored in."""

    frames: int
    rows: int
    columns: int
    syntax: UID


def check_pixels(ds: Dataset) -> PixelFacts:
    """Prove the pixel data is present, complete and decodable (first and last frame)."""
    if "PixelData" not in ds:
        raise Rejected(errors.NO_PIXEL_DATA, f"no pixel data ({_sop_class_name(ds)}): nothing to label")
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError):
        raise Rejected(errors.UNSUPPORTED_SYNTAX,
                       f"transfer syntax {_syntax_name(syntax)} is not supported") from None
    if not decoder.is_available:
        raise Rejected(errors.UNSUPPORTED_SYNTAX,
                       f"no decoder is installed for transfer syntax {_syntax_name(syntax)}")
    rows, columns = _positive(ds, "Rows"), _positive(ds, "Columns")
    try:
        frames = int(get_nr_frames(ds, warn=False))
    except (ValueError, TypeError):
        raise Rejected(errors.CORRUPT, "NumberOfFrames is not a number") from None
    if frames < 1:
        raise Rejected(errors.CORRUPT, "NumberOfFrames is below 1")
    if not syntax.is_compressed:
        try:
            expected = get_expected_length(ds, "bytes")
        except (AttributeError, TypeError, ValueError, KeyError):
            raise Rejected(errors.CORRUPT, "the image attributes (bits, samples) are missing or invalid") from None
        if len(ds.PixelData) < expected:
            raise Rejected(errors.TRUNCATED, f"truncated pixel data: {len(ds.PixelData)} of {expected} bytes")
    # Compressed: every frame, so that no frame fails later in the viewer (decoders meet each
    # frame's bytes here first, in an isolated worker: imaging/isolation.py). Uncompressed: the
    # length check proved every frame is there; the first and last prove the layout.
    # (pixel_array per frame, not iter_pixels: pydicom 3.0's iterator trips on some J2K files.)
    indices = range(frames) if syntax.is_compressed else sorted({0, frames - 1})
    for index in indices:
        _decode_or_reject(ds, index, syntax)
    return PixelFacts(frames, rows, columns, syntax)


def _decode_or_reject(ds: Dataset, index: int, syntax: UID) -> None:
    """Decode frame `index`, every decoder failure turned into a Rejected."""
    try:
        pixel_array(ds, index=index, raw=False)
    except MemoryError:
        raise Rejected(errors.TOO_LARGE, "a frame is too large to decode") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - plugins raise their own types; Rust panics are BaseException
        kind = "truncated" if isinstance(exc, EOFError) else "undecodable"
        code = errors.TRUNCATED if kind == "truncated" else errors.CORRUPT
        raise Rejected(code, f"{kind} pixel data (frame {index + 1}, {_syntax_name(syntax)})") from None


def _positive(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    if not isinstance(value, int) or value < 1:
        raise Rejected(errors.CORRUPT, f"{keyword} is missing or not a positive number")
    return value


def _syntax_name(syntax: UID) -> str:
    # The UID dictionary's name, or the UID itself: both come from the standard, not the patient.
    name = syntax.name if syntax.is_valid else ""
    return f"'{name}'" if name and name != str(syntax) else f"'{str(syntax)[:64]}'"


def _sop_class_name(ds: Dataset) -> str:
    value = ds.get("SOPClassUID")
    uid = UID(str(value)) if value is not None else None
    if uid is not None and uid.is_valid and uid.name != str(uid):
        return uid.name
    return "unknown SOP class"


def sort_key(ds: Dataset) -> float:
    """Where an instance sits in its series: position along the slice normal, else InstanceNumber."""
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    try:
        if position is not None and orientation is not None and len(position) == 3 and len(orientation) == 6:
            row, col = [float(v) for v in orientation[:3]], [float(v) for v in orientation[3:]]
            normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
                      row[0] * col[1] - row[1] * col[0])
            key = sum(float(p) * n for p, n in zip(position, normal))
            if math.isfinite(key):
                return key
    except (TypeError, ValueError):
        pass
    try:
        number = float(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def display_meta(ds: Dataset, facts: PixelFacts) -> dict[str, Any]:
    """The technical, non-identifying facts the viewer needs (read after de-identification)."""
    meta: dict[str, Any] = {
        "modality": _text(ds.get("Modality")),
        "photometric": _text(ds.get("PhotometricInterpretation")),
        "bits_stored": _number(ds.get("BitsStored")),
        "signed": ds.get("PixelRepresentation") == 1,
        "transfer_syntax": str(facts.syntax),
        "sop_class": str(ds.get("SOPClassUID", ""))[:64],
    }
    # Descriptive values the profile keeps (they name no one): shown as text, escaped, never parsed.
    for keyword, key in (("BodyPartExamined", "body_part"), ("Manufacturer", "manufacturer"),
                         ("ManufacturerModelName", "model"), ("ViewPosition", "view_position"),
                         ("ImageLaterality", "laterality")):
        if ds.get(keyword):
            meta[key] = _text(ds.get(keyword))
    for keyword, key in (("RescaleSlope", "rescale_slope"), ("RescaleIntercept", "rescale_intercept")):
        if keyword in ds:
            meta[key] = _number(ds.get(keyword))
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        first = lambda v: v[0] if isinstance(v, pydicom.multival.MultiValue) else v  # noqa: E731
        meta["window"] = {"center": _number(first(center)), "width": _number(first(width))}
    return meta


def _text(value: Any) -> str:
    return "" if value is None else str(value)[:64]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
