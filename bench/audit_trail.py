"""Benchmark: the audit hash chain (issue 7) — one append in a request, verify and export of 1,000,000 events.

Goals (issue 7):
  1. one append inside a request costs <= 1 ms (median) on SQLite, also with 1,000,000 events in
     the table (the head lookup stays an index lookup);
  2. verifying 1,000,000 events takes <= 15 s;
  3. exporting 1,000,000 events streams: the exporting process's RSS grows <= 64 MiB.
Method, all on one fresh data directory (`onprem-label init`, connection settings of the server:
db.make_engine / make_sessionmaker, the chain attached with audit.chain.attach, checkpoint file as
configured):
  1. write transactions as a request makes them, timed from opening the session to the end of
     COMMIT: a small UPDATE of one task row, with and without one `record(...)` (annotation:save);
     the two kinds alternate, N pairs per run. Extra cost = median(with) - median(without) (also
     p95 - p95). Every COMMIT is synchronous (SQLite WAL, synchronous=FULL: one fsync of the WAL
     per COMMIT in both kinds), so the difference is what the audit event adds: record(), the
     before_commit seal (head query, HMAC, INSERT), the extra WAL pages at COMMIT and the after_commit
     hook (a checkpoint line, fsync'd, every 1,000th event). The seal's pieces are timed alone in a
     transaction rolled back. Measured before the table is filled and again at 1,000,000 events.
  2. the chain is filled to 1,000,000 events with `append` in transactions of 10,000 realistic
     events; then `verify_chain` (verify_database with the checkpoint file) in-process, the bare
     row fetch of the same query, and `onprem-label audit verify --json` end to end as a subprocess.
  3. `onprem-label audit export --format csv|jsonl --out F` as a subprocess: its peak RSS (ru_maxrss
     from wait4) minus its RSS when the first bytes reached F (streaming had begun), and minus the
     peak of the same export filtered to no event (same start-up, nothing streamed); the verdict takes
     the larger. Then a `serve` process (fresh each time, warmed up by a zero-event export) while one
     client downloads GET /api/v1/audit/export?format=... with an auditor's token: its VmHWM (reset
     before the download) minus its RSS before. The trailer's count is checked every time.
Usage: .venv/bin/python bench/audit_trail.py [--backend sqlite|postgresql] [--runs 5] [--events 1000000]
       [--pairs 1000] [--goals 1,2,3] [--no-http] [--profile] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import hmac
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import _audit as a
import _common as c
from sqlalchemy import bindparam

from onprem_label.db.models import Task

APPEND_GOAL_MS = 1.0
VERIFY_GOAL_S = 15.0
EXPORT_GOAL_MIB = 64.0
WARMUP_PAIRS = 50
PIECES = 500
_T = Task.__table__
# What a save does to its task row (the label loop's PUT of one bbox): its version and clocks.
_UPDATE_TASK = (_T.update().where(_T.c.id == bindparam("tid"))
                .values(version=_T.c.version + 1, active_seconds=_T.c.active_seconds + 1, updated_at=bindparam("now")))


def pct(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def verdict(value: float, goal: float) -> str:
    """'<ratio> x goal -> PASS|FAIL'."""
    return f"{value / goal:.2f} x goal -> {'PASS' if value <= goal else 'FAIL'}"


# --- goal 1: one append in a request ---------------------------------------------------------------

def request_transaction(site: a.Site, audited: bool, task_id: int, context) -> float:
    """One write transaction as a request makes it (UPDATE one task, maybe one event); seconds."""
    from onprem_label.audit import AuditAction, record

    t0 = time.perf_counter()
    with site.maker() as db:
        db.execute(_UPDATE_TASK, {"tid": task_id, "now": datetime.now(timezone.utc)})
        if audited:
            record(db, AuditAction.ANNOTATION_SAVE, actor=site.auditor, object_type="task", object_id=task_id,
                   details={"project_id": site.project_id, "version": 2, "shapes": 1}, context=context,
                   study_uid=a.STUDY_UID)
        db.commit()
    return time.perf_counter() - t0


def append_run(site: a.Site, pairs: int, rng: random.Random) -> dict:
    """`pairs` transactions of each kind, alternating (which goes first alternates too); ms figures."""
    from onprem_label.audit.record import AuditContext

    context = AuditContext("127.0.0.1", a.USER_AGENT, uuid.uuid4().hex)
    took = {True: [], False: []}
    for i in range(WARMUP_PAIRS + pairs):
        for audited in ((True, False) if i % 2 else (False, True)):
            seconds = request_transaction(site, audited, rng.choice(site.task_ids), context)
            if i >= WARMUP_PAIRS:
                took[audited].append(seconds * 1000)
    w, wo = took[True], took[False]
    return {"with_p50": pct(w, 0.5), "with_p95": pct(w, 0.95), "without_p50": pct(wo, 0.5),
            "without_p95": pct(wo, 0.95), "diff_p50": pct(w, 0.5) - pct(wo, 0.5),
            "diff_p95": pct(w, 0.95) - pct(wo, 0.95), "diff_mean": (sum(w) - sum(wo)) / len(w),
            "with_max": max(w)}


def seal_pieces(site: a.Site, n: int = PIECES) -> dict:
    """Median µs of record(), seal_pending() and the seal's parts, in transactions rolled back."""
    from sqlalchemy import insert

    from onprem_label.audit import AuditAction, chain, record
    from onprem_label.db.models import AuditEvent

    times: dict[str, list[float]] = {k: [] for k in ("record", "seal_pending", "head", "canonical", "hmac",
                                                     "insert")}
    with site.maker() as db:
        db.connection()
        for i in range(n):
            t0 = time.perf_counter()
            record(db, AuditAction.ANNOTATION_SAVE, actor=site.auditor, object_type="task", object_id=i,
                   details={"project_id": site.project_id, "version": 2, "shapes": 1}, study_uid=a.STUDY_UID)
            t1 = time.perf_counter()
            chain.seal_pending(db)
            times["record"].append(t1 - t0)
            times["seal_pending"].append(time.perf_counter() - t1)
        db.rollback()
    statement = insert(AuditEvent.__table__)
    with site.engine.connect() as conn, conn.begin() as transaction:
        for row in a.event_rows(0, n, datetime.now(timezone.utc)):
            t0 = time.perf_counter()
            last_id, last_hash = chain.head(conn)
            t1 = time.perf_counter()
            row.update(id=last_id + 1, prev_hash=last_hash)
            body = chain.canonical(row) + b"\n" + last_hash.encode("ascii")
            t2 = time.perf_counter()
            row["hash"] = hmac.digest(site.key, body, "sha256").hex()
            t3 = time.perf_counter()
            conn.execute(statement, [row])
            t4 = time.perf_counter()
            for name, seconds in (("head", t1 - t0), ("canonical", t2 - t1), ("hmac", t3 - t2), ("insert", t4 - t3)):
                times[name].append(seconds)
        transaction.rollback()
    return {name: pct(values, 0.5) * 1e6 for name, values in times.items()}


