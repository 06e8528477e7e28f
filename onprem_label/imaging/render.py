"""Rendering for display: DICOM frames through the PS3.3 C.11 grey pipeline or colour, raster pages, PNG."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing, pixel_array
from pydicom.pixels.utils import get_nr_frames


@dataclass(frozen=True)
class Window:
    """A VOI window in modality units (Hounsfield units for CT): center (level) and width > 0."""

    center: float
    width: float

    def __post_init__(self) -> None:
        center, width = float(self.center), float(self.width)
        if not (math.isfinite(center) and math.isfinite(width)):
            raise ValueError("window center and width must be finite numbers")
        if width <= 0:
            raise ValueError("window width must be greater than 0")
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "width", width)


# The usual CT presets (center, width) in Hounsfield units.
PRESETS: dict[str, Window] = {
    "lung": Window(-600, 1500),
    "mediastinum": Window(40, 400),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
    "abdomen": Window(40, 350),
}

GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
_MESSAGE_LIMIT = 200


class RenderError(Exception):
    """A frame that cannot be rendered: missing, undecodable, or with unusable display attributes."""


def frame_count(ds: Dataset) -> int:
    """The number of frames in the pixel data (NumberOfFrames; 1 when absent, empty or 0)."""
    try:
        count = int(get_nr_frames(ds, warn=False))
    except (TypeError, ValueError) as exc:
        raise RenderError("NumberOfFrames is not a number") from exc
    if count < 1:
        raise RenderError("NumberOfFrames is below 1")
    return count


def decode_frame(ds: Dataset, frame: int) -> np.ndarray:
    """Stored values of one frame (0-based): (rows, cols), or (rows, cols, 3) with YBR already as RGB."""
    count = frame_count(ds)
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= frame < count:
        raise RenderError(f"frame {frame!r} does not exist: the image has {count} frame(s), counted from 0")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise RenderError("the dataset has no pixel data")
    try:
        # raw=False (the default) makes pydicom convert YBR_FULL and YBR_FULL_422 to RGB; the
        # JPEG and JPEG 2000 plugins already return RGB for the YBR colour spaces of their codecs.
        return pixel_array(ds, index=int(frame))
    except MemoryError as exc:
        raise RenderError(f"frame {frame} is too large to decode") from exc
    except Exception as exc:  # noqa: BLE001 - every decoder plugin raises its own exception types
        raise RenderError(f"frame {frame} cannot be decoded: {_describe(exc)}") from exc


def display_array(ds: Dataset, pixels: np.ndarray, window: Window | None = None) -> np.ndarray:
    """8-bit display values of a decoded frame: (rows, cols) grey or (rows, cols, 3) RGB."""
    photometric = _photometric(ds)
    if photometric == "PALETTE COLOR" and pixels.ndim == 2:
        return _palette_to_rgb(ds, pixels)
    if pixels.ndim == 3:
        return _colour_to_rgb(ds, pixels)  # `window` does not apply to colour
    if pixels.ndim != 2:
        raise RenderError(f"cannot display a frame of shape {pixels.shape}")
    grey = _grey_to_display(ds, pixels, window)
    # MONOCHROME1 shows the lowest value as white; the inversion follows the VOI stage (C.11).
    return 255 - grey if photometric == "MONOCHROME1" else grey


def default_window(ds: Dataset, pixels: np.ndarray) -> Window | None:
    """The file's first WindowCenter/WindowWidth (already in modality units, C.11.2.1.2) or None."""
    if pixels.ndim != 2 or _photometric(ds) not in GREYSCALE:
        return None
    try:
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if center is None or width is None:
            return None
        return Window(float(center), float(width))
    except (TypeError, ValueError):
        return None  # an unusable window in the header: the caller falls back to min..max


