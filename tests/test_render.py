"""Display rendering: PS3.3 C.11 windowing checked against hand-computed bytes, colour, real files, PNG."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from onprem_label.imaging.render import (
    PRESETS, RenderError, Window, decode_frame, default_window, display_array, display_raster,
    encode_png, frame_count, render_frame, thumbnail_png, window_from_request,
)


def make_ds(stored, *, photometric="MONOCHROME2", bits_stored=None, signed=False, raw=None, **attrs):
    """A native Explicit VR Little Endian dataset holding `stored` (frames, rows, cols[, 3]) or one frame."""
    stored = np.asarray(stored)
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    frames = stored.shape[0] if stored.ndim == (4 if samples == 3 else 3) else None
    rows, cols = stored.shape[-3:-1] if samples == 3 else stored.shape[-2:]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    data = raw if raw is not None else stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    return ds


def shown(ds, window=None, frame=0):
    """The display array of one frame, the way the viewer computes it."""
    return display_array(ds, decode_frame(ds, frame), window)


def ct(hu, **attrs):
    """A CT frame stored as HU + 1024 (signed 16-bit) with RescaleIntercept -1024."""
    stored = np.asarray(hu, dtype=np.int16) + 1024
    return make_ds(stored.astype(np.int16), signed=True, RescaleSlope=1, RescaleIntercept=-1024, **attrs)


# --- greyscale windowing (C.11.2.1.2.1) ------------------------------------------------------

# Mediastinum (40, 400): 0 at or below 39.5 - 199.5 = -160, 255 above 39.5 + 199.5 = 239.
# -159: ((-159 - 39.5)/399 + .5)*255 = 0.639 -> 1;  40: (0.5/399 + .5)*255 = 127.82 -> 128;
# 100: (60.5/399 + .5)*255 = 166.17 -> 166;  239: exactly 1.0*255 = 255.
WINDOW_IN = [[-500, -160, -159, 40], [100, 239, 240, 3000]]
WINDOW_OUT = [[0, 0, 1, 128], [166, 255, 255, 255]]


def test_monochrome2_linear_window_matches_hand_computed_values():
    """MONOCHROME2 with a window gives exactly the C.11.2.1.2.1 bytes, including at both edges."""
    ds = make_ds(np.array(WINDOW_IN, dtype=np.int16), signed=True)
    out = shown(ds, Window(40, 400))
    assert out.dtype == np.uint8 and out.shape == (2, 4)
    assert out.tolist() == WINDOW_OUT


def test_monochrome1_is_inverted_after_windowing():
    """MONOCHROME1 shows the windowed value v as 255 - v."""
    ds = make_ds(np.array(WINDOW_IN, dtype=np.int16), signed=True, photometric="MONOCHROME1")
    assert shown(ds, Window(40, 400)).tolist() == [[255, 255, 254, 127], [89, 0, 0, 0]]


def test_signed_16_bit_with_rescale_slope_and_intercept():
    """Slope 2 / intercept -100 is applied before the window (modality units)."""
    stored = np.array([[-300, -50, 0], [70, 150, 400]], dtype=np.int16)
    ds = make_ds(stored, signed=True, RescaleSlope=2, RescaleIntercept=-100)
    # Modality values -700, -200, -100 / 40, 200, 700; window (0, 401): edges -200.5 and 199.5.
    # -200: 0.5/400*255 = 0.32 -> 0;  -100: (-99.5/400 + .5)*255 = 64.07 -> 64;  40: 153.32 -> 153.
    assert shown(ds, Window(0, 401)).tolist() == [[0, 0, 64], [153, 255, 255]]


def test_unsigned_12_bit_stored_in_16_ignores_the_unused_high_bits():
    """BitsStored 12 of 16: junk in the top four bits does not change the picture (min..max here)."""
    values = np.array([[0, 1000, 2048], [3000, 4095, 4095]], dtype=np.uint16)
    junk = (values | np.array([[0xF000, 0x1000, 0], [0xA000, 0, 0x8000]], dtype=np.uint16))
    ds = make_ds(values, bits_stored=12, raw=junk.astype("<u2").tobytes())
    # (x - 0) * 255 / 4095: 62.27 -> 62, 127.53 -> 128, 186.81 -> 187.
    assert shown(ds).tolist() == [[0, 62, 128], [187, 255, 255]]


def test_signed_12_bit_stored_in_16_is_sign_extended():
    """PixelRepresentation 1 with BitsStored 12: 0x0FFF is -1, not 4095."""
    values = np.array([[-2048, -1, 0], [1, 1000, 2047]], dtype=np.int16)
    raw = (values.astype(np.int32) & 0x0FFF).astype("<u2").tobytes()
    ds = make_ds(values, bits_stored=12, signed=True, raw=raw)
    # min..max = -2048..2047, (x + 2048) * 255 / 4095:
    # -1 -> 127.47 -> 127, 0 -> 127.53 -> 128, 1 -> 127.59 -> 128, 1000 -> 189.80 -> 190.
    assert shown(ds).tolist() == [[0, 127, 128], [128, 190, 255]]


@pytest.mark.parametrize("preset, hu, expected", [
    # lung (-600, 1500): edges -1350 and 149.  -600: 127.59 -> 128;  0: (600.5/1499 + .5)*255 = 229.65 -> 230.
    ("lung", [[-2000, -1350, -600], [0, 149, 500]], [[0, 0, 128], [230, 255, 255]]),
    # mediastinum (40, 400): see WINDOW_OUT.
    ("mediastinum", [[-500, -160, -159], [40, 100, 240]], [[0, 0, 1], [128, 166, 255]]),
    # bone (400, 1800): edges -500 and 1299.  0: (-399.5/1799 + .5)*255 = 70.87 -> 71;
    # 400: 127.57 -> 128;  1000: (600.5/1799 + .5)*255 = 212.62 -> 213.
    ("bone", [[-1000, -500, 0], [400, 1000, 1299]], [[0, 0, 71], [128, 213, 255]]),
    # brain (40, 80): edges 0 and 79.  1: (-38.5/79 + .5)*255 = 3.23 -> 3;  40: 129.11 -> 129;
    # 60: (20.5/79 + .5)*255 = 193.67 -> 194.
    ("brain", [[-100, 0, 1], [40, 60, 80]], [[0, 0, 3], [129, 194, 255]]),
    # abdomen (40, 350): edges -135 and 214.  0: (-39.5/349 + .5)*255 = 98.64 -> 99;
    # 40: 127.87 -> 128;  150: (110.5/349 + .5)*255 = 208.24 -> 208.
    ("abdomen", [[-500, -135, 0], [40, 150, 215]], [[0, 0, 99], [128, 208, 255]]),
])
def test_ct_presets_on_rescaled_hounsfield_units(preset, hu, expected):
    """Each CT preset maps HU (stored + 1024, intercept -1024) to the hand-computed bytes."""
    assert shown(ct(hu), PRESETS[preset]).tolist() == expected


def test_preset_values_are_the_documented_ones():
    """The five presets carry the usual (center, width) pairs."""
    assert {k: (w.center, w.width) for k, w in PRESETS.items()} == {
        "lung": (-600, 1500), "mediastinum": (40, 400), "bone": (400, 1800),
        "brain": (40, 80), "abdomen": (40, 350)}


def test_files_own_window_is_the_first_pair():
    """Without a requested window the first WindowCenter/WindowWidth pair of the file is used."""
    stored = np.array([[0, 75, 76], [100, 124, 500]], dtype=np.uint16)
    ds = make_ds(stored, WindowCenter=[100, 300], WindowWidth=[50, 600])
    # (100, 50): edges 75 and 124.  76: (-23.5/49 + .5)*255 = 5.20 -> 5;  100: 130.10 -> 130.
    assert shown(ds).tolist() == [[0, 0, 5], [130, 255, 255]]
    assert default_window(ds, decode_frame(ds, 0)) == Window(100, 50)


def test_files_window_is_in_modality_units():
    """A CT file's WindowCenter 40 / Width 400 applies to HU, so it matches the mediastinum preset."""
    ds = ct([[-500, -160, -159], [40, 100, 240]], WindowCenter=40, WindowWidth=400)
    assert shown(ds).tolist() == [[0, 0, 1], [128, 166, 255]]


