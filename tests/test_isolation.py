"""Isolated decoding: a worker that dies costs its own file only; the pool comes back."""

from __future__ import annotations

import os

import pytest

from imaging_helpers import make_dicom
from onprem_label.imaging.batch import run_batch
from onprem_label.imaging.deidentify import DeidSettings
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.isolation import CRASHED, WorkerPool, decode_deadline
from onprem_label.imaging.prepare import Prepared, PrepareOptions
from onprem_label.imaging.sources import Source

OPTIONS = PrepareOptions(deid=DeidSettings(uid_key=b"k" * 32), digest_key=b"d" * 32,
                         raster_max_pixels=10**7, max_bytes=1 << 30)


def die(code: int) -> int:
    """Ends the worker process the way a C++ abort would (no Python exception, no cleanup)."""
    os._exit(code)


def square(value: int) -> int:
    """An innocent job."""
    return value * value


@pytest.fixture
def pool():
    """A two-worker pool, stopped after the test."""
    workers = WorkerPool(2)
    yield workers
    workers.close()


def test_a_dying_worker_is_a_rejection_and_the_pool_recovers(pool):
    """run() of a job that kills its worker raises Rejected(CRASHED); the next job runs normally."""
    assert pool.run(square, 7) == 49
    with pytest.raises(Rejected) as caught:
        pool.run(die, 3)
    assert caught.value.reason == CRASHED and caught.value.code == "corrupt"
    assert pool.run(square, 9) == 81


def test_batch_rejects_only_the_file_that_kills_its_worker(tmp_path):
    """In a batch, a file whose decoding ends the worker is rejected; files around it are imported."""
    names = []
    for n in range(5):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(make_dicom(seed=n))
        names.append(str(path))
    killer = tmp_path / "killer.dcm"
    killer.write_bytes(b"KILL" + make_dicom(seed=99))
    sources = [Source(name, name) for name in names[:2]] + [Source(str(killer), str(killer))] + \
              [Source(name, name) for name in names[2:]]
    outcomes = {}
    run_batch(sources, OPTIONS, 2, lambda source, outcome: outcomes.__setitem__(source.name, outcome),
              prepare=prepare_or_die)
    assert isinstance(outcomes[str(killer)], Rejected) and outcomes[str(killer)].reason == CRASHED
    assert all(isinstance(outcomes[name], Prepared) for name in names)
    assert list(outcomes) == [s.name for s in sources]  # results in source order


def prepare_or_die(source: Source, options: PrepareOptions):
    """prepare_source, except that a file starting with KILL ends the worker process."""
    from onprem_label.imaging.batch import prepare_source

    with open(source.path, "rb") as fh:
        if fh.read(4) == b"KILL":
            os._exit(134)
    return prepare_source(source, options)


def hang(source: Source, options: PrepareOptions):
    """A decoder caught in a loop: never returns (sleep stands in for a C loop no signal handler reaches)."""
    import time

    with decode_deadline(options.decode_timeout):
        time.sleep(3600)


def test_a_file_that_hangs_its_decoder_is_rejected_after_the_deadline(tmp_path):
    """decode_deadline ends a stuck worker; the file is rejected and the batch goes on."""
    from dataclasses import replace

    path = tmp_path / "fine.dcm"
    path.write_bytes(make_dicom(seed=5))
    outcomes = []
    options = replace(OPTIONS, decode_timeout=1)
    run_batch([Source("stuck", "stuck")], options, 1, lambda s, o: outcomes.append(o), prepare=hang)
    run_batch([Source(str(path), str(path))], options, 1, lambda s, o: outcomes.append(o))
    assert isinstance(outcomes[0], Rejected) and outcomes[0].reason == CRASHED
    assert "ingest_decode_timeout" in CRASHED
    assert isinstance(outcomes[1], Prepared)


def test_decode_deadline_does_nothing_outside_a_worker():
    """In the server or CLI process itself the deadline is never armed (it would end that process)."""
    import signal

    with decode_deadline(1):
        assert signal.alarm(0) == 0  # no alarm was pending


def test_two_killers_in_one_batch_never_blame_the_files_between_them(tmp_path):
    """Each retry runs in a pool of its own: a file retried beside another killer is not rejected for it."""
    sources = []
    for n, kind in enumerate(["KILL", "good", "KILL", "good", "good", "KILL", "good"]):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes((b"KILL" if kind == "KILL" else b"") + make_dicom(seed=200 + n))
        sources.append((kind, Source(str(path), str(path))))
    outcomes = {}
    run_batch([s for _, s in sources], OPTIONS, 2, lambda source, outcome: outcomes.__setitem__(source.name, outcome),
              prepare=prepare_or_die)
    for kind, source in sources:
        if kind == "KILL":
            assert isinstance(outcomes[source.name], Rejected) and outcomes[source.name].reason == CRASHED
        else:
            assert isinstance(outcomes[source.name], Prepared), (source.name, outcomes[source.name])


_ORPHAN_SCRIPT = """
import os, sys, time
from onprem_label.imaging.isolation import WorkerPool
pool = WorkerPool(1)
print(pool.run(os.getpid), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for a reaper has ended)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\tZ" not in next(line for line in f if line.startswith("State:"))
    except FileNotFoundError:
        return False


def test_workers_end_when_their_parent_is_killed():
    """A server killed with SIGKILL leaves no decoding worker behind (they would hold memory for ever)."""
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        assert _alive(worker)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        parent.stdout.close()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), f"worker {worker} outlived its parent"
