"""Raster ingest: formats, modes, EXIF orientation, metadata stripped, pages, limits, bad input rejected."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile
from PIL.PngImagePlugin import PngInfo

from onprem_label.config import BY_NAME
from onprem_label.imaging import errors, raster
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.raster import RasterPage, RasterRejected, load_raster

MARKER = "ZQX-MARKER-4711"
LIMIT = 10_000_000
RED, WHITE = (255, 0, 0), (255, 255, 255)


def encoded(image: Image.Image, fmt: str, **params) -> io.BytesIO:
    """`image` saved in `fmt` into a rewound in-memory stream."""
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    out.seek(0)
    return out


def decoded(page: RasterPage) -> Image.Image:
    """A stored page opened again."""
    image = Image.open(io.BytesIO(page.png))
    image.load()
    return image


def png_chunks(data: bytes) -> list[bytes]:
    """Chunk types of a PNG, in order."""
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append(kind)
        pos += 12 + length
    return chunks


def rejected(data, *, max_pixels=LIMIT) -> RasterRejected:
    """The RasterRejected that loading `data` (bytes or stream) raises."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    with pytest.raises(RasterRejected) as info:
        load_raster(stream, max_pixels=max_pixels)
    return info.value


def corner_marked(size=(40, 20)) -> Image.Image:
    """A white RGB picture with a red 10x10 block in its top-left corner."""
    image = Image.new("RGB", size, WHITE)
    image.paste(RED, (0, 0, 10, 10))
    return image


def near(pixel, colour, tolerance=40) -> bool:
    """True when an RGB pixel is within `tolerance` of `colour` in every channel (JPEG is lossy)."""
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


# --- accepted formats ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_lossless_formats_become_one_identical_rgb_page(fmt):
    """PNG, TIFF and BMP pictures come back as one RGB page with the same pixels."""
    pixels = np.random.default_rng(3).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    [page] = load_raster(encoded(Image.fromarray(pixels), fmt), max_pixels=LIMIT)
    assert (page.width, page.height, page.mode) == (9, 6, "RGB")
    assert np.array_equal(np.asarray(decoded(page)), pixels)


def test_jpeg_becomes_one_rgb_page():
    """A JPEG is one RGB page of its size with its colours (within JPEG loss)."""
    [page] = load_raster(encoded(corner_marked(), "JPEG", quality=95), max_pixels=LIMIT)
    image = decoded(page)
    assert (page.width, page.height, page.mode, image.format) == (40, 20, "RGB", "PNG")
    assert near(image.getpixel((2, 2)), RED) and near(image.getpixel((37, 17)), WHITE)


def test_multi_picture_jpeg_keeps_its_first_picture():
    """A camera MPO (a JPEG holding two pictures) is accepted as one page: the primary picture."""
    first, second = Image.new("RGB", (8, 6), RED), Image.new("RGB", (8, 6), (0, 0, 255))
    [page] = load_raster(encoded(first, "MPO", save_all=True, append_images=[second]), max_pixels=LIMIT)
    assert near(decoded(page).getpixel((4, 3)), RED)


def test_multi_page_tiff_gives_one_page_each_in_order():
    """A three-page TIFF yields three pages, in file order, each with its own size and colour."""
    pages = [Image.new("RGB", (4 + i, 3), colour) for i, colour in enumerate([RED, (0, 255, 0), (0, 0, 255)])]
    stream = encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    out = load_raster(stream, max_pixels=LIMIT)
    assert [(p.width, p.height) for p in out] == [(4, 3), (5, 3), (6, 3)]
    assert [decoded(p).getpixel((0, 0)) for p in out] == [RED, (0, 255, 0), (0, 0, 255)]