def test_requested_window_overrides_the_files_window():
    """A window passed by the caller wins over the file's own."""
    ds = ct([[-500, -160, -159], [40, 100, 240]], WindowCenter=1000, WindowWidth=10)
    assert shown(ds, PRESETS["mediastinum"]).tolist() == [[0, 0, 1], [128, 166, 255]]


def test_sigmoid_voi_function_is_honoured():
    """VOILUTFunction SIGMOID: 255 / (1 + exp(-4 (x - c) / w)), far tails without overflow warnings."""
    stored = np.array([[-1000, -1, 1], [2, 3, 1000]], dtype=np.int16)
    ds = make_ds(stored, signed=True, WindowCenter=0, WindowWidth=4, VOILUTFunction="SIGMOID")
    # 255/(1+e) = 68.58 -> 69;  255/(1+1/e) = 186.42 -> 186;  255/(1+e^-2) = 224.60 -> 225;
    # 255/(1+e^-3) = 242.91 -> 243.
    assert shown(ds).tolist() == [[0, 69, 186], [225, 243, 255]]


def test_min_max_when_the_file_has_no_window():
    """No window anywhere: the frame's own min..max is spread over 0..255."""
    ds = make_ds(np.array([[10, 20, 30], [40, 50, 60]], dtype=np.uint8))
    assert shown(ds).tolist() == [[0, 51, 102], [153, 204, 255]]
    assert default_window(ds, decode_frame(ds, 0)) is None


