"""Benchmark: token-authenticated GET /api/v1/me on `onprem-label serve` vs a bare Flask route.

Goal (issue 2): with 4 concurrent clients, onprem-label's requests/s >= 0.5 x the bare Flask
app's, both under waitress with the same thread count, on the same machine in the same run.
The clients are separate processes (one keep-alive http.client connection each); both servers
run the whole time and are measured alternately, round after round.
Usage: .venv/bin/python bench/api_throughput.py [--rounds 5] [--duration 10] [--clients 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import queue as queue_module
import sys
import tempfile
import time
from pathlib import Path

import _common as c

from onprem_label.config import BY_NAME

GOAL_RATIO = 0.5
PATH = "/api/v1/me"
BENCH_PASSWORD = "a long throughput passphrase 42"
MAX_REQUESTS_PER_CLIENT = 2_000_000  # a bound on every client loop besides its end time


def create_user_and_token(data: Path) -> str:
    """A labeler 'bench' with an API token (core functions; see RESULTS.md for why not the CLI)."""
    from onprem_label.auth import accounts, tokens
    from onprem_label.clock import utcnow
    from onprem_label.config import load_settings
    from onprem_label.db import make_engine

    settings = load_settings({"data_dir": str(data)}, env={})
    engine = make_engine(settings.effective_database_url)
    try:
        with c.site_sessionmaker(data, engine)() as db:
            # The CLI's `user create` makes a one-time password that must be changed in the
            # browser first; until then the API answers 403 password_change_required.
            user = accounts.create_user(db, "bench", BENCH_PASSWORD, ["labeler"],
                                        must_change_password=False, now=utcnow())
            secret, _ = tokens.create_token(db, user, "bench", now=utcnow())
            db.commit()
    finally:
        engine.dispose()
    return secret


def client(port: int, headers: dict, t_start: float, t_end: float, results) -> None:
    """One client process: back-to-back GETs on one keep-alive connection until t_end."""
    conn = http.client.HTTPConnection(c.LOOPBACK, port, timeout=10)
    ok = errors = 0
    latencies: list[float] = []
    cpu_start = None
    for _ in range(MAX_REQUESTS_PER_CLIENT):
        sent = time.monotonic()
        if sent >= t_end:
            break
        if cpu_start is None and sent >= t_start:
            cpu_start = time.process_time()
        try:
            conn.request("GET", PATH, headers=headers)
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(c.LOOPBACK, port, timeout=10)
            status = None
        if sent < t_start:
            continue  # warm-up
        if status == 200:
            ok += 1
            latencies.append(time.monotonic() - sent)
        else:
            errors += 1
    cpu = time.process_time() - (cpu_start if cpu_start is not None else time.process_time())
    conn.close()
    results.put((ok, errors, latencies, cpu))


def measure(port: int, server_pid: int, headers: dict, clients: int, duration: float,
            warmup: float) -> dict:
    """Run `clients` client processes against one server; requests/s and what it cost."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    t_start = time.monotonic() + 0.5 + warmup  # 0.5 s for the processes to start
    t_end = t_start + duration
    procs = [ctx.Process(target=client, args=(port, headers, t_start, t_end, results))
             for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, t_start - time.monotonic()))
    cpu0, load = c.process_cpu_seconds(server_pid), c.MachineLoad().start()
    time.sleep(max(0.0, t_end - time.monotonic()))
    cpu1, busy = c.process_cpu_seconds(server_pid), load.stop()
    collected = []
    try:
        for _ in procs:
            collected.append(results.get(timeout=duration + 30))
    except queue_module.Empty:
        raise RuntimeError("a client process did not report") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    ok = sum(r[0] for r in collected)
    errors = sum(r[1] for r in collected)
    latencies = sorted(x for r in collected for x in r[2])
    return {
        "rps": ok / duration, "ok": ok, "errors": errors,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan"),
        "server_cpu_ms_per_req": (cpu1 - cpu0) * 1000 / ok if ok else float("nan"),
        "server_cpu_share": (cpu1 - cpu0) / duration,
        "client_cpu_share": sum(r[3] for r in collected) / duration,
        "machine_busy": busy,
    }


def check_answer(port: int, headers: dict, expect: int) -> None:
    """One GET; fail loudly unless it answers `expect`."""
    conn = http.client.HTTPConnection(c.LOOPBACK, port, timeout=10)
    try:
        conn.request("GET", PATH, headers=headers)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != expect:
        raise RuntimeError(f"GET {PATH} on {port} answered {response.status}, expected {expect}: "
                           f"{body[:200]!r}")


