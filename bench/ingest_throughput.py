"""Benchmark: `onprem-label ingest` of 2,000 synthetic 512 x 512 CT slices vs `cp -r` of the same tree.

Goal (issue 4): >= 100 files/s with the default worker count on 2 cores. The ratio of ingest
files/s to `cp -r` files/s (same tree, same filesystem, same run) is printed for reference.
Usage: .venv/bin/python bench/ingest_throughput.py [--files 2000] [--runs 3] [--tmp /tmp]

The tree is made once per invocation with pydicom: patient/study/series folders of 16-bit
signed CT slices (a body phantom with noise) carrying the attributes a scanner writes, patient
name, IDs, dates, institution and a private group included, ~0.5 MB each. Each run then:
  1. `sync` (untimed), then `cp -r TREE COPY` followed by `sync`, timed together: ingest
     fsyncs every blob and SQLite fsyncs every commit, so the copy is timed until its bytes
     are on disk too (the copy alone, before its sync, is printed as well);
  2. a fresh data directory (`init`, `project create`), `sync` (untimed), then the whole
     `onprem-label ingest PROJECT TREE` subprocess timed by wall clock (Python start-up, key
     and database opening and the worker processes included), default worker count, no
     --report; its summary line must say every file was imported.
Both outputs are deleted after each run (untimed). CPU seconds of the ingest process tree come
from getrusage(RUSAGE_CHILDREN), to tell whether the cores or the disk set the pace.

With --parts N (default 100; 0 skips it), N files are then also ingested in this process, one
step at a time, each step timed alone with the production functions: what a worker does
(digest, prepare_file, pickling the result) and what the one parent process does for every file
(unpickling; store_batch of 64 files at a time, per file, as the CLI's storer thread does; store.put
alone on other bytes), next to a plain write + fsync of the same bytes and of their folder. The
parent's steps run one batch at a time whatever the worker count, so 1000 / (their ms) is a
ceiling on files/s.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import _storage as s
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

GOAL_FILES_PER_S = 100.0
BATCH = 64  # files stored per transaction, as the CLI's StoreBehind does (imaging/batch.py)
SIDE = 512
SUMMARY_RE = re.compile(r"ingest: (\d+) imported, (\d+) duplicates, (\d+) rejected "
                        r"\((\d+) files in ([\d.]+) s, ([\d.]+) files/s\)")
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root: these UIDs are made up


def phantom(rng: np.random.Generator, z: float) -> np.ndarray:
    """A 512 x 512 stored-value slice (HU + 1024): air, an elliptic body, two lungs, a spine, noise."""
    y, x = np.mgrid[-1:1:SIDE * 1j, -1:1:SIDE * 1j]
    scale = 1.0 + 0.05 * np.sin(z / 40.0)
    hu = np.full((SIDE, SIDE), -1000.0)
    hu[(x / (0.85 * scale)) ** 2 + (y / (0.6 * scale)) ** 2 <= 1] = 40.0
    for cx in (-0.4, 0.4):
        hu[((x - cx) / 0.28) ** 2 + ((y + 0.05) / 0.4) ** 2 <= 1] = -820.0
    hu[(x / 0.09) ** 2 + ((y - 0.38) / 0.09) ** 2 <= 1] = 700.0
    hu += rng.normal(0.0, 12.0, size=hu.shape)
    return np.clip(hu + 1024.0, -32768, 32767).astype(np.int16)


def ct_slice(*, patient: int, series_uid: str, study_uid: str, frame_uid: str, number: int,
             z: float, pixels: np.ndarray) -> Dataset:
    """One CT Image Storage instance with the identifying and technical attributes scanners write."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(UID_ROOT)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "BENCH_CT_1"
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240312"
    ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime = "081502", "081733", f"0817{number % 60:02d}"
    ds.AccessionNumber = f"ACC{700000 + patient}"
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "CT", "BenchMed", "Tomo 64"
    ds.InstitutionName = "Saint Elsewhere Hospital"
    ds.InstitutionAddress = "1 Hospital Road, Springfield"
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.StationName, ds.DeviceSerialNumber, ds.SoftwareVersions = "CT-ROOM-2", "SN48213", "4.2.1"
    ds.StudyDescription, ds.SeriesDescription = "CT CHEST W/O CONTRAST", "AXIAL 1.0 STANDARD"
    ds.OperatorsName = "Tech^Terry"
    ds.ProcedureCodeSequence = Sequence([Dataset()])
    code = ds.ProcedureCodeSequence[0]
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTCHEST", "99LOCAL", "CT chest"
    ds.PatientName = f"Testperson^Patient{patient}^Q"
    ds.PatientID = f"MRN-{100000 + patient}"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19610412", "F" if patient % 2 else "M", "062Y"
    ds.PatientWeight, ds.PatientSize = 71.5, 1.68
    ds.BodyPartExamined, ds.SliceThickness, ds.KVP = "CHEST", 1.0, 120
    ds.DataCollectionDiameter, ds.ReconstructionDiameter = 500.0, 350.0
    ds.GantryDetectorTilt, ds.TableHeight, ds.RotationDirection = 0.0, 165.0, "CW"
    ds.ExposureTime, ds.XRayTubeCurrent, ds.Exposure = 500, 220, 110
    ds.ConvolutionKernel, ds.PatientPosition = "STANDARD", "FFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = "4411", 3, 1, number
    ds.ImagePositionPatient = [-175.0, -175.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator, ds.SliceLocation = frame_uid, "SN", z
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = SIDE
    ds.PixelSpacing = [0.683594, 0.683594]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.WindowCenter, ds.WindowWidth = [40, -600], [400, 1500]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    block = ds.private_block(0x0009, "BENCHMED_IDEN_01", create=True)
    block.add_new(0x01, "LO", f"scanner-user-{patient}")
    block.add_new(0x02, "DA", "20240312")
    ds.PixelData = pixels.tobytes()
    return ds


def make_tree(root: Path, files: int, per_series: int = 200) -> int:
    """`files` CT slices under root/patientNN/study/seriesNN/IMnnnn.dcm; their total bytes."""
    rng = np.random.default_rng(20240312)
    bases = [phantom(rng, z) for z in np.linspace(0.0, 300.0, 8)]
    total = 0
    for index in range(files):
        patient, number = index // per_series, index % per_series + 1
        if number == 1:
            study_uid, series_uid, frame_uid = (generate_uid(UID_ROOT) for _ in range(3))
            folder = root / f"patient{patient:02d}" / "study" / f"series{patient:02d}"
            folder.mkdir(parents=True)
        noise = rng.integers(-6, 7, size=(SIDE, SIDE), dtype=np.int16)  # every slice differs
        ds = ct_slice(patient=patient, series_uid=series_uid, study_uid=study_uid, frame_uid=frame_uid,
                      number=number, z=-1.0 * number, pixels=bases[index % len(bases)] + noise)
        path = folder / f"IM{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def timed_command(argv: list[str], timeout: float) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall s, CPU s of the process and its children, result) of one command; raise on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=c.clean_env())
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {result.returncode}: "
                           f"{result.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result


def copy_once(tree: Path, dest: Path, timeout: float) -> dict[str, float]:
    """`cp -r` of the tree then `sync`, timed together (and the copy alone)."""
    subprocess.run(["sync"], check=True, timeout=timeout)
    load = c.MachineLoad().start()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(tree), str(dest)], check=True, timeout=timeout)
    copied = time.perf_counter() - t0
    subprocess.run(["sync"], check=True, timeout=timeout)
    total = time.perf_counter() - t0
    busy = load.stop()
    shutil.rmtree(dest)
    return {"cp": copied, "cp+sync": total, "busy": busy}


