"""Benchmark: C-STORE receive rate of `dicom-listen` vs dcmtk's `storescp`, 512 x 512 CT slices from `storescu`.

Goal (issue 9): our instances/s >= 80% of storescp's on the same machine in the same run.
Usage: .venv/bin/python bench/cstore_rate.py [--slices 500] [--runs 3] [--backend sqlite|postgresql]
       [--workers N] [--parts 100] [--nagle] [--bare]

The slices are made once with ingest_throughput.py's generator (16-bit signed CT, explicit VR
little endian, identifying attributes and a private group, ~0.5 MB each), one series. Each run,
alternating which goes first:
  - storescp: `storescp --output-directory TMP PORT` (it writes each file, no fsync), then
    `storescu +sd -nh TREE` into it, wall clock of storescu; the output is deleted (untimed);
  - ours: `onprem-label dicom-listen` (started once, default workers), a fresh project whose
    dicom_callers list this run's calling AE title, then the same storescu, wall clock of
    storescu (every success answer means de-identified and sealed in the spool), and the time until
    the association's last batch committed (its `dicom:association_end` audit event).
Both dcmtk programs run with TCP_NODELAY=1 (dcmtk's switch for Nagle's algorithm): without it, this
Debian build lets Nagle and delayed ACKs hold each exchange ~40 ms, which caps storescp near
22 instances/s and would make any receiver look good (--nagle measures that way instead).

With --bare, each run also sends the tree to a pynetdicom SCP that answers success and does nothing
else: the rate the library's message loop allows before any work of ours.
With --parts N, N slices are then sent once more to a receiver in this process whose steps are
timed alone (digest, spool put, prepare in the worker, the batch stores per instance).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import _common as c
from ingest_throughput import make_tree

GOAL_RATIO = 0.8
AE_TITLE = "ONPREMLABEL"


def dcmtk_env(nagle: bool) -> dict[str, str]:
    """The environment of storescu and storescp (see the module docstring on TCP_NODELAY)."""
    env = c.clean_env()
    if not nagle:
        env["TCP_NODELAY"] = "1"
    return env


def send(tree: Path, port: int, calling: str, called: str, env: dict[str, str], timeout: float) -> float:
    """Wall seconds of one storescu run sending the tree in one association; raise on failure."""
    t0 = time.perf_counter()
    result = subprocess.run(["storescu", "-aet", calling, "-aec", called, "+sd", "+r", "-nh", "127.0.0.1", str(port),
                             str(tree)], capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"storescu exited {result.returncode}: {(result.stdout + result.stderr)[-400:]}")
    return wall


def storescp_once(tree: Path, base: Path, files: int, env: dict[str, str], timeout: float) -> float:
    """storescp into a fresh folder; storescu's wall seconds."""
    out = base / "storescp-out"
    out.mkdir()
    port = c.free_port()
    log = base / "storescp.log"
    proc = subprocess.Popen(["storescp", "--output-directory", str(out), str(port)], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)  # it binds at once; no readiness line to wait for
        wall = send(tree, port, "BENCH", "STORESCP", env, timeout)
        received = sum(1 for _ in out.iterdir())
        if received != files:
            raise RuntimeError(f"storescp wrote {received} of {files} files")
        return wall
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(out)


# The ceiling of any receiver built on pynetdicom: an SCP that answers success without decoding,
# keeping or writing anything, with dicom-listen's PDU size. Its rate against storescp's is what
# pynetdicom's own message loop allows before any work of ours.
_BARE_SCP = """
import sys
from pynetdicom import AE, AllStoragePresentationContexts, evt
from onprem_label.dicomnet.receiver import MAX_PDU
ae = AE(ae_title="BARE")
ae.maximum_pdu_size = MAX_PDU
ae.supported_contexts = AllStoragePresentationContexts
print("ready", flush=True)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
"""