def describe(name: str, m: dict) -> str:
    """One line for one measurement."""
    return (f"{name:<13} {m['rps']:8.1f} req/s  p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms"
            f"  server CPU {m['server_cpu_ms_per_req']:.3f} ms/req ({m['server_cpu_share']:.2f} "
            f"cores)  clients {m['client_cpu_share']:.2f} cores  machine busy "
            f"{m['machine_busy']:.0%}  errors {m['errors']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (>= 5 advised)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per server per round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client processes")
    parser.add_argument("--log-level", default=BY_NAME["log_level"].default,
                        help="onprem-label's log_level ('warning' drops the access line of each request)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="wait up to this many s for the machine to go idle before each measurement")
    args = parser.parse_args()
    rounds = max(1, min(args.rounds, 50))
    duration = max(1.0, min(args.duration, 120.0))
    warmup = max(0.0, min(args.warmup, 30.0))
    clients = max(1, min(args.clients, 32))
    threads = BY_NAME["threads"].default

    print(c.machine_summary())
    print(f"{clients} client processes, keep-alive, GET {PATH}; waitress threads {threads} on both "
          f"servers; {rounds} rounds x {duration:g} s (+{warmup:g} s warm-up) per server")
    with tempfile.TemporaryDirectory(prefix="onprem-bench-") as tmp:
        base = Path(tmp)
        c.set_pycache_dir(base / "pycache")
        data = c.init_data_dir(base)
        token = create_user_and_token(data)
        auth = {"Authorization": f"Bearer {token}"}
        ports = {"onprem-label": c.free_port(), "bare Flask": c.free_port()}
        argvs = {
            "onprem-label": [*c.onprem_label_command(), "--data-dir", str(data), "serve",
                             "--port", str(ports["onprem-label"])],
            "bare Flask": [sys.executable, str(Path(__file__).with_name("_bare_server.py")),
                           str(ports["bare Flask"]), str(threads)],
        }
        procs = {}
        try:
            for name, argv in argvs.items():
                env = {"ONPREM_LABEL_LOG_LEVEL": args.log_level} if name == "onprem-label" else {}
                procs[name] = c.start_process(argv, base / f"{name.replace(' ', '-')}.log", env)
            c.wait_for_status(ports["onprem-label"], "/healthz", procs["onprem-label"], timeout=60)
            c.wait_for_status(ports["bare Flask"], PATH, procs["bare Flask"], timeout=60)
            check_answer(ports["onprem-label"], {}, 401)
            check_answer(ports["onprem-label"], auth, 200)
            check_answer(ports["bare Flask"], auth, 200)

            runs: dict[str, list[dict]] = {name: [] for name in argvs}
            for i in range(rounds):
                order = list(argvs) if i % 2 == 0 else list(reversed(argvs))
                for name in order:
                    busy, waited = c.wait_for_quiet(args.quiet_wait)
                    m = measure(ports[name], procs[name].pid, auth, clients, duration, warmup)
                    m["busy_before"] = busy
                    runs[name].append(m)
                    print(f"round {i + 1}: {describe(name, m)}  (busy before {busy:.0%}, "
                          f"waited {waited:.0f} s)", flush=True)
            rss = {name: c.rss_bytes(p.pid) for name, p in procs.items()}
        finally:
            for p in procs.values():
                c.stop_process(p)

    ours = c.median([m["rps"] for m in runs["onprem-label"]])
    bare = c.median([m["rps"] for m in runs["bare Flask"]])
    ratios = [o["rps"] / b["rps"] for o, b in zip(runs["onprem-label"], runs["bare Flask"])]
    print()
    for name in argvs:
        ms = runs[name]
        print(f"{name}: median {c.median([m['rps'] for m in ms]):.1f} req/s over {rounds} rounds "
              f"(min {min(m['rps'] for m in ms):.1f}, max {max(m['rps'] for m in ms):.1f}); "
              f"median server CPU {c.median([m['server_cpu_ms_per_req'] for m in ms]):.3f} ms/req; "
              f"median p50 {c.median([m['p50_ms'] for m in ms]):.2f} ms, p99 "
              f"{c.median([m['p99_ms'] for m in ms]):.2f} ms; errors {sum(m['errors'] for m in ms)}; "
              f"RSS after load {rss[name] / 1e6:.1f} MB")
    ratio = ours / bare
    print(f"ratio onprem-label / bare Flask (medians): {ratio:.2f}; per-round ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)} (median {c.median(ratios):.2f}); "
          f"goal >= {GOAL_RATIO}; {ratio / GOAL_RATIO:.2f} x goal -> "
          f"{'PASS' if ratio >= GOAL_RATIO else 'FAIL'}")
    print(json.dumps({"onprem_rps": ours, "bare_rps": bare, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