def goal_append(args, site: a.Site, label: str) -> dict:
    """Goal 1 runs on the table as it is; per-run lines; the medians."""
    rng = random.Random(7)
    events = a.event_count(site)
    print(f"head lookup plan at {events:,} events: " + " | ".join(a.head_plan(site)) + f"; a 4 KiB write + "
          f"fsync in the data directory takes {a.fsync_ms(site.data):.3f} ms (median of 200)")
    runs = []
    for r in range(args.runs):
        busy, waited = c.wait_for_quiet(args.quiet_wait)
        load = c.MachineLoad().start()
        m = append_run(site, args.pairs, rng)
        m["busy"] = load.stop()
        p = seal_pieces(site)
        m.update({f"piece_{k}": v for k, v in p.items()})
        runs.append(m)
        print(f"goal 1 {label} run {r + 1}: with event p50 {m['with_p50']:.3f} p95 {m['with_p95']:.3f} ms; without "
              f"p50 {m['without_p50']:.3f} p95 {m['without_p95']:.3f} ms; extra p50 {m['diff_p50']:.3f} ms, p95 "
              f"{m['diff_p95']:.3f} ms, mean {m['diff_mean']:.3f} ms ({args.pairs} pairs; slowest with event "
              f"{m['with_max']:.1f} ms) | pieces (median µs): record {p['record']:.0f}, seal_pending "
              f"{p['seal_pending']:.0f} = head {p['head']:.0f} + canonical {p['canonical']:.0f} + hmac "
              f"{p['hmac']:.0f} + insert {p['insert']:.0f} | machine busy before {busy:.0%} (waited "
              f"{waited:.0f} s), during {m['busy']:.0%}", flush=True)
    med = {k: c.median([m[k] for m in runs]) for k in runs[0]}
    med["events"] = events
    return med


