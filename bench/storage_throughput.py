"""Benchmark: put and get of a 256 MiB blob vs AESGCM.encrypt / decrypt of the same bytes in one call.

Goal (issue 3): put / encrypt >= 0.6 and get / decrypt >= 0.6 (MB/s ratios, same process).
Usage: .venv/bin/python bench/storage_throughput.py [--runs 5] [--size-mib 256] [--tmp /tmp] [--before]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import _storage as s
from _put_before import put_before
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

RATIO_GOAL = 0.6
READ_SIZE = 1 << 20  # what a web view streaming the blob would ask for at a time


def mb_per_s(size: int, seconds: float) -> float:
    """Throughput in decimal MB/s."""
    return size / seconds / 1e6


def timed(fn, *args):
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def read_all(store, blob_id: str) -> int:
    """Read a blob sequentially through store.open, READ_SIZE at a time; the bytes read."""
    total = 0
    with store.open(blob_id) as reader:
        while block := reader.read(READ_SIZE):
            total += len(block)
    return total


def check_content(store, blob_id: str, data: bytes) -> None:
    """Read the blob back (untimed) and compare it with what was put."""
    with store.open(blob_id) as reader:
        at = 0
        while block := reader.read(READ_SIZE):
            if block != data[at:at + len(block)]:
                raise SystemExit(f"content differs near byte {at}")
            at += len(block)
    if at != len(data):
        raise SystemExit(f"read {at} bytes back, put {len(data)}")


def one_run(store, data: bytes, before: bool) -> dict[str, float]:
    """Seconds of encrypt, decrypt, put, warm get and cold get of `data` (plus the busy share).

    With `before`, also of the serial put() this store had before the throughput work.
    """
    aead, nonce, aad = AESGCM(AESGCM.generate_key(256)), os.urandom(12), os.urandom(41)
    load = c.MachineLoad().start()
    enc_s, sealed = timed(aead.encrypt, nonce, data, aad)
    dec_s, _ = timed(aead.decrypt, nonce, sealed, aad)
    del sealed
    put_s, ref = timed(store.put, io.BytesIO(data))
    get_s, got = timed(read_all, store, ref.blob_id)
    s.drop_cached_pages(store.path_of(ref.blob_id))
    cold_s, _ = timed(read_all, store, ref.blob_id)
    busy = load.stop()
    if got != len(data) or ref.size != len(data):
        raise SystemExit(f"sizes differ: put {ref.size}, read {got}, expected {len(data)}")
    store.delete(ref.blob_id)  # the next put must write a new file, not find this one
    result = {"encrypt": enc_s, "decrypt": dec_s, "put": put_s, "get": get_s, "cold get": cold_s,
              "busy": busy}
    if before:
        result["put before"], old = timed(put_before, store, io.BytesIO(data))
        if old != ref:
            raise SystemExit(f"the earlier put gave {old}, the store's put {ref}")
        store.delete(old.blob_id)
    return result


def report(name: str, size: int, seconds: list[float]) -> float:
    """Print the MB/s of one operation over the runs; return the median MB/s."""
    rates = [mb_per_s(size, t) for t in seconds]
    med = c.median(rates)
    print(f"{name:<10} MB/s: median {med:7.0f} (min {min(rates):.0f}, max {max(rates):.0f}); "
          f"runs: {', '.join(f'{r:.0f}' for r in rates)}")
    return med


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each operation (>= 5)")
    parser.add_argument("--size-mib", type=int, default=256, help="blob size in MiB")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="store chunk size in bytes (default: the setting's default, 1 MiB)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the data directory goes")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many s for the machine to go idle before each run")
    parser.add_argument("--before", action="store_true",
                        help="also time the serial put() from before the throughput work")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="stop starting new runs after this many s")
    args = parser.parse_args()
    runs = max(1, min(args.runs, 50))
    size = max(1, min(args.size_mib, 4096)) * s.MIB

    print(c.machine_summary())
    s.require_free_disk(Path(args.tmp), 2 * size + 64 * s.MIB)
    deadline = time.monotonic() + args.max_seconds
    data = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="onprem-bench-", dir=args.tmp) as tmp:
        _settings, store = s.new_store(Path(tmp), args.chunk_size)
        print(f"blob {size / s.MIB:.0f} MiB of os.urandom bytes; chunk size {store.chunk_size} B; "
              f"store on {tmp} ({os.statvfs(tmp).f_bsize} B blocks); get reads "
              f"{READ_SIZE} B at a time; MB = 10^6 bytes")
        ref = store.put(io.BytesIO(data))  # warm-up, and a check that the bytes come back
        check_content(store, ref.blob_id, data)
        store.delete(ref.blob_id)
        results = []
        for i in range(runs):
            if time.monotonic() > deadline:
                print(f"stopping after {i} runs: --max-seconds {args.max_seconds:g} reached")
                break
            before, waited = c.wait_for_quiet(args.quiet_wait)
            result = one_run(store, data, args.before)
            results.append(result)
            print(f"run {i + 1}: " + "; ".join(f"{k} {mb_per_s(size, result[k]):.0f} MB/s"
                                               for k in result if k != "busy")
                  + f"; machine busy before {before:.0%} (waited {waited:.0f} s), "
                    f"during {result['busy']:.0%} of {os.cpu_count()} cores")
    if not results:
        return 1
    med = {k: report(k, size, [r[k] for r in results]) for k in results[0] if k != "busy"}
    print(f"over {len(results)} runs (MB/s medians; the cold get drops the blob's pages first, "
          f"so it reads from disk and has no goal)")
    if "put before" in med:
        print(f"put before the throughput work / encrypt ratio {med['put before'] / med['encrypt']:.2f}"
              f" (for comparison; the goal is for the store's put)")
    for op, ref_op in (("put", "encrypt"), ("get", "decrypt")):
        ratio = med[op] / med[ref_op]
        paired = c.median([r[ref_op] / r[op] for r in results])
        print(f"{op}/{ref_op} ratio {ratio:.2f} (median of per-run ratios {paired:.2f}); goal >= "
              f"{RATIO_GOAL}; {ratio / RATIO_GOAL:.2f} x goal -> "
              f"{'PASS' if ratio >= RATIO_GOAL else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
