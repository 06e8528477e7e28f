"""Tried as a new user would: build the wheel, install it in a fresh venv, init, serve, sign in.

Nothing here imports the source tree into the server: the wheel is built from a copy of the
tree, installed into a new virtualenv, and every command runs from an empty temporary
directory with the repository off `sys.path`. The only network use is pip fetching the
dependencies from the configured index (its cache is reused); the server listens on loopback.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
# Generous bounds: a 2-core CI machine may be busy with the rest of the suite.
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 600
COMMAND_TIMEOUT = 120
START_TIMEOUT = 30
REQUEST_TIMEOUT = 60
STOP_TIMEOUT = 20
# What a copy of the source tree leaves out: local state, caches and earlier build output
# (a stale build/lib would otherwise leak deleted files into the wheel).
NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                                    "*.pyc", ".pytest_cache", "onprem-data", "onprem-data.key")
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
NEW_PASSWORD = "a fresh passphrase chosen at first login"


def _run(args, *, cwd, env=None, timeout=COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command to completion, bounded, capturing text output."""
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _explain(result: subprocess.CompletedProcess) -> str:
    return (f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}"
            f"\n--- stderr ---\n{result.stderr[-4000:]}")


def _user_env(venv: Path) -> dict[str, str]:
    """The environment of an operator who activated the venv: no repo, no ONPREM_LABEL_* settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ONPREM_LABEL_")
           and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONNOUSERSITE"] = "1"  # nothing from ~/.local either
    env["PIP_NO_INPUT"] = "1"
    return env


def _free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _source_files(src: Path) -> set[str]:
    """The paths, inside the wheel, of every file the package and its migrations consist of."""
    expected = set()
    for root, target in ((src / "onprem_label", "onprem_label"),
                         (src / "migrations", "onprem_label/migrations")):
        for path in root.rglob("*"):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") or part == "__pycache__"
                                          for part in rel.parts):
                expected.add(f"{target}/{rel.as_posix()}")
    return expected


# --- fixtures: one wheel and one fresh venv for the whole module ------------------------------

@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """A copy of the source tree as a developer has it, minus local state and build output."""
    src = tmp_path_factory.mktemp("source") / "onprem-label"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    return src


@pytest.fixture(scope="module")
def wheel(source_copy, tmp_path_factory) -> Path:
    """The one wheel `pip wheel .` builds from the source tree (no build isolation: works offline)."""
    out = tmp_path_factory.mktemp("wheelhouse")
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                   "--no-input", ".", "-w", out], cwd=source_copy, timeout=BUILD_TIMEOUT)
    assert result.returncode == 0, "building the wheel failed (dev extra installed?)\n" + _explain(result)
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, f"expected exactly one wheel, got {[w.name for w in wheels]}"
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A new virtualenv with only the wheel (and its dependencies from the index) installed."""
    home = tmp_path_factory.mktemp("newuser")
    venv = home / "venv"
    result = _run([sys.executable, "-m", "venv", venv], cwd=home, timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, "python -m venv failed\n" + _explain(result)
    result = _run([venv / "bin" / "python", "-m", "pip", "install", "--no-input", wheel],
                  cwd=home, env=_user_env(venv), timeout=INSTALL_TIMEOUT)
    assert result.returncode == 0, "pip install of the wheel failed\n" + _explain(result)
    return venv


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An empty current directory for the operator's commands, far from the repository."""
    path = tmp_path / "cwd"
    path.mkdir()
    return path


# --- the wheel ------------------------------------------------------------------------------

def test_wheel_holds_package_migrations_templates_static_and_password_list(wheel, source_copy):
    """One wheel carries every package file: migrations, templates, static files, password list."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        assert len(dist_info) == 1, dist_info
        entry_points = archive.read(f"{dist_info.pop()}/entry_points.txt").decode()
    for required in ("onprem_label/__init__.py", "onprem_label/cli.py",
                     "onprem_label/migrations/env.py", "onprem_label/migrations/script.py.mako",
                     "onprem_label/migrations/versions/0001_initial_schema.py",
                     "onprem_label/web/templates/base.html", "onprem_label/web/templates/login.html",
                     "onprem_label/web/templates/password.html",
                     "onprem_label/web/static/style.css",
                     "onprem_label/auth/data/common-passwords.txt.gz"):
        assert required in names, f"{required} missing from {wheel.name}"
    missing = sorted(_source_files(source_copy) - names)
    assert not missing, (f"source files missing from {wheel.name} "
                         f"(pyproject packages / package-data?): {missing}")
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"onprem_label"}, top
    assert re.search(r"^onprem-label\s*=\s*onprem_label\.cli:main$", entry_points, re.M), entry_points


# --- the installed package ------------------------------------------------------------------

def test_installed_package_runs_from_the_venv_not_the_source_tree(venv, workdir):
    """`onprem-label --help` works, and the code, migrations and password list load from site-packages."""
    env = _user_env(venv)
    result = _run([venv / "bin" / "onprem-label", "--help"], cwd=workdir, env=env)
    assert result.returncode == 0, _explain(result)
    for command in ("init", "serve", "db", "user", "token", "config"):
        assert re.search(rf"^\s+{command}\b", result.stdout, re.M), \
            f"--help lacks {command}:\n{result.stdout}"
    probe = ("import json, onprem_label, sqlalchemy\n"
             "from importlib.resources import files\n"
             "from onprem_label.db import migrate\n"
             "from onprem_label.auth import passwords\n"
             "engine = sqlalchemy.create_engine('sqlite://')\n"
             "print(json.dumps({'package': onprem_label.__file__,\n"
             "  'migrations': str(files('onprem_label.migrations')),\n"
             "  'head': migrate.head_revision(engine),\n"
             "  'common': len(passwords.common_passwords())}))\n")
    result = _run([venv / "bin" / "python", "-c", probe], cwd=workdir, env=env)
    assert result.returncode == 0, _explain(result)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    site = (venv / "lib").resolve()
    for key in ("package", "migrations"):
        path = Path(found[key]).resolve()
        assert site in path.parents, f"{key} loaded from {path}, not from the venv"
        assert REPO not in path.parents, f"{key} loaded from the source tree: {path}"
    assert found["head"], "no migration head found in the installed package"
    assert found["common"] >= 10_000, "the shipped common-password list did not load"


# --- first run: init, serve, sign in, forced password change ----------------------------------

class Browser:
    """A minimal browser over urllib: a cookie jar, no automatic redirects, bounded requests."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None  # hand every 3xx back to the caller

    def __init__(self, base: str, server: subprocess.Popen, log: Path):
        self.base, self.server, self.log = base, server, log
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                  self._NoRedirect())

    def request(self, path: str, form: dict[str, str] | None = None) -> tuple[int, dict, str]:
        """(status, headers, body) for a GET, or a form POST when `form` is given."""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data)
        started = time.monotonic()
        try:
            with self.opener.open(req, timeout=REQUEST_TIMEOUT) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as exc:  # 3xx (redirects are not followed) and 4xx/5xx
            with exc:
                return exc.code, dict(exc.headers), exc.read().decode(errors="replace")
        except OSError as exc:  # refused, reset, or no answer within REQUEST_TIMEOUT
            pytest.fail(f"{'POST' if form is not None else 'GET'} {path}: {exc!r} after "
                        f"{time.monotonic() - started:.1f} s; server log and threads:\n"
                        f"{_dump_threads(self.server, self.log)}")

    def csrf(self, path: str) -> str:
        """GET a page and return the CSRF token of its form."""
        status, _, body = self.request(path)
        assert status == 200, f"GET {path} -> {status}"
        match = CSRF_RE.search(body)
        assert match, f"no csrf_token on {path}"
        return match.group(1)

    def location(self, headers: dict) -> str:
        """The path a redirect points to (absolute or relative Location)."""
        return urllib.parse.urlsplit(urllib.parse.urljoin(self.base + "/", headers["Location"])).path