def encode_png(display: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Lossless PNG of an 8-bit display array (grey, RGB or RGBA) with no metadata chunks."""
    image = Image.fromarray(_checked_display(display))
    out = io.BytesIO()
    # A fresh image has an empty `info`, so Pillow writes only IHDR, (PLTE,) IDAT and IEND.
    image.save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


def render_frame(ds: Dataset, frame: int = 0, window: Window | None = None) -> bytes:
    """Decode one frame, map it to display values and encode it as PNG."""
    return encode_png(display_array(ds, decode_frame(ds, frame), window))


def thumbnail_png(display: np.ndarray, max_side: int = 256) -> bytes:
    """PNG of a display array scaled down to fit `max_side` (aspect kept, never scaled up)."""
    if max_side < 1:
        raise ValueError("max_side must be at least 1")
    image = Image.fromarray(_checked_display(display))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=6)
    return out.getvalue()


def display_raster(png: bytes) -> np.ndarray:
    """8-bit display array of a stored raster page: L and RGB(A) as stored, I;16 scaled min..max."""
    with Image.open(io.BytesIO(png), formats=("PNG",)) as image:
        image.load()
        if image.mode in ("L", "RGB", "RGBA"):
            return np.array(image)
        if image.mode.startswith("I"):
            return _min_max(np.asarray(image))
        # Pages written by raster.load_raster never get here; older or foreign PNGs might.
        return np.array(image.convert("RGBA" if "A" in image.getbands() else "RGB"))


def window_from_request(preset: str | None, center: str | float | None,
                        width: str | float | None) -> Window | None:
    """A window from query parameters: a preset name, or center and width together; None if none."""
    preset, center, width = (_blank_to_none(v) for v in (preset, center, width))
    if preset is not None:
        if center is not None or width is not None:
            raise ValueError("give either a window preset or a center and width, not both")
        key = str(preset).strip().lower()
        if key not in PRESETS:
            raise ValueError(f"unknown window preset {str(preset)[:40]!r}; "
                             f"known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[key]
    if center is None and width is None:
        return None
    if center is None or width is None:
        raise ValueError("window center and width must be given together")
    return Window(_parse_number("center", center), _parse_number("width", width))


# --- greyscale: modality LUT, then VOI (window, VOI LUT or min..max) -------------------------

def _grey_to_display(ds: Dataset, pixels: np.ndarray, window: Window | None) -> np.ndarray:
    values = _modality(ds, pixels)
    if window is not None:
        return _linear_window(values, window.center, window.width)
    voi_item = _voi_lut_item(ds)
    if voi_item is not None:
        return _voi_lut(ds, values, voi_item)
    file_window = default_window(ds, pixels)
    if file_window is None:
        return _min_max(values)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function in ("SIGMOID", "LINEAR_EXACT"):
        return _pydicom_window(ds, values)
    # LINEAR, and any value the standard does not define (LINEAR is the default of C.11.2.1.3).
    return _linear_window(values, file_window.center, file_window.width)


def _modality(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    try:
        return apply_modality_lut(pixels, ds)
    except Exception as exc:  # noqa: BLE001 - a malformed Modality LUT or rescale value
        raise RenderError(f"the modality LUT or rescale cannot be applied: {_describe(exc)}") from exc


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, rounded half up."""
    if width <= 1:
        # Width 1 is a threshold: x <= c - 0.5 -> 0, else 255. LINEAR allows no width below 1,
        # so a smaller positive width is read the same way rather than rejected.
        return np.where(np.asarray(values) <= center - 0.5, 0, 255).astype(np.uint8)
    # The standard's piecewise function equals this formula clipped to 0..1: the formula is exactly
    # 0 at x = c - 0.5 - (w-1)/2 and exactly 1 at x = c - 0.5 + (w-1)/2. In place on one buffer:
    # every fresh 512x512 float array costs more in page faults than the arithmetic on it.
    y = np.subtract(values, center - 0.5, dtype=np.float64)
    y /= width - 1
    y += 0.5
    np.clip(y, 0.0, 1.0, out=y)
    y *= 255.0
    return _round_to_uint8(y)


def _voi_lut_item(ds: Dataset) -> Dataset | None:
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
        return None
    return item


def _voi_lut(ds: Dataset, values: np.ndarray, item: Dataset) -> np.ndarray:
    """The first VOI LUT, its output range 0..2**bits-1 (bits: LUTDescriptor[2]) scaled to 0..255."""
    try:
        entries, first_map, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 2**16
        if not np.issubdtype(values.dtype, np.integer):
            # LUT inputs are integers: round rescaled values here (pydicom would truncate and warn).
            values = np.floor(np.nan_to_num(values) + 0.5)
        # Clip first so pydicom's uint16 index array cannot wrap around for far-out values.
        values = np.clip(values, first_map, first_map + entries - 1).astype(np.int64)
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    except Exception as exc:  # noqa: BLE001 - a malformed VOI LUT Sequence
        raise RenderError(f"the VOI LUT cannot be applied: {_describe(exc)}") from exc
    return _scale_bits(out, bits)


def _pydicom_window(ds: Dataset, values: np.ndarray) -> np.ndarray:
    """SIGMOID or LINEAR_EXACT via pydicom, on a copy of the window attributes set up for 0..255."""
    # apply_windowing maps onto the stored value range; an 8-bit unsigned description makes that
    # range 0..255, and a separate dataset keeps pydicom from rewriting attributes of the caller's.
    spec = Dataset()
    spec.PhotometricInterpretation = "MONOCHROME2"
    spec.BitsStored = 8
    spec.PixelRepresentation = 0
    spec.WindowCenter = ds.WindowCenter
    spec.WindowWidth = ds.WindowWidth
    spec.VOILUTFunction = ds.VOILUTFunction
    try:
        with np.errstate(over="ignore"):  # exp() overflows far outside a sigmoid window: y is 0 there
            out = apply_windowing(np.asarray(values, dtype=np.float64), spec, index=0)
    except (ValueError, TypeError, IndexError) as exc:
        raise RenderError(f"the window cannot be applied: {_describe(exc)}") from exc
    return _round_to_uint8(out)


def _min_max(values: np.ndarray) -> np.ndarray:
    """The frame's own finite min..max onto 0..255; a constant frame is all 0."""
    x = np.asarray(values, dtype=np.float64)
    mask = np.isfinite(x)
    finite = x if mask.all() else x[mask]
    if finite.size == 0:
        return np.zeros(x.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(x.shape, dtype=np.uint8)
    y = np.subtract(x, low)
    y *= 255.0 / (high - low)
    return _round_to_uint8(y)


# --- colour ----------------------------------------------------------------------------------

def _palette_to_rgb(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    try:
        rgb = apply_color_lut(pixels, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except Exception as exc:  # noqa: BLE001 - a malformed palette
        raise RenderError(f"the palette colour LUT cannot be applied: {_describe(exc)}") from exc
    return _scale_bits(rgb[..., :3], bits)  # an alpha palette, if any, is not shown


def _colour_to_rgb(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    if pixels.shape[-1] != 3:
        raise RenderError(f"cannot display {pixels.shape[-1]} samples per pixel")
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    try:
        bits = int(ds.get("BitsStored") or pixels.dtype.itemsize * 8)
    except (TypeError, ValueError):
        bits = pixels.dtype.itemsize * 8
    return _scale_bits(pixels, bits)


# --- helpers ---------------------------------------------------------------------------------

def _scale_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Values of a 0..2**bits-1 range onto 0..255 (rounded half up, clipped)."""
    top = float(2 ** max(1, min(int(bits), 32)) - 1)
    if top == 255.0 and values.dtype == np.uint8:
        return np.ascontiguousarray(values)
    return _round_to_uint8(np.multiply(values, 255.0 / top, dtype=np.float64))


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    """Round half up and clip to 0..255, in place: `values` must be a float64 buffer the caller owns."""
    values += 0.5
    np.floor(values, out=values)
    # fmax/fmin (unlike clip) also send NaN to 0, so casting never meets an invalid value.
    np.fmax(values, 0.0, out=values)
    np.fmin(values, 255.0, out=values)
    return values.astype(np.uint8)


def _checked_display(display: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(display)
    if arr.dtype != np.uint8:
        raise ValueError(f"a display array must be uint8, not {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or arr.size == 0:
        raise ValueError(f"a display array must be (rows, cols) or (rows, cols, 3|4), not {arr.shape}")
    return arr


def _photometric(ds: Dataset) -> str:
    # A frame without the attribute is shown as plain grey (MONOCHROME2).
    return str(ds.get("PhotometricInterpretation", "") or "MONOCHROME2").strip().upper()


def _first(value: Any) -> Any:
    if isinstance(value, (MultiValue, list, tuple)):
        return value[0] if len(value) else None
    return value


def _blank_to_none(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _parse_number(name: str, value: str | float) -> float:
    if isinstance(value, bool):
        raise ValueError(f"window {name} is not a number")
    try:
        text = value.strip() if isinstance(value, str) else value
        if isinstance(text, str) and "_" in text:
            raise ValueError  # float() accepts '1_000'; a query parameter should not
        number = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"window {name} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"window {name} must be a finite number")
    return number


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."
