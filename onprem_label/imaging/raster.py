"""Ordinary pictures (PNG, JPEG, TIFF, BMP) -> upright, metadata-free PNG pages in a known mode."""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from onprem_label.imaging import errors
from onprem_label.imaging.errors import Rejected

ALLOWED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
# Pillow names a JPEG that carries more than one picture (camera MPO files) "MPO": it is still a
# JPEG, and only its first (primary) picture is kept.
_JPEG_ALIASES = ("MPO",)
MAX_PAGES = 1000
PNG_COMPRESS_LEVEL = 6  # stored pages are written once and read many times
_COPY_CHUNK = 1 << 20


class RasterRejected(Rejected):
    """A picture that cannot be stored; the message says why and `code` is one of imaging.errors'."""


@dataclass
class RasterPage:
    """One page, upright and without metadata: PNG bytes, size and mode ("L", "I;16", "RGB", "RGBA")."""

    png: bytes
    width: int
    height: int
    mode: str


def load_raster(stream: BinaryIO, *, max_pixels: int) -> list[RasterPage]:
    """Pages of a PNG, JPEG or BMP (one) or TIFF (each) read from the stream's position, or RasterRejected."""
    if max_pixels < 1:
        raise ValueError("max_pixels must be at least 1")
    source = _seekable_from_here(stream)
    try:
        return _read_pages(source, max_pixels)
    finally:
        if source is not stream:
            source.close()


def _seekable_from_here(stream: BinaryIO) -> BinaryIO:
    """`stream` itself when Pillow can use it; otherwise its rest, copied into memory."""
    # Pillow always seeks to 0, so a stream positioned past its start (or not seekable at all)
    # is copied from where it stands. Never to a temp file: no plaintext image touches the disk
    # (callers bound the size: upload_max_file_bytes).
    try:
        if stream.seekable() and stream.tell() == 0:
            return stream
    except (AttributeError, OSError, ValueError):
        pass
    spool = io.BytesIO()
    try:
        shutil.copyfileobj(stream, spool, _COPY_CHUNK)
        spool.seek(0)
    except (AttributeError, OSError, ValueError, TypeError) as exc:
        spool.close()
        raise RasterRejected(errors.CORRUPT, f"the upload could not be read ({type(exc).__name__})") from None
    return spool


def _read_pages(source: BinaryIO, max_pixels: int) -> list[RasterPage]:
    try:
        with Image.open(source, formats=ALLOWED_FORMATS) as image:
            if image.format not in ALLOWED_FORMATS + _JPEG_ALIASES:
                raise RasterRejected(errors.UNSUPPORTED_FORMAT, f"{image.format} pictures are not supported")
            pages = []
            for page in _pages(image):
                _check_size(page, max_pixels)  # from the header, before any pixel is decoded
                pages.append(_normalised_page(page))
            return pages
    except RasterRejected:
        raise
    except UnidentifiedImageError:
        raise _unidentified(source) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow checks the header size inside Image.open, before we can: its error fires above
        # twice MAX_IMAGE_PIXELS, its warning above once (and reaches here only where warnings are
        # errors, as in the tests). The raster_max_pixels setting defaults to Pillow's warning
        # threshold and cannot exceed its error threshold, so both limits agree.
        factor = 2 if isinstance(exc, Image.DecompressionBombError) else 1
        limit = min(max_pixels, (Image.MAX_IMAGE_PIXELS or max_pixels) * factor)
        raise RasterRejected(errors.TOO_MANY_PIXELS,
                             f"the picture has more pixels than the limit of {limit}") from None
    except MemoryError:
        raise RasterRejected(errors.TOO_LARGE, "the picture is too large to decode") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on hostile input
        raise _decode_failure(exc) from None


def _pages(image: Image.Image) -> Iterator[Image.Image]:
    """The image at each page in turn: every page of a TIFF, the first picture of anything else."""
    if image.format != "TIFF":
        yield image
        return
    for index in range(MAX_PAGES + 1):
        try:
            image.seek(index)
        except EOFError:
            return
        if index == MAX_PAGES:
            raise RasterRejected(errors.TOO_LARGE, f"the TIFF has more than {MAX_PAGES} pages")
        yield image


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise RasterRejected(errors.CORRUPT, "the picture has no width or no height")
    if width * height > max_pixels:
        raise RasterRejected(errors.TOO_MANY_PIXELS, f"the picture has {width} x {height} = "
                             f"{width * height} pixels, more than the limit of {max_pixels}")


