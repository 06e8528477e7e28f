"""Preparing many files in worker processes while the caller stores the results in order."""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable

from onprem_label.imaging import errors
from onprem_label.imaging.errors import Rejected
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
        return Rejected(errors.NOT_AN_IMAGE, f"cannot read the file ({exc.strerror})")


def run_batch(sources: Iterable[Source], options: PrepareOptions, workers: int,
              handle: Callable[[Source, Prepared | Rejected], None]) -> None:
    """Prepare every source (in `workers` processes when > 1) and hand each result to `handle`.

    Results arrive in source order. At most two per worker are in flight, so memory stays
    bounded however many files there are (a prepared file holds its de-identified bytes).
    """
    if workers <= 1:
        for source in sources:
            handle(source, prepare_source(source, options))
        return
    # spawn, not fork: the parent holds database connections and threads a fork would copy.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque = deque()
        for source in sources:
            pending.append((source, pool.submit(prepare_source, source, options)))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                handle(done, future.result())
        while pending:
            done, future = pending.popleft()
            handle(done, future.result())
