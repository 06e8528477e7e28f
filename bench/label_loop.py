"""Benchmark: the label loop over HTTP (lease next -> save -> submit) against `onprem-label serve`.

Goals (issue 5), at 16 concurrent clients on a project of 10,000 items:
  - p95 latency per request <= 50 ms;
  - median tasks/next latency <= 3 x the median of a bare Flask JSON route under waitress
    (bench/_bare_server.py, same thread count, same number of clients, same run);
  - on a project of 1,000,000 items, median tasks/next <= 1.5 x the 10,000-item figure
    (the next task is found through an index, never by a scan).
The clients are separate processes, each one labeler with its own token on one keep-alive
http.client connection. Every server runs the whole time: the 10,000-item project, the
1,000,000-item project, the same project half done (`--aged`: its first half accepted, labeled in
turn by the 16 labelers, as a project is half-way through), and the bare Flask app. Each round
measures them all in turn, and the next round runs in reverse order. The items and tasks are
bulk-inserted and have no images. The loop never reads pixels. The EXPLAIN of every lease query
is printed for each project. When a project runs low on new tasks, the tasks the loop handed in
are put back to new between measurements.
Usage: .venv/bin/python bench/label_loop.py [--backend sqlite|postgresql] [--rounds 5]
       [--duration 10] [--clients 1,4,16] [--items 10000] [--large-items 1000000] [--aged 0.5]
       [--profile]   (instead: one 16-client run against cProfiled servers; where the time goes)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pstats
import queue as queue_module
import sys
import tempfile
import time
import uuid
from pathlib import Path

import _common as c
import _workflow as w

from onprem_label.config import BY_NAME

P95_GOAL_MS = 50.0
BARE_RATIO_GOAL = 3.0
LARGE_RATIO_GOAL = 1.5
GOAL_CLIENTS = 16
MAX_LOOPS_PER_CLIENT = 1_000_000  # a bound on every client loop besides its end time
PG_ADMIN_URL = os.environ.get("ONPREM_LABEL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def client(kind: str, port: int, token: str, project_id: int, t_start: float, t_end: float, results) -> None:
    """One client process: loops back to back until t_end; only loops begun after t_start count."""
    worker = w.LoopClient(port, token, project_id) if kind == "label" else w.BareClient(port)
    took_by_kind: dict[str, list[float]] = {}
    loops = errors = 0
    empty, first_error, cpu_start = False, "", None
    for _ in range(MAX_LOOPS_PER_CLIENT):
        begun = time.monotonic()
        if begun >= t_end:
            break
        if cpu_start is None and begun >= t_start:
            cpu_start = time.process_time()
        status, took, problem = worker.loop_once()
        if begun < t_start:
            continue  # warm-up
        if status == "ok":
            loops += 1
            for name, seconds in took.items():
                took_by_kind.setdefault(name, []).append(seconds)
        elif status == "empty":
            empty = True
            break
        else:
            errors += 1
            first_error = first_error or problem
    cpu = time.process_time() - (cpu_start if cpu_start is not None else time.process_time())
    worker.close()
    results.put((loops, errors, took_by_kind, cpu, empty, first_error))


def measure(kind: str, port: int, server_pid: int, tokens: list[str], project_id: int, clients: int,
            duration: float, warmup: float) -> dict:
    """`clients` client processes against one server for `duration` s: loops/s, latencies, CPU."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    t_start = time.monotonic() + 0.5 + warmup  # 0.5 s for the processes to start
    t_end = t_start + duration
    procs = [ctx.Process(target=client, args=(kind, port, tokens[n % len(tokens)], project_id, t_start, t_end,
                                              results)) for n in range(clients)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, t_start - time.monotonic()))
    cpu0, load = c.process_cpu_seconds(server_pid), c.MachineLoad().start()
    time.sleep(max(0.0, t_end - time.monotonic()))
    cpu1, busy = c.process_cpu_seconds(server_pid), load.stop()
    collected = []
    try:
        for _ in procs:
            collected.append(results.get(timeout=duration + 60))
    except queue_module.Empty:
        raise RuntimeError("a client process did not report") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    loops = sum(r[0] for r in collected)
    took: dict[str, list[float]] = {}
    for r in collected:
        for name, values in r[2].items():
            took.setdefault(name, []).extend(values)
    every = sorted(v for values in took.values() for v in values)
    out = {"loops": loops, "loops_per_s": loops / duration, "errors": sum(r[1] for r in collected),
           "empty": any(r[4] for r in collected), "first_error": next((r[5] for r in collected if r[5]), ""),
           "p50_ms": w.percentile(every, 0.50) * 1000, "p95_ms": w.percentile(every, 0.95) * 1000,
           "server_cores": (cpu1 - cpu0) / duration,
           "server_cpu_ms_per_loop": (cpu1 - cpu0) * 1000 / loops if loops else float("nan"),
           "client_cores": sum(r[3] for r in collected) / duration, "machine_busy": busy}
    for name, values in took.items():
        values.sort()
        out[f"{name}_p50_ms"] = w.percentile(values, 0.50) * 1000
        out[f"{name}_p95_ms"] = w.percentile(values, 0.95) * 1000
    return out