# --- goal 2: verify ------------------------------------------------------------------------------

def verify_in_process(site: a.Site) -> tuple[float, float, object]:
    """verify_chain in a read transaction: (wall s, CPU s of this process, result)."""
    from onprem_label.audit.verify import verify_chain
    from onprem_label.db.engine import read_connection

    t0, cpu0 = time.perf_counter(), time.process_time()
    with read_connection(site.engine) as conn:
        result = verify_chain(conn, site.chain)
    return time.perf_counter() - t0, time.process_time() - cpu0, result


def fetch_only(site: a.Site) -> float:
    """Seconds to fetch every row verify walks (same statement and options), checking nothing."""
    from onprem_label.audit import verify
    from onprem_label.db.engine import read_connection

    t0 = time.perf_counter()
    with read_connection(site.engine) as conn:
        result = conn.exec_driver_sql(verify._RAW_ROWS, execution_options={"stream_results": True,
                                                                           "yield_per": 10_000})
        for _ in verify._raw_events(result):  # the rows as walk gets them
            pass
        result.close()
    return time.perf_counter() - t0


def verify_cli(site: a.Site, timeout: float) -> tuple[float, dict]:
    """`onprem-label audit verify --json` as a subprocess: (wall s, its JSON)."""
    t0 = time.perf_counter()
    done = subprocess.run([*c.onprem_label_command(), "--data-dir", str(site.data), "audit", "verify", "--json"],
                          capture_output=True, text=True, timeout=timeout, env=c.clean_env())
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"audit verify failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-1000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def goal_verify(args, site: a.Site) -> dict:
    """Goal 2 runs: in-process verify, the bare fetch, the CLI; per-run lines; the medians."""
    runs = []
    for r in range(args.runs):
        busy, waited = c.wait_for_quiet(args.quiet_wait)
        load = c.MachineLoad().start()
        wall, cpu, result = verify_in_process(site)
        fetch = fetch_only(site)
        cli, out = verify_cli(site, args.timeout)
        m = {"verify_s": wall, "cpu_s": cpu, "fetch_s": fetch, "cli_s": cli, "busy": load.stop()}
        if not result.ok or not out["ok"] or out["events"] < result.events:
            raise SystemExit(f"verify run {r + 1} found a problem: {result.problem} / {out}")
        runs.append(m)
        print(f"goal 2 run {r + 1}: verify_chain {result.events:,} events {wall:.2f} s ({result.events / wall:,.0f} "
              f"events/s; this process's CPU {cpu:.2f} s; {result.checkpoints} checkpoints); bare row fetch "
              f"{fetch:.2f} s; CLI `audit verify --json` {cli:.2f} s end to end ({out['events']:,} events, ok) | "
              f"machine busy before {busy:.0%} (waited {waited:.0f} s), during {m['busy']:.0%}", flush=True)
        m["events"] = result.events
    return {k: c.median([m[k] for m in runs]) for k in runs[0]}


# --- goal 3: export ------------------------------------------------------------------------------

