"""Benchmark: the scrypt parameters in use and the measured ms per hash_password / verify_password.

Reference (issue 2): scrypt N >= 2^17, r = 8, p = 1 (OWASP ASVS minimum); no time goal.
Usage: .venv/bin/python bench/password_hash.py [--runs 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import _common as c

from onprem_label.auth import passwords

REFERENCE_LOG_N, REFERENCE_R, REFERENCE_P = 17, 8, 1
PASSWORD = "correct horse battery staple 42"


def timed_ms(fn, *args) -> float:
    """Wall milliseconds of one call."""
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1000


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parallel_rate(threads: int, per_thread: int, encoded: str) -> float:
    """Verifications per second with `threads` threads each verifying `per_thread` times."""
    def work():
        for _ in range(per_thread):
            passwords.verify_password(PASSWORD, encoded)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    return threads * per_thread / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="timed calls of each function (>= 7)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the parallel figure")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="wait up to this many s for the machine to go idle first")
    args = parser.parse_args()
    runs = max(1, min(args.runs, 100))
    threads = max(1, min(args.threads, 16))

    print(c.machine_summary())
    log_n, r, p = passwords.SCRYPT_LOG_N, passwords.SCRYPT_R, passwords.SCRYPT_P
    memory_mib = 128 * r * (1 << log_n) / 2**20
    print(f"parameters: scrypt N=2^{log_n} ({1 << log_n}), r={r}, p={p}, salt "
          f"{passwords.SALT_BYTES} B, output {passwords.HASH_BYTES} B; memory per hash "
          f"128*r*N = {memory_mib:.0f} MiB")
    reference_cost = (1 << REFERENCE_LOG_N) * REFERENCE_R * REFERENCE_P
    ok = log_n >= REFERENCE_LOG_N and r == REFERENCE_R and p >= REFERENCE_P
    print(f"reference: N >= 2^{REFERENCE_LOG_N}, r={REFERENCE_R}, p={REFERENCE_P}; cost ratio "
          f"(N*r*p / reference) {(1 << log_n) * r * p / reference_cost:.2f} -> "
          f"{'MEETS' if ok else 'BELOW'} the reference")

    busy, waited = c.wait_for_quiet(args.quiet_wait)
    print(f"machine busy before timing {busy:.0%} (waited {waited:.0f} s for quiet)")
    passwords.hash_password(PASSWORD)  # warm-up: first touch of 128 MiB costs page faults
    encoded = passwords.hash_password(PASSWORD)
    load = c.MachineLoad().start()
    hash_ms = [timed_ms(passwords.hash_password, PASSWORD) for _ in range(runs)]
    verify_ms = [timed_ms(passwords.verify_password, PASSWORD, encoded) for _ in range(runs)]
    wrong_ms = [timed_ms(passwords.verify_password, PASSWORD + "x", encoded) for _ in range(runs)]
    busy = load.stop()
    print(f"hash_password   ms: median {c.median(hash_ms):.0f} over {runs} "
          f"(min {min(hash_ms):.0f}, max {max(hash_ms):.0f})")
    print(f"verify_password ms: median {c.median(verify_ms):.0f} over {runs} "
          f"(min {min(verify_ms):.0f}, max {max(verify_ms):.0f}) [right password]")
    print(f"verify_password ms: median {c.median(wrong_ms):.0f} over {runs} "
          f"(min {min(wrong_ms):.0f}, max {max(wrong_ms):.0f}) [wrong password]")
    print(f"machine busy during the timed calls {busy:.0%} of {os.cpu_count()} cores")
    load = c.MachineLoad().start()
    rate1 = parallel_rate(1, 3, encoded)
    rate_n = parallel_rate(threads, 3, encoded)
    busy = load.stop()
    print(f"verifications/s: 1 thread {rate1:.2f}; {threads} threads {rate_n:.2f} "
          f"(x{rate_n / rate1:.2f}; machine busy meanwhile {busy:.0%}): the number of logins "
          f"one server can check per second, as hashlib.scrypt runs outside the GIL")
    print(f"peak RSS of this process {peak_rss_mib():.0f} MiB "
          f"(each concurrent hash holds {memory_mib:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