def test_tiff_page_limit(monkeypatch):
    """More pages than MAX_PAGES is rejected; exactly MAX_PAGES is fine."""
    monkeypatch.setattr(raster, "MAX_PAGES", 2)
    pages = [Image.new("L", (2, 2), v) for v in (1, 2, 3)]
    assert len(load_raster(encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:2]),
                           max_pixels=LIMIT)) == 2
    error = rejected(encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    assert error.code == errors.TOO_LARGE and "more than 2 pages" in str(error)


# --- modes -----------------------------------------------------------------------------------

def test_16_bit_png_is_kept_losslessly_as_i16():
    """A 16-bit grey PNG stays I;16 with every value intact."""
    values = np.array([[0, 1, 255, 256], [4095, 30000, 65534, 65535]], dtype=np.uint16)
    [page] = load_raster(encoded(Image.fromarray(values), "PNG"), max_pixels=LIMIT)
    image = decoded(page)
    assert page.mode == image.mode == "I;16"
    assert np.array_equal(np.asarray(image), values)


def test_big_endian_16_bit_tiff_becomes_i16():
    """I;16B (big-endian TIFF) is stored as I;16 with the same values."""
    values = np.array([[0, 258, 65535]], dtype=">u2")
    image = Image.frombytes("I;16B", (3, 1), values.tobytes())
    [page] = load_raster(encoded(image, "TIFF"), max_pixels=LIMIT)
    assert page.mode == "I;16" and np.asarray(decoded(page)).tolist() == [[0, 258, 65535]]


def test_palette_with_transparency_becomes_rgba():
    """A P image whose index 1 is transparent becomes RGBA with alpha 0 exactly there."""
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    image.putdata([0, 1, 2])
    [page] = load_raster(encoded(image, "PNG", transparency=1), max_pixels=LIMIT)
    assert page.mode == "RGBA"
    assert np.asarray(decoded(page)).tolist() == [[[255, 0, 0, 255], [0, 255, 0, 0], [0, 0, 255, 255]]]


def test_palette_without_transparency_becomes_rgb():
    """A P image without transparency becomes plain RGB."""
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    image.putdata([1, 0])
    [page] = load_raster(encoded(image, "PNG"), max_pixels=LIMIT)
    assert page.mode == "RGB" and np.asarray(decoded(page)).tolist() == [[[40, 50, 60], [10, 20, 30]]]


@pytest.mark.parametrize("mode, fmt, expected", [
    ("1", "PNG", "L"), ("1", "BMP", "L"), ("L", "PNG", "L"), ("L", "JPEG", "L"), ("LA", "PNG", "RGBA"),
    ("RGBA", "PNG", "RGBA"), ("RGBA", "TIFF", "RGBA"), ("CMYK", "TIFF", "RGB"), ("YCbCr", "TIFF", "RGB"),
    ("I;16", "TIFF", "I;16"), ("I", "TIFF", "I;16"), ("F", "TIFF", "I;16"),
])
def test_modes_are_normalised(mode, fmt, expected):
    """Every input mode lands on L, I;16, RGB or RGBA (LA keeps its alpha as RGBA)."""
    [page] = load_raster(encoded(Image.new(mode, (4, 3)), fmt), max_pixels=LIMIT)
    assert page.mode == decoded(page).mode == expected


def test_grey_with_alpha_keeps_grey_and_alpha():
    """LA (grey 100, alpha 50) becomes RGBA (100, 100, 100, 50)."""
    [page] = load_raster(encoded(Image.new("LA", (2, 2), (100, 50)), "PNG"), max_pixels=LIMIT)
    assert decoded(page).getpixel((1, 1)) == (100, 100, 100, 50)


def test_cmyk_jpeg_becomes_rgb():
    """A CMYK JPEG (pure cyan, pure yellow halves) becomes RGB with the matching colours."""
    image = Image.new("CMYK", (16, 8), (255, 0, 0, 0))
    image.paste((0, 0, 255, 0), (8, 0, 16, 8))
    [page] = load_raster(encoded(image, "JPEG", quality=95), max_pixels=LIMIT)
    out = decoded(page)
    assert page.mode == "RGB"
    assert near(out.getpixel((2, 4)), (0, 255, 255)) and near(out.getpixel((13, 4)), (255, 255, 0))


def test_32_bit_integers_in_16_bit_range_are_kept_exactly():
    """Mode I with every value a whole number in 0..65535 is stored as those exact values."""
    values = np.array([[0, 7, 65535]], dtype=np.int32)
    [page] = load_raster(encoded(Image.fromarray(values), "TIFF"), max_pixels=LIMIT)
    assert page.mode == "I;16" and np.asarray(decoded(page)).tolist() == [[0, 7, 65535]]


def test_32_bit_integers_out_of_range_are_scaled_min_max():
    """Mode I with negative values is spread min..max over 0..65535: -100, 0, 100 -> 0, 32768, 65535."""
    values = np.array([[-100, 0, 100]], dtype=np.int32)  # 100 * 65535 / 200 = 32767.5 -> 32768
    [page] = load_raster(encoded(Image.fromarray(values), "TIFF"), max_pixels=LIMIT)
    assert np.asarray(decoded(page)).tolist() == [[0, 32768, 65535]]


def test_float_pictures_are_scaled_min_max():
    """Mode F 0.0, 0.25, 1.0 -> 0, 16384, 65535 (0.25 * 65535 = 16383.75)."""
    values = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    [page] = load_raster(encoded(Image.fromarray(values), "TIFF"), max_pixels=LIMIT)
    assert page.mode == "I;16" and np.asarray(decoded(page)).tolist() == [[0, 16384, 65535]]


# --- orientation -----------------------------------------------------------------------------

def exif_with(**tags) -> Image.Exif:
    """An Exif block holding the given base tags."""
    exif = Image.Exif()
    for name, value in tags.items():
        exif[ExifTags.Base[name]] = value
    return exif


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation, red_corner", [
    (6, (-3, 2)),   # displayed rotated 90 degrees clockwise: the top-left block moves to the top-right
    (8, (2, -3)),   # rotated 90 degrees counter-clockwise: it moves to the bottom-left
])
def test_exif_orientation_is_applied(fmt, orientation, red_corner):
    """EXIF orientation 6 and 8 turn a 40x20 picture into 20x40 with the marked corner where it belongs."""
    stream = encoded(corner_marked(), fmt, exif=exif_with(Orientation=orientation), quality=95)
    [page] = load_raster(stream, max_pixels=LIMIT)
    image = decoded(page).convert("RGB")
    assert (page.width, page.height) == image.size == (20, 40)
    x, y = red_corner[0] % 20, red_corner[1] % 40
    assert near(image.getpixel((x, y)), RED), image.getpixel((x, y))
    for corner in [(2, 2), (17, 2), (2, 37), (17, 37)]:
        if corner != (x, y) and abs(corner[0] - x) + abs(corner[1] - y) > 5:
            assert near(image.getpixel(corner), WHITE), corner
    assert b"eXIf" not in png_chunks(page.png)