def test_constant_frame_is_all_black_without_dividing_by_zero():
    """A frame with one value everywhere shows as 0 (warnings are errors, so no 0/0 either)."""
    ds = make_ds(np.full((2, 3), 7, dtype=np.uint16))
    assert shown(ds).tolist() == [[0, 0, 0], [0, 0, 0]]


def test_width_one_is_a_threshold():
    """Width 1 (C.11.2.1.2.1): x <= c - 0.5 -> 0, anything above -> 255."""
    ds = make_ds(np.array([[0, 9, 10], [11, 100, 9]], dtype=np.uint8))
    assert shown(ds, Window(10, 1)).tolist() == [[0, 0, 255], [255, 255, 0]]


def test_bad_window_in_the_file_falls_back_to_min_max():
    """WindowWidth 0 in a header is unusable: the frame is shown min..max instead of failing."""
    ds = make_ds(np.array([[10, 20, 30], [40, 50, 60]], dtype=np.uint8), WindowCenter=20, WindowWidth=0)
    assert default_window(ds, decode_frame(ds, 0)) is None
    assert shown(ds).tolist() == [[0, 51, 102], [153, 204, 255]]


def voi_lut_item(descriptor, data):
    """A VOI LUT Sequence item with US descriptor and US data."""
    item = Dataset()
    item.add_new(0x00283002, "US", descriptor)
    item.add_new(0x00283006, "US", data)
    return item


def test_voi_lut_sequence_is_applied_and_scaled_to_8_bits():
    """A 12-bit VOI LUT (first mapped 100) wins over the file's window; its 0..4095 output -> 0..255."""
    ds = make_ds(np.array([[50, 100, 101], [102, 103, 500]], dtype=np.uint16),
                 WindowCenter=0, WindowWidth=10)
    ds.VOILUTSequence = [voi_lut_item([4, 100, 12], [0, 1000, 2000, 4095])]
    # Entries 0, 0, 1000, 2000, 4095, 4095 (clipped both ends); 1000*255/4095 = 62.27 -> 62; 124.54 -> 125.
    assert shown(ds).tolist() == [[0, 0, 62], [125, 255, 255]]


