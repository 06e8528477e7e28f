"""De-identification by the PS3.15 Basic Profile: every table action at every depth, and nothing leaks."""

from __future__ import annotations

import copy
import hashlib
import hmac
import importlib
import io
import json
import os
import re
import types
import uuid
from datetime import date, datetime, timedelta

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian,
                         MultiFrameTrueColorSecondaryCaptureImageStorage, SecondaryCaptureImageStorage,
                         UltrasoundImageStorage, UltrasoundMultiFrameImageStorage)

import dicomanonymizer.dicom_anonymization_databases as databases
from onprem_label.imaging import deid_table, deidentify
from onprem_label.imaging.deid_table import TABLE_SOURCE, TABLE_VERSION, TableError, action_for, load_table
from onprem_label.imaging.deidentify import (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME,
                                             DeidSettings, burned_in_reasons, deidentify_dataset, new_uid)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
ROOT = "1.2.826.0.1.3680043.8.498."  # every original UID here starts with it; none may survive
CONTAINER = 0x00081115  # Referenced Series Sequence: unlisted, so kept and walked; holds levels 1, 2
PREAMBLE = (b"POLYGLOT-PREAMBLE-" * 8)[:128]
SHIFT_DAYS = 20000  # lands every shifted date far outside the originals' 1971-1978 range

# What each list of the package stands for, written out here rather than imported.
CATEGORY_ACTIONS = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
                    "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D",
                    "X_Z_U_STAR_TAGS": "X/Z/U*"}
# The brief's resolution of combined actions ("U*": keep the sequence, clean its items).
EFFECTIVE = {"X": "X", "Z": "Z", "D": "D", "U": "U", "X/Z": "Z", "X/D": "D", "X/Z/D": "Z",
             "Z/D": "Z", "X/Z/U*": "U*"}
TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
DUMMY = {**dict.fromkeys(TEXT_VRS, "ANONYMIZED"), "DA": "19000101", "TM": "000000",
         "DT": "19000101000000", "AS": "000Y"}
REPORT_LIST = {"X": "removed", "Z": "emptied", "D": "dummied", "U": "uids_replaced",
               "U*": "uids_replaced"}


def _module():
    return importlib.import_module(f"{databases.__name__}.{TABLE_VERSION}")


EXPECTED = {(e[0] << 16) | e[1]: action for name, action in CATEGORY_ACTIONS.items()
            for e in getattr(_module(), name) if len(e) == 2}
# dcmwrite refuses command (0000) and file-meta (0002) elements in a data set, so the file cannot
# hold them; test_structural_elements_are_removed covers them in memory instead.
SKIPPED = sorted(t for t in EXPECTED if t >> 16 in (0x0000, 0x0002))