def cli_export(site: a.Site, fmt: str, out: Path, *, zero: bool, timeout: float) -> dict:
    """`onprem-label audit export` as a subprocess: peak RSS (wait4), RSS at first output, wall, size."""
    argv = [*c.onprem_label_command(), "--data-dir", str(site.data), "audit", "export", "--format", fmt,
            "--out", str(out)] + (["--since", "2999-01-01"] if zero else [])
    out.unlink(missing_ok=True)  # "first bytes in the file" must be this export's
    first: list[int] = []

    def watch(pid: int) -> None:
        if not first and out.exists() and out.stat().st_size > 0:
            rss = a.proc_kib(pid, "VmRSS")
            if rss is not None:
                first.append(rss)

    wall, usage = a.run_watched(argv, out.with_suffix(".log"), timeout, watch)
    trailer = a.trailer_of(out)
    return {"peak_kib": usage.ru_maxrss, "first_rss_kib": first[0] if first else usage.ru_maxrss, "wall_s": wall,
            "bytes": out.stat().st_size, "count": trailer["count"], "cpu_s": usage.ru_utime + usage.ru_stime}


def serve_and_download(site: a.Site, base: Path, fmt: str) -> dict:
    """A fresh `serve`, warmed up by a zero-event export, then the full download measured."""
    port = c.free_port()
    proc = c.start_process([*c.onprem_label_command(), "--data-dir", str(site.data), "serve", "--port", str(port)],
                           base / f"serve-{port}.log")
    try:
        c.wait_for_status(port, "/healthz", proc, timeout=60)
        a.http_export(port, proc.pid, site.token, fmt, zero=True)
        cpu0 = c.process_cpu_seconds(proc.pid)
        m = a.http_export(port, proc.pid, site.token, fmt)
        m["server_cpu_s"] = c.process_cpu_seconds(proc.pid) - cpu0
        return m
    finally:
        c.stop_process(proc)


def describe_export(kind: str, fmt: str, m: dict, growth: float, extra: str) -> str:
    """One line of one measured export."""
    return (f"{kind} {fmt:<5}: {m['count']:,} events, {m['bytes'] / 1e6:.0f} MB in {m['wall_s']:.2f} s "
            f"({m['count'] / m['wall_s']:,.0f} events/s, {m['bytes'] / m['wall_s'] / 1e6:.1f} MB/s); peak RSS "
            f"{m['peak_kib'] / 1024:.1f} MiB; {extra}; growth {growth:.1f} MiB")


def goal_export(args, site: a.Site, base: Path) -> dict:
    """Goal 3 runs: CLI exports (csv, jsonl; full and zero-event), HTTP downloads; medians of growth."""
    out = base / "export.out"
    runs = []
    for r in range(args.runs):
        busy, waited = c.wait_for_quiet(args.quiet_wait)
        load = c.MachineLoad().start()
        m = {}
        for fmt in ("csv", "jsonl"):
            zero = cli_export(site, fmt, out, zero=True, timeout=args.timeout)
            full = cli_export(site, fmt, out, zero=False, timeout=args.timeout)
            if zero["count"] != 0 or full["count"] < args.events:
                raise SystemExit(f"export counts wrong: zero-event export {zero['count']}, full {full['count']}")
            if r == 0 and fmt == "jsonl" and args.verify_export:
                verify_export_once(site, out, full["bytes"], args.timeout)
            out.unlink()
            vs_first = (full["peak_kib"] - full["first_rss_kib"]) / 1024
            vs_zero = (full["peak_kib"] - zero["peak_kib"]) / 1024
            m[f"cli_{fmt}_growth"] = max(vs_first, vs_zero)
            m[f"cli_{fmt}_events_s"] = full["count"] / full["wall_s"]
            m[f"cli_{fmt}_mb_s"] = full["bytes"] / full["wall_s"] / 1e6
            print(f"goal 3 run {r + 1}: " + describe_export("CLI ", fmt, full, m[f"cli_{fmt}_growth"],
                  f"RSS at first output {full['first_rss_kib'] / 1024:.1f} MiB (+{vs_first:.1f}); zero-event export "
                  f"peak {zero['peak_kib'] / 1024:.1f} MiB (+{vs_zero:.1f}); CPU {full['cpu_s']:.1f} s"), flush=True)
            if args.http:
                h = serve_and_download(site, base, fmt)
                if h["count"] < args.events:
                    raise SystemExit(f"HTTP export holds {h['count']} events")
                m[f"http_{fmt}_growth"] = (h["peak_kib"] - h["rss0_kib"]) / 1024
                m[f"http_{fmt}_events_s"] = h["count"] / h["wall_s"]
                m[f"http_{fmt}_mb_s"] = h["bytes"] / h["wall_s"] / 1e6
                peak_how = "VmHWM reset" if h["hwm_reset"] else "sampled"
                print(f"goal 3 run {r + 1}: " + describe_export("HTTP", fmt, h, m[f"http_{fmt}_growth"],
                      f"server RSS before {h['rss0_kib'] / 1024:.1f} MiB ({peak_how}); "
                      f"server CPU {h['server_cpu_s']:.1f} s"), flush=True)
        m["busy"] = load.stop()
        print(f"goal 3 run {r + 1}: machine busy before {busy:.0%} (waited {waited:.0f} s), during {m['busy']:.0%}")
        runs.append(m)
    return {k: c.median([m[k] for m in runs]) for k in runs[0]}


