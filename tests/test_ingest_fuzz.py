"""Acceptance: 500 seeded mutations of valid files through the upload API: no 500, no orphan, no crash."""

from __future__ import annotations

import faulthandler
import io
import json
import os
import random
import signal
import struct
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless
from sqlalchemy import func, select

from imaging_helpers import bearer_for, make_dicom, new_project, upload
from onprem_label.db.engine import read_connection
from onprem_label.db.models import Blob, Item

MUTATIONS = 500
FILES_PER_REQUEST = 10
MAX_FRAMES = 40
STEP_SECONDS = 60  # one request taking longer than this counts as a hung server
STRUCTURE_BYTES = 2048  # headers live here; flips spread over the whole file mostly hit pixels

# Explicit VR element layouts (PS3.5 7.1.2): these VRs have 2 reserved bytes and a 4-byte length.
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
             b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item, little endian: a 4-byte length follows
PNG_SIGNATURE, JPEG_SOI = b"\x89PNG\r\n\x1a\n", b"\xff\xd8"
UID_ROOT = "1.2.826.0.1.3680043.8.498.4242."  # fixed instance UIDs: the same seeds on every run


@dataclass(frozen=True)
class LengthField:
    """Where a length is stored in a file: offset, width in bytes and byte order."""

    offset: int
    width: int
    order: str  # "<" little endian, ">" big endian


# --- seeds -----------------------------------------------------------------------------------

def _rle_stack() -> bytes:
    """Three RLE frames: ingest checks the first and last, so a damaged middle one shows at render time."""
    plain = make_dicom(rows=8, columns=8, frames=3, seed=7, instance=UID_ROOT + "3000")
    ds = pydicom.dcmread(io.BytesIO(plain))
    ds.compress(RLELossless, generate_instance_uid=False)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _picture(fmt: str) -> bytes:
    """A small gradient picture written by Pillow."""
    image = Image.new("RGB", (24, 16))
    image.putdata([(x * 10, y * 15, (x + y) * 5) for y in range(16) for x in range(24)])
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def seeds() -> dict[str, bytes]:
    """Valid files of each kind ingest reads: plain, multi-frame, RLE and JPEG DICOM, PNG and JPEG."""
    return {
        "ct.dcm": make_dicom(rows=16, columns=16, seed=1, instance=UID_ROOT + "1000"),
        "ct3.dcm": make_dicom(rows=8, columns=8, frames=3, seed=2, instance=UID_ROOT + "2000"),
        "rle3.dcm": _rle_stack(),
        "mr.dcm": Path(get_testdata_file("MR_small.dcm")).read_bytes(),
        "mr_rle.dcm": Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes(),
        "jpeg.dcm": Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).read_bytes(),
        "pic.png": _picture("PNG"),
        "pic.jpg": _picture("JPEG"),
    }


# --- where the length fields are -------------------------------------------------------------

def length_fields(data: bytes) -> list[LengthField]:
    """Length fields found by simple pattern rules, per format (false positives only widen the fuzz).

    DICOM: any two uppercase bytes that name an explicit VR, four bytes after a candidate tag,
    and every (FFFE,E000) item tag (fragments of compressed pixel data). PNG: each chunk's
    length, walking the chunks. JPEG: each marker segment's length, up to start of scan.
    """
    if data.startswith(PNG_SIGNATURE):
        return _png_lengths(data)
    if data.startswith(JPEG_SOI):
        return _jpeg_lengths(data)
    fields = []
    for i in range(0, len(data) - 8):
        vr = data[i + 4:i + 6]
        if vr in LONG_VRS and data[i + 6:i + 8] == b"\0\0":
            fields.append(LengthField(i + 8, 4, "<"))
        elif vr in SHORT_VRS:
            fields.append(LengthField(i + 6, 2, "<"))
        elif data[i:i + 4] == ITEM_TAG:
            fields.append(LengthField(i + 4, 4, "<"))
    return fields


def _png_lengths(data: bytes) -> list[LengthField]:
    fields, offset = [], len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        fields.append(LengthField(offset, 4, ">"))
        offset += 12 + struct.unpack(">I", data[offset:offset + 4])[0]
    return fields


def _jpeg_lengths(data: bytes) -> list[LengthField]:
    fields, offset = [], 2
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        fields.append(LengthField(offset + 2, 2, ">"))
        if marker == 0xDA:  # start of scan: entropy-coded data follows, no more segments
            break
        offset += 2 + struct.unpack(">H", data[offset + 2:offset + 4])[0]
    return fields