def describe(name: str, clients: int, m: dict) -> str:
    """One line for one measurement."""
    kinds = [k for k in (*w.KINDS, "bare") if f"{k}_p50_ms" in m]
    parts = "  ".join(f"{k} {m[f'{k}_p50_ms']:.1f}/{m[f'{k}_p95_ms']:.1f}" for k in kinds)
    unit = "req/s" if name == "bare" else "loops/s"
    problems = f" ({m['first_error'][:200]})" if m["first_error"] else ""
    problems += " RAN OUT" if m["empty"] else ""
    return (f"{name:<9} {clients:>2} clients {m['loops_per_s']:7.1f} {unit}  all p50 {m['p50_ms']:6.1f} ms "
            f"p95 {m['p95_ms']:6.1f} ms  [p50/p95 ms: {parts}]  server {m['server_cores']:.2f} cores "
            f"{m['server_cpu_ms_per_loop']:.1f} ms/{'req' if name == 'bare' else 'loop'}  clients "
            f"{m['client_cores']:.2f} cores  machine busy {m['machine_busy']:.0%}  errors {m['errors']}"
            + problems)


def create_databases(tags: list[str]) -> dict[str, str]:
    """One fresh PostgreSQL database per tag: {tag: URL}."""
    from sqlalchemy import create_engine

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    urls = {}
    try:
        with admin.connect() as conn:
            for tag in tags:
                name = f"onprem_bench_{uuid.uuid4().hex[:8]}_{tag.replace(' ', '_').lower()}"
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
                urls[tag] = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.dispose()
    return urls


def drop_databases(urls: dict[str, str]) -> None:
    """Drop the databases create_databases made (closing any connection left)."""
    from sqlalchemy import create_engine

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for url in urls.values():
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        admin.dispose()


def print_plans(name: str, project: w.Project) -> None:
    """The plan of each lease query on one project, and its time when run alone."""
    print(f"EXPLAIN of the lease queries, {name} project (each also run alone, median of 20):")
    for query, rows, ms in w.explain_lease_queries(project.url, project.project_id):
        print(f"  {query}: {ms:.3f} ms")
        for row in rows:
            print(f"      {row}")


def summarise(runs: dict) -> dict:
    """Per (server, clients): the median over rounds of each figure."""
    out = {}
    for key, ms in runs.items():
        out[key] = {k: c.median([m[k] for m in ms]) for k in ms[0] if isinstance(ms[0][k], float)}
        out[key].update(rounds=len(ms), errors=sum(m["errors"] for m in ms), empty=False, first_error="")
    return out


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