def test_voi_lut_after_a_fractional_rescale_is_indexed_by_rounded_values():
    """Slope 0.5 makes float modality values; they index the LUT as integers, with no pydicom warning."""
    ds = make_ds(np.array([[200, 202, 204]], dtype=np.uint16), RescaleSlope=0.5, RescaleIntercept=0)
    ds.VOILUTSequence = [voi_lut_item([4, 100, 12], [0, 1000, 2000, 4095])]
    assert shown(ds).tolist() == [[0, 62, 125]]


def test_requested_window_wins_over_a_voi_lut():
    """A window the user picked replaces the file's VOI LUT."""
    ds = make_ds(np.array([[0, 9, 10]], dtype=np.uint8))
    ds.VOILUTSequence = [voi_lut_item([4, 0, 8], [255, 255, 255, 255])]
    assert shown(ds, Window(10, 1)).tolist() == [[0, 0, 255]]


# --- colour ----------------------------------------------------------------------------------

def palette_ds(stored, descriptor, red, green, blue, dtype):
    """A PALETTE COLOR dataset with the three LUTs stored as `dtype` entries."""
    ds = make_ds(np.asarray(stored, dtype=np.uint8), photometric="PALETTE COLOR")
    for colour, lut in (("Red", red), ("Green", green), ("Blue", blue)):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", descriptor)
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", np.asarray(lut, dtype=dtype).tobytes())
    return ds


def test_palette_colour_with_16_bit_entries():
    """PALETTE COLOR maps through the LUTs (first mapped 1, clipped both ends), 16-bit entries -> 8-bit."""
    ds = palette_ds([[0, 1, 2], [3, 9, 200]], [4, 1, 16],
                    [65535, 0, 0, 32896], [0, 65535, 0, 32896], [0, 0, 65535, 32896], "<u2")
    red, green, blue, grey = [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]  # 32896/257 = 128
    assert shown(ds).tolist() == [[red, red, green], [blue, grey, grey]]


def test_palette_colour_with_8_bit_entries_is_not_rescaled():
    """8-bit palette entries are already display values."""
    ds = palette_ds([[0, 1, 2, 3]], [4, 0, 8], [10, 20, 30, 40], [50, 60, 70, 80], [90, 100, 110, 120], "u1")
    assert shown(ds).tolist() == [[[10, 50, 90], [20, 60, 100], [30, 70, 110], [40, 80, 120]]]


def test_rgb_passes_through_and_ignores_the_window():
    """8-bit RGB is shown as stored; a window does not apply to colour."""
    rgb = np.array([[[1, 2, 3], [250, 128, 0], [0, 0, 0]], [[9, 99, 199], [255, 255, 255], [7, 70, 17]]],
                   dtype=np.uint8)
    ds = make_ds(rgb, photometric="RGB")
    assert np.array_equal(shown(ds, PRESETS["bone"]), rgb)


def test_16_bit_rgb_is_scaled_to_8_bits():
    """RGB with 16 bits stored: v * 255 / 65535, rounded."""
    rgb = np.array([[[0, 257, 65535], [32896, 65535, 0]]], dtype=np.uint16)
    assert shown(make_ds(rgb, photometric="RGB")).tolist() == [[[0, 1, 255], [128, 255, 0]]]


def test_ybr_full_is_decoded_to_rgb():
    """YBR_FULL pixels arrive as RGB (PS3.3 C.7.6.3.1.2), checked against hand-converted values."""
    # R = Y + 1.402 (Cr-128), G = Y - .344136 (Cb-128) - .714136 (Cr-128), B = Y + 1.772 (Cb-128).
    ybr = np.array([[[100, 128, 128], [76, 85, 255], [150, 44, 21]]], dtype=np.uint8)
    ds = make_ds(ybr, photometric="YBR_FULL")
    # (100,100,100);  (254.05, 0.10, -0.20) -> (254, 0, 0);  (0.01, 255.32, 1.15) -> (0, 255, 1).
    expected = np.array([[[100, 100, 100], [254, 0, 0], [0, 255, 1]]])
    assert np.abs(decode_frame(ds, 0).astype(int) - expected).max() <= 1
    assert np.abs(shown(ds).astype(int) - expected).max() <= 1


