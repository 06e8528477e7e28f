"""Shared helpers for the storage benchmarks: a fresh store in a temp dir, disk space, /proc figures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from onprem_label.config import load_settings
from onprem_label.storage import init_keyring, open_store

MIB = 1 << 20


def new_store(base: Path, chunk_size: int | None = None):
    """(settings, store) of a fresh data directory `base/data`, its key file `base/data.key`.

    Made the way `onprem-label init` makes them (init_keyring), with only the data directory
    (and the chunk size, when given) set: no environment variable or config file counts.
    """
    explicit = {"data_dir": str(base / "data")}
    if chunk_size is not None:
        explicit["blob_chunk_size"] = chunk_size
    settings = load_settings(explicit, env={})
    keyring, _notes = init_keyring(settings)
    return settings, open_store(settings, keyring)


def require_free_disk(path: Path, needed: int) -> int:
    """Free bytes on the filesystem of `path`; SystemExit with one line when below `needed`."""
    free = shutil.disk_usage(path).free
    if free < needed:
        raise SystemExit(f"need {needed / 2**30:.1f} GiB free under {path}, have "
                         f"{free / 2**30:.1f} GiB; free some space or pass --tmp")
    return free


def proc_status_kib(field: str, pid: str = "self") -> int:
    """A `VmXXX:` figure of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def drop_cached_pages(path: Path) -> None:
    """Ask the kernel to drop a (synced) file's pages from the page cache, so the next read is cold."""
    with open(path, "rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

