"""Decoding untrusted files in worker processes: a decoder that crashes costs one file, not the server.

Image decoders are C, C++ and Rust libraries. On hostile input some of them abort the whole
process (GDCM throws a C++ exception past pydicom: SIGABRT) or hang. So every file is read,
decoded and de-identified in a spawned worker; if the worker dies, the pool is replaced and the
files that were in flight are tried once more, each in a pool of its own making, so the file
that killed a worker twice is rejected and the others go through.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from contextlib import contextmanager
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterator

from onprem_label.imaging import errors
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.prepare import Prepared, PrepareOptions, prepare_or_reject
from onprem_label.logs import configure_worker, worker_config
from onprem_label.storage import EncryptedBlobStore, Keyring

CRASHED = ("the file crashed the image decoder, or decoding it took longer than the limit "
           "(ingest_decode_timeout)")
ATTEMPTS = 2


class WorkerPool:
    """A spawned process pool that replaces itself when a worker dies."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args: Any) -> tuple[Future, ProcessPoolExecutor]:
        """Run fn(*args) in a worker; returns the future and the pool it went to."""
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the parent holds database connections and threads.
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=start_worker,
                                                 initargs=(os.getpid(), worker_config()))
            pool = self._pool
        try:
            return pool.submit(fn, *args), pool
        except BrokenProcessPool:
            self.renew(pool)
            return self.submit(fn, *args)

    def renew(self, broken: ProcessPoolExecutor) -> None:
        """Replace `broken` (if it is still the current pool) with a fresh one on next use."""
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)

    def run(self, fn: Callable, *args: Any) -> Any:
        """fn(*args) in a worker, retried once in a fresh pool if a worker died meanwhile.

        Raises Rejected(CRASHED) when it still dies: this file is the one that kills workers.
        """
        for attempt in range(ATTEMPTS):
            future, pool = self.submit(fn, *args)
            try:
                return future.result()
            except BrokenProcessPool:
                self.renew(pool)
        raise Rejected(errors.CORRUPT, CRASHED)

    def close(self) -> None:
        """Stop the workers."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def start_worker(parent_pid: int, log_config: dict) -> None:
    """Worker initializer: log like the parent (logs.configure_worker), and die with it."""
    configure_worker(log_config)
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this worker when the process that started it ends, however it ends.

    A `serve` killed with SIGKILL runs no exit handler, and its idle workers would otherwise live
    on as orphans, each holding its memory. Linux delivers SIGKILL to the child when the parent
    dies (prctl PR_SET_PDEATHSIG); elsewhere a watcher thread notices the parent is gone.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # it died before the signal was asked for
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(2.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_shared: dict[int, WorkerPool] = {}
_shared_lock = threading.Lock()


def shared_pool(workers: int) -> WorkerPool:
    """One pool per process and size: every app in a process (and every test) shares its workers."""
    with _shared_lock:
        if workers not in _shared:
            _shared[workers] = WorkerPool(workers)
        return _shared[workers]


def _forget_pools_in_child() -> None:
    # A forked child inherits the pools without their manager threads (and maybe a held lock):
    # it must start its own, never touch the parent's.
    global _shared, _shared_lock
    _shared, _shared_lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_in_child)


@contextmanager
def decode_deadline(seconds: int) -> Iterator[None]:
    """In a worker process: end the process if the work inside takes longer than `seconds`.

    A decoder caught in a loop by a hostile file never returns to Python, so no exception can
    stop it; SIGALRM's default action ends the process, which the pool then treats as a crash
    (the file is tried once more alone, then rejected). Outside worker processes this does nothing.
    """
    armed = seconds > 0 and multiprocessing.parent_process() is not None
    if armed:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(seconds)
    try:
        yield
    finally:
        if armed:
            signal.alarm(0)


def prepare_staged(root: str, keyring: Keyring, blob_id: str, options: PrepareOptions,
                   digest: str) -> Prepared | Rejected:
    """Worker: prepare an upload sealed in a staging store (decrypted in the worker's memory only)."""
    try:
        with (decode_deadline(options.decode_timeout),
              EncryptedBlobStore(Path(root), keyring).open(blob_id) as stream):
            return prepare_or_reject(stream, options, digest=digest)
    except Rejected as exc:
        return exc