# --- frames ----------------------------------------------------------------------------------

def test_multi_frame_index_selects_that_frame():
    """decode_frame and render_frame pick the frame asked for, counted from 0."""
    frames = np.stack([np.full((2, 3), v, dtype=np.uint8) for v in (5, 50, 200)])
    frames[:, 0, 0] = 0
    frames[:, 1, 2] = 255
    ds = make_ds(frames)
    assert frame_count(ds) == 3
    assert np.array_equal(decode_frame(ds, 2), frames[2])
    assert np.array_equal(decode_frame(ds, 1), frames[1])
    # Frame 1 min..max 0..255 is shown as stored.
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(render_frame(ds, 1)))), frames[1])


@pytest.mark.parametrize("frame", [-1, 3, 99, True, 1.0, "1", None])
def test_bad_frame_index_is_a_render_error(frame):
    """A frame that does not exist (or is not an int) raises RenderError naming the count."""
    ds = make_ds(np.zeros((3, 2, 3), dtype=np.uint8))
    with pytest.raises(RenderError, match="3 frame"):
        decode_frame(ds, frame)


def test_missing_pixel_data_is_a_render_error():
    """A dataset without PixelData cannot be rendered."""
    ds = make_ds(np.zeros((2, 3), dtype=np.uint8))
    del ds.PixelData
    with pytest.raises(RenderError, match="no pixel data"):
        render_frame(ds)


def test_undecodable_pixel_data_is_a_render_error():
    """Native bytes labelled as JPEG Baseline fail to decode with a RenderError, not a plugin error."""
    ds = make_ds(np.zeros((2, 3), dtype=np.uint8))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    with pytest.raises(RenderError, match="cannot be decoded"):
        render_frame(ds)