# --- mutations -------------------------------------------------------------------------------

def flip_bits(data: bytes, rng: random.Random) -> bytes:
    """1-8 random bits flipped, half of them inside the first 2 KiB (the headers)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        span = min(len(out), STRUCTURE_BYTES) if rng.random() < 0.5 else len(out)
        out[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    """The file cut at a random offset (0 gives an empty file)."""
    return data[:rng.randrange(len(data))]


def overwrite_length(data: bytes, rng: random.Random) -> bytes:
    """A random length field set to an edge value, a huge one, or noise."""
    fields = length_fields(data) or [LengthField(rng.randrange(len(data) - 4), 4, "<")]
    field = rng.choice(fields)
    top = (1 << (8 * field.width)) - 1
    value = rng.choice([0, 1, 3, 0xFF, top, top - 1, top // 2, len(data), rng.randrange(top + 1)])
    code = {2: "H", 4: "I"}[field.width]
    return data[:field.offset] + struct.pack(field.order + code, value) + data[field.offset + field.width:]


def duplicate_range(data: bytes, rng: random.Random) -> bytes:
    """A random range of up to 512 bytes copied in again at a random place."""
    start = rng.randrange(len(data))
    piece = data[start:start + rng.randint(1, 512)]
    at = rng.randrange(len(data) + 1)
    return data[:at] + piece + data[at:]


def delete_range(data: bytes, rng: random.Random) -> bytes:
    """A random range of up to 512 bytes removed."""
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 512):]


def zero_magic(data: bytes, rng: random.Random) -> bytes:
    """The format's signature zeroed ('DICM', the PNG signature, the JPEG SOI), then one more mutation.

    The second mutation keeps the cases of one seed apart (zeroing alone is the same every time).
    """
    out = bytearray(data)
    if data[128:132] == b"DICM":
        out[128:132] = bytes(4)
    elif data.startswith(PNG_SIGNATURE):
        out[:8] = bytes(8)
    else:
        out[:2] = bytes(2)
    return rng.choice([flip_bits, truncate, overwrite_length, duplicate_range, delete_range])(bytes(out), rng)


OPERATORS: list[Callable[[bytes, random.Random], bytes]] = [
    flip_bits, truncate, overwrite_length, duplicate_range, delete_range, zero_magic]


def unique_instance(data: bytes, index: int) -> bytes:
    """A DICOM seed with the last four digits of its SOPInstanceUID set from `index`, in place.

    Without it every import after the first of a seed would be a duplicate of the same instance
    and never reach the store or the renderer. Same length, so no length field changes.
    """
    if data[128:132] != b"DICM":
        return data
    uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID).encode()
    assert uid[-4:].isdigit(), uid
    return data.replace(uid, uid[:-4] + f"9{index:03d}".encode())


def cases() -> list[tuple[str, bytes, bytes]]:
    """The 500 (name, seed, mutant): each seed meets each operator in turn; case i draws from Random(i)."""
    pool = sorted(seeds().items())
    found = []
    for index in range(MUTATIONS):
        seed_name, data = pool[index % len(pool)]
        operator = OPERATORS[(index // len(pool)) % len(OPERATORS)]
        data = unique_instance(data, index)
        name = f"{index:03d}-{operator.__name__}-{seed_name}"
        found.append((name, data, operator(data, random.Random(index))))
    return found


def mutated_files() -> list[tuple[str, bytes]]:
    """The 500 mutants with their names."""
    return [(name, mutant) for name, _seed, mutant in cases()]


def batches(files: list[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    """Consecutive groups of FILES_PER_REQUEST files, one request each."""
    return [files[i:i + FILES_PER_REQUEST] for i in range(0, len(files), FILES_PER_REQUEST)]


# --- a server process that may die ----------------------------------------------------------

def supervise(app, step: Callable[[int], Any], count: int, log: Path) -> tuple[dict[int, Any], list[str]]:
    """Run step(0..count-1) in forked server processes, starting a new one after each death.

    Some decoders end the whole process on bad input (a C++ exception reaching std::terminate);
    in pytest's own process that would end the test run with no report. The child plays the
    server; the parent notes how it died and carries on with the next step, as systemd would.
    """
    results: dict[int, Any] = {}
    deaths: list[str] = []
    start = 0
    while start < count:
        pid = os.fork()
        if pid == 0:
            _serve(app, step, start, count, log)
        how = _wait_for(pid, log)
        begun, ended, crashes = _read_log(log)
        results.update(ended)
        deaths += crashes
        if how is None:
            break
        failed = max(begun, default=start)
        deaths.append(f"step {failed}: the server process {how}")
        start = failed + 1
    return results, deaths


def _serve(app, step: Callable[[int], Any], start: int, count: int, log: Path) -> NoReturn:
    code = 0
    try:
        # pytest's faulthandler writes to the terminal, past output capture; the parent reports the death.
        faulthandler.disable()
        # The parent's pooled SQLite connections must not be shared: the child opens its own.
        app.extensions["onprem_label"].engine.dispose(close=False)
        with open(log, "a", encoding="utf-8") as out:
            for index in range(start, count):
                _note(out, {"begin": index})
                _note(out, {"end": index, "result": step(index)})
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into pytest
        code = 1
        with open(log, "a", encoding="utf-8") as out:
            _note(out, {"crash": traceback.format_exc()[-3000:]})
    finally:
        os._exit(code)


def _note(out, record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def _wait_for(pid: int, log: Path) -> str | None:
    """None when the child finished; else how it died (a signal, a status, or no progress)."""
    size, changed = -1, time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
            return None if os.WEXITSTATUS(status) == 0 else f"exited with status {os.WEXITSTATUS(status)}"
        now_size = log.stat().st_size if log.exists() else 0
        if now_size != size:
            size, changed = now_size, time.monotonic()
        elif time.monotonic() - changed > STEP_SECONDS:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return f"hung (no progress for {STEP_SECONDS} s)"
        time.sleep(0.01)


def _read_log(log: Path) -> tuple[set[int], dict[int, Any], list[str]]:
    begun, ended, crashes = set(), {}, []
    for line in log.read_text(encoding="utf-8").splitlines() if log.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short when the process died
        if "begin" in record:
            begun.add(record["begin"])
        elif "end" in record:
            ended[record["end"]] = record["result"]
        else:
            crashes.append(f"the server process failed: {record['crash']}")
    return begun, ended, crashes


def answered(call: Callable[[], Any]) -> tuple[Any, str | None]:
    """(the response, None), or (None, what escaped the app): a request waitress would leave unanswered.

    waitress catches only Exception around the app; a BaseException such as pyo3's
    PanicException leaves the connection without a response.
    """
    try:
        return call(), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - exactly what the server would not catch
        return None, f"{type(exc).__module__}.{type(exc).__name__} escaped the app: {str(exc)[:200]}"


# --- the steps the server runs ---------------------------------------------------------------

def upload_step(client, project: int, headers: dict, group: list[tuple[str, bytes]]) -> dict:
    """One upload request: its status and per-file results, or what went wrong."""
    response, escaped = answered(lambda: upload(client, project, group, headers))
    if escaped:
        return {"problem": escaped}
    body = response.get_json(silent=True) or {}
    return {"status": response.status_code, "results": body.get("results"),
            "text": response.data[:300].decode("latin-1")}


def render_step(client, headers: dict, item_id: int) -> list[str]:
    """Every frame (up to MAX_FRAMES) and the thumbnail of an item must render to a PNG of its size."""
    item, escaped = answered(lambda: client.get(f"/api/v1/items/{item_id}", headers=headers))
    if escaped or item.status_code != 200:
        return [f"item {item_id}: GET item: {escaped or item.status_code}"]
    body, problems = item.get_json(), []
    for frame in range(min(body["frames"], MAX_FRAMES)):
        png, escaped = answered(lambda: client.get(f"/api/v1/items/{item_id}/image?frame={frame}",
                                                   headers=headers))
        if escaped or png.status_code != 200:
            problems.append(f"item {item_id} frame {frame}: {escaped or png.status_code}")
        elif Image.open(io.BytesIO(png.data)).size != (body["width"], body["height"]):
            problems.append(f"item {item_id} frame {frame}: the PNG is not {body['width']}x{body['height']}")
    thumbnail, escaped = answered(lambda: client.get(f"/api/v1/items/{item_id}/thumbnail", headers=headers))
    if escaped or thumbnail.status_code != 200:
        problems.append(f"item {item_id} thumbnail: {escaped or thumbnail.status_code}")
    return problems


def answer_problems(group: list[tuple[str, bytes]], answer: dict | None) -> list[str]:
    """What is wrong with the answer to one upload request (nothing, ideally)."""
    names = [name for name, _ in group]
    if answer is None:
        return [f"{names}: no answer (the server died on this request)"]
    if "problem" in answer:
        return [f"{names}: {answer['problem']}"]
    # 400 and 413 are about the request, not a file: these bodies are well-formed and small, so
    # either would mean the files went unexamined.
    if answer["status"] not in (200, 422):
        return [f"{names}: HTTP {answer['status']} {answer['text']}"]
    results = answer["results"] or []
    if [r["name"] for r in results] != names:
        return [f"{names}: the results do not match the files: {results}"]
    problems = []
    for result in results:
        if result["status"] not in ("imported", "duplicate", "rejected"):
            problems.append(f"{result['name']}: unknown status {result}")
        elif result["status"] == "rejected" and not (result.get("code") and result.get("reason")):
            problems.append(f"{result['name']}: rejected without a code and a reason: {result}")
    return problems


def storage_problems(app, imported: set[int]) -> list[str]:
    """Blob files and blob rows match one to one; no staging or temp file is left; no stray item."""
    services = app.extensions["onprem_label"]
    # A read-only connection: on SQLite an ordinary session would take the write lock the app needs.
    with read_connection(services.engine) as conn:
        rows = set(conn.scalars(select(Blob.id)))
        items = conn.scalar(select(func.count()).select_from(Item))
    files = set(services.store.iter_blobs())
    staging = services.settings.data_path / "staging"
    problems = [f"blob file without a row: {b}" for b in sorted(files - rows)]
    problems += [f"blob row without a file: {b}" for b in sorted(rows - files)]
    problems += [f"temp file left: {p.name}" for p in services.store.iter_temp()]
    if staging.exists():
        problems += [f"staged file left: {p}" for p in staging.rglob("*") if p.is_file()]
    if items != len(imported):
        problems.append(f"{items} items in the database, {len(imported)} reported imported")
    return problems


# --- the tests -------------------------------------------------------------------------------

@pytest.fixture
def manager(make_user, db, clock):
    """A manager with an API token header."""
    return bearer_for(db, make_user("mona", "manager"), clock)


def test_mutations_are_deterministic_and_cover_every_operator():
    """The same 500 cases on every run, each operator applied to each seed, almost none left unchanged."""
    first, again = cases(), cases()
    assert first == again and len(first) == MUTATIONS
    assert {name.split("-")[1] for name, _, _ in first} == {op.__name__ for op in OPERATORS}
    assert sum(seed == mutant for _, seed, mutant in first) <= MUTATIONS // 100  # a flip may land twice


# Pillow only warns about a damaged EXIF block (a preamble reading "II*" looks like a TIFF); this
# suite turns warnings into exceptions the server never meets, so that one warning is let through.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize("backend", ["sqlite"])  # the code under test is the same on both backends
def test_mutated_files_are_imported_or_rejected_never_a_500(app, client, manager, db, tmp_path, backend):
    """500 mutated files: each imported or rejected, no 5xx, no death, imports render, no orphan blob."""
    project = new_project(db, "Fuzz")
    groups = batches(mutated_files())
    answers, problems = supervise(app, lambda i: upload_step(client, project, manager, groups[i]),
                                  len(groups), tmp_path / "uploads.jsonl")
    for index, group in enumerate(groups):
        problems += answer_problems(group, answers.get(index))
    results = [r for answer in answers.values() for r in (answer.get("results") or [])]
    imported = sorted({r["item_id"] for r in results if r["status"] == "imported"})
    problems += storage_problems(app, set(imported))
    renders, deaths = supervise(app, lambda i: render_step(client, manager, imported[i]), len(imported),
                                tmp_path / "renders.jsonl")
    problems += deaths + [p for found in renders.values() for p in found]
    # Renditions cached while rendering are blobs too; a finding already listed is not repeated.
    problems += [p for p in storage_problems(app, set(imported)) if p not in problems]
    health = client.get("/healthz")
    if health.status_code != 200:
        problems.append(f"/healthz answered {health.status_code}: {health.get_json()}")
    assert problems == [], "\n".join(problems)
    # The fuzz means little unless both outcomes occur in numbers.
    tally = {status: sum(r["status"] == status for r in results) for status in ("imported", "rejected")}
    assert tally["imported"] >= 50 and tally["rejected"] >= 50, tally


# --- what the fuzz found, one minimal case each (the xfails are strict: they fail once fixed) -

def _testdata(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _with_vr(data: bytes, tag: bytes, vr: bytes, new_vr: bytes) -> bytes:
    """`data` with the explicit VR of the one element `tag` (group, element LE) replaced."""
    assert data.count(tag + vr) == 1
    return data.replace(tag + vr, tag + new_vr)


def _rle_stack_with_damaged_middle_frame() -> bytes:
    """The 3-frame RLE seed with the segment data of frame 2 zeroed (its RLE header kept)."""
    data = bytearray(_rle_stack())
    ds = pydicom.dcmread(io.BytesIO(bytes(data)))
    start = bytes(data).find(ds.PixelData)
    fragments, offset = [], 0
    while offset < len(ds.PixelData):  # (FFFE,E000) items: the offset table, then one per frame
        _tag, length = struct.unpack("<II", ds.PixelData[offset:offset + 8])
        fragments.append((start + offset + 8, length))
        offset += 8 + length
    at, length = fragments[2]
    data[at + 64:at + length] = bytes(length - 64)  # 64: the RLE header with the segment offsets
    return bytes(data)


def assert_survives(app, client, headers: dict, db, logs: Path, name: str, data: bytes) -> None:
    """One file sent to a server process: it lives; the file is imported and renders, or is rejected."""
    project, files = new_project(db), [(name, data)]
    answers, deaths = supervise(app, lambda _: upload_step(client, project, headers, files), 1,
                                logs / "upload.jsonl")
    assert deaths == [] and answer_problems(files, answers.get(0)) == [], (deaths, answers)
    [result] = answers[0]["results"]
    if result["status"] == "imported":
        renders, deaths = supervise(app, lambda _: render_step(client, headers, result["item_id"]), 1,
                                    logs / "render.jsonl")
        assert deaths == [] and renders == {0: []}, (deaths, renders)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_corrupt_jpeg_marker_does_not_kill_the_server(app, client, manager, db, tmp_path, backend):
    """SC_rgb_jpeg_dcmtk.dcm with one JPEG marker byte changed (offset 1938, 0xFF -> 0xEF) is survived."""
    data = bytearray(_testdata("SC_rgb_jpeg_dcmtk.dcm"))
    assert data[1938] == 0xFF
    data[1938] = 0xEF
    assert_survives(app, client, manager, db, tmp_path, "j.dcm", bytes(data))


@pytest.mark.parametrize("backend", ["sqlite"])
def test_rle_decoder_panic_is_answered(app, client, manager, db, tmp_path, backend):
    """MR_small_RLE.dcm with bytes 5992..6282 cut from its second segment is answered, not dropped."""
    data = _testdata("MR_small_RLE.dcm")
    assert_survives(app, client, manager, db, tmp_path, "r.dcm", data[:5992] + data[6283:])


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("tag, vr, new_vr", [
    (b"\x28\x00\x11\x00", b"US", b"TS"),  # Columns, read by check_pixels
    (b"\x10\x00\x10\x00", b"PN", b"QQ"),  # PatientName, read by de-identification
], ids=["Columns", "PatientName"])
def test_unknown_vr_is_a_rejection(client, manager, db, backend, tag, vr, new_vr):
    """A VR that does not exist makes that file a rejection; the valid file before it is still reported."""
    data = _with_vr(make_dicom(rows=8, columns=8, seed=1), tag, vr, new_vr)
    response = upload(client, new_project(db), [("ok.dcm", make_dicom(seed=2)), ("vr.dcm", data)], manager)
    assert response.status_code == 200, response.data[:300]
    results = response.get_json()["results"]
    assert [(r["status"], r.get("code")) for r in results] == [("imported", None), ("rejected", "corrupt")]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_damaged_middle_frame_is_rejected_or_renders(client, manager, db, backend):
    """A 3-frame RLE file whose middle frame cannot be decoded is rejected, or every frame renders."""
    response = upload(client, new_project(db), [("rle.dcm", _rle_stack_with_damaged_middle_frame())], manager)
    assert response.status_code in (200, 422)
    [result] = response.get_json()["results"]
    if result["status"] == "imported":
        image = f"/api/v1/items/{result['item_id']}/image"
        frames = [client.get(f"{image}?frame={frame}", headers=manager).status_code for frame in range(3)]
        assert frames == [200, 200, 200]
