"""Benchmark: `onprem-label serve` start to first 200 from /healthz, and idle server RSS.

Goals (issue 2): start <= 2 s, idle RSS <= 120 MB.
Usage: .venv/bin/python bench/serve_startup.py [--runs 7] [--idle 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _common as c

START_GOAL_S = 2.0
RSS_GOAL_BYTES = 120 * 1000 * 1000  # "120 MB", read as decimal megabytes (the stricter reading)


def one_run(data: Path, idle_s: float) -> tuple[float, int, int, float]:
    """Start serve once: (s to first 200, RSS after idling, RSS at first 200, others' CPU s)."""
    port = c.free_port()
    argv = [*c.onprem_label_command(), "--data-dir", str(data), "serve", "--port", str(port)]
    load = c.MachineLoad().start()
    t0 = time.monotonic()
    proc = c.start_process(argv, data.parent / f"serve-{port}.log")
    try:
        t_up = c.wait_for_status(port, "/healthz", proc, timeout=30.0)
        busy = load.stop()
        server_cpu = c.process_cpu_seconds(proc.pid)
        rss_at_up = c.rss_bytes(proc.pid)
        time.sleep(idle_s)
        rss_idle = c.rss_bytes(proc.pid)
        if proc.poll() is not None:
            raise RuntimeError("server died while idle")
    finally:
        c.stop_process(proc)
    wall = t_up - t0
    # CPU the rest of the machine used meanwhile (the poller in this process is a few ms).
    others = max(0.0, busy * (os.cpu_count() or 1) * wall - server_cpu)
    return wall, rss_idle, rss_at_up, others


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="number of starts (>= 5 advised)")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle before reading RSS")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="wait up to this many s for the machine to go idle before each run")
    args = parser.parse_args()
    runs = max(1, min(args.runs, 50))

    print(c.machine_summary())
    print(f"command: {' '.join(c.onprem_label_command())} --data-dir DIR serve --port PORT")
    with tempfile.TemporaryDirectory(prefix="onprem-bench-") as tmp:
        c.set_pycache_dir(Path(tmp) / "pycache")
        data = c.init_data_dir(Path(tmp))
        seconds, idle_rss, _, others = one_run(data, 0.0)
        print(f"warm-up (fills the bytecode cache, not counted): start->200 {seconds:.3f} s")
        starts, rss, rss_up = [], [], []
        for i in range(runs):
            background, waited = c.wait_for_quiet(args.quiet_wait)
            seconds, idle_rss, up_rss, others = one_run(data, args.idle)
            starts.append(seconds)
            rss.append(idle_rss)
            rss_up.append(up_rss)
            print(f"run {i + 1}: start->200 {seconds:.3f} s; RSS at first 200 "
                  f"{up_rss / 1e6:.1f} MB; RSS after {args.idle:g} s idle {idle_rss / 1e6:.1f} MB "
                  f"({idle_rss / 2**20:.1f} MiB); machine busy before {background:.0%} "
                  f"(after waiting {waited:.0f} s for quiet), "
                  f"other processes' CPU during start {others:.2f} s")
    start_med, rss_med = c.median(starts), c.median(rss)
    print(f"start->200 median of {runs}: {start_med:.3f} s (min {min(starts):.3f}, "
          f"max {max(starts):.3f}); goal <= {START_GOAL_S:g} s; ratio {start_med / START_GOAL_S:.2f} "
          f"-> {'PASS' if start_med <= START_GOAL_S else 'FAIL'}")
    print(f"idle RSS median of {runs}: {rss_med / 1e6:.1f} MB ({rss_med / 2**20:.1f} MiB) "
          f"(min {min(rss) / 1e6:.1f}, max {max(rss) / 1e6:.1f} MB); goal <= 120 MB; ratio "
          f"{rss_med / RSS_GOAL_BYTES:.2f} -> {'PASS' if rss_med <= RSS_GOAL_BYTES else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