def _uid_for(key: bytes, old: str) -> str:
    """The brief's formula, computed here independently of the implementation."""
    digest = hmac.new(key, old.encode("ascii"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _vr(tag: int) -> str:
    """The dictionary VR (first of an ambiguous pair); UN for tags newer than pydicom's dictionary."""
    return dictionary_VR(tag).split(" or ")[0] if dictionary_has_tag(tag) else "UN"


def _item(n: int) -> Dataset:
    """A sequence item with a listed name, a referenced instance, an unlisted class and private data."""
    item = Dataset()
    item.PatientName = f"MARK{n:05d}S"
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = f"{ROOT}9{n:05d}"
    _private(item, n)
    return item


def _value(vr: str, n: int):
    """A value valid for `vr`, unique for `n` (text carries a MARK marker)."""
    day = date(1971, 1, 1) + timedelta(days=n)
    marker = f"MARK{n:05d}"
    fixed = {"DA": f"{day:%Y%m%d}", "DT": f"{day:%Y%m%d}120000", "TM": f"12{n % 60:02d}00",
             "AS": f"{n % 1000:03d}Y", "UI": f"{ROOT}{n}", "IS": str(n), "DS": str(n),
             "SQ": [_item(n)], "FL": float(n), "FD": float(n)}
    if vr in fixed:
        return fixed[vr]
    if vr in TEXT_VRS:
        return marker
    if vr in {"US", "SS", "UL", "SL", "UV", "SV"}:
        return n
    return marker.encode() + b"\0"  # OB, OW, UN ...: the marker, padded to even length


def _private(ds: Dataset, n: int) -> None:
    """A private creator, a private text and a private sequence, all carrying markers."""
    block = ds.private_block(0x0011, "MARKCREATOR", create=True)
    block.add_new(0x01, "LO", f"MARK{n:05d}P")
    inner = Dataset()
    inner.PatientName = f"MARK{n:05d}PS"
    block.add_new(0x02, "SQ", [inner])


def _repeating_groups(ds: Dataset, level: int) -> None:
    """Curve data (50xx,eeee) and overlays (60xx,3000)/(60xx,4000), with overlay rows kept."""
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50023000, "OB", f"MARK{level}CURVE".encode())
    ds.add_new(0x50020022, "LO", f"MARK{level}CURVEDESC")
    ds.add_new(0x60000010, "US", 4)
    ds.add_new(0x60003000, "OW", f"MARK{level}OVERLAY".encode())
    ds.add_new(0x60004000, "LT", f"MARK{level}OVERLAYCOMMENT")
    ds.add_new(0x601E3000, "OW", f"MARK{level}OVERLAY2".encode())


def _fill(ds: Dataset, level: int) -> None:
    """Every exact tag of the table at this level, then the same one level deeper."""
    for i, tag in enumerate(sorted(EXPECTED)):
        if tag not in SKIPPED:
            vr = _vr(tag)
            ds.add_new(tag, vr, _value(vr, level * 1000 + i))
    _private(ds, level * 1000 + 999)
    _repeating_groups(ds, level)
    if level < 2:
        child = Dataset()
        _fill(child, level + 1)
        ds.add_new(CONTAINER, "SQ", [child])


def _image(ds: Dataset) -> None:
    """What a viewer needs to render: none of it is in the table."""
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 4, 4, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = "1.5", "-1024"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.PixelData = bytes(range(32))


RENDERING = ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
             "PixelRepresentation", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept",
             "WindowCenter", "WindowWidth", "PixelSpacing", "PixelData"]


def _reference() -> Dataset:
    """The reference object: the whole table at three depths, private data, a hostile preamble."""
    ds = Dataset()
    _fill(ds, 0)
    _image(ds)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.SourceApplicationEntityTitle = "MARKSOURCEAE"
    ds.file_meta.PrivateInformationCreatorUID = f"{ROOT}77777"
    ds.file_meta.PrivateInformation = b"MARKPRIVINFO"
    ds.preamble = PREAMBLE
    return ds


