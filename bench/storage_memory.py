"""Benchmark: resident memory growth of a process that puts a 2 GiB blob and reads it all back.

Goal (issue 3): RSS growth <= 64 MiB during a 2 GiB round trip.
Usage: .venv/bin/python bench/storage_memory.py [--runs 3] [--size-mib 2048] [--tmp /tmp]

Each run is a fresh subprocess: it imports everything and opens a fresh store, notes VmRSS and
resets VmHWM (the peak) to it, puts the blob from a generated stream (pseudo-random bytes made
as they are read, never the whole blob in memory), reads it back through store.open checking a
running SHA-256 against the one computed while generating, and then reads VmHWM and VmRSS.
Growth = peak RSS during the round trip - RSS before it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import _storage as s

GOAL_MIB = 64
READ_SIZE = 1 << 20


class GeneratedStream(io.RawIOBase):
    """`size` pseudo-random bytes (AES-CTR keystream), made as read; hashes what it hands out."""

    def __init__(self, size: int):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        super().__init__()
        self._left = size
        self._keystream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._left)
        if count == 0:
            return 0
        view = memoryview(buffer)[:count]
        view[:] = self._keystream.update(bytes(count))  # keystream of zeros = pseudo-random bytes
        self.sha256.update(view)
        self._left -= count
        return count


def child(tmp: str, size: int) -> None:
    """One measured round trip; prints a JSON line of figures."""
    _settings, store = s.new_store(Path(tmp))
    stream = GeneratedStream(size)
    rss_before = s.proc_status_kib("VmRSS")
    hwm_before = s.proc_status_kib("VmHWM")
    reset = s.reset_peak_rss()
    t0 = time.perf_counter()
    ref = store.put(stream)
    t_put = time.perf_counter() - t0
    rss_after_put = s.proc_status_kib("VmRSS")
    readback = hashlib.sha256()
    t0 = time.perf_counter()
    with store.open(ref.blob_id) as reader:
        while block := reader.read(READ_SIZE):
            readback.update(block)
    t_get = time.perf_counter() - t0
    figures = {"rss_before_kib": rss_before, "hwm_before_kib": hwm_before, "hwm_reset": reset,
               "rss_after_put_kib": rss_after_put, "hwm_after_kib": s.proc_status_kib("VmHWM"),
               "rss_after_kib": s.proc_status_kib("VmRSS"), "size": ref.size,
               "file_size": store.path_of(ref.blob_id).stat().st_size,
               "hash_ok": readback.digest() == stream.sha256.digest(), "put_s": t_put, "get_s": t_get}
    store.delete(ref.blob_id)
    print(json.dumps(figures))


def one_run(tmp_base: str, size: int, timeout: float) -> dict:
    """Run the child in a fresh interpreter on a fresh data directory; its figures."""
    with tempfile.TemporaryDirectory(prefix="onprem-bench-", dir=tmp_base) as tmp:
        result = subprocess.run([sys.executable, __file__, "--child", tmp, "--size-mib",
                                 str(size // s.MIB)], capture_output=True, text=True,
                                timeout=timeout, env=c.clean_env())
    if result.returncode != 0:
        raise SystemExit(f"child failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh subprocesses, one round trip each")
    parser.add_argument("--size-mib", type=int, default=2048, help="blob size in MiB")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the data directory goes")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many s for the machine to go idle before each run")
    parser.add_argument("--timeout", type=float, default=600.0, help="s allowed per round trip")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = max(1, min(args.size_mib, 16384)) * s.MIB
    if args.child:
        child(args.child, size)
        return 0

    runs = max(1, min(args.runs, 20))
    print(c.machine_summary())
    free = s.require_free_disk(Path(args.tmp), size + size // 64 + 256 * s.MIB)
    print(f"blob {size / s.MIB:.0f} MiB, generated while read (AES-CTR keystream); default chunk "
          f"size; {free / 2**30:.1f} GiB free under {args.tmp}; each run a fresh subprocess")
    growths = []
    for i in range(runs):
        before, waited = c.wait_for_quiet(args.quiet_wait)
        f = one_run(args.tmp, size, args.timeout)
        if not f["hash_ok"] or f["size"] != size:
            raise SystemExit(f"run {i + 1}: content read back differs from what was put: {f}")
        peak = f["hwm_after_kib"] if f["hwm_reset"] else max(f["hwm_after_kib"], f["rss_before_kib"])
        growth = (peak - f["rss_before_kib"]) / 1024
        growths.append(growth)
        print(f"run {i + 1}: RSS before {f['rss_before_kib'] / 1024:.1f} MiB; peak during "
              f"{peak / 1024:.1f} MiB{'' if f['hwm_reset'] else ' (VmHWM not resettable)'}; "
              f"RSS after put {f['rss_after_put_kib'] / 1024:.1f} MiB, after get "
              f"{f['rss_after_kib'] / 1024:.1f} MiB; growth {growth:.1f} MiB; put "
              f"{size / f['put_s'] / 1e6:.0f} MB/s, get {size / f['get_s'] / 1e6:.0f} MB/s; "
              f"SHA-256 matches; file {f['file_size']} B; machine busy before {before:.0%}")
    med = c.median(growths)
    print(f"RSS growth median of {len(growths)}: {med:.1f} MiB (min {min(growths):.1f}, max "
          f"{max(growths):.1f}); goal <= {GOAL_MIB} MiB; {med / GOAL_MIB:.2f} x goal -> "
          f"{'PASS' if max(growths) <= GOAL_MIB else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