def _normalised_page(image: Image.Image) -> RasterPage:
    image.load()
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - the pixels decoded, so this is the EXIF block
        # Shown unrotated, a photo could be read with left and right swapped: refuse instead.
        raise RasterRejected(errors.CORRUPT, "the picture's EXIF orientation cannot be read") from None
    clean = _normalise_mode(upright)
    # EXIF, XMP, ICC profile, comments, text chunks, DPI: Pillow's PNG writer copies what is in
    # `info` (the ICC profile, for one), and an ICC description can carry a name. Keep none of it.
    clean.info = {}
    out = io.BytesIO()
    clean.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return RasterPage(out.getvalue(), clean.width, clean.height, clean.mode)


def _normalise_mode(image: Image.Image) -> Image.Image:
    """A new image in "L", "I;16", "RGB" or "RGBA"; transparency becomes an alpha channel."""
    mode, transparent = image.mode, "transparency" in image.info
    if mode == "1":
        return image.convert("L")
    if mode in ("L", "RGB", "P"):
        # A tRNS colour or palette transparency turns into real alpha; else P becomes plain RGB.
        return image.convert("RGBA") if transparent else image.convert("RGB" if mode == "P" else mode)
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        # Grey with alpha is kept as RGBA rather than dropping the alpha or adding a fifth mode.
        return image.convert("RGBA")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return Image.fromarray(np.asarray(image).astype(np.uint16))  # native order: "I;16"
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_wide_to_uint16(np.asarray(image)))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        # No colour management: an embedded ICC profile is dropped, not applied.
        return image.convert("RGB")
    raise RasterRejected(errors.UNSUPPORTED_FORMAT, f"pictures in pixel mode {mode} are not supported")


def _wide_to_uint16(values: np.ndarray) -> np.ndarray:
    """32-bit integer or float grey as 16-bit: exact when every value is a whole 0..65535, else min..max."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    if finite.all() and (x == np.floor(x)).all() and x.min() >= 0 and x.max() <= 65535:
        return x.astype(np.uint16)
    if not finite.any():
        return np.zeros(x.shape, dtype=np.uint16)
    low, high = float(x[finite].min()), float(x[finite].max())
    if high <= low:
        return np.zeros(x.shape, dtype=np.uint16)
    scaled = np.floor((np.where(finite, x, low) - low) * (65535.0 / (high - low)) + 0.5)
    return np.clip(scaled, 0, 65535).astype(np.uint16)


def _unidentified(source: BinaryIO) -> RasterRejected:
    """Name what Pillow would not open: a known other format, a damaged allowed one, or neither."""
    try:
        source.seek(0)
        prefix = source.read(16)
    except (OSError, ValueError):
        prefix = b""
    name = _sniff_format(prefix)
    if name in ALLOWED_FORMATS:
        return RasterRejected(errors.CORRUPT, f"the {name} header is damaged")
    if name:
        return RasterRejected(errors.UNSUPPORTED_FORMAT,
                              f"{name} pictures are not supported (only {', '.join(ALLOWED_FORMATS)})")
    return RasterRejected(errors.NOT_AN_IMAGE,
                          f"not a picture in a supported format ({', '.join(ALLOWED_FORMATS)})")


def _sniff_format(prefix: bytes) -> str | None:
    """The format whose signature `prefix` carries, by Pillow's own checks (no header parsing)."""
    if not prefix:
        return None
    try:
        Image.init()
        for name in Image.ID:
            accept = Image.OPEN[name][1]
            verdict = accept(prefix) if accept is not None else False
            if verdict and not isinstance(verdict, str):  # a str is a "maybe" with a warning text
                return name
    except Exception:  # noqa: BLE001 - naming is a courtesy; never fail the rejection over it
        return None
    return None


def _decode_failure(exc: Exception) -> RasterRejected:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in text:
        return RasterRejected(errors.TRUNCATED, "the picture is truncated")
    return RasterRejected(errors.CORRUPT, f"the picture is corrupt ({type(exc).__name__})")