def verify_export_once(site: a.Site, path: Path, size: int, timeout: float) -> None:
    """`audit verify-export` of one full export (not a goal): wall time and peak RSS."""
    available = a.proc_meminfo_kib("MemAvailable") * 1024
    if available < 16 * size + (4 << 30):  # it reads the whole file into memory, several times over
        print(f"(not a goal) `audit verify-export` skipped: {available / 2**30:.1f} GiB available for a "
              f"{size / 1e6:.0f} MB file")
        return
    argv = [*c.onprem_label_command(), "--data-dir", str(site.data), "audit", "verify-export", str(path), "--json"]
    log = path.with_suffix(".verify.log")
    try:
        wall, usage = a.run_watched(argv, log, timeout)
    except RuntimeError as exc:  # not a goal: report, go on
        print(f"(not a goal) `audit verify-export` of the jsonl export FAILED: {exc}")
        return
    result = json.loads(next(line for line in log.read_text().splitlines() if line.startswith("{")))
    print(f"(not a goal) `audit verify-export` of the {size / 1e6:.0f} MB jsonl export: {wall:.1f} s, peak RSS "
          f"{usage.ru_maxrss / 1024:.0f} MiB, ok={result.get('ok')}, {result.get('events', 0):,} events", flush=True)


# --- main ---------------------------------------------------------------------------------------------

def report(args, g1: dict | None, g1_big: dict | None, g2: dict | None, g3: dict | None) -> dict:
    """The medians and one verdict line per goal; the figures as a dict."""
    print()
    figures = {}
    for label, m in (("", g1), (" after the fill", g1_big)):
        if m:
            figures[f"append_ms{label.replace(' ', '_')}"] = m["diff_p50"]
            print(f"goal 1{label}: one audit event in a {args.backend} write transaction (UPDATE one task, "
                  f"COMMIT; {m['events']:,} events in the table; median of {args.runs} runs): extra "
                  f"{m['diff_p50']:.3f} ms median, {m['diff_p95']:.3f} ms p95, {m['diff_mean']:.3f} ms mean (with "
                  f"event {m['with_p50']:.3f} / without {m['without_p50']:.3f} ms median); goal <= "
                  f"{APPEND_GOAL_MS:g} ms; {verdict(m['diff_p50'], APPEND_GOAL_MS)}")
            print(f"        seal pieces (median µs): record {m['piece_record']:.0f}, seal_pending "
                  f"{m['piece_seal_pending']:.0f} = head {m['piece_head']:.0f} + canonical "
                  f"{m['piece_canonical']:.0f} + hmac {m['piece_hmac']:.0f} + insert {m['piece_insert']:.0f}")
    if g2:
        figures.update(verify_s=g2["verify_s"], verify_cli_s=g2["cli_s"])
        print(f"goal 2: verify {g2['events']:,.0f} events, median of {args.runs}: verify_chain {g2['verify_s']:.2f} s "
              f"(bare row fetch {g2['fetch_s']:.2f} s, CPU {g2['cpu_s']:.2f} s); goal <= {VERIFY_GOAL_S:g} s; "
              f"{verdict(g2['verify_s'], VERIFY_GOAL_S)}")
        print(f"goal 2 (CLI): `onprem-label audit verify` end to end {g2['cli_s']:.2f} s; goal <= {VERIFY_GOAL_S:g} s; "
              f"{verdict(g2['cli_s'], VERIFY_GOAL_S)}")
    if g3:
        for kind in ("cli", "http"):
            for fmt in ("csv", "jsonl"):
                if f"{kind}_{fmt}_growth" in g3:
                    growth = g3[f"{kind}_{fmt}_growth"]
                    figures[f"{kind}_{fmt}_growth_mib"] = growth
                    what = "`audit export` process" if kind == "cli" else "`serve` process, one client downloading"
                    print(f"goal 3 ({kind} {fmt}): export of {args.events:,} events, RSS growth of the {what}, "
                          f"median of {args.runs}: {growth:.1f} MiB ({g3[f'{kind}_{fmt}_events_s']:,.0f} events/s, "
                          f"{g3[f'{kind}_{fmt}_mb_s']:.1f} MB/s); goal <= {EXPORT_GOAL_MIB:g} MiB; "
                          f"{verdict(growth, EXPORT_GOAL_MIB)}")
    return figures