def test_truncated_real_file_is_a_render_error():
    """pydicom's MR_truncated.dcm (pixel data cut short) raises RenderError."""
    ds = dcmread(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(RenderError, match="cannot be decoded"):
        render_frame(ds)


# --- real files ------------------------------------------------------------------------------

def pydicom_file(name):
    """A test file shipped inside pydicom itself (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not shipped with pydicom"
    return dcmread(path)


REAL_FILES = [
    # name, (width, height), PNG mode, frames
    ("CT_small.dcm", (128, 128), "L", 1),
    ("MR_small.dcm", (64, 64), "L", 1),
    ("examples_jpeg2k.dcm", (640, 480), "RGB", 1),    # JPEG 2000 lossless, YBR_RCT
    ("examples_rgb_color.dcm", (320, 240), "RGB", 1),
    ("rtdose.dcm", (10, 10), "L", 15),                # multi-frame, 32-bit dose grid
    ("SC_rgb_jpeg_dcmtk.dcm", (100, 100), "RGB", 1),  # JPEG baseline, YBR_FULL
    ("examples_ybr_color.dcm", (320, 240), "RGB", 30),  # JPEG baseline, YBR_FULL_422, multi-frame
    ("MR_small_jpeg_ls_lossless.dcm", (64, 64), "L", 1),
    ("JPEGLSNearLossless_08.dcm", (10, 45), "L", 1),
    ("MR_small_RLE.dcm", (64, 64), "L", 1),
    ("SC_rgb_rle_16bit.dcm", (100, 100), "RGB", 1),
    ("SC_ybr_full_422_uncompressed.dcm", (100, 100), "RGB", 1),
    ("examples_palette.dcm", (800, 350), "RGB", 1),
    ("JPGExtended.dcm", (256, 1024), "L", 1),         # JPEG extended, 12-bit
    ("liver_1frame.dcm", (512, 512), "L", 1),         # 1 bit allocated
]


@pytest.mark.parametrize("name, size, mode, frames", REAL_FILES, ids=[r[0] for r in REAL_FILES])
def test_real_file_renders_to_a_png_of_its_size_and_mode(name, size, mode, frames):
    """First and last frame of each pydicom test file decode to a PNG of Columns x Rows in the right mode."""
    ds = pydicom_file(name)
    assert frame_count(ds) == frames
    assert (ds.Columns, ds.Rows) == size
    for frame in sorted({0, frames - 1}):
        image = Image.open(io.BytesIO(render_frame(ds, frame)))
        assert image.format == "PNG" and image.size == size and image.mode == mode


# SC_rgb.dcm's colour bars, one per 10 rows: the uncompressed file's values at column 0.
SC_RGB_BARS = {0: (255, 0, 0), 15: (255, 128, 128), 25: (0, 255, 0), 35: (128, 255, 128), 45: (0, 0, 255),
               55: (128, 128, 255), 65: (0, 0, 0), 75: (64, 64, 64), 85: (192, 192, 192), 95: (255, 255, 255)}


@pytest.mark.parametrize("name, tolerance", [
    ("SC_rgb_jpeg_dcmtk.dcm", 6), ("SC_ybr_full_422_uncompressed.dcm", 6),
    ("SC_rgb_rle.dcm", 0), ("SC_rgb_rle_16bit.dcm", 0),
])
def test_colour_files_show_the_true_colour_bars(name, tolerance):
    """YBR-coded and 16-bit copies of SC_rgb show the same RGB bars (YBR left unconverted would not)."""
    out = shown(pydicom_file(name))
    for row, rgb in SC_RGB_BARS.items():
        assert np.abs(out[row, 0].astype(int) - rgb).max() <= tolerance, (row, out[row, 0])


@pytest.mark.parametrize("name", [
    "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
])
def test_lossless_encodings_render_identically(name):
    """RLE, JPEG-LS and JPEG 2000 lossless copies of MR_small give the same display bytes as the original."""
    reference = shown(pydicom_file("MR_small.dcm"))
    assert np.array_equal(shown(pydicom_file(name)), reference)


def test_multi_frame_real_file_frames_differ():
    """examples_ybr_color.dcm (30 JPEG frames): frame 0 and frame 29 are different pictures."""
    ds = pydicom_file("examples_ybr_color.dcm")
    assert not np.array_equal(shown(ds, frame=0), shown(ds, frame=29))


def test_real_ct_with_preset_window():
    """CT_small.dcm through the bone preset: clipped at -500 / 1299 HU, strictly inside a little within."""
    ds = pydicom_file("CT_small.dcm")
    hu = decode_frame(ds, 0) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = shown(ds, PRESETS["bone"])
    assert (out[hu <= -500] == 0).all() and (out[hu > 1299] == 255).all()
    # -496 HU: (-895.5/1799 + .5)*255 = 0.57 -> 1;  1295 HU: 254.43 -> 254.
    inside = (hu >= -496) & (hu <= 1295)
    assert inside.sum() > 1000 and (out[inside] >= 1).all() and (out[inside] <= 254).all()
    order = np.argsort(hu, axis=None, kind="stable")
    assert (np.diff(out.ravel()[order].astype(int)) >= 0).all()  # brighter never means fewer HU


# --- window_from_request ---------------------------------------------------------------------

@pytest.mark.parametrize("preset, center, width, expected", [
    (None, None, None, None),
    ("", "", "", None),
    ("  ", None, " ", None),
    ("lung", None, None, Window(-600, 1500)),
    (" Bone ", "", "", Window(400, 1800)),
    ("BRAIN", None, None, Window(40, 80)),
    (None, "40", "400", Window(40, 400)),
    (None, " -1.5e2 ", "2", Window(-150, 2)),
    (None, -600.0, 1500, Window(-600, 1500)),
    (None, "10", "0.5", Window(10, 0.5)),
])
def test_window_from_request_valid(preset, center, width, expected):
    """Valid query parameters: nothing, a preset (any case), or a numeric center and width."""
    assert window_from_request(preset, center, width) == expected


@pytest.mark.parametrize("preset, center, width, message", [
    ("liver", None, None, "unknown window preset"),
    ("lung", "40", "400", "not both"),
    (None, "40", None, "together"),
    (None, "", "400", "together"),
    (None, "abc", "400", "center is not a number"),
    (None, "40", "4OO", "width is not a number"),
    (None, "1_000", "400", "center is not a number"),
    (None, True, "400", "center is not a number"),
    (None, "40", "0", "greater than 0"),
    (None, "40", "-5", "greater than 0"),
    (None, "nan", "400", "finite"),
    (None, "40", "inf", "finite"),
    (None, "1e999", "400", "finite"),
    (None, float("nan"), 10, "finite"),
])
def test_window_from_request_invalid(preset, center, width, message):
    """Invalid query parameters raise ValueError with a message a 400 response can carry."""
    with pytest.raises(ValueError, match=message):
        window_from_request(preset, center, width)


@pytest.mark.parametrize("center, width", [(0, 0), (0, -1), (float("inf"), 1), (0, float("nan"))])
def test_window_rejects_unusable_values(center, width):
    """Window itself refuses a width <= 0 and non-finite numbers."""
    with pytest.raises(ValueError):
        Window(center, width)


# --- PNG, thumbnails, raster display ---------------------------------------------------------

def png_chunks(data: bytes) -> list[bytes]:
    """The chunk types of a PNG, in order, with each CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        chunks.append(kind)
        pos += 12 + length
    return chunks


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (5, 7, 4)])
def test_encode_png_is_lossless_and_has_no_metadata_chunks(shape):
    """encode_png writes only IHDR, IDAT and IEND, and the pixels read back unchanged."""
    display = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(display)
    chunks = png_chunks(data)
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    assert not {b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"iCCP", b"tIME", b"pHYs"} & set(chunks)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), display)


