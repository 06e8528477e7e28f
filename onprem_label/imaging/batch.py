"""Preparing many files in isolated worker processes while the caller stores the results in order."""

from __future__ import annotations

from collections import deque
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable

from onprem_label.imaging import errors
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.isolation import CRASHED, WorkerPool
from onprem_label.imaging.prepare import Prepared, PrepareOptions, prepare_or_reject
from onprem_label.imaging.sources import Source, open_source


def prepare_source(source: Source, options: PrepareOptions) -> Prepared | Rejected:
    """Prepare one source; every failure comes back as a Rejected, so one file never stops a batch."""
    if source.problem is not None:
        return source.problem
    try:
        with open_source(source) as stream:
            return prepare_or_reject(stream, options)
    except Rejected as exc:
        return exc
    except OSError as exc:  # closing a source that vanished mid-read
        return Rejected(errors.UNREADABLE, f"cannot read the file ({exc.strerror})")


def run_batch(sources: Iterable[Source], options: PrepareOptions, workers: int,
              handle: Callable[[Source, Prepared | Rejected], None], *,
              prepare: Callable[[Source, PrepareOptions], Prepared | Rejected] = prepare_source) -> None:
    """Prepare every source in `workers` isolated processes and hand each result to `handle`.

    Results arrive in source order. At most two per worker are in flight, so memory stays
    bounded however many files there are (a prepared file holds its de-identified bytes). When a
    worker dies (a decoder crashed), each file that was in flight is tried again alone in a
    fresh pool: the one that kills it again is rejected, the others go through. `prepare` runs
    in the workers (a module-level function; tests pass one that crashes on purpose).
    """
    pool = WorkerPool(workers)
    pending: deque = deque()

    def finish_first() -> None:
        source, future, used = pending.popleft()
        try:
            outcome = future.result()
        except BrokenProcessPool:
            pool.renew(used)
            outcome = _alone(pool, prepare, source, options)
        handle(source, outcome)

    try:
        for source in sources:
            pending.append((source, *pool.submit(prepare, source, options)))
            if len(pending) >= 2 * pool.workers:
                finish_first()
        while pending:
            finish_first()
    finally:
        pool.close()


def _alone(pool: WorkerPool, prepare, source: Source, options: PrepareOptions) -> Prepared | Rejected:
    """A second try for a file whose worker died, with nothing else in the fresh pool."""
    future, used = pool.submit(prepare, source, options)
    try:
        return future.result()
    except BrokenProcessPool:
        pool.renew(used)
        return Rejected(errors.CORRUPT, CRASHED)
