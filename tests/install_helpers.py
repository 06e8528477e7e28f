"""Helpers for the tests that install the package as an operator would (wheel, offline bundle).

Commands run bounded, in a clean environment (no repository, no ONPREM_LABEL_* settings); the
server is driven over real HTTP on loopback by a minimal cookie-keeping browser.
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
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

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


def run(args, *, cwd, env=None, timeout=COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command to completion, bounded, capturing text output."""
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def explain(result: subprocess.CompletedProcess) -> str:
    """A failed command's exit status and the tails of its output, for an assertion message."""
    return (f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}"
            f"\n--- stderr ---\n{result.stderr[-4000:]}")


def user_env(venv: Path) -> dict[str, str]:
    """The environment of an operator who activated the venv: no repo, no ONPREM_LABEL_* settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ONPREM_LABEL_")
           and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONNOUSERSITE"] = "1"  # nothing from ~/.local either
    env["PIP_NO_INPUT"] = "1"
    return env


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


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
                        f"{dump_threads(self.server, self.log)}")

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


def dump_threads(server: subprocess.Popen, log: Path) -> str:
    """The server's log, plus every thread's stack if it is still running (it is stopped by this)."""
    if server.poll() is None:
        server.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER prints all threads, then it dies
        try:
            server.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    return log.read_text(errors="replace")[-20000:]


def wait_healthy(base: str, server: subprocess.Popen, log: Path) -> dict:
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
                f"{dump_threads(server, log)}")


def stop(server: subprocess.Popen) -> None:
    """Terminate the server and wait for it, killing it if it will not stop in time."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=STOP_TIMEOUT)


def init_admin(exe: Path, data: Path, *, cwd: Path, env: dict[str, str]) -> tuple[str, str]:
    """`onprem-label init` on `data`: (admin username, one-time password) from its output."""
    result = run([exe, "--data-dir", data, "init"], cwd=cwd, env=env)
    assert result.returncode == 0, explain(result)
    username = re.search(r"^admin username: (\S+)$", result.stdout, re.M)
    password = re.search(r"^admin one-time password: (\S+)$", result.stdout, re.M)
    assert username and password, explain(result)
    return username.group(1), password.group(1)


def start_server(command: list, *, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `serve` (the full command line) with its output in `log`; faulthandler on for dumps."""
    with log.open("w") as log_file:
        return subprocess.Popen([str(a) for a in command], cwd=cwd,
                                env={**env, "PYTHONFAULTHANDLER": "1"}, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)


def sign_in_and_change_password(browser: Browser, username: str, password: str) -> None:
    """Log in with init's one-time password, get sent to the password page, change it, reach /admin/users."""
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
