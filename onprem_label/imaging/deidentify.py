"""De-identify a DICOM dataset in place by the PS3.15 Annex E Basic Profile and report what was done."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta

import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRBigEndian, ImplicitVRLittleEndian

from onprem_label import __version__
from onprem_label.imaging.deid_table import TABLE_SOURCE, TABLE_VERSION, action_for

# Names our writer in every file we emit. Derived once, never to change, as
# "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "onprem-label.dicom.implementation-class").int)
# (ISO/IEC 9834-8 UUID-derived OID, so no registered root is needed); a test re-derives it.
IMPLEMENTATION_CLASS_UID = "2.25.249284238087873942342870492610207261965"
IMPLEMENTATION_VERSION_NAME = f"ONPREM_{__version__}"[:16]  # SH: at most 16 characters

CODE_BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
CODE_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
DUMMY_TEXT = "ANONYMIZED"

# Maximum value lengths (PS3.5 Table 6.2-1) of the text VRs a dummy is cut to; None: unlimited.
_TEXT_MAX = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240,
             "UC": None, "UR": None, "UT": None}
_FIXED_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y",
                "IS": "0", "DS": "0"}
_NUMBER_VRS = {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"}
_BYTES_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
# Combined actions resolved to the one that keeps nothing yet leaves the object valid
# (Z and D keep a Type 1/2 attribute present; X might drop a required one). X/Z/U* is handled apart.
_RESOLVED = {"X/Z": "Z", "X/D": "D", "X/Z/D": "Z", "Z/D": "Z"}

# Modalities whose pixels commonly carry burned-in identifying text or features.
BURNED_IN_MODALITIES: dict[str, str] = {
    "US": "ultrasound scanners burn patient name, ID and dates into the image",
    "IVUS": "intravascular ultrasound frames carry the scanner's text overlay",
    "ES": "endoscopy video processors overlay patient name and date",
    "XC": "external-camera photographs can show faces, wristbands and charts",
    "GM": "general microscopy images can show slide labels with patient identifiers",
    "SM": "slide microscopy includes label images with names and barcodes",
    "OP": "ophthalmic photographs can show the face and burned-in patient data",
    "PX": "panoramic dental X-ray units print patient name and date into the image",
    "SC": "secondary captures are screenshots that show whatever the screen showed",
    "OT": "'other' objects are often scans or screen grabs with printed text",
    "DOC": "scanned documents are mostly identifying text",
}
# SOP classes of the secondary-capture family and ultrasound (retired classes included).
BURNED_IN_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.6.1": "ultrasound",
    "1.2.840.10008.5.1.4.1.1.3.1": "ultrasound",
    "1.2.840.10008.5.1.4.1.1.6": "ultrasound",
    "1.2.840.10008.5.1.4.1.1.3": "ultrasound",
    "1.2.840.10008.5.1.4.1.1.6.2": "ultrasound",
}

_DA = re.compile(r"\d{8}")
# DT: date, optional HH[MM[SS[.F{1,6}]]], optional UTC offset (dropped after a shift).
_DT = re.compile(r"(\d{8})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?")


@dataclass(frozen=True)
class DeidSettings:
    """How to de-identify: the per-install UID key and what to do with dates."""

    uid_key: bytes            # 32-byte per-install secret (the caller derives it from the keyring)
    dates: str = "remove"     # "remove" (basic profile) or "shift"
    date_offset_days: int = 0  # whole days added to every date when dates == "shift"

    def __post_init__(self) -> None:
        if not isinstance(self.uid_key, bytes) or len(self.uid_key) != 32:
            raise ValueError("uid_key must be 32 bytes")
        if self.dates not in ("remove", "shift"):
            raise ValueError(f"dates must be 'remove' or 'shift', not {self.dates!r}")
        if not isinstance(self.date_offset_days, int) or isinstance(self.date_offset_days, bool):
            raise ValueError("date_offset_days must be a whole number of days")


@dataclass
class DeidReport:
    """What de-identification did, as attribute keywords and counts; never a value."""

    table: str
    method_codes: list[str]
    removed: list[str] = field(default_factory=list)
    emptied: list[str] = field(default_factory=list)
    dummied: list[str] = field(default_factory=list)
    uids_replaced: list[str] = field(default_factory=list)
    dates_shifted: list[str] = field(default_factory=list)  # DA/DT shifted, TM kept (option 113107)
    private_removed: int = 0
    kept_unlisted: int = 0
    burned_in_reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """A plain JSON-able dict of the report."""
        return asdict(self)


def new_uid(uid_key: bytes, old_uid: str) -> str:
    """'2.25.' + decimal of the first 16 bytes of HMAC-SHA-256(uid_key, old_uid) – same input, same UID."""
    # Padding is not part of a UID; stripping it keeps "1.2.3\0" and "1.2.3" one identity.
    digest = hmac.new(uid_key, str(old_uid).strip("\0 ").encode("ascii"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _texts(value: object) -> list[str]:
    """The values of a CS/UI-like attribute, stripped and upper-cased ([] when absent)."""
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v).strip("\0 ").upper() for v in values if v is not None]


def burned_in_reasons(ds: Dataset) -> list[str]:
    """Why the pixels may carry identifying text; empty when nothing suggests it."""
    reasons = [f"{kw} is YES" for kw in ("BurnedInAnnotation", "RecognizableVisualFeatures")
               if "YES" in _texts(ds.get(kw))]
    reasons += [f"Modality {m}: {BURNED_IN_MODALITIES[m]}" for m in _texts(ds.get("Modality"))
                if m in BURNED_IN_MODALITIES]
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    reasons += [f"SOP class {UID(c).name}: {BURNED_IN_SOP_CLASSES[c]} images often show "
                "identifying text" for c in _texts(sop_class) if c in BURNED_IN_SOP_CLASSES]
    return reasons


def _name(tag: BaseTag) -> str:
    """The attribute's keyword, or (gggg,eeee) when the dictionary has none."""
    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"


