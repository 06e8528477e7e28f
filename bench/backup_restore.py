"""Benchmark: `onprem-label backup` and `restore` of 10 GiB of blobs and 1,000,000 rows, against `cp -r`.

Reference (issue 10): backup time <= 1.5 x `cp -r` of the same data directory, in the same run.
Usage: .venv/bin/python bench/backup_restore.py [--gib 10] [--blob-kib 512] [--rows 1000000]
       [--runs 3] [--backend sqlite|postgresql] [--no-drop-caches]

The site: `init`, one project, rows/2 image-less items and their rows/2 tasks (bulk insert), and
GiB of blobs of --blob-kib each (the real format, written as `put` would without its per-file fsyncs,
then one sync) with their Blob rows. Each run, with the page cache dropped before every timed step
(`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root; --no-drop-caches to skip):
  1. `cp -r DATA COPY` then `sync` (timed to the end of the sync, and to the end of cp alone);
  2. `onprem-label backup DEST` as a subprocess (process start, snapshot, copy + hash, syncfs,
     manifest, audit event);
  3. `onprem-label restore DEST` into a new data directory (copy checked against the manifest,
     every blob authenticated, counts and the audit chain checked);
  4. `onprem-label backup verify DEST` (re-hash, authenticate, chain): reported, no goal.
The backup's ratio counts against `cp -r` + `sync`, because a backup is only done once it is on
disk (the bare cp figure is printed too). Copies are removed after each step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import _common as c

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def drop_caches(enabled: bool) -> None:
    """Write back and drop the page cache, so every timed step reads from the disk."""
    os.sync()
    if enabled:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_site(base: Path, gib: float, blob_kib: int, rows: int, database_url: str) -> tuple[Path, int]:
    """The data directory with its rows and blobs; (path, blob count)."""
    import io

    from sqlalchemy import insert

    from key_rotation import write_blob_unsynced  # single-chunk blobs, as put writes them
    from onprem_label.config import load_settings
    from onprem_label.db import make_engine
    from onprem_label.db.models import Blob
    from onprem_label.storage import open_keyring, open_store
    from onprem_label.workflow.projects import create_project
    import _workflow

    data = base / "data"
    if database_url:
        data.mkdir(mode=0o700)
        (data / "onprem-label.toml").write_text(f'database_url = "{database_url}"\n')
    c.run_cli(data, "init")
    settings = load_settings({"data_dir": str(data)}, env={})
    url = settings.effective_database_url
    engine = make_engine(url)
    try:
        with c.site_sessionmaker(data, engine)() as db:
            project = create_project(db, "Backup bench", label_schema=_workflow.SCHEMA, actor_name="bench",
                                     now=datetime.now(timezone.utc))
            db.commit()
            project_id = project.id
    finally:
        engine.dispose()
    t0 = time.perf_counter()
    _workflow.add_tasks(url, project_id, rows // 2)
    print(f"  {rows // 2} items + {rows // 2} tasks in {time.perf_counter() - t0:.0f} s", flush=True)

    store = open_store(settings, open_keyring(settings))
    count = int(gib * GIB) // (blob_kib * KIB)
    pool = os.urandom(blob_kib * KIB + 4 * MIB)
    name_key = store.keyring.purpose_key("blob-names")
    chunk = store.chunk_size
    t0, rows_out = time.perf_counter(), []
    for i in range(count):
        start = (i * 4099) % (4 * MIB)
        content = i.to_bytes(8, "big") + pool[start:start + blob_kib * KIB - 8]
        if len(content) < chunk:
            blob_id = write_blob_unsynced(store, name_key, content)
        else:
            blob_id = store.put(io.BytesIO(content)).blob_id
        rows_out.append({"id": blob_id, "size": len(content), "created_at": datetime.now(timezone.utc)})
        if (i + 1) % max(1, count // 5) == 0:
            print(f"  {i + 1}/{count} blobs ({time.perf_counter() - t0:.0f} s)", flush=True)
    os.sync()
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for at in range(0, len(rows_out), 10_000):
                conn.execute(insert(Blob), rows_out[at:at + 10_000])
    finally:
        engine.dispose()
    return data, count


def timed(argv: list[str], **kwargs) -> float:
    """Seconds one command takes; raise with its stderr when it fails."""
    t0 = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=c.clean_env(), **kwargs)
    took = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}... failed: {result.stderr.strip()[-2000:]}")
    return took


def one_run(base: Path, data: Path, drop: bool, restore_url: str) -> dict[str, float]:
    """cp -r (+sync), backup, restore, verify: seconds of each."""
    out = {}
    copy = base / "cp-copy"
    drop_caches(drop)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(data), str(copy)], check=True)
    out["cp"] = time.perf_counter() - t0
    os.sync()
    out["cp_sync"] = time.perf_counter() - t0
    shutil.rmtree(copy)

    dest = base / "backup"
    drop_caches(drop)
    out["backup"] = timed([*c.onprem_label_command(), "--data-dir", str(data), "backup", str(dest)])

    restored = base / "restored"
    shutil.copy(data.with_name(data.name + ".key"), restored.with_name(restored.name + ".key"))
    drop_caches(drop)
    args = ["--database-url", restore_url] if restore_url else []
    out["restore"] = timed([*c.onprem_label_command(), "--data-dir", str(restored), "restore", str(dest), *args])
    shutil.rmtree(restored)
    restored.with_name(restored.name + ".key").unlink()

    drop_caches(drop)
    out["verify"] = timed([*c.onprem_label_command(), "--data-dir", str(data), "backup", "verify", str(dest)])
    shutil.rmtree(dest)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=10.0, help="GiB of blobs")
    parser.add_argument("--blob-kib", type=int, default=512, help="size of each blob (KiB)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="database rows (half items, half tasks)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache")
    parser.add_argument("--tmp", default="/var/tmp", help="where the data directories go")
    args = parser.parse_args()
    drop = not args.no_drop_caches
    if drop and os.geteuid() != 0:
        raise SystemExit("dropping the page cache needs root; run as root or pass --no-drop-caches")
    need = int(args.gib * GIB * 3.3)
    if shutil.disk_usage(args.tmp).free < need:
        raise SystemExit(f"{args.tmp} needs {need / GIB:.0f} GiB free (data, backup, restore)")
    print(c.machine_summary())
    with tempfile.TemporaryDirectory(prefix="onprem-bench-backup-", dir=args.tmp) as tmp, \
            (c.postgres_database("bench_backup") if args.backend == "postgresql" else _nothing()) as url, \
            (c.postgres_database("bench_restore") if args.backend == "postgresql" else _nothing()) as restore_url:
        base = Path(tmp)
        t0 = time.perf_counter()
        data, count = make_site(base, args.gib, args.blob_kib, args.rows, url or "")
        size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
        print(f"site: {count} blobs of {args.blob_kib} KiB + {args.rows} rows ({args.backend}); data directory "
              f"{size / GIB:.2f} GiB; made in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = []
        for n in range(args.runs):
            if restore_url:  # each restore needs an empty database
                _empty_database(restore_url)
            busy, _ = c.wait_for_quiet(120)
            figures = one_run(base, data, drop, restore_url or "")
            runs.append(figures)
            print(f"run {n + 1} (machine {busy:.0%} busy before): " + ", ".join(
                f"{k} {v:.1f} s" for k, v in figures.items()) + f"; backup/cp+sync "
                f"{figures['backup'] / figures['cp_sync']:.2f}, restore/cp+sync "
                f"{figures['restore'] / figures['cp_sync']:.2f}", flush=True)
    med = {k: c.median([r[k] for r in runs]) for k in runs[0]}
    ratio = c.median([r["backup"] / r["cp_sync"] for r in runs])
    ratio_cp = c.median([r["backup"] / r["cp"] for r in runs])
    restore_ratio = c.median([r["restore"] / r["cp_sync"] for r in runs])
    print(f"{args.backend}: median of {len(runs)} runs: cp -r {med['cp']:.1f} s (+sync {med['cp_sync']:.1f} s), "
          f"backup {med['backup']:.1f} s, restore {med['restore']:.1f} s, verify {med['verify']:.1f} s; "
          f"backup / (cp -r + sync) {ratio:.2f} (goal <= 1.5) {'PASS' if ratio <= 1.5 else 'FAIL'}; "
          f"backup / cp -r alone {ratio_cp:.2f}; restore / (cp -r + sync) {restore_ratio:.2f}; "
          f"page cache {'dropped' if drop else 'not dropped'} before each step")
    return 0


class _nothing:
    """A context manager that gives None (no PostgreSQL database needed)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _empty_database(url: str) -> None:
    """Drop everything a previous restore left in the restore database."""
    from onprem_label.backup.database import postgresql_state, undo_postgresql

    undo_postgresql(url, set())
    relations, _ = postgresql_state(url)
    assert not relations, relations


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
