"""One incoming file -> de-identified, storable images. No database, no store: runs in workers."""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

from onprem_label.imaging import errors
from onprem_label.imaging.deidentify import DeidSettings, burned_in_reasons, deidentify_dataset
from onprem_label.imaging.dicom import check_pixels, display_meta, looks_like_dicom, read_dicom, sort_key
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.raster import load_raster
from onprem_label.logs import HIDE_EXCEPTION_TEXT

_READ = 1 << 20
log = logging.getLogger("onprem_label.imaging")

# Original identifiers kept (sealed) in the linkage table when an admin has switched it on.
LINK_KEYWORDS = ("PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID",
                 "SeriesInstanceUID", "SOPInstanceUID")


@dataclass(frozen=True)
class PrepareOptions:
    """Everything prepare_file needs; plain values so it can cross into a worker process."""

    deid: DeidSettings
    digest_key: bytes
    raster_max_pixels: int
    max_bytes: int
    keep_link: bool = False
    decode_timeout: int = 0  # seconds a worker may spend on one file; 0: no limit


@dataclass
class PreparedImage:
    """One storable image: de-identified DICOM (Part 10 bytes) or a metadata-free PNG page."""

    data: bytes
    page: int
    frames: int
    width: int
    height: int
    instance_uid: str | None = None
    sort_key: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    deid_report: dict[str, Any] = field(default_factory=dict)
    link: dict[str, str] | None = None


@dataclass
class Prepared:
    """A file ready to be stored: its kind, keyed digest, images and series facts."""

    kind: str
    digest: str
    images: list[PreparedImage]
    modality: str = ""
    study_uid: str | None = None
    series_uid: str | None = None
    pixel_check_reasons: list[str] = field(default_factory=list)


def source_digest(stream: BinaryIO, key: bytes, max_bytes: int) -> str:
    """Keyed hash of the whole stream (then rewound); TOO_LARGE past `max_bytes`."""
    mac, size = hmac.new(key, digestmod=hashlib.sha256), 0
    stream.seek(0)
    while chunk := stream.read(_READ):
        size += len(chunk)
        if size > max_bytes:
            raise Rejected(errors.TOO_LARGE, f"file is larger than the limit of {max_bytes} bytes")
        mac.update(chunk)
    stream.seek(0)
    if size == 0:
        raise Rejected(errors.NOT_AN_IMAGE, "empty file")
    return mac.hexdigest()


def prepare_file(stream: BinaryIO, options: PrepareOptions, *, digest: str | None = None) -> Prepared:
    """Read, check and de-identify one file; raises Rejected with the reason.

    `digest` is the stream's source_digest when the caller already has it.
    """
    if digest is None:
        digest = source_digest(stream, options.digest_key, options.max_bytes)
    head = stream.read(132)
    stream.seek(0)
    if looks_like_dicom(head):
        return _prepare_dicom(stream, digest, options)
    if _is_picture(stream):
        return _prepare_raster(stream, digest, options)
    try:
        return _prepare_dicom(stream, digest, options)  # a meta-less dataset in another group
    except Rejected as exc:
        if exc.code in (errors.CORRUPT, errors.NOT_AN_IMAGE, errors.NO_PIXEL_DATA):
            raise Rejected(errors.NOT_AN_IMAGE,
                           "neither a DICOM file nor a PNG, JPEG, TIFF or BMP picture") from None
        raise


def prepare_or_reject(stream: BinaryIO, options: PrepareOptions, *, digest: str | None = None) -> Prepared:
    """prepare_file, with any unexpected failure on a strange file turned into a Rejected.

    A parser bug met on one hostile file must cost that file, never the batch or the request;
    it is logged with its trace for the operator.
    """
    try:
        return prepare_file(stream, options, digest=digest)
    except Rejected:
        raise
    except RecursionError:
        raise Rejected(errors.CORRUPT, "the file is nested too deeply to read") from None
    except MemoryError:
        raise Rejected(errors.TOO_LARGE, "the file needs more memory than this server has") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - see the docstring; Rust panics are BaseException
        # The exception's text may quote the file (a decoder's message with a patient's name in it).
        log.exception("unexpected error preparing a file", extra=HIDE_EXCEPTION_TEXT)
        raise Rejected(errors.CORRUPT, f"unexpected error while reading the file ({type(exc).__name__})") from None


def _is_picture(stream: BinaryIO) -> bool:
    try:
        with Image.open(stream):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False
    finally:
        stream.seek(0)


def _prepare_raster(stream: BinaryIO, digest: str, options: PrepareOptions) -> Prepared:
    pages = load_raster(stream, max_pixels=options.raster_max_pixels)  # RasterRejected is a Rejected
    report = {"kind": "raster", "stripped": ["EXIF", "XMP", "ICC profile", "text chunks", "comments"]}
    images = [PreparedImage(page.png, number, 1, page.width, page.height, meta={"mode": page.mode},
                            deid_report=report)
              for number, page in enumerate(pages)]
    return Prepared("raster", digest, images)


def _prepare_dicom(stream: BinaryIO, digest: str, options: PrepareOptions) -> Prepared:
    ds = read_dicom(stream)
    facts = check_pixels(ds)
    link = {k: str(ds.get(k, "")) for k in LINK_KEYWORDS} if options.keep_link else None
    reasons = burned_in_reasons(ds)
    try:
        report = deidentify_dataset(ds, options.deid)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError, struct.error) as exc:
        raise Rejected(errors.CORRUPT, "the file could not be written after de-identification "
                                       f"({type(exc).__name__})") from None
    data = out.getvalue()
    _check_written(data)
    image = PreparedImage(data, 0, facts.frames, facts.columns, facts.rows,
                          instance_uid=_uid(ds, "SOPInstanceUID"), sort_key=sort_key(ds),
                          meta=display_meta(ds, facts), deid_report=report.to_json(), link=link)
    return Prepared("dicom", digest, [image], modality=str(ds.get("Modality", ""))[:16],
                    study_uid=_uid(ds, "StudyInstanceUID"), series_uid=_uid(ds, "SeriesInstanceUID"),
                    pixel_check_reasons=reasons)


def _check_written(data: bytes) -> None:
    """The stored copy must parse again: a file the viewer cannot open later is rejected now."""
    try:
        read_dicom(io.BytesIO(data))
    except Rejected:
        raise Rejected(errors.CORRUPT, "the de-identified copy could not be read back") from None


def _uid(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value)[:64] if value else None


def prepare_options(settings, keyring) -> PrepareOptions:
    """The ingest options of this installation (settings + per-install keys from the keyring)."""
    shift = settings.deid_date_shift_days
    return PrepareOptions(
        deid=DeidSettings(uid_key=keyring.purpose_key("deid-uids"), dates="shift" if shift else "remove",
                          date_offset_days=shift),
        digest_key=keyring.purpose_key("ingest-digest"), raster_max_pixels=settings.raster_max_pixels,
        max_bytes=settings.upload_max_file_bytes, keep_link=settings.deid_linkage,
        decode_timeout=settings.ingest_decode_timeout)


def link_key(settings, keyring) -> bytes | None:
    """The key sealing the linkage table, or None when the admin has not switched it on."""
    return keyring.purpose_key("deid-linkage") if settings.deid_linkage else None