def report(med: dict, clients_list: list[int]) -> dict:
    """Print the medians and the goal lines; the goal figures."""
    print()
    for (name, clients), m in sorted(med.items()):
        print(f"median of {m['rounds']} rounds: {describe(name, clients, m)}")
    print()
    figures = {}
    small, bare = med.get(("10k", GOAL_CLIENTS)), med.get(("bare", GOAL_CLIENTS))
    if small:
        figures["p95_ms"] = p95 = small["p95_ms"]
        print(f"goal 1: p95 per request at {GOAL_CLIENTS} clients, 10k items: {p95:.1f} ms (next "
              f"{small['next_p95_ms']:.1f}, save {small['save_p95_ms']:.1f}, submit "
              f"{small['submit_p95_ms']:.1f}); "
              f"goal <= {P95_GOAL_MS:g} ms; {p95 / P95_GOAL_MS:.2f} x goal -> {verdict(p95 <= P95_GOAL_MS)}")
    if small and bare:
        figures["next_vs_bare"] = ratio = small["next_p50_ms"] / bare["bare_p50_ms"]
        print(f"goal 2: median tasks/next {small['next_p50_ms']:.2f} ms vs bare Flask GET "
              f"{bare['bare_p50_ms']:.2f} ms at {GOAL_CLIENTS} clients: ratio {ratio:.2f}; goal <= "
              f"{BARE_RATIO_GOAL:g} -> {verdict(ratio <= BARE_RATIO_GOAL)}")
        for clients in clients_list:
            s, b = med.get(("10k", clients)), med.get(("bare", clients))
            if s and b and clients != GOAL_CLIENTS:
                print(f"        at {clients} client(s): {s['next_p50_ms']:.2f} ms vs "
                      f"{b['bare_p50_ms']:.2f} ms, ratio {s['next_p50_ms'] / b['bare_p50_ms']:.2f}")
        print(f"        server CPU: {small['server_cpu_ms_per_loop']:.1f} ms per loop of 3 requests vs "
              f"{bare['server_cpu_ms_per_loop']:.2f} ms per bare request")
    for tag, label in (("1M", "1,000,000 items"), ("1M aged", "1,000,000 items half done")):
        for clients in clients_list:
            s, big = med.get(("10k", clients)), med.get((tag, clients))
            if s and big:
                figures[f"{tag} vs 10k at {clients}"] = ratio = big["next_p50_ms"] / s["next_p50_ms"]
                print(f"{'goal 3' if clients == GOAL_CLIENTS else '      '}: median tasks/next, {label} "
                      f"vs 10k, {clients} client(s): {big['next_p50_ms']:.2f} ms vs {s['next_p50_ms']:.2f} "
                      f"ms: ratio {ratio:.2f}; goal <= {LARGE_RATIO_GOAL:g} -> "
                      f"{verdict(ratio <= LARGE_RATIO_GOAL)}")
    return figures


def profile(args, projects: dict, base: Path, threads: int) -> None:
    """Per project: the label loop against a cProfiled server, 16 clients on the wall clock, then
    1 client on the CPU clock (where the waiting goes, then where the work goes); top functions."""
    for name, project in projects.items():
        for clients, clock in ((GOAL_CLIENTS, "wall"), (1, "cpu")):
            port, out = c.free_port(), base / f"{name.replace(' ', '-')}-{clock}.prof"
            proc = c.start_process([sys.executable, str(Path(w.__file__)), str(project.data), str(port),
                                    str(threads), str(out), clock], base / f"profile-{port}.log")
            try:
                c.wait_for_status(port, "/healthz", proc, timeout=60)
                busy, _ = c.wait_for_quiet(args.quiet_wait)
                m = measure("label", port, proc.pid, project.tokens, project.project_id, clients,
                            args.duration, args.warmup)
                print(f"profiled ({clock} clock): {describe(name, clients, m)} (busy before {busy:.0%})")
            finally:
                c.stop_process(proc, timeout=60)
            stats = pstats.Stats(str(out))
            print(f"--- {name}, {clients} client(s), {clock} clock: top functions by cumulative time "
                  f"(summed over worker threads) ---")
            stats.sort_stats("cumulative").print_stats(40)
            print(f"--- {name}, {clients} client(s), {clock} clock: top functions by own time ---")
            stats.sort_stats("tottime").print_stats(20)


def prepare_projects(base: Path, specs: list[tuple[str, int, float]], urls: dict, labelers: int) -> dict:
    """One data directory per (tag, items, share already accepted); their plans printed."""
    projects = {}
    for tag, count, share in specs:
        where = base / tag.replace(" ", "-")
        where.mkdir()
        project = w.prepare(where, items=count, labelers=labelers, database_url=urls.get(tag, ""))
        note = ""
        if share:
            started = time.monotonic()
            changed = w.age_project(project.url, project.project_id, share)
            note = f"; then {changed:,} of them marked accepted in {time.monotonic() - started:.1f} s"
        print(f"{tag} project: {count:,} items and tasks bulk-inserted in {project.seconds_to_fill:.1f} s"
              + note)
        print_plans(tag, project)
        projects[tag] = project
    return projects


def start_servers(base: Path, projects: dict, threads: int) -> tuple[dict, dict]:
    """`serve` for each project and the bare Flask app, each answering: (ports, processes)."""
    ports = {tag: c.free_port() for tag in [*projects, "bare"]}
    procs = {}
    for tag, project in projects.items():
        procs[tag] = c.start_process([*c.onprem_label_command(), "--data-dir", str(project.data), "serve",
                                      "--port", str(ports[tag])], base / f"serve-{ports[tag]}.log")
    procs["bare"] = c.start_process([sys.executable, str(Path(__file__).with_name("_bare_server.py")),
                                     str(ports["bare"]), str(threads)], base / "bare.log")
    for tag in projects:
        c.wait_for_status(ports[tag], "/healthz", procs[tag], timeout=60)
    c.wait_for_status(ports["bare"], "/api/v1/me", procs["bare"], timeout=60)
    return ports, procs


