"""Benchmark: `onprem-label doctor` on a data directory whose audit chain holds 1,000,000 events.

Question (issue 10): may the doctor verify the audit chain by default, or is a walk of every event
too slow for a check that monitoring runs every few minutes? Method: a fresh data directory
(`onprem-label init`), the chain filled to N realistic events with `append` (bench/_audit.py), and
a checkpoint every 1,000 events as the server writes them (checkpoint file as configured). Then,
end to end as subprocesses, `doctor --json` (the default: the events after the newest checkpoint
walked, the events the checkpoints name checked) and `doctor --json --audit-full` (every event
walked); and in-process `verify_chain` both ways. Each timed `--runs` times, median reported, the
default's ratio against the full walk (the reference).
Usage: .venv/bin/python bench/doctor.py [--backend sqlite|postgresql] [--events 1000000] [--runs 3] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import _audit as a
import _common as c

from onprem_label.audit.checkpoints import CheckpointLog
from onprem_label.audit.verify import verify_chain
from onprem_label.db.engine import read_connection


def write_checkpoints(site: a.Site, every: int = 1000) -> int:
    """A checkpoint at every `every`th event, as the server leaves them; how many."""
    log = CheckpointLog(site.settings.audit_checkpoint_path, site.key)
    with site.engine.connect() as conn:
        marks = conn.exec_driver_sql(f"SELECT id, hash FROM audit_events WHERE id % {every} = 0 ORDER BY id").all()
    for count, digest in marks:
        log.write(count, digest)
    return len(marks)


def doctor_cli(site: a.Site, *extra: str) -> tuple[float, dict]:
    """Seconds of one `onprem-label doctor --json` subprocess, and its report."""
    started = time.monotonic()
    result = subprocess.run([*c.onprem_label_command(), "--data-dir", str(site.data), "doctor", "--json", *extra],
                            capture_output=True, text=True, timeout=600, env=c.clean_env())
    seconds = time.monotonic() - started
    report = json.loads(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"doctor found something: {[f for f in report['findings'] if f['severity'] != 'ok']}")
    return seconds, report


def verify_in_process(site: a.Site, since_checkpoint: bool) -> tuple[float, int]:
    """Seconds of verify_chain in a read transaction, and the events it walked."""
    started = time.monotonic()
    with read_connection(site.engine, snapshot=True) as conn:
        result = verify_chain(conn, site.chain, since_checkpoint=since_checkpoint)
    seconds = time.monotonic() - started
    if not result.ok:
        raise RuntimeError(f"the chain does not verify: {result.problem}")
    return seconds, result.events


def main() -> int:
    """Fill, checkpoint, time both ways, print the lines for bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench-doctor-") as base:
        database = (c.postgres_database(f"bench_doctor_{uuid.uuid4().hex[:8]}") if args.backend == "postgresql"
                    else nullcontext(""))
        with database as url:
            site = a.prepare(Path(base), database_url=url, tasks=10)
            try:
                added, fill_s = a.fill(site, args.events)
                checkpoints = write_checkpoints(site)
                print(f"filled {added} events in {fill_s:.1f} s; {checkpoints} checkpoints written", flush=True)
                print(f"machine: {c.machine_summary()}", flush=True)
                timings: dict[str, list[float]] = {k: [] for k in ("cli", "cli_full", "core", "core_full")}
                walked = {}
                for run in range(args.runs):
                    c.wait_for_quiet()
                    s, report = doctor_cli(site)
                    timings["cli"].append(s)
                    s, _ = doctor_cli(site, "--audit-full")
                    timings["cli_full"].append(s)
                    s, walked["core"] = verify_in_process(site, True)
                    timings["core"].append(s)
                    s, walked["core_full"] = verify_in_process(site, False)
                    timings["core_full"].append(s)
                    print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in timings.items()), flush=True)
                audit_line = next(f["detail"] for f in report["findings"] if f["check"] == "audit")
                print(f"doctor's audit line: {audit_line}")
                med = {k: c.median(v) for k, v in timings.items()}
                print(f"doctor (default) end to end: median {med['cli']:.2f} s over {args.runs}; "
                      f"doctor --audit-full: {med['cli_full']:.2f} s; ratio {med['cli'] / med['cli_full']:.3f}")
                print(f"verify_chain since the newest checkpoint: {med['core'] * 1000:.1f} ms "
                      f"({walked['core']} events walked); full walk: {med['core_full']:.2f} s "
                      f"({walked['core_full']} events); ratio {med['core'] / med['core_full']:.4f}")
            finally:
                site.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