def _shift_date(text: str, days: int) -> str | None:
    """YYYYMMDD moved by `days`, or None when `text` is not a valid date or leaves 0001-9999."""
    if not _DA.fullmatch(text):
        return None
    try:
        moved = date(int(text[:4]), int(text[4:6]), int(text[6:])) + timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}"


def _shift_datetime(text: str, days: int) -> str | None:
    """DT with its date part moved by `days`, time kept, UTC offset dropped; None if unparseable."""
    match = _DT.fullmatch(text)
    if not match:
        return None
    clock = match.group(2) or ""
    limits = (24, 60, 61)  # hour, minute, second (leap second allowed)
    parts = [int(clock[i:i + 2]) for i in range(0, len(clock.split(".")[0]), 2)]
    if any(p >= limit for p, limit in zip(parts, limits)):
        return None
    moved = _shift_date(match.group(1), days)
    return None if moved is None else moved + clock


def _values(elem: DataElement) -> list[str]:
    """The element's values as strings (none for an empty element)."""
    if elem.VM == 0:
        return []
    raw = list(elem.value) if isinstance(elem.value, (MultiValue, list, tuple)) else [elem.value]
    return [str(v) for v in raw]


def _set_values(elem: DataElement, values: list[str]) -> None:
    """Store `values` keeping the element single-valued when it was."""
    multi = isinstance(elem.value, (MultiValue, list, tuple))
    elem.value = values if multi else values[0]


