"""Benchmark: where the time of put() goes, each part of it timed alone on a 256 MiB blob.

No goal: this explains storage_throughput.py. The parts, each over the whole blob, 1 MiB chunks:
read (BytesIO.read into new bytes, as before; readinto a reused buffer, as now), name HMAC,
AES-GCM sealing (encrypt into new bytes; encrypt_into a reused buffer), HMAC and sealing
together in two threads, write (unbuffered, one syscall a chunk) and the final fsync, with and
without asking the kernel to start writeback every 8 MiB (and, as an experiment put() does not
do, with early fdatasyncs in a background thread); then put() itself.
Usage: .venv/bin/python bench/storage_put_parts.py [--runs 5] [--size-mib 256] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as c
import _storage as s
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from onprem_label.storage import format as fmt

CHUNK = fmt.DEFAULT_CHUNK_SIZE
WRITEBACK_STEP = 8 << 20
EARLY_SYNC_STEP = 32 << 20


def chunks(data: bytes):
    """Memoryviews of the 1 MiB chunks of `data`."""
    view = memoryview(data)
    return [view[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def part_read_new_bytes(data, parts, aead, key, path):
    stream = io.BytesIO(data)
    while stream.read(CHUNK):
        pass


def part_readinto(data, parts, aead, key, path):
    stream, buffer = io.BytesIO(data), bytearray(CHUNK)
    while stream.readinto(buffer):
        pass


def part_hmac(data, parts, aead, key, path):
    namer = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        namer.update(part)


def part_encrypt(data, parts, aead, key, path):
    for i, part in enumerate(parts):
        aead.encrypt(i.to_bytes(12, "big"), part, b"aad")


def part_encrypt_into(data, parts, aead, key, path):
    out = bytearray(CHUNK + fmt.TAG_BYTES)
    for i, part in enumerate(parts):
        aead.encrypt_into(i.to_bytes(12, "big"), part, b"aad", memoryview(out)[:len(part) + 16])


def part_hmac_and_seal_threads(data, parts, aead, key, path):
    worker = threading.Thread(target=part_hmac, args=(data, parts, aead, key, path))
    worker.start()
    part_encrypt_into(data, parts, aead, key, path)
    worker.join()


def write_file(parts, path, mode: str, seal=None) -> tuple[float, float]:
    """(s writing, s in the final fsync) of the chunks to a new file.

    mode "plain": writes, then fsync; "hint": also ask for writeback every 8 MiB;
    "hint+fdatasync": also fdatasync every 32 MiB in a background thread, as put() does since
    session 2 (see bench/RESULTS.md, section S2). With `seal`
    (aead, key), each chunk is first sealed and hashed as put() does, and the sealed bytes written.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with ThreadPoolExecutor(max_workers=1) as syncer, ThreadPoolExecutor(max_workers=1) as hasher:
            t0 = time.perf_counter()
            started = written = synced = 0
            syncing = None
            if seal:
                namer, out = hmac.new(seal[1], digestmod=hashlib.sha256), bytearray(CHUNK + 16)
            for i, part in enumerate(parts):
                if seal:
                    hashed = hasher.submit(namer.update, part)
                    sealed = memoryview(out)[:len(part) + 16]
                    seal[0].encrypt_into(i.to_bytes(12, "big"), part, b"aad", sealed)
                    written += os.write(fd, sealed)
                    hashed.result()
                else:
                    written += os.write(fd, part)
                if mode != "plain" and written - started >= WRITEBACK_STEP:
                    os.posix_fadvise(fd, started, written - started, os.POSIX_FADV_DONTNEED)
                    started = written
                if mode == "hint+fdatasync" and written - synced >= EARLY_SYNC_STEP and (
                        syncing is None or syncing.done()):
                    syncing, synced = syncer.submit(os.fdatasync, fd), written
            t1 = time.perf_counter()
            if syncing is not None:
                syncing.result()
            os.fsync(fd)
            return t1 - t0, time.perf_counter() - t1
    finally:
        os.close(fd)
        os.unlink(path)


WRITE_MODES = {"plain": "no hint", "hint": "writeback hint every 8 MiB",
               "hint+fdatasync": "hint + bg fdatasync every 32 MiB (as put)"}
PARTS = [("read: BytesIO.read -> new bytes", part_read_new_bytes),
         ("read: BytesIO.readinto reused buffer", part_readinto),
         ("name HMAC-SHA-256", part_hmac),
         ("seal: AESGCM.encrypt -> new bytes", part_encrypt),
         ("seal: AESGCM.encrypt_into reused buffer", part_encrypt_into),
         ("HMAC + encrypt_into in two threads", part_hmac_and_seal_threads)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each part")
    parser.add_argument("--size-mib", type=int, default=256, help="blob size in MiB")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where files are written")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many s for the machine to go idle first")
    args = parser.parse_args()
    runs = max(1, min(args.runs, 50))
    size = max(1, min(args.size_mib, 4096)) * s.MIB

    print(c.machine_summary())
    s.require_free_disk(Path(args.tmp), 2 * size + 64 * s.MIB)
    data = os.urandom(size)
    parts = chunks(data)
    aead, key = AESGCM(AESGCM.generate_key(256)), os.urandom(32)
    busy, waited = c.wait_for_quiet(args.quiet_wait)
    print(f"{size / s.MIB:.0f} MiB in {len(parts)} chunks of {CHUNK} B; MB = 10^6 bytes; machine "
          f"busy before {busy:.0%} (waited {waited:.0f} s)")
    load = c.MachineLoad().start()
    with tempfile.TemporaryDirectory(prefix="onprem-bench-", dir=args.tmp) as tmp:
        path = Path(tmp) / "blob"
        for label, fn in PARTS:
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn(data, parts, aead, key, path)
                times.append(time.perf_counter() - t0)
            med = c.median(times)
            print(f"{label:<44} median {med * 1000:6.0f} ms  ({size / med / 1e6:6.0f} MB/s)")
        for seal, what in ((None, "write"), ((aead, key), "seal+HMAC+write")):
            for mode, label in WRITE_MODES.items():
                results = [write_file(parts, path, mode, seal) for _ in range(runs)]
                w, f = c.median([r[0] for r in results]), c.median([r[1] for r in results])
                print(f"{what + ' + fsync, ' + label:<60}: loop median {w * 1000:4.0f} ms, then fsync "
                      f"median {f * 1000:4.0f} ms; together {size / (w + f) / 1e6:4.0f} MB/s")
        _settings, store = s.new_store(Path(tmp) / "store")
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            ref = store.put(io.BytesIO(data))
            times.append(time.perf_counter() - t0)
            store.delete(ref.blob_id)
        med = c.median(times)
        print(f"{'EncryptedBlobStore.put (all of the above)':<44} median {med * 1000:6.0f} ms  "
              f"({size / med / 1e6:6.0f} MB/s)")
    print(f"machine busy during the parts {load.stop():.0%} of {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
