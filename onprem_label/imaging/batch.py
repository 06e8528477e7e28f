"""Preparing many files in isolated worker processes while the caller stores the results in order."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable

from onprem_label.imaging import errors
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.isolation import CRASHED, WorkerPool, decode_deadline
from onprem_label.imaging.prepare import Prepared, PrepareOptions, prepare_or_reject
from onprem_label.imaging.sources import Source, open_source


def prepare_source(source: Source, options: PrepareOptions) -> Prepared | Rejected:
    """Prepare one source; every failure comes back as a Rejected, so one file never stops a batch."""
    if source.problem is not None:
        return source.problem
    try:
        with decode_deadline(options.decode_timeout), open_source(source) as stream:
            return prepare_or_reject(stream, options)
    except Rejected as exc:
        return exc
    except OSError as exc:  # closing a source that vanished mid-read
        return Rejected(errors.UNREADABLE, f"cannot read the file ({exc.strerror})")


def run_batch(sources: Iterable[Source], options: PrepareOptions, workers: int,
              handle: Callable[[Source, Any], None], *,
              prepare: Callable[[Source, PrepareOptions], Prepared | Rejected] = prepare_source,
              known: Callable[[Source], Any] | None = None) -> None:
    """Prepare every source in `workers` isolated processes and hand each result to `handle`.

    Results arrive in source order. At most two per worker are in flight, so memory stays
    bounded however many files there are (a prepared file holds its de-identified bytes). When a
    worker dies (a decoder crashed), each file that was in flight is tried again alone in a
    fresh pool: the one that kills it again is rejected, the others go through. `prepare` runs
    in the workers (a module-level function; tests pass one that crashes on purpose).
    `known(source)` runs here first: a result other than None (a file already imported, say)
    is handed on as it is, and the file is never decoded.
    """
    pool = WorkerPool(workers)
    pending: deque = deque()

    def finish_first() -> None:
        source, future, used = pending.popleft()
        try:
            outcome = future.result()
        except BrokenProcessPool:
            pool.renew(used)
            outcome = _alone(prepare, source, options)
        handle(source, outcome)

    try:
        for source in sources:
            outcome = known(source) if known is not None else None
            if outcome is not None:
                pending.append((source, _done(outcome), None))
            else:
                pending.append((source, *pool.submit(prepare, source, options)))
            if len(pending) >= 2 * pool.workers:
                finish_first()
        while pending:
            finish_first()
    finally:
        pool.close()


def _done(outcome: Any) -> Future:
    future: Future = Future()
    future.set_result(outcome)
    return future


def _alone(prepare, source: Source, options: PrepareOptions) -> Prepared | Rejected:
    """A second try for a file whose worker died, in a one-worker pool of its own: if it dies again,
    this file is the one that kills workers (another file's crash cannot be blamed on it)."""
    own = WorkerPool(1)
    try:
        future, _ = own.submit(prepare, source, options)
        return future.result()
    except BrokenProcessPool:
        return Rejected(errors.CORRUPT, CRASHED)
    finally:
        own.close()


class StoreBehind:
    """Groups results and stores each group in a background thread while preparing goes on.

    Storing a group is one transaction (imaging/ingest.py store_batch); while it runs, the
    workers keep preparing the next files, so neither waits for the other. Groups are stored
    in order, one at a time; at most one more waits, so memory stays bounded. `store(group)`
    gets a list of (source, outcome); an error it raises stops the run at the next result.
    """

    def __init__(self, store: Callable[[list], None], *, max_files: int = 64, max_bytes: int = 64 << 20,
                 max_seconds: float = 1.0):
        self._store, self._limits = store, (max_files, max_bytes, max_seconds)
        self._group: list = []
        self._bytes, self._since = 0, 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ingest-store", daemon=True)
        self._thread.start()

    def __call__(self, source: Source, outcome: Prepared | Rejected) -> None:
        """Take one result (run_batch's `handle`)."""
        self._raise_if_failed()
        if not self._group:
            self._since = time.monotonic()
        self._group.append((source, outcome))
        if isinstance(outcome, Prepared):
            self._bytes += sum(len(image.data) for image in outcome.images)
        max_files, max_bytes, max_seconds = self._limits
        if (len(self._group) >= max_files or self._bytes >= max_bytes
                or time.monotonic() - self._since >= max_seconds):
            self._hand_over()

    def close(self) -> None:
        """Store what is left and wait for the thread; re-raise its error."""
        self._hand_over()
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Drop what is not stored yet; wait for the group being stored (its transaction) to end."""
        self._group = []
        self._stopping = True  # a group still queued is not stored (see _run)
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()

    def _hand_over(self) -> None:
        if self._group:
            group, self._group, self._bytes = self._group, [], 0
            while True:  # wait for room, but notice a storer that died meanwhile
                self._raise_if_failed()
                try:
                    self._queue.put(group, timeout=0.5)
                    return
                except queue.Full:
                    continue

    def _run(self) -> None:
        while (group := self._queue.get()) is not None:
            if self._error is None and not self._stopping:
                try:
                    self._store(group)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