class _Walk:
    """One recursive pass over a dataset, applying the table and recording what it did."""

    def __init__(self, settings: DeidSettings) -> None:
        self.settings = settings
        self.done: dict[str, set[str]] = {k: set() for k in
                                          ("removed", "emptied", "dummied", "uids", "shifted")}
        self.private_removed = 0
        self.kept_unlisted = 0

    def dataset(self, ds: Dataset) -> None:
        """Apply the profile to every element of `ds` and, through sequences, every item below it."""
        for tag in list(ds.keys()):
            tag = Tag(tag)
            if tag.is_private:  # odd group: private data and their creators, never inspected
                del ds[tag]
                self.private_removed += 1
            elif tag.group in (0x0000, 0x0002) or tag.element == 0x0000:
                # Command and file-meta elements are not allowed in a stored data set (the meta is
                # rebuilt), and group lengths would be stale after our changes (retired anyway).
                del ds[tag]
                self.done["removed"].add(_name(tag))
            else:
                self.element(ds, ds[tag])

    def element(self, ds: Dataset, elem: DataElement) -> None:
        """Apply the table's action to one element (sequences recurse)."""
        action = action_for(elem.tag)
        if self.settings.dates == "shift" and (elem.VR in ("DA", "DT") or action and elem.VR == "TM"):
            # Every date moves, listed or not: one unshifted date would give the offset away.
            self.clean_date(elem)
        elif action is None:
            self.kept_unlisted += 1  # the profile's K for everything it does not list
            if elem.VR == "SQ":
                self.items(elem)
        elif action == "X/Z/U*":
            self.u_star(elem)
        else:
            self.apply(ds, elem, _RESOLVED.get(action, action))

    def items(self, elem: DataElement) -> None:
        """De-identify every item of a sequence that is kept."""
        for item in elem.value or []:
            self.dataset(item)

    def apply(self, ds: Dataset, elem: DataElement, action: str) -> None:
        """Apply a single action X, Z, D or U."""
        if action == "X":
            del ds[elem.tag]
            self.done["removed"].add(_name(elem.tag))
        elif action == "Z":
            self.empty(elem)
        elif action == "D":
            self.dummy(elem)
        else:
            self.replace_uids(elem)

    def empty(self, elem: DataElement) -> None:
        """Z: zero-length value; a sequence keeps no items."""
        elem.value = empty_value_for_VR(elem.VR)
        self.done["emptied"].add(_name(elem.tag))

    def dummy(self, elem: DataElement) -> None:
        """D: a non-identifying value valid for the VR; a sequence is emptied.

        A dummy sequence is an empty one: kept items would carry free text the table does not
        list (Content Sequence holds an SR's Text Value, e.g. "A mass was detected in ...").
        """
        vr = elem.VR
        if vr == "UI":
            return self.replace_uids(elem)
        if vr == "SQ":
            return self.empty(elem)
        if vr in _FIXED_DUMMY:
            elem.value = _FIXED_DUMMY[vr]
        elif vr in _TEXT_MAX:
            elem.value = DUMMY_TEXT[:_TEXT_MAX[vr]]
        elif vr in _NUMBER_VRS:
            elem.value = 0
        elif vr in _BYTES_VRS:
            elem.value = b""
        else:  # AT and anything unforeseen: no value is the only one that can't point anywhere
            elem.value = empty_value_for_VR(vr)
        self.done["dummied"].add(_name(elem.tag))

    def replace_uids(self, elem: DataElement) -> None:
        """U: every UID value replaced by its keyed hash; a non-UI element cannot be mapped, so Z."""
        if elem.VR != "UI":
            return self.empty(elem)
        values = _values(elem)
        if values:
            key = self.settings.uid_key
            _set_values(elem, [new_uid(key, v) if v.strip("\0 ") else "" for v in values])
        self.done["uids"].add(_name(elem.tag))

    def u_star(self, elem: DataElement) -> None:
        """X/Z/U*: keep a sequence and clean its items (UIDs inside get new UIDs); UI -> U; else Z."""
        if elem.VR == "SQ":
            self.items(elem)
            self.done["uids"].add(_name(elem.tag))
        elif elem.VR == "UI":
            self.replace_uids(elem)
        else:
            self.empty(elem)

    def clean_date(self, elem: DataElement) -> None:
        """Modified Dates option (C): DA/DT shifted by whole days, TM kept; unparseable -> emptied."""
        if elem.VR != "TM":
            shift = _shift_date if elem.VR == "DA" else _shift_datetime
            moved = [shift(v.strip(), self.settings.date_offset_days) for v in _values(elem)]
            if None in moved:
                return self.empty(elem)
            if moved:
                _set_values(elem, moved)  # type: ignore[arg-type]
        self.done["shifted"].add(_name(elem.tag))

    def report(self, codes: list[str], reasons: list[str]) -> DeidReport:
        """The report of this pass."""
        done = {k: sorted(v) for k, v in self.done.items()}
        return DeidReport(table=TABLE_SOURCE, method_codes=codes, removed=done["removed"],
                          emptied=done["emptied"], dummied=done["dummied"],
                          uids_replaced=done["uids"], dates_shifted=done["shifted"],
                          private_removed=self.private_removed, kept_unlisted=self.kept_unlisted,
                          burned_in_reasons=reasons)


def _method_codes(settings: DeidSettings) -> list[tuple[str, str]]:
    """The CID 7050 codes of what is applied."""
    if settings.dates == "shift":
        return [CODE_BASIC_PROFILE, CODE_MODIFIED_DATES]
    return [CODE_BASIC_PROFILE]


def _mark_deidentified(ds: Dataset, codes: list[tuple[str, str]], shifted: bool) -> None:
    """Record in the object itself that, and how, it was de-identified (PS3.15 E.1.1)."""
    ds.PatientIdentityRemoved = "YES"
    method = "PS3.15 E Basic Profile" + (" + Modified Dates" if shifted else "")
    ds.DeidentificationMethod = f"{method} ({TABLE_VERSION})"[:64]  # LO: at most 64 characters
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if shifted else "REMOVED"


def _transfer_syntax(ds: Dataset) -> str:
    """The input's Transfer Syntax; without file meta, the encoding it was read with."""
    old = getattr(ds, "file_meta", None)
    syntax = old.get("TransferSyntaxUID") if old is not None else None
    if syntax:
        return syntax
    # pydicom cannot re-encode big endian as little endian, so a meta-less big-endian file keeps
    # its byte order; everything else (including datasets built in memory) gets the default.
    if ds.original_encoding == (False, False):
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian


def _rebuild_file_meta(ds: Dataset) -> None:
    """Replace the file meta with only what PS3.10 requires, naming our writer and the new UIDs."""
    syntax = _transfer_syntax(ds)
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta


def deidentify_dataset(ds: pydicom.Dataset, settings: DeidSettings) -> DeidReport:
    """De-identify `ds` in place (file meta included) and say what was done."""
    reasons = burned_in_reasons(ds)  # before anything changes
    walk = _Walk(settings)
    walk.dataset(ds)
    codes = _method_codes(settings)
    _mark_deidentified(ds, codes, shifted=settings.dates == "shift")
    ds.preamble = b"\0" * 128  # CVE-2019-11687: the preamble can smuggle an executable
    _rebuild_file_meta(ds)
    return walk.report([code for code, _ in codes], reasons)