def run_rounds(args, plan: list[tuple[str, int]], projects: dict, ports: dict, procs: dict) -> dict:
    """Every (server, clients) of the plan once per round, the order reversed every other round."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for tag, clients in (plan if r % 2 == 0 else list(reversed(plan))):
            project = projects.get(tag)
            if project is not None:
                refilled = w.refill_if_low(project.url, project.project_id, reserve=3000)
                if refilled:
                    print(f"({tag}: {refilled:,} handed-in tasks put back to new)")
            busy, waited = c.wait_for_quiet(args.quiet_wait)
            if project is None:
                m = measure("bare", ports[tag], procs[tag].pid, [""], 0, clients, args.duration, args.warmup)
            else:
                m = measure("label", ports[tag], procs[tag].pid, project.tokens, project.project_id, clients,
                            args.duration, args.warmup)
            runs.setdefault((tag, clients), []).append(m)
            print(f"round {r + 1}: {describe(tag, clients, m)}  (busy before {busy:.0%}, waited "
                  f"{waited:.0f} s)", flush=True)
    return runs


def parse_args() -> argparse.Namespace:
    """The command line, each value clamped to a sane range."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (>= 5 advised)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--items", type=int, default=10_000, help="items of the small project")
    parser.add_argument("--large-items", type=int, default=1_000_000,
                        help="items of the large projects (0: none)")
    parser.add_argument("--aged", type=float, default=0.5,
                        help="share of the second large project already accepted (0: no such project)")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="wait up to this many s for the machine to go idle before each measurement")
    parser.add_argument("--profile", action="store_true", help="profile the servers instead of measuring")
    args = parser.parse_args()
    args.rounds = max(1, min(args.rounds, 50))
    args.duration = max(1.0, min(args.duration, 120.0))
    args.warmup = max(0.0, min(args.warmup, 30.0))
    args.clients = sorted({max(1, min(int(n), 64)) for n in args.clients.split(",")})
    args.items = max(100, min(args.items, 10_000_000))
    args.large_items = max(0, min(args.large_items, 10_000_000))
    args.aged = max(0.0, min(args.aged, 0.95)) if args.large_items else 0.0
    return args


def main() -> int:
    args = parse_args()
    threads = BY_NAME["threads"].default
    print(c.machine_summary())
    print(f"backend {args.backend}; label loop = POST tasks/next, PUT annotation (one bbox + one answer), "
          f"POST submit; clients {args.clients} (separate processes, one labeler and keep-alive connection "
          f"each); waitress threads {threads}; {args.rounds} rounds x {args.duration:g} s "
          f"(+{args.warmup:g} s warm-up) per measurement")
    specs = [("10k", args.items, 0.0)]
    if args.large_items:
        specs.append(("1M", args.large_items, 0.0))
        if args.aged:
            specs.append(("1M aged", args.large_items, args.aged))
    urls = create_databases([tag for tag, _, _ in specs]) if args.backend == "postgresql" else {}
    procs = {}
    try:
        with tempfile.TemporaryDirectory(prefix="onprem-bench-") as tmp:
            base = Path(tmp)
            c.set_pycache_dir(base / "pycache")
            projects = prepare_projects(base, specs, urls, max(args.clients))
            if args.profile:
                profile(args, projects, base, threads)
                return 0
            ports, procs = start_servers(base, projects, threads)
            plan = [(tag, n) for tag in ["10k", "bare", *list(projects)[1:]] for n in args.clients]
            runs = run_rounds(args, plan, projects, ports, procs)
            rss = {tag: c.rss_bytes(p.pid) for tag, p in procs.items()}
            for tag, p in procs.items():
                c.stop_process(p)
                log = Path(p.log_path).read_text(errors="replace")
                if "Traceback" in log or "ERROR" in log:
                    print(f"{tag} server log has errors:\n{log[-3000:]}")
    finally:
        for p in procs.values():
            c.stop_process(p)
        if urls:
            drop_databases(urls)
    figures = report(summarise(runs), args.clients)
    print("server RSS after load: " + ", ".join(f"{tag} {v / 1e6:.1f} MB" for tag, v in rss.items()))
    print(json.dumps({"backend": args.backend, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