def ingest_once(tree: Path, base: Path, files: int, timeout: float) -> dict[str, float]:
    """A fresh data directory and project, then the timed `ingest` subprocess; its figures."""
    data = c.init_data_dir(base)
    c.run_cli(data, "project", "create", "Bench CT")
    subprocess.run(["sync"], check=True, timeout=timeout)
    argv = [*c.onprem_label_command(), "--data-dir", str(data), "ingest", "Bench CT", str(tree)]
    load = c.MachineLoad().start()
    wall, cpu, result = timed_command(argv, timeout)
    busy = load.stop()
    match = SUMMARY_RE.search(result.stdout)
    if match is None:
        raise RuntimeError(f"no summary line in the ingest output: {result.stdout[-300:]!r}")
    imported, duplicates, rejected, seen = (int(v) for v in match.groups()[:4])
    if (imported, seen) != (files, files):
        raise RuntimeError(f"ingest imported {imported} of {files} files: {match.group(0)}")
    stored = sum(p.stat().st_size for p in (data / "blobs").rglob("*") if p.is_file()) \
        if (data / "blobs").exists() else 0
    shutil.rmtree(base)
    return {"wall": wall, "cpu": cpu, "inner": float(match.group(5)), "busy": busy, "stored": stored,
            "summary": match.group(0)}