def test_tiff_orientation_tag_is_applied():
    """A TIFF with Orientation 6 comes out upright too."""
    stream = encoded(corner_marked(), "TIFF", exif=exif_with(Orientation=6))
    [page] = load_raster(stream, max_pixels=LIMIT)
    image = decoded(page)
    assert image.size == (20, 40) and image.getpixel((17, 2)) == RED and image.getpixel((2, 2)) == WHITE


# --- metadata --------------------------------------------------------------------------------

def identifying_exif() -> Image.Exif:
    """Exif naming the marker as Artist, ImageDescription, UserComment and GPS area."""
    exif = exif_with(Artist=MARKER, ImageDescription=MARKER, Orientation=1)
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSAreaInformation] = MARKER
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = MARKER
    return exif


def metadata_sources():
    """(name, stream) pairs whose metadata carries MARKER (and the stream's bytes prove it)."""
    picture = corner_marked()
    text = PngInfo()
    text.add_text("Author", MARKER)
    text.add_text("Comment", MARKER, zip=True)
    text.add_itxt("Description", MARKER, lang="en", tkey=MARKER)
    icc = b"fake ICC profile of " + MARKER.encode()
    return [
        ("jpeg", encoded(picture, "JPEG", exif=identifying_exif(), comment=MARKER, icc_profile=icc,
                         xmp=f"<x:xmpmeta>{MARKER}</x:xmpmeta>".encode())),
        ("png", encoded(picture, "PNG", pnginfo=text, exif=identifying_exif(), icc_profile=icc)),
        ("tiff", encoded(picture, "TIFF", tiffinfo={270: MARKER, 315: MARKER}, exif=identifying_exif())),
        ("16-bit png", encoded(Image.fromarray(np.full((4, 4), 999, dtype=np.uint16)), "PNG", pnginfo=text)),
        ("palette png", encoded(picture.convert("P"), "PNG", pnginfo=text, transparency=0)),
    ]