def bare_once(tree: Path, base: Path, env: dict[str, str], timeout: float) -> float:
    """A bare pynetdicom SCP (see _BARE_SCP); storescu's wall seconds."""
    port = c.free_port()
    proc = subprocess.Popen([sys.executable, "-c", _BARE_SCP, str(port)], env=c.clean_env(), stdout=subprocess.PIPE,
                            stderr=open(base / "bare.log", "wb"))
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the bare SCP did not start")
        time.sleep(0.2)
        return send(tree, port, "BENCH", "BARE", env, timeout)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Listener:
    """`onprem-label dicom-listen` on a site with one project per run (each with its own calling AE)."""

    def __init__(self, base: Path, database_url: str, workers: int | None):
        self.data, self.url = base / "data", database_url
        extra = {"ONPREM_LABEL_DATABASE_URL": database_url} if database_url else {}
        self.env = {**c.clean_env(), **extra}
        subprocess.run([*c.onprem_label_command(), "--data-dir", str(self.data), "init"], check=True,
                       capture_output=True, env=self.env, timeout=120)
        self.port = c.free_port()
        argv = [*c.onprem_label_command(), "--data-dir", str(self.data), "dicom-listen", "--port", str(self.port)]
        if workers:
            argv += ["--workers", str(workers)]
        self.proc = c.start_process(argv, base / "listen.log", extra_env=extra)
        deadline = time.monotonic() + 60
        while "dicom-listen: AE" not in (base / "listen.log").read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dicom-listen did not start: {c.log_tail(self.proc)}")
            time.sleep(0.05)
        from onprem_label.db import make_engine

        self.engine = make_engine(database_url or f"sqlite:///{self.data / 'onprem-label.db'}")
        self.maker = c.site_sessionmaker(self.data, self.engine)

    def new_project(self, calling: str) -> int:
        """A project that lists `calling` from loopback."""
        from onprem_label.clock import utcnow
        from onprem_label.workflow.projects import create_project

        with self.maker() as db:
            project = create_project(db, f"bench {calling}", actor_name="bench", now=utcnow(),
                                     settings={"dicom_callers": [{"ae_title": calling, "address": "127.0.0.1"}]})
            db.commit()
            return project.id

    def committed(self, project_id: int) -> tuple[int, bool]:
        """(items of the project, whether its association's end is audited)."""
        from sqlalchemy import func, select

        from onprem_label.db.models import AuditEvent, Item

        with self.maker() as db:
            items = db.scalar(select(func.count()).select_from(Item).where(Item.project_id == project_id))
            ended = db.scalar(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.action == "dicom:association_end", AuditEvent.object_id == str(project_id)))
            return items, bool(ended)

    def once(self, tree: Path, files: int, run: int, env: dict[str, str], timeout: float) -> tuple[float, float]:
        """(storescu wall s, s until the last batch committed) for one run."""
        calling = f"BENCH{run}"
        project_id = self.new_project(calling)
        t0 = time.perf_counter()
        wall = send(tree, self.port, calling, AE_TITLE, env, timeout)
        while not self.committed(project_id)[1]:
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError("the association's end was never audited")
            time.sleep(0.02)
        done = time.perf_counter() - t0
        items, _ = self.committed(project_id)
        if items != files:
            raise RuntimeError(f"dicom-listen stored {items} of {files} slices")
        return wall, done

    def close(self) -> None:
        """Stop the listener (SIGINT: the graceful path) and the engine."""
        c.stop_process(self.proc, timeout=60)
        self.engine.dispose()


def parts(tree: Path, base: Path, count: int, env: dict[str, str], workers: int) -> dict[str, list[float]]:
    """Seconds of each receive step for `count` slices, the receiver in this process (see --parts)."""
    from onprem_label.clock import utcnow
    from onprem_label.config import load_settings
    from onprem_label.db import make_engine
    from onprem_label.dicomnet import receiver as r
    from onprem_label.imaging.prepare import prepare_options
    from onprem_label.storage import open_keyring, open_store
    from onprem_label.workflow.projects import create_project

    data = base / "parts-data"
    subprocess.run([*c.onprem_label_command(), "--data-dir", str(data), "init"], check=True, capture_output=True,
                   env=c.clean_env(), timeout=120)
    settings = load_settings({"data_dir": str(data)}, env={})
    keyring = open_keyring(settings)
    engine = make_engine(settings.effective_database_url)
    maker = c.site_sessionmaker(data, engine)
    with maker() as db:
        project = create_project(db, "parts", actor_name="bench", now=utcnow(),
                                 settings={"dicom_callers": [{"ae_title": "PARTS", "address": "127.0.0.1"}]})
        db.commit()
    times: dict[str, list[float]] = {}

    def timed(name: str, fn, per: int = 1):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times.setdefault(name, []).append((time.perf_counter() - t0) / per)
        return wrapper

    receiver = r.Receiver(r.ReceiverConfig(AE_TITLE, "127.0.0.1", 0, data, workers=workers), maker,
                          open_store(settings, keyring), keyring, prepare_options(settings, keyring))
    receiver._receive = timed("handler: digest + spool put + prepare (critical path)", receiver._receive)
    handled = receiver._on_store
    last_end: list[float] = []

    def on_store(event):  # the time between two handlers: network, pynetdicom, storescu
        start = time.perf_counter()
        if last_end:
            times.setdefault("between handlers (storescu, network, pynetdicom's PDU loop)", []).append(
                start - last_end[0])
        try:
            return handled(event)
        finally:
            last_end[:] = [time.perf_counter()]
    receiver._on_store = on_store
    receiver._pool.run = timed("  prepare in the worker (decode, de-identify, write; IPC)", receiver._pool.run)
    originals = (r.Spool.put, r.source_digest, r.store_batch)
    r.Spool.put = timed("  spool put (encrypt + fsync)", r.Spool.put)
    r.source_digest = timed("  source_digest (HMAC)", r.source_digest)
    r.store_batch = lambda db, store, target, files, **kw: timed(
        f"storer thread: store_batch, per instance ({r.BATCH_FILES} a batch)", originals[2], len(files))(
        db, store, target, files, **kw)
    try:
        port = receiver.start()
        subset = base / "parts-tree"
        subset.mkdir()
        for path in sorted(tree.rglob("*.dcm"))[:count]:
            os.link(path, subset / path.name)
        wall = send(subset, port, "PARTS", AE_TITLE, env, 600)
        times["storescu wall per instance"] = [wall / count]
    finally:
        receiver.stop()
        r.Spool.put, r.source_digest, r.store_batch = originals
        engine.dispose()
    return times


