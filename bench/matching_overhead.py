"""Benchmark: what matching adds to tasks/next (issue 8).

Goal (issue 8): matching adds <= 20% to the median `tasks/next` latency.
Method: one data directory (`onprem-label init`), one `onprem-label serve` process, one project of
`--items` image-less items whose modalities alternate CT / MR (so the head of the queue always holds
both and the lease really chooses), 16 labelers each with a skill profile strong in one of the two.
The label loop of bench/label_loop.py (lease next -> save -> submit, each client process one labeler
on one keep-alive connection) runs with the project's match_window at 16 (matching on) and at 1 (strict
queue order: no window read, no profile read), alternating, the order reversed every other round; the
figure is the median over rounds of each setting's median `next` latency, and the ratio on / off.
Handed-in tasks are put back to new between measurements when the queue runs low; on PostgreSQL the
loop's tables are VACUUM ANALYZEd before each measurement (see settle()).
Usage: .venv/bin/python bench/matching_overhead.py [--backend sqlite|postgresql] [--rounds 5] [--duration 10]
       [--clients 16] [--items 10000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import _common as c
import _workflow as w
import label_loop

GOAL_RATIO = 1.20


def shape_project(project: w.Project) -> None:
    """Alternate the items' modalities and give every labeler a history: even ones strong in MR."""
    from sqlalchemy import case, update

    from onprem_label.db import make_engine
    from onprem_label.db.models import Item
    from onprem_label.workflow import matching

    labelers = w.labeler_ids(project.url)
    engine = make_engine(project.url)
    now = datetime.now(timezone.utc)
    try:
        with engine.begin() as conn:
            conn.execute(update(Item).where(Item.project_id == project.project_id)
                         .values(modality=case((Item.id % 2 == 0, "CT"), else_="MR")))
            for n, user_id in enumerate(labelers):
                strong, weak = ("MR", "CT") if n % 2 == 0 else ("CT", "MR")
                matching.bump(conn, user_id, [("modality", strong)], now=now, reviewed=50, passed=49)
                matching.bump(conn, user_id, [("modality", weak)], now=now, reviewed=50, passed=40)
    finally:
        engine.dispose()


def set_window(project: w.Project, window: int) -> None:
    """The project's match_window (read by the server on every lease)."""
    from sqlalchemy import select, update

    from onprem_label.db import make_engine
    from onprem_label.db.models import Project

    engine = make_engine(project.url)
    try:
        with engine.begin() as conn:
            settings = conn.scalar(select(Project.settings).where(Project.id == project.project_id))
            conn.execute(update(Project).where(Project.id == project.project_id)
                         .values(settings={**settings, "match_window": window, "hidden_gold_rate": 0.0}))
    finally:
        engine.dispose()


def settle(project: w.Project) -> None:
    """PostgreSQL: VACUUM ANALYZE the loop's tables before a measurement, so that each one starts from the
    same state (the loop leaves thousands of dead row versions; autovacuum would clean them up at
    random moments, inside one setting's measurement and not the other's)."""
    if not project.url.startswith("postgresql"):
        return
    from sqlalchemy import create_engine

    engine = create_engine(project.url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for table in ("tasks", "annotations", "audit_events", "work_log", "skill_profiles"):
                conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")
    finally:
        engine.dispose()


def main() -> int:
    """Prepare, serve, measure on/off in alternation, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    args = parser.parse_args()
    print(c.machine_summary())
    urls = label_loop.create_databases(["matching"]) if args.backend == "postgresql" else {}
    with tempfile.TemporaryDirectory(prefix="onprem-matching-") as tmp:
        base = Path(tmp)
        c.set_pycache_dir(base / "pycache")
        try:
            project = w.prepare(base, items=args.items, labelers=16, database_url=urls.get("matching", ""))
            shape_project(project)
            port = c.free_port()
            proc = c.start_process([*c.onprem_label_command(), "--data-dir", str(project.data), "serve", "--port",
                                    str(port)], base / "serve.log")
            try:
                c.wait_for_status(port, "/healthz", proc, timeout=60)
                clients_list = [int(n) for n in args.clients.split(",")]
                plan = [(window, n) for n in clients_list for window in (16, 1)]
                runs: dict[tuple[int, int], list[dict]] = {key: [] for key in plan}
                for r in range(args.rounds):
                    for window, clients in (plan if r % 2 == 0 else list(reversed(plan))):
                        set_window(project, window)
                        w.refill_if_low(project.url, project.project_id, reserve=3000)
                        settle(project)
                        c.wait_for_quiet(args.quiet_wait)
                        m = label_loop.measure("label", port, proc.pid, project.tokens, project.project_id,
                                               clients, args.duration, args.warmup)
                        runs[(window, clients)].append(m)
                        print(f"round {r + 1}, {clients:>2} clients, match_window {window:>2}: "
                              f"next p50 {m['next_p50_ms']:.2f} ms "
                              f"p95 {m['next_p95_ms']:.2f} ms  loops/s {m['loops_per_s']:.1f}  errors {m['errors']}"
                              + (f" ({m['first_error'][:200]})" if m["first_error"] else ""), flush=True)
            finally:
                c.stop_process(proc)
        finally:
            if urls:
                label_loop.drop_databases(urls)
    ok = True
    for clients in clients_list:
        on = c.median([m["next_p50_ms"] for m in runs[(16, clients)]])
        off = c.median([m["next_p50_ms"] for m in runs[(1, clients)]])
        ratio = on / off
        ok &= ratio <= GOAL_RATIO
        paired = c.median([a["next_p50_ms"] / b["next_p50_ms"] for a, b in zip(runs[(16, clients)], runs[(1, clients)])])
        print(f"{args.backend}, {clients} clients, {args.items} items: median of {args.rounds} rounds' next p50 with "
              f"matching {on:.2f} ms, without {off:.2f} ms: ratio {ratio:.3f} (median of the rounds' own "
              f"ratios {paired:.3f}; goal <= {GOAL_RATIO}) "
              f"{'PASS' if ratio <= GOAL_RATIO else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
