"""Benchmark: disk footprint of the venv the offline bundle installs, per package; what .pyc buys at start.

Goal (issue 10): the installed venv <= 150 MB.
Usage: .venv/bin/python bench/venv_footprint.py [--archive dist/onprem-label-...tar.gz] [--runs 5]
       [--python /path/to/python3.12 --python-version 3.12] [--postgres]

Builds the bundle with installer/build-bundle (unless --archive is given), installs it with
`install.sh --venv-only` into a temporary venv, and reports: the venv's size (apparent bytes and
disk blocks), the size of every installed distribution from its RECORD (the .pyc files pip
compiled included), the share of .pyc, and the start of `serve` (spawn to first 200 from
/healthz) with the compiled .pyc and without them. The second case is what a venv installed with
`--no-compile` costs under the systemd unit: the venv is read-only there (ProtectSystem=strict),
so Python cannot write the .pyc and compiles every module again at every start
(simulated with an empty PYTHONPYCACHEPREFIX and PYTHONDONTWRITEBYTECODE).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import _common as c

GOAL_BYTES = 150 * 1000 * 1000  # "150 MB", read as decimal megabytes (the stricter reading)
REPO = Path(__file__).resolve().parents[1]


def build_archive(out: Path, python_version: str) -> Path:
    """The bundle for `python_version`, built by installer/build-bundle into `out`."""
    subprocess.run([sys.executable, str(REPO / "installer" / "build-bundle"), "--python-version",
                    python_version, "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return next(out.glob("*.tar.gz"))


def install(archive: Path, work: Path, python: str, postgres: bool) -> Path:
    """Unpack the bundle and install it with install.sh --venv-only; the venv."""
    with tarfile.open(archive) as tar:
        tar.extractall(work / "unpacked", filter="data")
    top = next((work / "unpacked").iterdir())
    venv = work / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    subprocess.run(["bash", str(top / "install.sh"), "--venv-only", "--venv", str(venv), "--python", python,
                    *(["--postgres"] if postgres else [])], check=True, env=env, stdout=subprocess.DEVNULL)
    return venv


def sizes(paths, seen: set | None = None) -> tuple[int, int]:
    """(apparent bytes, bytes of allocated disk blocks) of the regular files among `paths`.

    A file with several names (install.sh hard-links identical files) counts once, as du does;
    `seen` carries the inodes already counted across calls.
    """
    apparent = blocks = 0
    seen = set() if seen is None else seen
    for path in paths:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if path.is_symlink() or not path.is_file() or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        apparent += st.st_size
        blocks += st.st_blocks * 512
    return apparent, blocks


def per_distribution(venv: Path) -> list[tuple[str, int, int]]:
    """(name, apparent bytes, of which .pyc) for every distribution in the venv, by its RECORD."""
    site = next((venv / "lib").glob("python*/site-packages"))
    rows = []
    seen: set = set()
    for record in site.glob("*.dist-info/RECORD"):
        name = record.parent.name.removesuffix(".dist-info")
        files = []
        with record.open(newline="") as fh:
            for row in csv.reader(fh):
                if row:
                    files.append((site / row[0]).resolve())
        pyc, _ = sizes([f for f in files if f.suffix == ".pyc"], set(seen))
        total, _ = sizes(files, seen)
        rows.append((name, total, pyc))
    return sorted(rows, key=lambda r: -r[1])


def serve_start(venv: Path, base: Path, *, with_pyc: bool) -> float:
    """Seconds from spawning `serve` to its first 200 from /healthz (a fresh data directory)."""
    data = Path(tempfile.mkdtemp(dir=base)) / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONPREM_LABEL_", "PYTHON"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # like the read-only venv under the unit
    subprocess.run([str(venv / "bin" / "onprem-label"), "--data-dir", str(data), "init"], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    if not with_pyc:
        env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(dir=base)  # empty: every module compiles again
    port = c.free_port()
    log = (data.parent / "serve.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen([str(venv / "bin" / "onprem-label"), "--data-dir", str(data), "serve",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    proc.log_path = data.parent / "serve.log"  # for _common.log_tail
    try:
        t_up = c.wait_for_status(port, "/healthz", proc, timeout=60.0)
    finally:
        c.stop_process(proc)
        log.close()
    return t_up - t0


def mb(n: int) -> str:
    """Bytes as decimal MB with one decimal."""
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    """Build or take a bundle, install it, print the footprint table and the start times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, help="a built bundle (default: build one now)")
    parser.add_argument("--python", default=sys.executable, help="CPython to make the venv with")
    parser.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}")
    parser.add_argument("--postgres", action="store_true", help="install with the postgres extra")
    parser.add_argument("--runs", type=int, default=5, help="serve starts per case (median)")
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    args = parser.parse_args()

    print(c.machine_summary())
    with tempfile.TemporaryDirectory(prefix="venv-footprint-") as tmp:
        work = Path(tmp)
        archive = args.archive or build_archive(work / "dist", args.python_version)
        venv = install(archive, work, args.python, args.postgres)
        apparent, blocks = sizes(venv.rglob("*"))
        pyc, _ = sizes(venv.rglob("*.pyc"))
        print(f"bundle {archive.name}: {mb(archive.stat().st_size)} archive"
              f"{' (postgres extra installed)' if args.postgres else ''}")
        print(f"venv: {mb(apparent)} apparent, {mb(blocks)} on disk (du), of which .pyc {mb(pyc)}")
        print(f"  without .pyc: {mb(apparent - pyc)}")
        print("per distribution (RECORD, .pyc included):")
        rows = per_distribution(venv)
        for name, total, dist_pyc in rows:
            if total >= 500_000:
                print(f"  {name:28s} {mb(total):>10s}  (.pyc {mb(dist_pyc)})")
        small = [r for r in rows if r[1] < 500_000]
        print(f"  {len(small)} others under 0.5 MB: {mb(sum(r[1] for r in small))}")
        owned = sum(r[1] for r in rows)
        print(f"  not in any RECORD (interpreter links, pyvenv.cfg, caches): {mb(apparent - owned)}")

        busy, waited = c.wait_for_quiet(args.quiet_wait)
        print(f"machine busy {busy:.0%} at start (waited {waited:.0f} s)")
        serve_start(venv, work, with_pyc=True)  # warm the page cache once
        starts = {True: [], False: []}
        for _ in range(args.runs):
            for with_pyc in (True, False):
                starts[with_pyc].append(serve_start(venv, work, with_pyc=with_pyc))
        for with_pyc in (True, False):
            runs = ", ".join(f"{s:.2f}" for s in starts[with_pyc])
            print(f"serve start {'with' if with_pyc else 'without'} .pyc: median "
                  f"{c.median(starts[with_pyc]):.2f} s ({runs})")
        verdict = "PASS" if apparent <= GOAL_BYTES else "FAIL"
        print(f"venv {mb(apparent)} (goal <= {mb(GOAL_BYTES)}): {verdict}")


if __name__ == "__main__":
    main()