@pytest.mark.parametrize("name, stream", metadata_sources(), ids=[n for n, _ in metadata_sources()])
def test_metadata_is_not_in_the_stored_png(name, stream):
    """EXIF (Artist, description, GPS), XMP, ICC, comments and PNG text never reach the stored bytes."""
    assert MARKER.encode() in stream.getvalue()
    [page] = load_raster(stream, max_pixels=LIMIT)
    assert MARKER.encode() not in page.png
    assert set(png_chunks(page.png)) <= {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"}
    assert decoded(page).info == {} or set(decoded(page).info) <= {"transparency"}


# --- rejections ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, name", [("GIF", "GIF"), ("WEBP", "WEBP")])
def test_other_image_formats_are_rejected_by_name(fmt, name):
    """GIF and WebP are real pictures but not accepted; the message names the format."""
    error = rejected(encoded(Image.new("RGB", (4, 4)), fmt))
    assert error.code == errors.UNSUPPORTED_FORMAT and name in str(error)


def test_psd_is_rejected_by_name():
    """A Photoshop header is named as PSD without being parsed."""
    error = rejected(b"8BPS\x00\x01" + b"\x00" * 20)
    assert error.code == errors.UNSUPPORTED_FORMAT and "PSD" in str(error)


@pytest.mark.parametrize("data", [np.random.default_rng(4).bytes(5000), b"", b"hello, world\n" * 10,
                                  b"\0" * 128 + b"DICM" + b"\0" * 100])
def test_non_pictures_are_rejected(data):
    """Random bytes, an empty stream, text and a DICOM file are not pictures."""
    error = rejected(data)
    assert error.code == errors.NOT_AN_IMAGE and "PNG, JPEG, TIFF, BMP" in str(error)


def halves(stream: io.BytesIO) -> bytes:
    """The first half of an encoded picture."""
    data = stream.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_truncated_files_are_rejected_cleanly(fmt):
    """Half a file is rejected as truncated or corrupt (never another exception)."""
    noisy = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    error = rejected(halves(encoded(noisy, fmt)))
    assert error.code in (errors.TRUNCATED, errors.CORRUPT)


def test_damaged_png_header_is_rejected_as_corrupt():
    """A PNG signature followed by junk is named as a damaged PNG."""
    error = rejected(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert error.code == errors.CORRUPT and "PNG header is damaged" in str(error)


def test_corrupt_png_data_is_rejected():
    """A PNG whose image data was overwritten is rejected, not decoded into garbage or a crash."""
    data = bytearray(encoded(Image.fromarray(np.zeros((32, 32), dtype=np.uint8)), "PNG").getvalue())
    start = data.index(b"IDAT") + 4
    data[start:start + 12] = b"\xff" * 12
    assert rejected(bytes(data)).code in (errors.CORRUPT, errors.TRUNCATED)


def test_rejection_is_an_ingest_rejection():
    """RasterRejected is an imaging.errors.Rejected, so the ingest code handles it like any other."""
    error = rejected(encoded(Image.new("RGB", (4, 4)), "GIF"))
    assert isinstance(error, Rejected) and error.reason == str(error)


# --- pixel limits ----------------------------------------------------------------------------

def test_too_many_pixels_is_rejected_before_decoding(monkeypatch):
    """width x height over max_pixels is refused from the header: no pixel decoding is attempted."""
    stream = encoded(Image.new("RGB", (30, 20)), "PNG")
    loads = []

    def no_load(self, *args, **kwargs):
        loads.append(self)
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    monkeypatch.setattr(Image.Image, "load", no_load)
    error = rejected(stream, max_pixels=599)
    assert loads == []
    assert error.code == errors.TOO_MANY_PIXELS and "600 pixels" in str(error) and "599" in str(error)


def test_exactly_max_pixels_is_accepted():
    """max_pixels itself is allowed."""
    assert len(load_raster(encoded(Image.new("RGB", (30, 20)), "PNG"), max_pixels=600)) == 1


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG claiming width x height grey pixels whose image data is a few bytes: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_huge_header_only_file_is_rejected_by_our_limit():
    """A 100000 x 100000 header is refused with the configured limit in the message."""
    error = rejected(header_only_png(100_000, 100_000), max_pixels=LIMIT)
    assert error.code == errors.TOO_MANY_PIXELS and str(LIMIT) in str(error)


def test_pillow_decompression_bomb_error_is_a_rejection():
    """Above Pillow's hard limit (2 x MAX_IMAGE_PIXELS, the setting's maximum) the file is rejected."""
    error = rejected(header_only_png(100_000, 100_000), max_pixels=BY_NAME["raster_max_pixels"].maximum)
    assert error.code == errors.TOO_MANY_PIXELS and f"limit of {2 * Image.MAX_IMAGE_PIXELS}" in str(error)


def test_pillow_decompression_bomb_warning_is_a_rejection_where_warnings_are_errors():
    """Between Pillow's warning and error limits, an escalated DecompressionBombWarning is a rejection."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        error = rejected(header_only_png(10_000, 10_000), max_pixels=BY_NAME["raster_max_pixels"].maximum)
    assert error.code == errors.TOO_MANY_PIXELS and f"limit of {Image.MAX_IMAGE_PIXELS}" in str(error)


def test_setting_limits_agree_with_pillow():
    """raster_max_pixels defaults to Pillow's warning threshold and cannot pass its error threshold."""
    assert BY_NAME["raster_max_pixels"].default == Image.MAX_IMAGE_PIXELS
    assert BY_NAME["raster_max_pixels"].maximum == 2 * Image.MAX_IMAGE_PIXELS


# --- streams ---------------------------------------------------------------------------------

class ReadOnlyStream(io.RawIOBase):
    """A stream that can only be read, like a socket or a pipe."""

    def __init__(self, data: bytes):
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._inner.read(min(len(buffer), 1000))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_non_seekable_stream_is_read():
    """A stream without seek is copied aside and read normally."""
    data = encoded(corner_marked(), "PNG").getvalue()
    [page] = load_raster(ReadOnlyStream(data), max_pixels=LIMIT)
    assert (page.width, page.height) == (40, 20)


def test_stream_positioned_past_its_start_is_read_from_there():
    """A stream whose picture starts at its current position (not 0) is read from that position."""
    stream = io.BytesIO(b"multipart preamble" + encoded(corner_marked(), "PNG").getvalue())
    stream.seek(len(b"multipart preamble"))
    [page] = load_raster(stream, max_pixels=LIMIT)
    assert decoded(page).getpixel((2, 2)) == RED


def test_failing_stream_is_rejected_cleanly():
    """A stream whose read fails mid-way is a rejection, not an OSError."""

    class Broken(ReadOnlyStream):
        def readinto(self, buffer):
            raise OSError("connection reset")

    assert rejected(Broken(b"")).code == errors.CORRUPT


def test_seekable_stream_is_not_read_whole():
    """A seekable stream is read by Pillow in blocks, never in one read of everything."""
    data = encoded(Image.fromarray(np.random.default_rng(6).integers(0, 256, (400, 400, 3), dtype=np.uint8)),
                   "PNG").getvalue()
    sizes = []

    class Recording(io.BytesIO):
        def read(self, size=-1):
            sizes.append(size)
            return super().read(size)

    load_raster(Recording(data), max_pixels=LIMIT)
    assert sizes and all(s is not None and 0 <= s < len(data) // 2 for s in sizes)


def test_max_pixels_must_be_positive():
    """A zero limit is a caller error, not a rejection of the file."""
    with pytest.raises(ValueError):
        load_raster(io.BytesIO(b""), max_pixels=0)
