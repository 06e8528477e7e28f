"""Copy files and hash them in the same pass, several at once; hash files in place; make them durable."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable

from onprem_label.backup.errors import BackupError

BUFFER_BYTES = 4 << 20
# Four workers on two cores: while one waits for the disk another hashes (hashlib and file I/O
# release the GIL); measured in bench/backup_restore.py.
WORKERS = 4


def copy_hashed(source: Path, target: Path, *, head_bytes: int = 0, buffer: bytearray | None = None,
                expect: str | None = None) -> tuple[int, str, bytes]:
    """Copy `source` to a new file `target` (mode 0600), hashing what is written: (size, sha256, head).

    `expect`: the SHA-256 the bytes must have; on a mismatch the target is removed and ValueError
    raised, so a restore never leaves a file it could not vouch for.
    """
    buffer = buffer if buffer is not None else bytearray(BUFFER_BYTES)
    view, digest, size, head = memoryview(buffer), hashlib.sha256(), 0, b""
    with open(source, "rb", buffering=0) as src:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
                while count := src.readinto(view):
                    chunk = view[:count]
                    if size < head_bytes:
                        head += bytes(chunk[:head_bytes - size])
                    digest.update(chunk)
                    while chunk:
                        chunk = chunk[out.write(chunk):]
                    size += count
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    hexdigest = digest.hexdigest()
    if expect is not None and hexdigest != expect:
        target.unlink(missing_ok=True)
        raise ValueError(f"{source} does not match its checksum in the manifest")
    return size, hexdigest, head


def hash_file(path: Path, buffer: bytearray | None = None) -> tuple[int, str]:
    """(size, SHA-256) of a file."""
    buffer = buffer if buffer is not None else bytearray(BUFFER_BYTES)
    view, digest, size = memoryview(buffer), hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as fh:
        while count := fh.readinto(view):
            digest.update(view[:count])
            size += count
    return size, digest.hexdigest()


def parallel(jobs: Iterable, work: Callable, progress: Callable[[int], None] | None = None,
             weight: Callable = lambda result: 1) -> list:
    """Run `work(job, buffer)` over `jobs` on WORKERS threads (one reused buffer each); results in order.

    `progress(n)` is called in this thread as each result arrives, with `weight(result)`.
    The first exception stops the rest and is raised.
    """
    import threading

    local = threading.local()

    def run(job):
        if not hasattr(local, "buffer"):
            local.buffer = bytearray(BUFFER_BYTES)
        return work(job, local.buffer)

    jobs = list(jobs)
    results = []
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="backup-copy") as pool:
        futures = [pool.submit(run, job) for job in jobs]
        try:
            for future in futures:
                result = future.result()
                results.append(result)
                if progress is not None:
                    progress(weight(result))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def _libc_syncfs():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _libc_syncfs()


def sync_tree(root: Path) -> None:
    """Make every file written under `root` durable: syncfs(2) on its filesystem, else sync(2).

    One call instead of an fsync per file: the kernel writes everything back in one go.
    """
    fd = os.open(root, os.O_RDONLY)
    try:
        if _SYNCFS is None:
            os.sync()
        elif _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            if err != errno.ENOSYS:
                # Since Linux 5.8 syncfs reports write-back errors: the data may not be on disk,
                # so no manifest may say it is (sync(2) would report nothing).
                raise BackupError(f"writing the backup to disk failed (syncfs: {os.strerror(err)}); it is not complete")
            os.sync()
    finally:
        os.close(fd)


def remove_made(folder: Path, made: bool, keep: set[str] = frozenset()) -> None:
    """Undo a folder this run filled: remove it if it made it, else empty it again but for `keep`."""
    if made:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for child in folder.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def no_progress(_label: str, _total: int):
    """A progress callback that shows nothing (the core's default; the CLI passes click's bars)."""
    class _Bar:
        def update(self, _n: int) -> None:
            pass
    return nullcontext(_Bar())
