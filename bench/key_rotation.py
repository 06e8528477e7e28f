"""Benchmark: time to rotate the master key of a store of 100,000 small blobs.

Reference (issue 3): key rotation time for 100,000 blobs (no goal figure).
Usage: .venv/bin/python bench/key_rotation.py [--blobs 100000] [--rotations 3] [--create fast|put]

The blobs (512 random bytes each) are made first and timed apart. `--create fast` (default)
writes each file with the format functions and no per-file fsync, then syncs once: the same
bytes `put` writes (a sample is checked with store.verify), made in a fraction of the time.
`--create put` uses EncryptedBlobStore.put (two fsyncs a blob). Then rotate_master_key runs
`--rotations` times in a row on the same data directory (A->B, B->C, ...), each re-wrapping
every blob through the journal (three fsyncs, a rename and an unlink a blob).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import _storage as s

from onprem_label.storage import format as fmt
from onprem_label.storage import open_keyring, open_store
from onprem_label.storage.rotation import key_usage, rotate_master_key

BLOB_BYTES = 512
SAMPLE = 200


class OutOfTime(Exception):
    """--max-seconds passed during a rotation."""


def write_blob_unsynced(store, name_key: bytes, content: bytes) -> str:
    """Write one single-chunk blob file exactly as put() would, without fsync; its id."""
    master_id, master_key = store.keyring.current()
    data_key, salt = os.urandom(fmt.DATA_KEY_BYTES), os.urandom(fmt.SALT_BYTES)
    keys = fmt.BlobKeys(data_key, salt)
    blob_id = hmac.new(name_key, content, hashlib.sha256).digest()
    header = fmt.Header(store.chunk_size, master_id, salt, fmt.wrap_key(master_key, data_key),
                        blob_id, b"")
    header = dataclasses.replace(header, mac=keys.header_mac(header.signed_part()))
    path = store.path_of(blob_id.hex())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "xb") as out:
        out.write(header.to_bytes() + fmt.seal_chunk(keys.payload, salt, 0, True, content))
    return blob_id.hex()


def create_blobs(store, count: int, how: str) -> tuple[list[str], float]:
    """Make `count` distinct 512-byte blobs; (their ids, seconds including the final sync)."""
    name_key = store.keyring.purpose_key("blob-names")
    ids = []
    t0 = time.perf_counter()
    for i in range(count):
        content = i.to_bytes(8, "big") + os.urandom(BLOB_BYTES - 8)  # distinct: no dedup
        if how == "put":
            ids.append(store.put(io.BytesIO(content)).blob_id)
        else:
            ids.append(write_blob_unsynced(store, name_key, content))
        if (i + 1) % max(1, count // 10) == 0:
            print(f"  created {i + 1}/{count} ({time.perf_counter() - t0:.0f} s)", flush=True)
    os.sync()
    return ids, time.perf_counter() - t0


def verify_sample(settings, ids: list[str], seed: int) -> int:
    """store.verify (every chunk, the header MAC and the content hash) on a sample, freshly opened."""
    store = open_store(settings, open_keyring(settings))
    sample = random.Random(seed).sample(ids, min(SAMPLE, len(ids)))
    for blob_id in sample:
        if store.verify(blob_id) != BLOB_BYTES:
            raise SystemExit(f"blob {blob_id} has the wrong size")
    return len(sample)


def rotate_once(settings, count: int, deadline: float) -> tuple[float, object]:
    """One full rotation; (seconds, report). OutOfTime when --max-seconds passes."""
    done = [0]
    t0 = time.perf_counter()

    def progress(step: int) -> None:
        done[0] += step
        if done[0] % max(1, count // 5) == 0:
            print(f"  re-wrapped {done[0]}/{count} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if time.monotonic() > deadline:
            raise OutOfTime(f"{done[0]} blobs re-wrapped in {time.perf_counter() - t0:.0f} s")

    report = rotate_master_key(settings.data_path, settings.key_path,
                               lambda keyring: open_store(settings, keyring), progress=progress)
    return time.perf_counter() - t0, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=100_000, help="number of blobs")
    parser.add_argument("--rotations", type=int, default=3, help="rotations timed in a row")
    parser.add_argument("--create", choices=("fast", "put"), default="fast",
                        help="how the blobs are made (see the module docstring)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the data directory goes")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many s for the machine to go idle before each rotation")
    parser.add_argument("--max-seconds", type=float, default=7200.0,
                        help="give up (and say so) after this many s in all")
    args = parser.parse_args()
    count = max(1, min(args.blobs, 1_000_000))
    rotations = max(1, min(args.rotations, 10))
    deadline = time.monotonic() + args.max_seconds

    print(c.machine_summary())
    s.require_free_disk(Path(args.tmp), count * 8192 + 256 * s.MIB)  # a 4 KiB file + inode each
    with tempfile.TemporaryDirectory(prefix="onprem-bench-", dir=args.tmp) as tmp:
        settings, store = s.new_store(Path(tmp))
        print(f"creating {count} blobs of {BLOB_BYTES} B ({args.create}) in {settings.data_path}")
        ids, create_s = create_blobs(store, count, args.create)
        print(f"created {count} blobs in {create_s:.1f} s ({count / create_s:.0f} blobs/s, "
              f"{args.create}, including one final sync); store.verify OK on "
              f"{verify_sample(settings, ids, 1)} sampled blobs")
        seconds = []
        for i in range(rotations):
            before, waited = c.wait_for_quiet(args.quiet_wait)
            load = c.MachineLoad().start()
            try:
                took, report = rotate_once(settings, count, deadline)
            except OutOfTime as exc:
                print(f"rotation {i + 1} stopped by --max-seconds {args.max_seconds:g}: {exc}; "
                      "no figure for it")
                break
            busy = load.stop()
            if report.rewrapped != count or report.already_new:
                raise SystemExit(f"rotation {i + 1} re-wrapped {report.rewrapped} of {count}")
            usage = key_usage(open_store(settings, open_keyring(settings)))
            if usage != {report.new_key_id: count}:
                raise SystemExit(f"after rotation {i + 1} blobs by key: {usage}")
            seconds.append(took)
            print(f"rotation {i + 1}: {report.old_key_id} -> {report.new_key_id}: {count} blobs "
                  f"in {took:.1f} s ({count / took:.0f} blobs/s, {took / count * 1000:.2f} ms a "
                  f"blob); all {count} headers now on the new key; store.verify OK on "
                  f"{verify_sample(settings, ids, i + 2)} sampled blobs; "
                  f"machine busy before {before:.0%} (waited {waited:.0f} s), during {busy:.0%}")
    if not seconds:
        return 1
    med = c.median(seconds)
    print(f"rotation of {count} blobs, median of {len(seconds)}: {med:.1f} s (min "
          f"{min(seconds):.1f}, max {max(seconds):.1f}); {count / med:.0f} blobs/s; no goal set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