def _dump_threads(server: subprocess.Popen, log: Path) -> str:
    """The server's log, plus every thread's stack if it is still running (it is stopped by this)."""
    if server.poll() is None:
        server.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER prints all threads, then it dies
        try:
            server.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    return log.read_text(errors="replace")[-20000:]


def _wait_healthy(base: str, server: subprocess.Popen, log: Path) -> dict:
    """Poll /healthz until it answers 200, bounded; fail early if the server died."""
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"serve exited with {server.returncode} before answering:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
                return {"status": response.status, "body": json.loads(response.read())}
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:  # not listening yet
            last = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"/healthz not 200 within {START_TIMEOUT} s (last: {last}):\n"
                f"{_dump_threads(server, log)}")


def _stop(server: subprocess.Popen) -> None:
    """Terminate the server and wait for it, killing it if it will not stop in time."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=STOP_TIMEOUT)


def test_new_user_inits_serves_signs_in_and_must_change_password(venv, workdir):
    """init's one-time password signs in over real HTTP, must be changed, then /admin/users opens."""
    env = _user_env(venv)
    exe = venv / "bin" / "onprem-label"
    data = workdir / "data"

    result = _run([exe, "--data-dir", data, "init"], cwd=workdir, env=env)
    assert result.returncode == 0, _explain(result)
    username = re.search(r"^admin username: (\S+)$", result.stdout, re.M)
    password = re.search(r"^admin one-time password: (\S+)$", result.stdout, re.M)
    assert username and password, _explain(result)
    username, password = username.group(1), password.group(1)
    assert (data / "onprem-label.db").is_file()
    assert data.with_name(data.name + ".key").is_file()

    port = _free_port()
    base = f"http://{LOOPBACK}:{port}"
    log = workdir / "serve.log"
    with log.open("w") as log_file:
        server = subprocess.Popen([str(exe), "--data-dir", str(data), "serve", "--host", LOOPBACK,
                                   "--port", str(port)], cwd=workdir,
                                  env={**env, "PYTHONFAULTHANDLER": "1"},
                                  stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        health = _wait_healthy(base, server, log)
        assert health["status"] == 200 and health["body"]["status"] == "ok", health

        second = _run([exe, "--data-dir", data, "serve", "--host", LOOPBACK, "--port", port],
                      cwd=workdir, env=env)
        assert second.returncode != 0, _explain(second)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and str(port) in lines[0], _explain(second)
        assert server.poll() is None, "the first server died when a second one tried its port"

        browser = Browser(base, server, log)
        token = browser.csrf("/login")
        status, headers, body = browser.request(
            "/login", {"username": username, "password": password, "csrf_token": token})
        assert status in (302, 303), f"login with the printed password -> {status}:\n{body[:2000]}"

        status, headers, _ = browser.request("/")
        assert status in (302, 303) and browser.location(headers) == "/account/password", (status, headers)
        status, headers, _ = browser.request("/admin/users")
        assert status in (302, 303) and browser.location(headers) == "/account/password", (status, headers)

        token = browser.csrf("/account/password")
        status, headers, body = browser.request("/account/password", {
            "current_password": password, "new_password": NEW_PASSWORD,
            "confirm_password": NEW_PASSWORD, "csrf_token": token})
        assert status in (302, 303), f"password change -> {status}:\n{body[:2000]}"
        assert browser.location(headers) == "/admin/users", headers

        status, headers, body = browser.request("/admin/users")
        assert status == 200, (status, headers)
        assert username in body
        status, headers, _ = browser.request("/")
        assert status in (302, 303) and browser.location(headers) == "/admin/users", (status, headers)
    finally:
        _stop(server)

    again = _run([exe, "--data-dir", data, "init"], cwd=workdir, env=env)
    assert again.returncode == 0, _explain(again)
    assert "password" not in again.stdout.lower(), _explain(again)
    assert "already initialised" in again.stdout, _explain(again)
