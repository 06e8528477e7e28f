"""Shared helpers for the benchmarks: machine facts, free ports, starting and stopping servers."""

from __future__ import annotations

import http.client
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOOPBACK = "127.0.0.1"
PG_ADMIN_URL = os.environ.get("ONPREM_LABEL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def machine_summary() -> str:
    """One line naming the date, cores, memory, CPU model and Python version."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_mib = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_mib = str(int(line.split()[1]) // 1024)
                break
    except OSError:
        pass
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f"{date}; nproc={os.cpu_count()}; MemTotal={mem_mib} MiB; CPU={cpu}; "
            f"Python {platform.python_version()} ({sys.executable})")


def median(values) -> float:
    """The median of a non-empty sequence."""
    return statistics.median(values)


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def onprem_label_command() -> list[str]:
    """The `onprem-label` console script of the running interpreter's environment."""
    script = Path(sys.executable).parent / "onprem-label"
    if script.exists():
        return [str(script)]
    found = shutil.which("onprem-label")
    if found:
        return [found]
    return [sys.executable, "-m", "onprem_label"]


_PYCACHE_DIR: str | None = None


def set_pycache_dir(path: Path) -> None:
    """Let server processes cache bytecode in `path` (as an installed wheel has it compiled).

    Some shells export PYTHONDONTWRITEBYTECODE, and an editable install has no compiled
    bytecode of its own, so every start would compile the package from source: a cost a
    wheel install (pip compiles at install time) does not pay. A private prefix keeps the
    source tree untouched; the first start fills it and is reported apart as the warm-up.
    """
    global _PYCACHE_DIR
    _PYCACHE_DIR = str(path)


def clean_env() -> dict[str, str]:
    """The environment without any ONPREM_LABEL_* variable, so only our flags count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONPREM_LABEL_")}
    if _PYCACHE_DIR:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = _PYCACHE_DIR
    return env


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


class MachineLoad:
    """Fraction of all cores busy between start() and stop(), to spot other work on the box."""

    def start(self) -> "MachineLoad":
        self._busy0, self._total0 = _cpu_jiffies()
        return self

    def stop(self) -> float:
        busy, total = _cpu_jiffies()
        return (busy - self._busy0) / max(1, total - self._total0)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (its own threads, not its children)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float = 120.0, busy_below: float = 0.10,
                   sample: float = 1.0) -> tuple[float, float]:
    """Wait (at most `max_wait` s) until the machine is nearly idle: (last busy share, s waited).

    The benchmarks share a small machine with whatever else runs there; starting while another
    job keeps the cores busy would measure that job as much as ours.
    """
    start = time.monotonic()
    while True:
        load = MachineLoad().start()
        time.sleep(sample)
        busy = load.stop()
        waited = time.monotonic() - start
        if busy < busy_below or waited >= max_wait:
            return busy, waited


def run_cli(data_dir: Path, *args: str, timeout: float = 120) -> str:
    """Run `onprem-label --data-dir DATA ARGS...`; return stdout, raise on failure."""
    result = subprocess.run([*onprem_label_command(), "--data-dir", str(data_dir), *args],
                            capture_output=True, text=True, timeout=timeout, env=clean_env())
    if result.returncode != 0:
        raise RuntimeError(f"onprem-label {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def http_get_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """Status of one GET on loopback, or None when nothing answers."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def wait_for_status(port: int, path: str, proc: subprocess.Popen, *, timeout: float = 30.0,
                    interval: float = 0.005) -> float:
    """Poll until GET path answers 200; return the monotonic time it did. Bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before answering: "
                               f"{log_tail(proc)}")
        if http_get_status(port, path, timeout=1.0) == 200:
            return time.monotonic()
        time.sleep(interval)
    raise RuntimeError(f"no 200 from {path} on port {port} within {timeout} s: {log_tail(proc)}")


def log_tail(proc: subprocess.Popen, lines: int = 3) -> str:
    """The last lines a process started by start_process wrote."""
    path = getattr(proc, "log_path", None)
    try:
        return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
    except (OSError, TypeError):
        return "(no log)"


def start_process(argv: list[str], log_path: Path,
                  extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server process with its output in a log file (never a pipe that could fill)."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the child's exit; kept for the Popen
    try:
        # A shell without job control starts background jobs with SIGINT ignored, and Python
        # keeps it ignored; restore the default so stop_process's Ctrl+C reaches the server.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env={**clean_env(), **(extra_env or {})},
                                stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        proc.log_path = log_path
        return proc
    finally:
        log.close()


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Ctrl+C the server (clean shutdown), then kill it if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process in bytes, from /proc/<pid>/status VmRSS (given in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def init_data_dir(base: Path) -> Path:
    """`onprem-label init` in base/data (its key file lands beside it as base/data.key)."""
    data = base / "data"
    run_cli(data, "init")
    return data


def site_sessionmaker(data_dir: Path, engine):
    """A sessionmaker on a data directory's database whose sessions seal audit events with its key
    (every event is sealed onto the hash chain at COMMIT; a session without the key cannot record)."""
    from onprem_label.audit.chain import attach
    from onprem_label.audit.site import chain_for
    from onprem_label.config import load_settings
    from onprem_label.db import make_sessionmaker
    from onprem_label.storage import open_keyring

    settings = load_settings({"data_dir": str(data_dir)}, env={})
    maker = make_sessionmaker(engine)
    attach(maker, chain_for(settings, open_keyring(settings)))
    return maker


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A new empty PostgreSQL database (its URL) on the test server, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