def compare(args, tree: Path, base: Path, env: dict[str, str]) -> None:
    """The alternating runs of storescp and dicom-listen; prints each run, the medians and the verdict."""
    with ExitStack() as stack:
        url = stack.enter_context(c.postgres_database("onprem_bench_cstore")) if args.backend == "postgresql" else ""
        ours, done, theirs, bare = _alternate(args, tree, base, env, url)
    rate, their_rate = args.slices / c.median(ours), args.slices / c.median(theirs)
    committed_rate = args.slices / c.median(done)
    ratio = rate / their_rate
    if bare:
        bare_rate = args.slices / c.median(bare)
        print(f"{args.backend}: bare pynetdicom SCP (answers without any work) median {bare_rate:.1f} instances/s: "
              f"{bare_rate / their_rate:.3f} of storescp; dicom-listen is {rate / bare_rate:.3f} of it")
    print(f"{args.backend}: dicom-listen median {rate:.1f} instances/s (until the last commit "
          f"{committed_rate:.1f}/s), storescp median {their_rate:.1f}/s, over {args.runs} runs of "
          f"{args.slices} slices: ratio {ratio:.3f} (goal >= {GOAL_RATIO}) {'PASS' if ratio >= GOAL_RATIO else 'FAIL'}")


def _alternate(args, tree: Path, base: Path, env: dict[str, str], url: str) -> tuple[list, list, list, list]:
    """(our storescu seconds, our seconds until committed, storescp's seconds, the bare SCP's seconds)
    per run, alternating (the bare SCP last in each run, with --bare)."""
    listener = Listener(base / "ours", url, args.workers)
    ours, done, theirs, bare = [], [], [], []
    try:
        listener.once(tree, args.slices, 0, env, args.timeout)  # warm-up: worker start, page cache
        for run in range(1, args.runs + 1):
            order = ("storescp", "ours") if run % 2 else ("ours", "storescp")
            for which in order:
                load = c.MachineLoad().start()
                if which == "storescp":
                    theirs.append(storescp_once(tree, base, args.slices, env, args.timeout))
                    figure = f"{args.slices / theirs[-1]:.1f}/s"
                else:
                    wall, committed = listener.once(tree, args.slices, run, env, args.timeout)
                    ours.append(wall)
                    done.append(committed)
                    figure = f"{args.slices / wall:.1f}/s (all committed {args.slices / committed:.1f}/s)"
                print(f"run {run} {which}: {figure}; machine busy {load.stop():.0%}")
            if args.bare:
                bare.append(bare_once(tree, base, env, args.timeout))
                print(f"run {run} bare pynetdicom SCP: {args.slices / bare[-1]:.1f}/s")
    finally:
        listener.close()
    return ours, done, theirs, bare


def main() -> int:
    """Make the slices, alternate the two receivers, print medians, the ratio and the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parts-only", action="store_true", help="only the per-step timing")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--workers", type=int, default=None, help="dicom-listen --workers (default: its own)")
    parser.add_argument("--parts", type=int, default=100, help="slices for the per-step timing; 0 skips it")
    parser.add_argument("--nagle", action="store_true", help="leave TCP_NODELAY unset for dcmtk")
    parser.add_argument("--bare", action="store_true", help="also time a bare pynetdicom SCP (the library's ceiling)")
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--quiet-wait", type=float, default=60)
    args = parser.parse_args()
    for program in ("storescu", "storescp"):
        if shutil.which(program) is None:
            print(f"{program} is missing: apt-get install dcmtk", file=sys.stderr)
            return 2
    print(c.machine_summary())
    busy, waited = c.wait_for_quiet(args.quiet_wait)
    print(f"machine busy {busy:.0%} at start (waited {waited:.0f} s)")
    env = dcmtk_env(args.nagle)
    with tempfile.TemporaryDirectory(prefix="onprem-cstore-", dir=args.tmp) as tmp:
        base = Path(tmp)
        c.set_pycache_dir(base / "pycache")
        tree = base / "tree"
        size = make_tree(tree, args.slices, per_series=args.slices)
        print(f"{args.slices} slices, {size / args.slices / 1e6:.2f} MB each, one series; "
              f"dcmtk TCP_NODELAY={'unset' if args.nagle else '1'}; backend {args.backend}")
        if not args.parts_only:
            compare(args, tree, base, env)
        if args.parts:
            times = parts(tree, base, min(args.parts, args.slices), env, args.workers or os.cpu_count() or 1)
            print(f"per-step medians over {min(args.parts, args.slices)} slices (ms per instance):")
            for step, values in times.items():
                print(f"  {step:<72} {1000 * c.median(values):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