def parse_args() -> argparse.Namespace:
    """The command line, each value clamped to a sane range."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--runs", type=int, default=5, help="runs per goal (the figures are medians over runs)")
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the chain for goals 2 and 3")
    parser.add_argument("--pairs", type=int, default=1000, help="goal 1: transactions of each kind per run")
    parser.add_argument("--goals", default="1,2,3", help="comma-separated goals to measure")
    parser.add_argument("--no-http", dest="http", action="store_false", help="goal 3: skip the serve download")
    parser.add_argument("--no-verify-export", dest="verify_export", action="store_false",
                        help="goal 3: skip the one `audit verify-export` of a full export")
    parser.add_argument("--profile", action="store_true", help="after the runs, cProfile verify and export")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the data directory goes")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="wait up to this many s for the machine to go idle before each run")
    parser.add_argument("--timeout", type=float, default=900.0, help="s allowed per CLI command")
    args = parser.parse_args()
    args.runs = max(1, min(args.runs, 50))
    args.events = max(1000, min(args.events, 20_000_000))
    args.pairs = max(10, min(args.pairs, 100_000))
    args.goals = {int(g) for g in args.goals.split(",") if g.strip()}
    return args


def main() -> int:
    args = parse_args()
    from label_loop import create_databases, drop_databases

    print(c.machine_summary())
    urls = create_databases(["audit"]) if args.backend == "postgresql" else {}
    g1 = g1_big = g2 = g3 = None
    try:
        with tempfile.TemporaryDirectory(prefix="onprem-bench-", dir=args.tmp) as tmp:
            base = Path(tmp)
            c.set_pycache_dir(base / "pycache")
            site = a.prepare(base, database_url=urls.get("audit", ""))
            try:
                print(f"backend {args.backend}: {a.database_settings(site)}; checkpoint every "
                      f"{site.chain.checkpoint_every} events to {site.chain.checkpoints.path.name}; {args.runs} runs "
                      f"per goal; data in {base}")
                if 1 in args.goals:
                    g1 = goal_append(args, site, "before the fill")
                if args.goals & {1, 2, 3}:
                    added, seconds = a.fill(site, args.events)
                    print(f"chain filled with {added:,} events by append() in transactions of {a.BATCH:,}: "
                          f"{seconds:.1f} s ({added / max(seconds, 1e-9):,.0f} events/s); {a.event_count(site):,} "
                          f"events, database {a.database_bytes(site) / 1e6:.0f} MB", flush=True)
                if 2 in args.goals:
                    g2 = goal_verify(args, site)
                if 3 in args.goals:
                    g3 = goal_export(args, site, base)
                if 1 in args.goals:
                    g1_big = goal_append(args, site, "after the fill")
                if args.profile:
                    a.profile(site, verify_in_process)
            finally:
                site.close()
    finally:
        if urls:
            drop_databases(urls)
    figures = report(args, g1, g1_big, g2, g3)
    print(json.dumps({"backend": args.backend, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
