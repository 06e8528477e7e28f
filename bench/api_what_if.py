"""Experiment: api_throughput's load against onprem-label variants (see _patched_serve.py).

Shows where the time of a token-authenticated request goes by measuring what each candidate
change would buy, against the bare Flask reference, all in one run. Not a goal of its own.
Usage: .venv/bin/python bench/api_what_if.py [--variants bare,shipped,joined,...]
       [--rounds 3] [--duration 6] [--clients 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _common as c
import api_throughput as at
from _patched_serve import VARIANTS

from onprem_label.config import BY_NAME


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="bare," + ",".join(VARIANTS),
                        help="comma-separated: bare and/or " + ", ".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v != "bare" and v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    rounds = max(1, min(args.rounds, 20))
    duration = max(1.0, min(args.duration, 60.0))
    clients = max(1, min(args.clients, 32))
    threads = BY_NAME["threads"].default
    here = Path(__file__).parent

    print(c.machine_summary())
    print(f"{clients} client processes, GET {at.PATH}, {threads} waitress threads, "
          f"{rounds} rounds x {duration:g} s per variant")
    with tempfile.TemporaryDirectory(prefix="onprem-bench-") as tmp:
        base = Path(tmp)
        c.set_pycache_dir(base / "pycache")
        data = c.init_data_dir(base)
        auth = {"Authorization": f"Bearer {at.create_user_and_token(data)}"}
        servers = {}
        try:
            for v in variants:
                port = c.free_port()
                if v == "bare":
                    argv = [sys.executable, str(here / "_bare_server.py"), str(port), str(threads)]
                else:
                    argv = [sys.executable, str(here / "_patched_serve.py"), "--data-dir",
                            str(data), "serve", "--port", str(port)]
                servers[v] = (port, c.start_process(argv, base / f"{v}.log", {"BENCH_VARIANT": v}))
            for v, (port, proc) in servers.items():
                c.wait_for_status(port, at.PATH if v == "bare" else "/healthz", proc, timeout=60)
                at.check_answer(port, auth, 200)
            results = {v: [] for v in variants}
            for i in range(rounds):
                for v in variants if i % 2 == 0 else variants[::-1]:
                    port, proc = servers[v]
                    m = at.measure(port, proc.pid, auth, clients, duration, 1.0)
                    results[v].append(m)
                    print(f"round {i + 1}: {at.describe(v, m)}", flush=True)
        finally:
            for _, proc in servers.values():
                c.stop_process(proc)

    print()
    reference = c.median([m["rps"] for m in results["bare"]]) if "bare" in results else None
    for v in variants:
        ms = results[v]
        rps = c.median([m["rps"] for m in ms])
        ratio = f"  ratio to bare {rps / reference:.2f}" if reference else ""
        print(f"{v:<16} median {rps:7.1f} req/s  server CPU "
              f"{c.median([m['server_cpu_ms_per_req'] for m in ms]):.3f} ms/req  p99 "
              f"{c.median([m['p99_ms'] for m in ms]):6.1f} ms{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