@pytest.mark.parametrize("bad", [np.zeros((2, 2), dtype=np.uint16), np.zeros((2, 2, 2), dtype=np.uint8),
                                 np.zeros((0, 3), dtype=np.uint8)])
def test_encode_png_refuses_non_display_arrays(bad):
    """Only non-empty uint8 grey, RGB or RGBA arrays are display arrays."""
    with pytest.raises(ValueError):
        encode_png(bad)


@pytest.mark.parametrize("shape, max_side, size", [
    ((500, 1000), 256, (256, 128)),   # wide
    ((900, 300), 256, (85, 256)),     # tall: 300 * 256 / 900 = 85.3
    ((50, 100), 256, (100, 50)),      # small: never scaled up
    ((256, 256, 3), 256, (256, 256)),  # exactly the limit
    ((40, 30, 3), 8, (6, 8)),     # 40 rows x 30 columns
])
def test_thumbnail_keeps_aspect_and_never_enlarges(shape, max_side, size):
    """thumbnail_png fits the longer side to max_side, keeps the aspect ratio and leaves small images."""
    data = thumbnail_png(np.zeros(shape, dtype=np.uint8), max_side)
    assert Image.open(io.BytesIO(data)).size == size
    assert set(png_chunks(data)) == {b"IHDR", b"IDAT", b"IEND"}


def test_thumbnail_refuses_a_zero_side():
    """max_side below 1 is a caller error."""
    with pytest.raises(ValueError):
        thumbnail_png(np.zeros((4, 4), dtype=np.uint8), 0)


def png_of(array):
    """A plain PNG of a numpy array, as raster.load_raster stores pages."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_display_raster_scales_16_bit_grey_min_max():
    """An I;16 page is spread min..max over 0..255: 1000..3000 -> (x - 1000) * 255 / 2000."""
    page = np.array([[1000, 1500, 2000], [2500, 3000, 1001]], dtype=np.uint16)
    out = display_raster(png_of(page))
    # 63.75 -> 64, 127.5 -> 128, 191.25 -> 191, 0.1275 -> 0.
    assert out.dtype == np.uint8 and out.tolist() == [[0, 64, 128], [191, 255, 0]]


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 3), (3, 4, 4)])
def test_display_raster_keeps_8_bit_pages(shape):
    """L, RGB and RGBA pages come back exactly as stored."""
    page = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(display_raster(png_of(page)), page)