def parts(tree: Path, base: Path, count: int) -> dict[str, list[float]]:
    """Seconds of each ingest step for `count` files of the tree, run in this process (see --parts)."""
    from onprem_label.clock import utcnow
    from onprem_label.config import load_settings
    from onprem_label.db import make_engine
    from onprem_label.imaging.ingest import IngestTarget, store_batch
    from onprem_label.imaging.prepare import prepare_file, prepare_options, source_digest
    from onprem_label.storage import open_keyring, open_store
    from onprem_label.workflow.projects import find_project

    data = c.init_data_dir(base)
    c.run_cli(data, "project", "create", "Parts")
    settings = load_settings({"data_dir": str(data)}, env={})
    keyring = open_keyring(settings)
    store, options = open_store(settings, keyring), prepare_options(settings, keyring)
    engine = make_engine(settings.effective_database_url)
    times: dict[str, list[float]] = {}

    def timed_step(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return result

    try:
        with c.site_sessionmaker(data, engine)() as db:
            target = IngestTarget(find_project(db, "Parts").id, "cli", actor_name="console:bench")
            db.rollback()
            group: list = []
            paths = sorted(tree.rglob("*.dcm"))[:count]
            for path in paths:
                stream = io.BytesIO(path.read_bytes())
                digest = timed_step("W source_digest", source_digest, stream, options.digest_key,
                                    options.max_bytes)
                prepared = timed_step("W prepare_file", prepare_file, stream, options, digest=digest)
                sent = timed_step("W pickle.dumps", pickle.dumps, prepared)
                group.append((str(path), timed_step("P pickle.loads", pickle.loads, sent)))
                other = os.urandom(16) + prepared.images[0].data  # new content: a real write
                timed_step("P (store.put alone)", store.put, io.BytesIO(other))
                timed_step("P (plain write+fsync+dir fsync)", plain_durable_write, base / "plain", other)
                if len(group) == BATCH or path == paths[-1]:
                    t0 = time.perf_counter()
                    results = store_batch(db, store, target, group, now=utcnow())
                    per_file = (time.perf_counter() - t0) / len(group)
                    if any(r.status != "imported" for r in results):
                        raise RuntimeError(f"not all imported: {results[:3]}")
                    times.setdefault(f"P store_batch (per file, {BATCH} a batch)", []).extend([per_file] * len(group))
                    group = []
    finally:
        engine.dispose()
        shutil.rmtree(base)
    return times


def plain_durable_write(folder: Path, data: bytes) -> None:
    """Write `data` to a new file, fsync it and its folder (what a durable store must do at least)."""
    folder.mkdir(exist_ok=True)
    path = folder / os.urandom(8).hex()
    with open(path, "xb", buffering=0) as out:
        out.write(data)
        os.fsync(out.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def print_parts(times: dict[str, list[float]]) -> None:
    """Medians of each step; the worker and parent totals and the ceilings they imply."""
    med = {k: 1000 * c.median(v) for k, v in times.items()}
    count = len(next(iter(times.values())))
    print(f"steps of one file, in this process, medians over {count} files "
          "(W = in a worker, P = in the one parent process):")
    for name, ms in med.items():
        print(f"  {name:<36} {ms:7.2f} ms")
    worker = sum(ms for k, ms in med.items() if k.startswith("W "))
    parent = sum(ms for k, ms in med.items() if k.startswith("P ") and not k.startswith("P ("))
    cores = os.cpu_count() or 1
    both = 1000 * cores / (worker + parent)
    print(f"worker steps {worker:.1f} ms per file, parent steps {parent:.1f} ms per file: the parent alone "
          f"caps ingest at {1000 / parent:.0f} files/s; {cores} cores doing both at {both:.0f} files/s "
          f"(goal {GOAL_FILES_PER_S:.0f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="CT slices in the tree")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (>= 3)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(),
                        help="where the tree, the copies and the data directories go")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many s for the machine to go idle before each run")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="stop starting new runs after this many s")
    parser.add_argument("--parts", type=int, default=100,
                        help="files ingested step by step in this process after the runs (0: none)")
    args = parser.parse_args()
    files, runs = max(1, min(args.files, 100_000)), max(1, min(args.runs, 20))
    timeout = max(600.0, files * 2.0)  # one ingest at 0.5 files/s would be broken, not slow

    print(c.machine_summary())
    s.require_free_disk(Path(args.tmp), 3 * files * 600_000 + 256 * s.MIB)
    deadline = time.monotonic() + args.max_seconds
    with tempfile.TemporaryDirectory(prefix="onprem-bench-", dir=args.tmp) as tmp:
        tmp_path = Path(tmp)
        c.set_pycache_dir(tmp_path / "pycache")
        tree = tmp_path / "tree"
        t0 = time.perf_counter()
        size = make_tree(tree, files)
        print(f"tree: {files} CT slices {SIDE} x {SIDE} int16, {size / files / 1e6:.3f} MB each, "
              f"{size / 1e6:.0f} MB in all, made in {time.perf_counter() - t0:.0f} s under {tmp}; "
              f"default workers: ingest_workers setting 0 -> os.cpu_count() = {os.cpu_count()}")
        warm = ingest_once(next(tree.glob("patient00/study/series00")), tmp_path / "warm",
                           min(files, 200), timeout)
        print(f"warm-up (fills the bytecode cache, untimed): {warm['summary']}")
        results = []
        for i in range(runs):
            if time.monotonic() > deadline:
                print(f"stopping after {i} runs: --max-seconds {args.max_seconds:g} reached")
                break
            before, waited = c.wait_for_quiet(args.quiet_wait)
            copy = copy_once(tree, tmp_path / "copy", timeout)
            ingest = ingest_once(tree, tmp_path / f"run{i}", files, timeout)
            results.append((copy, ingest))
            # CPU the rest of the machine used meanwhile: another job would slow ingest down. It
            # includes kernel threads working for ingest (writeback, the ext4 journal): ~8 s quiet.
            others = max(0.0, ingest["busy"] * (os.cpu_count() or 1) * ingest["wall"] - ingest["cpu"])
            print(f"run {i + 1}: ingest {ingest['wall']:.1f} s wall = {files / ingest['wall']:.1f} files/s "
                  f"(CPU {ingest['cpu']:.1f} s = {1000 * ingest['cpu'] / files:.0f} ms/file; machine busy "
                  f"{ingest['busy']:.0%}, other processes {others:.1f} CPU s; "
                  f"stored {ingest['stored'] / 1e6:.0f} MB); "
                  f"CLI says: {ingest['summary']}; "
                  f"cp -r {copy['cp']:.2f} s, +sync {copy['cp+sync']:.2f} s = "
                  f"{files / copy['cp+sync']:.0f} files/s (busy {copy['busy']:.0%}); "
                  f"machine busy before {before:.0%} (waited {waited:.0f} s)")
        step_times = {}
        if args.parts > 0:
            c.wait_for_quiet(args.quiet_wait)
            step_times = parts(tree, tmp_path / "parts", min(args.parts, files))
    if not results:
        return 1
    if step_times:
        print_parts(step_times)
    return verdict(files, results)


def verdict(files: int, results: list[tuple[dict, dict]]) -> int:
    """Print medians, the ratio and the goal verdict."""
    ingest_rate = c.median([files / r["wall"] for _, r in results])
    inner_rate = c.median([files / r["inner"] for _, r in results])
    cp_rate = c.median([files / cp["cp+sync"] for cp, _ in results])
    cp_only = c.median([files / cp["cp"] for cp, _ in results])
    cpu_ms = c.median([1000 * r["cpu"] / files for _, r in results])
    ratio = ingest_rate / cp_rate
    cores = os.cpu_count() or 1
    print(f"over {len(results)} runs (medians): ingest {ingest_rate:.1f} files/s wall "
          f"({inner_rate:.1f} files/s by the CLI's own clock, start-up excluded); "
          f"cp -r + sync {cp_rate:.0f} files/s (cp -r alone {cp_only:.0f} files/s)")
    print(f"ingest CPU {cpu_ms:.0f} ms per file over all processes: {cores} cores could do at most "
          f"{1000 * cores / cpu_ms:.0f} files/s if nothing else waited")
    print(f"ingest / cp -r+sync ratio {ratio:.3f} (median of per-run ratios "
          f"{c.median([cp['cp+sync'] / r['wall'] for cp, r in results]):.3f}; reference, no goal)")
    print(f"ingest files/s {ingest_rate:.1f}; goal >= {GOAL_FILES_PER_S:.0f} on {cores} cores; "
          f"{ingest_rate / GOAL_FILES_PER_S:.2f} x goal -> "
          f"{'PASS' if ingest_rate >= GOAL_FILES_PER_S else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
