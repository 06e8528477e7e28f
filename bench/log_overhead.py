"""Benchmark: what the application log costs a request (the access line, JSON or key=value, to a file).

No goal was set; the reference is the same request with log_level=warning (hooks run, no line written).
Usage: .venv/bin/python bench/log_overhead.py [--runs 5] [--requests 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c

from onprem_label import logs
from onprem_label.app import create_app
from onprem_label.config import load_settings
from onprem_label.db import make_engine, migrate
from onprem_label.storage.format import key_id_of
from onprem_label.storage.keyring import Keyring


def per_request_us(client, requests: int) -> float:
    """Microseconds per GET of an unknown API path (a JSON 404: no database, no template)."""
    t0 = time.perf_counter()
    for _ in range(requests):
        client.get("/api/v1/nothing-here")
    return (time.perf_counter() - t0) / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per variant (median reported)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per run")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    data = root / "data"
    data.mkdir(mode=0o700)
    engine = make_engine(f"sqlite:///{data / 'onprem-label.db'}")
    migrate.upgrade(engine)
    engine.dispose()
    master = os.urandom(32)
    keyring = Keyring({key_id_of(master): master}, key_id_of(master), os.urandom(32))
    variants = {"no access line (log_level=warning)": {"log_level": "warning"},
                "json to file": {"log_format": "json"}, "keyvalue to file": {"log_format": "keyvalue"}}
    results: dict[str, list[float]] = {name: [] for name in variants}
    for run in range(args.runs):
        for name, values in variants.items():
            settings = load_settings({"data_dir": str(data), "log_file": str(root / f"{run}-{{command}}.log"),
                                      **values}, env={})
            app = create_app(settings, keyring=keyring)
            logs.configure_logging(settings, "bench")
            try:
                client = app.test_client()
                per_request_us(client, 100)  # warm up
                results[name].append(per_request_us(client, args.requests))
            finally:
                logs.close_logging()
                app.extensions["onprem_label"].engine.dispose()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(c.machine_summary())
    print(f"commit {commit}; {args.runs} runs x {args.requests} requests; median us per request")
    reference = c.median(results["no access line (log_level=warning)"])
    for name, values in results.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {runs} | **{c.median(values):.1f}** | {c.median(values) / reference:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