def _write(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module", params=["remove", "shift"])
def run(request, tmp_path_factory):
    """The reference written to disk, read back, de-identified, written and re-read."""
    path = tmp_path_factory.mktemp("deid") / "reference.dcm"
    _reference().save_as(path, enforce_file_format=True)
    original, ds = pydicom.dcmread(path), pydicom.dcmread(path)
    assert path.read_bytes()[:128] == PREAMBLE  # the test really starts from a hostile preamble
    settings = DeidSettings(uid_key=KEY, dates=request.param, date_offset_days=SHIFT_DAYS)
    report = deidentify_dataset(ds, settings)
    data = _write(ds)
    return types.SimpleNamespace(original=original, back=pydicom.dcmread(io.BytesIO(data)),
                                 data=data, report=report, settings=settings)


def _levels(ds: Dataset) -> list[Dataset]:
    found = [ds]
    while CONTAINER in found[-1] and found[-1][CONTAINER].value:
        found.append(found[-1][CONTAINER].value[0])
    return found


def _shifted(vr: str, value: str) -> str:
    """Expected value of a date under the shift, computed independently."""
    if vr == "TM":
        return value
    moved = datetime.strptime(value[:8], "%Y%m%d") + timedelta(days=SHIFT_DAYS)
    return moved.strftime("%Y%m%d") + value[8:]


def _item_problems(where: str, before, after) -> list[str]:
    """A kept sequence: same items, each cleaned (name emptied, new UID, class kept, no private)."""
    if len(after.value) != len(before.value) or not after.value:
        return [f"{where}: {len(after.value)} items"]
    old, new = before.value[0], after.value[0]
    problems = []
    if new.PatientName != "":
        problems.append(f"{where}: item PatientName kept")
    if new.ReferencedSOPInstanceUID != _uid_for(KEY, old.ReferencedSOPInstanceUID):
        problems.append(f"{where}: item UID not mapped")
    if new.ReferencedSOPClassUID != CTImageStorage:
        problems.append(f"{where}: item SOP class changed")
    if any(e.tag.is_private for e in new):
        problems.append(f"{where}: private tag in item")
    return problems


def _dummy_problems(where: str, before, after) -> list[str]:
    vr = before.VR
    if vr == "SQ":  # a dummy sequence is an empty one: its items could hold free text
        return [] if len(after.value) == 0 else [f"{where}: D kept {len(after.value)} items"]
    if vr == "UI":
        return _uid_problems(where, before, after)
    if vr in DUMMY:
        ok = str(after.value) == DUMMY[vr]
    elif vr in ("IS", "DS", "US", "SS", "UL", "SL", "FL", "FD"):
        ok = float(after.value) == 0
    else:
        ok = after.is_empty
    return [] if ok else [f"{where}: D gave {after.value!r}"]


def _uid_problems(where: str, before, after) -> list[str]:
    new = after.value
    ok = new == _uid_for(KEY, before.value) and new != before.value and UID(new).is_valid
    return [] if ok else [f"{where}: UID {new!r}"]


def _tag_problems(tag: int, before, out: Dataset, dates: str) -> list[str]:
    """Everything wrong with one tag at one level, judged from the package's table."""
    where = f"{keyword_for_tag(tag) or hex(tag)}"
    action = EFFECTIVE[EXPECTED[tag]]
    after = out.get(tag)
    if dates == "shift" and before.VR in ("DA", "DT", "TM"):
        ok = after is not None and after.value == _shifted(before.VR, before.value)
        return [] if ok else [f"{where}: not shifted"]
    if action == "X":
        return [] if after is None else [f"{where}: not removed"]
    if after is None:
        return [f"{where}: missing, expected {action}"]
    if action == "Z":
        return [] if after.is_empty else [f"{where}: not emptied"]
    if action == "D":
        return _dummy_problems(where, before, after)
    if action == "U":
        return _uid_problems(where, before, after)
    return _item_problems(where, before, after)


def test_reference_covers_the_whole_table():
    """The reference holds every exact tag of the table; only command/meta tags are left out."""
    print(f"skipped {len(SKIPPED)} tags:", [f"{t:08X}" for t in SKIPPED])
    assert len(SKIPPED) <= 3
    levels = _levels(_reference())
    assert len(levels) == 3 and action_for(CONTAINER) is None
    for level in levels:
        assert set(EXPECTED) - set(level.keys()) == set(SKIPPED)


def test_every_tag_gets_its_table_action_at_every_depth(run):
    """Each tag is removed, emptied, dummied, re-UIDed, kept-and-cleaned or shifted as the table says."""
    levels = list(zip(_levels(run.original), _levels(run.back)))
    assert len(levels) == 3
    problems = []
    for depth, (before, after) in enumerate(levels):
        for tag in sorted(set(EXPECTED) - set(SKIPPED)):
            problems += [f"level {depth} {p}" for p in _tag_problems(tag, before[tag], after,
                                                                        run.settings.dates)]
    assert problems == []


def test_no_private_curve_or_overlay_data_survives(run):
    """Private tags, curve groups and overlay data/comments are gone at every depth; overlay rows stay."""
    tags = [e.tag for e in run.back.iterall()]
    assert tags and not [t for t in tags if t.is_private]
    assert not [t for t in tags if t.group & 0xFF00 == 0x5000]
    assert not [t for t in tags if t.group & 0xFF00 == 0x6000 and t.element in (0x3000, 0x4000)]
    assert all(0x60000010 in level for level in _levels(run.back))
    assert run.report.private_removed > 0


def test_written_bytes_leak_no_marker_uid_date_or_preamble(run):
    """A byte search of the output finds no marker, no original UID, no preamble; no original date."""
    assert b"MARK" not in run.data
    assert ROOT.encode() not in run.data
    assert PREAMBLE not in run.data and run.data[:128] == b"\0" * 128
    assert run.back.preamble == b"\0" * 128
    originals = {str(v) for e in run.original.iterall() if e.VR in ("DA", "DT") for v in
                 (e.value if e.VM > 1 else [e.value])}
    survivors = [e for e in run.back.iterall() if e.VR in ("DA", "DT") and str(e.value) in originals]
    assert survivors == []


def test_file_meta_is_rebuilt_from_scratch(run):
    """The meta holds exactly the required set, our implementation UID and the new instance UID."""
    meta = run.back.file_meta
    assert {keyword_for_tag(t) for t in meta.keys()} == {
        "FileMetaInformationGroupLength", "FileMetaInformationVersion", "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID", "TransferSyntaxUID", "ImplementationClassUID",
        "ImplementationVersionName"}
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    assert meta.MediaStorageSOPInstanceUID == run.back.SOPInstanceUID
    assert meta.MediaStorageSOPInstanceUID == _uid_for(KEY, run.original.SOPInstanceUID)
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID != PYDICOM_IMPLEMENTATION_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME


def test_output_says_it_was_deidentified_and_how(run):
    """PatientIdentityRemoved, the method text and one code item per method applied."""
    back, shifted = run.back, run.settings.dates == "shift"
    assert back.PatientIdentityRemoved == "YES"
    assert 0 < len(back.DeidentificationMethod) <= 64 and "Basic" in back.DeidentificationMethod
    codes = [(i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning)
             for i in back.DeidentificationMethodCodeSequence]
    expected = [("113100", "DCM", "Basic Application Confidentiality Profile")]
    if shifted:
        expected.append(("113107", "DCM",
                         "Retain Longitudinal Temporal Information Modified Dates Option"))
    assert codes == expected
    assert run.report.method_codes == [c[0] for c in expected]
    assert back.LongitudinalTemporalInformationModified == ("MODIFIED" if shifted else "REMOVED")


def test_output_round_trips_identically(run):
    """Reading the written file and writing it again gives the same bytes."""
    assert _write(run.back) == run.data


def test_rendering_attributes_and_pixels_are_untouched(run):
    """Everything a viewer needs (pixel data included) is outside the table and comes out unchanged."""
    for keyword in RENDERING:
        assert action_for(tag_for_keyword(keyword)) is None
        assert run.back[keyword].value == run.original[keyword].value, keyword
    assert run.back.PixelData == bytes(range(32))


def test_report_names_attributes_and_counts_never_values(run):
    """The JSON report holds keywords and counts only: no marker, UID or date from the object."""
    report = run.report.to_json()
    text = json.dumps(report)
    assert "MARK" not in text and ROOT not in text and "2.25." not in text
    assert not re.search(r"19\d{6}", text)
    assert report["table"] == TABLE_SOURCE
    assert isinstance(report["private_removed"], int) and isinstance(report["kept_unlisted"], int)
    names = [n for key in ("removed", "emptied", "dummied", "uids_replaced", "dates_shifted")
             for n in report[key]]
    assert names and all(re.fullmatch(r"[A-Za-z0-9]+|\([0-9A-F]{4},[0-9A-F]{4}\)", n) for n in names)


def test_report_lists_each_attribute_under_its_action(run):
    """Each named table attribute appears in the report list for its action (dates: dates_shifted)."""
    report = run.report.to_json()
    missing = []
    for tag in set(EXPECTED) - set(SKIPPED):
        action, keyword = EFFECTIVE[EXPECTED[tag]], keyword_for_tag(tag)
        listed = REPORT_LIST[action]
        if action == "D" and _vr(tag) == "UI":
            listed = "uids_replaced"
        if action == "D" and _vr(tag) == "SQ":
            listed = "emptied"  # a dummy sequence is an empty one
        if run.settings.dates == "shift" and _vr(tag) in ("DA", "DT", "TM"):
            listed = "dates_shifted"
        if keyword and keyword not in report[listed]:
            missing.append(f"{keyword} not in {listed}")
    assert missing == []


def _instance(sop: str, referenced: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = f"{ROOT}1"
    ds.SOPInstanceUID = sop
    if referenced:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = referenced
        ds.ReferencedImageSequence = [item]
    return ds


def test_uids_are_consistent_within_a_key_and_differ_across_keys():
    """One study keeps one new Study UID, instances differ, references follow, another key differs."""
    first, second = _instance(f"{ROOT}2"), _instance(f"{ROOT}3", referenced=f"{ROOT}2")
    for ds in (first, second):
        deidentify_dataset(ds, DeidSettings(uid_key=KEY))
    assert first.StudyInstanceUID == second.StudyInstanceUID != f"{ROOT}1"
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert second.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert all(UID(u).is_valid for u in (first.StudyInstanceUID, first.SOPInstanceUID))
    other = _instance(f"{ROOT}2")
    deidentify_dataset(other, DeidSettings(uid_key=OTHER_KEY))
    assert other.StudyInstanceUID != first.StudyInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID


def test_new_uid_follows_the_documented_formula():
    """new_uid is 2.25 + the first 16 bytes of HMAC-SHA-256 as a decimal, valid and at most 64 chars."""
    made = new_uid(KEY, f"{ROOT}42")
    assert made == _uid_for(KEY, f"{ROOT}42") == new_uid(KEY, f"{ROOT}42")
    assert UID(made).is_valid and len(made) <= 64
    assert new_uid(KEY, f"{ROOT}42\0") == made  # padding is not part of the UID


def test_multi_valued_uids_are_each_replaced():
    """Every value of a multi-valued UI attribute is replaced, in order, consistently."""
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = [f"{ROOT}5", f"{ROOT}6", f"{ROOT}5"]
    deidentify_dataset(ds, DeidSettings(uid_key=KEY))
    a, b = _uid_for(KEY, f"{ROOT}5"), _uid_for(KEY, f"{ROOT}6")
    assert list(ds.FailedSOPInstanceUIDList) == [a, b, a]


@pytest.mark.parametrize("keyword, before, days, after", [
    ("StudyDate", "20200131", 1, "20200201"),
    ("StudyDate", "20200301", -1, "20200229"),
    ("AcquisitionDateTime", "20201231235959.123456+0100", 1, "20210101235959.123456"),
    ("AcquisitionDateTime", "20200229", 365, "20210228"),
    ("CalibrationDate", ["20200101", "20200301"], 10, ["20200111", "20200311"]),
    ("SelectorDTValue", ["20200101", "202001021200"], 1, ["20200102", "202001031200"]),
    ("StudyTime", "235959", 5, "235959"),
    ("StudyDate", "20200230", 1, ""),           # not a calendar date
    ("AcquisitionDateTime", "2020", 1, ""),     # valid DT, but no day to shift
    ("StudyDate", "99991231", 1, ""),           # leaves the representable range
    ("CalibrationDate", ["20200101", "20200230"], 1, ""),  # one bad value empties the element
    ("StudyUpdateDateTime", "20200131101010", 1, "20200201101010"),  # not in the table: shifted too
    ("ProcedureCreationDate", "20200131", -31, "20191231"),          # not in the table: shifted too
])
def test_date_shift(keyword, before, days, after):
    """Shift mode moves every DA and DT (listed or not) by whole days, keeps TM, empties the unparseable."""
    ds = Dataset()
    setattr(ds, keyword, before)
    report = deidentify_dataset(ds, DeidSettings(uid_key=KEY, dates="shift", date_offset_days=days))
    value = ds[keyword].value
    assert (list(value) if isinstance(after, list) else value) == after
    assert report.method_codes == ["113100", "113107"]
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert keyword in (report.dates_shifted if after != "" else report.emptied)


@pytest.mark.parametrize("keyword, value, reason", [
    ("BurnedInAnnotation", "YES", "BurnedInAnnotation"),
    ("RecognizableVisualFeatures", "YES", "RecognizableVisualFeatures"),
    *[("Modality", m, f"Modality {m}") for m in ("US", "ES", "XC", "SC", "OT", "DOC")],
    *[("SOPClassUID", uid, "SOP class") for uid in (
        SecondaryCaptureImageStorage, MultiFrameTrueColorSecondaryCaptureImageStorage,
        UltrasoundImageStorage, UltrasoundMultiFrameImageStorage)],
])
def test_burned_in_reason_triggers(keyword, value, reason):
    """Each sign of burned-in identifying content yields a reason."""
    ds = _plain_ct()
    setattr(ds, keyword, value)
    found = burned_in_reasons(ds)
    assert len(found) == 1 and found[0].startswith(reason)


def _plain_ct() -> Dataset:
    ds = Dataset()
    ds.Modality, ds.SOPClassUID, ds.BurnedInAnnotation = "CT", CTImageStorage, "NO"
    ds.RecognizableVisualFeatures = "NO"
    return ds


def test_plain_ct_has_no_burned_in_reason():
    """A CT that says NO to burned-in text has no reason to be held back."""
    assert burned_in_reasons(_plain_ct()) == []


def test_burned_in_is_judged_before_changes_and_the_flag_is_kept(monkeypatch):
    """Reasons come from the object as it arrived (even were Modality removed); the flag survives."""
    ds = _plain_ct()
    ds.BurnedInAnnotation, ds.Modality = "YES", "US"
    # No reason's input is in today's table, so pretend Modality were: the order becomes visible.
    modality = tag_for_keyword("Modality")
    monkeypatch.setattr(deidentify, "action_for", lambda t: "X" if t == modality else action_for(t))
    report = deidentify_dataset(ds, DeidSettings(uid_key=KEY))
    assert "Modality" not in ds and ds.BurnedInAnnotation == "YES"
    assert [r.split(":")[0] for r in report.burned_in_reasons] == ["BurnedInAnnotation is YES",
                                                                   "Modality US"]


def test_private_tags_are_counted_at_every_depth():
    """Private creators and elements are removed and counted at the top and inside sequences."""
    ds = Dataset()
    ds.Manufacturer = "kept"
    ds.private_block(0x0009, "CREATOR", create=True).add_new(0x01, "LO", "x")
    item = Dataset()
    item.private_block(0x0029, "CREATOR", create=True).add_new(0x01, "LO", "y")
    ds.add_new(CONTAINER, "SQ", [item])
    report = deidentify_dataset(ds, DeidSettings(uid_key=KEY))
    assert report.private_removed == 4 and report.kept_unlisted == 2
    assert [e.keyword for e in ds.iterall()][:2] == ["Manufacturer", "ReferencedSeriesSequence"]


def test_structural_elements_are_removed():
    """Command (0000), file-meta (0002) and group-length elements leave the body so it can be written."""
    ds = _instance(f"{ROOT}8")
    ds.add_new(0x00001001, "UI", f"{ROOT}9")
    ds.add_new(0x00020003, "UI", f"{ROOT}8")
    ds.add_new(0x00080000, "UL", 4)
    deidentify_dataset(ds, DeidSettings(uid_key=KEY))
    assert not [t for t in ds.keys() if t.group in (0, 2) or t.element == 0]
    assert ROOT.encode() not in _write(ds)


@pytest.mark.parametrize("dates", ["remove", "shift"])
def test_empty_values_do_not_crash(dates):
    """Empty and missing values pass through each action without error."""
    ds = Dataset()
    ds.PatientName = ""
    ds.add_new(0x0040A123, "PN", "")      # Person Name, D: still gets the dummy
    ds.StudyInstanceUID = ""
    ds.add_new(0x00080058, "UI", None)    # Failed SOP Instance UID List, U
    ds.ContentSequence = []
    ds.ReferencedImageSequence = []
    ds.StudyDate = ""
    ds.add_new(0x0040A121, "DA", None)    # Date, D
    deidentify_dataset(ds, DeidSettings(uid_key=KEY, dates=dates, date_offset_days=3))
    assert ds.PersonName == "ANONYMIZED" and ds.StudyInstanceUID == "" and ds.StudyDate == ""
    assert len(ds.ContentSequence) == 0 and len(ds.ReferencedImageSequence) == 0


TESTDATA = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtstruct.dcm", "test-SR.dcm",
            "waveform_ecg.dcm", "examples_overlay.dcm", "liver_1frame.dcm", "image_dfl.dcm",
            "ExplVR_BigEndNoMeta.dcm"]


@pytest.mark.parametrize("name", TESTDATA)
def test_pydicom_test_files(name):
    """Real files (sequences, SR, RT, no meta, big endian) de-identify, write, re-read and leak no UID."""
    path = get_testdata_file(name, download=False)
    assert path and os.path.exists(path)
    original = pydicom.dcmread(path, force=True)
    ds = copy.deepcopy(original)
    deidentify_dataset(ds, DeidSettings(uid_key=KEY))
    data = _write(ds)
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.get("PatientName", "") in ("", "ANONYMIZED")
    assert back.PatientIdentityRemoved == "YES"
    assert not [e for e in back.iterall() if e.tag.is_private]
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID != original.SOPInstanceUID
    old_uids = {str(v) for e in original.iterall() if action_for(e.tag) == "U" and e.VM
                for v in (e.value if e.VM > 1 else [e.value])}
    assert old_uids and not [u for u in old_uids if u.encode() in data]
    assert _write(back) == data


def test_table_is_the_newest_installed_version():
    """TABLE_VERSION is the newest dicomfields_* module and TABLE_SOURCE names standard and package."""
    names = sorted(f[:-3] for f in os.listdir(databases.__path__[0])
                   if re.fullmatch(r"dicomfields_\w+\.py", f))
    assert TABLE_VERSION == names[-1]
    for part in ("PS3.15", "E.1-1", "dicom-anonymizer", TABLE_VERSION, "2.1.0"):
        assert part in TABLE_SOURCE


def test_action_for_agrees_with_the_package_for_every_exact_tag():
    """The lookup returns, for every exact tag, the action of the list it is in."""
    assert {tag: action_for(tag) for tag in EXPECTED} == EXPECTED
    assert sum(deid_table.TABLE.counts().values()) == len(EXPECTED) + 3  # + 3 masked entries


@pytest.mark.parametrize("tag, action", [
    (0x50000005, "X"), (0x50223000, "X"), (0x60003000, "X"), (0x601E3000, "X"),
    (0x60024000, "X"), (0x60000010, None), (0x7FE00010, None), (0x00100010, "Z"),
])
def test_repeating_groups_match_by_mask(tag, action):
    """Masked entries cover the whole repeating group and nothing next to it."""
    assert action_for(tag) == action


def _fake_table(**lists) -> types.ModuleType:
    module = types.ModuleType("dicomfields_fake")
    for name in CATEGORY_ACTIONS:
        setattr(module, name, [])
    for name, entries in lists.items():
        setattr(module, name, entries)
    return module


@pytest.mark.parametrize("lists", [
    {"D_TAGS": [(0x0010, 0x0010)], "X_TAGS": [(0x0010, 0x0010)]},
    {"X_TAGS": [(0x6000, 0x3000, 0xFF00, 0xFFFF)], "Z_TAGS": [(0x6000, 0x3000, 0xFF00, 0xFFFF)]},
    {"X_TAGS": [(0x6000, 0x3000, 0xFF00, 0xFFFF)], "Z_TAGS": [(0x6002, 0x3000)]},
    {"K_TAGS": [(0x0010, 0x0010)]},
    {"X_TAGS": [(0x0010,)]},
])
def test_corrupt_table_is_refused(lists):
    """A tag with two actions, an unknown category or a malformed entry raises instead of winning."""
    with pytest.raises(TableError):
        load_table(_fake_table(**lists))


def test_missing_category_is_refused():
    """A table without one of the known categories raises (its tags would silently be kept)."""
    module = _fake_table()
    del module.U_TAGS
    with pytest.raises(TableError):
        load_table(module)


def test_same_tag_twice_with_one_action_is_fine():
    """Duplicates within one category are not a conflict."""
    table = load_table(_fake_table(X_TAGS=[(0x0010, 0x1040), (0x0010, 0x1040)]))
    assert table.action_for(0x00101040) == "X" and table.action_for(0x00100010) is None


def test_implementation_identity_is_ours_and_documented():
    """The implementation class UID is the documented UUID-derived constant, not pydicom's."""
    derived = uuid.uuid5(uuid.NAMESPACE_OID, "onprem-label.dicom.implementation-class").int
    assert IMPLEMENTATION_CLASS_UID == f"2.25.{derived}" and UID(IMPLEMENTATION_CLASS_UID).is_valid
    assert 0 < len(IMPLEMENTATION_VERSION_NAME) <= 16


@pytest.mark.parametrize("kwargs", [{"uid_key": b"short"}, {"uid_key": KEY, "dates": "keep"},
                                    {"uid_key": KEY, "date_offset_days": 1.5}])
def test_bad_settings_are_refused(kwargs):
    """A short key, an unknown date mode or a fractional offset raise ValueError."""
    with pytest.raises(ValueError):
        DeidSettings(**kwargs)
